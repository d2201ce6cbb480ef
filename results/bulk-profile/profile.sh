#!/bin/bash
# perf record -a -g (cpu-clock, 999 Hz) over a whole iperf3 run in MODE; writes
# OUT-MODE.data and OUT-MODE.json (iperf3 -J), OUT-MODE.pids (our iperf3 pids).
# Usage: profile.sh MODE OUT [SECONDS]
mode=$1; m=${mode:0:1}; out=$2; t=${3:-8}
ip netns exec gso$m-srv iperf3 -s -1 -B 192.0.2.20 >/dev/null 2>&1 &
srv=$!
sleep 0.3
perf record -a -g -F 999 -o $out-$mode.data >/dev/null 2>&1 &
perf=$!
sleep 0.2
ip netns exec gso$m-pod0 iperf3 -c 192.0.2.20 -t $t -J > $out-$mode.json &
cli=$!
echo "$srv $cli" > $out-$mode.pids
wait $cli; kill -INT $perf; wait $perf; wait $srv
echo "$mode load=$(cut -d' ' -f1 /proc/loadavg) $(python3 -c "import json;d=json.load(open('$out-$mode.json'));print('%.2f Gbit/s'%(d['end']['sum_received']['bits_per_second']/1e9), 'retrans', d['end']['sum_sent'].get('retransmits'))")"
