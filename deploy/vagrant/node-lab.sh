#!/usr/bin/env bash
# On the node VM: pods as namespaces wired as the egress-v4 plugin wires them, the node
# agent's FORWARD REJECT rule, and either the datapath or the iptables egress-v4 SNAT chains.
#   node-lab.sh datapath|iptables [pods]     node-lab.sh down
set -euo pipefail
mode=${1:-datapath}
pods=${2:-3}
bin=/vagrant/target/release/datapath-user
uplink=$(ip -o -4 addr show | awk '/192\.0\.2\.10\//{print $2}')

down() {
  pkill -f "datapath-user run" || true
  sleep 1
  "$bin" detach >/dev/null 2>&1 || true
  for ns in $(ip netns list | awk '/^vpod/{print $1}'); do ip netns del "$ns"; done
  iptables -t nat -S | awk '/CNI-E4-vpod/ && /^-A POSTROUTING/{sub("-A","-D"); print}' | while read -r rule; do iptables -t nat $rule; done
  for c in $(iptables -t nat -S | awk '/^-N CNI-E4-vpod/{print $2}'); do iptables -t nat -F "$c"; iptables -t nat -X "$c"; done
  iptables -D FORWARD -d 169.254.172.0/22 -m conntrack --ctstate NEW -j REJECT 2>/dev/null || true
}

if [ "$mode" = down ]; then down; exit 0; fi
down
sysctl -qw net.ipv4.ip_forward=1
iptables -I FORWARD 1 -d 169.254.172.0/22 -m conntrack --ctstate NEW -j REJECT
if [ "$mode" = datapath ]; then
  nohup "$bin" run --uplink "$uplink" >/var/log/datapath.log 2>&1 &
  sleep 3
fi
for i in $(seq 0 $((pods - 1))); do
  ns=vpod$i; ip=169.254.172.$((i + 2)); veth=vethvpod$i
  ip netns add "$ns"
  ip link add "$veth" type veth peer name v4if0 netns "$ns"
  ip link set "$veth" up
  ip addr add 169.254.172.1/32 dev "$veth" scope link
  ip route add "$ip/32" dev "$veth" scope link
  ip -n "$ns" addr add "$ip/22" dev v4if0 noprefixroute
  ip -n "$ns" link set v4if0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" route add 169.254.172.1/32 dev v4if0 scope link
  ip -n "$ns" route add 169.254.172.0/22 via 169.254.172.1 dev v4if0
  ip -n "$ns" route add default via 169.254.172.1 dev v4if0
  if [ "$mode" = datapath ]; then
    "$bin" pod add --ip "$ip" --host-veth "$veth" --name "default/vpod$i"
  else
    chain=CNI-E4-vpod$i
    iptables -t nat -N "$chain"
    iptables -t nat -A "$chain" -d 224.0.0.0/4 -j ACCEPT
    iptables -t nat -A "$chain" -j SNAT --to-source 192.0.2.10 --random-fully
    iptables -t nat -A POSTROUTING -s "$ip" -j "$chain"
  fi
done
echo "lab up in $mode mode with $pods pods (uplink $uplink)"
