#!/bin/bash
# One iperf3 run (one stream, pod 0 -> server, as xtask's bench) in MODE for SECONDS;
# prints Gbit/s received, the sender's retransmits and the server's out-of-order queueings
# (TcpExtTCPOFOQueue delta). Usage: bulk.sh MODE [SECONDS]
mode=$1; m=${mode:0:1}; t=${2:-5}
ofo() { ip netns exec gso$m-srv nstat -az TcpExtTCPOFOQueue | awk '/TcpExtTCPOFOQueue/ {print $2}'; }
o1=$(ofo)
ip netns exec gso$m-srv iperf3 -s -1 -B 192.0.2.20 >/dev/null 2>&1 &
srv=$!
sleep 0.3
ip netns exec gso$m-pod0 iperf3 -c 192.0.2.20 -t $t -J > /tmp/gso-iperf-$m.json
wait $srv
o2=$(ofo)
python3 -c "import json;d=json.load(open('/tmp/gso-iperf-$m.json'));print('%.2f'%(d['end']['sum_received']['bits_per_second']/1e9), d['end']['sum_sent'].get('retransmits'), $o2-$o1)"
