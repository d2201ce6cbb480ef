#!/bin/bash
# Packets the datapath's programs translate during one bulk run in MODE (datapath | fixed):
# translated_out (pod -> wire) and translated_in (replies), per second and bytes per packet.
mode=$1; m=${mode:0:1}; t=${2:-5}
BIN=$(tr '\0' ' ' < /proc/$(cat /tmp/gsolab-$mode.pid)/cmdline | cut -d' ' -f1)
c() { ip netns exec gso$m-node $BIN stats -o json --pin-path /tmp/gsolab-$mode/pin |
      python3 -c "import json,sys;d=json.load(sys.stdin);c={x['name']:x['value'] for x in d['counters']};print(c['translated_out'],c['translated_in'])"; }
read o1 i1 < <(c)
r=$(./bulk.sh $mode $t)
read o2 i2 < <(c)
python3 - <<PY
import json
d=json.load(open('/tmp/gso-iperf-$m.json'))['end']
sent=d['sum_sent']['bytes']; secs=d['sum_sent']['seconds']
out=$o2-$o1; inn=$i2-$i1
print(f"$mode: {d['sum_received']['bits_per_second']/1e9:.2f} Gbit/s; pod->wire packets {out} ({out/secs:,.0f}/s, {sent/out:,.0f} payload bytes each); replies {inn} ({inn/secs:,.0f}/s)")
PY
