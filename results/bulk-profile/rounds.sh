#!/bin/bash
# ROUNDS rounds of bulk.sh in the three modes, the order rotated each round; one line per run:
# round mode loadavg1 Gbit/s retransmits. Usage: rounds.sh ROUNDS SECONDS [MODES...]
n=$1; t=$2; shift 2; modes=(${@:-plain iptables datapath})
for r in $(seq $n); do
  for k in $(seq 0 $((${#modes[@]}-1))); do
    m=${modes[$(( (k + r) % ${#modes[@]} ))]}
    echo "$r $m $(cut -d' ' -f1 /proc/loadavg) $("$(dirname "$0")"/bulk.sh $m $t)"
  done
done
