#!/bin/bash
# CPU seconds (user+system) the lab's datapath-user daemon used while CMD ran.
pid=$(cat /tmp/gsolab-datapath.pid)
t() { awk '{print $14+$15}' /proc/$pid/stat; }
a=$(t); s=$(date +%s.%N); "$@"; b=$(t); e=$(date +%s.%N)
echo "daemon cpu: $(python3 -c "print('%.1f%% of a core over %.1f s' % (($b-$a)/$(getconf CLK_TCK)/($e-$s)*100, $e-$s))")"
