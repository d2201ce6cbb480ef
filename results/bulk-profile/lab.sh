#!/bin/bash
# The bulk-relevant part of tests/src/lab.rs (node, wire bridge, server, pod 0), same commands,
# for one mode. Usage: lab.sh up|down MODE   (MODE: plain | iptables | datapath | fixed)
# fixed: datapath mode with the binary in $DATAPATH_USER_BIN (a second build, side by side).
# Namespaces: gso<M>-{node,srv,wire,pod0}; bpffs for datapath at /tmp/gsolab-datapath.
set -e
cmd=$1; mode=$2; m=${mode:0:1}
N=gso$m-node S=gso$m-srv W=gso$m-wire P=gso$m-pod0 HV=vgso${m}0
BIN=${DATAPATH_USER_BIN:-target/debug/datapath-user}
MNT=/tmp/gsolab-$mode
x() { ip netns exec "$@"; }
veth() { # a_ns a b_ns b
  ip link add tgso${m}a netns $1 type veth peer name tgso${m}b netns $3
  x $1 ip link set tgso${m}a name $2; x $3 ip link set tgso${m}b name $4
  x $1 ip link set $2 up; x $3 ip link set $4 up
}
if [ "$cmd" = down ]; then
  if [ -f $MNT.pid ]; then kill -TERM $(cat $MNT.pid) 2>/dev/null || true; sleep 1; rm -f $MNT.pid; fi
  for ns in $P $S $W $N; do ip netns del $ns 2>/dev/null || true; done
  if mountpoint -q $MNT; then umount $MNT; fi; rmdir $MNT 2>/dev/null || true
  exit 0
fi
for ns in $N $S $W $P; do ip netns add $ns; x $ns ip link set lo up; done
x $W ip link add br0 type bridge; x $W ip link set br0 up
veth $N eth0 $W p-node; x $W ip link set p-node master br0; x $N ip addr add 192.0.2.10/24 dev eth0
veth $S eth0 $W p-srv;  x $W ip link set p-srv master br0;  x $S ip addr add 192.0.2.20/24 dev eth0
x $N sysctl -qw net.ipv4.ip_forward=1
x $N iptables -I FORWARD 1 -d 169.254.172.0/22 -m conntrack --ctstate NEW -j REJECT
[ $mode = plain ] && x $S ip route add 169.254.172.0/22 via 192.0.2.10
veth $N $HV $P v4if0
x $N ip addr add 169.254.172.1/32 dev $HV scope link
x $N ip route add 169.254.172.2/32 dev $HV scope link
x $P ip addr add 169.254.172.2/22 dev v4if0 noprefixroute
x $P ip route add 169.254.172.1/32 dev v4if0 scope link
x $P ip route add 169.254.172.0/22 via 169.254.172.1 dev v4if0
x $P ip route add default via 169.254.172.1 dev v4if0
if [ $mode = iptables ]; then
  x $N iptables -t nat -N CNI-E4-gso0
  x $N iptables -t nat -A CNI-E4-gso0 -d 224.0.0.0/4 -j ACCEPT
  x $N iptables -t nat -A CNI-E4-gso0 -j SNAT --to-source 192.0.2.10 --random-fully
  x $N iptables -t nat -A POSTROUTING -s 169.254.172.2 -j CNI-E4-gso0
fi
if [ $mode = datapath ] || [ $mode = fixed ]; then
  mkdir -p $MNT; mount -t bpf bpf $MNT
  ip netns exec $N $BIN run --uplink eth0 --pin-path $MNT/pin > $MNT.out 2> $MNT.log &
  echo $! > $MNT.pid
  for i in $(seq 100); do grep -qx ready $MNT.out 2>/dev/null && break; sleep 0.2; done
  grep -qx ready $MNT.out || { echo "daemon not ready"; tail $MNT.log; exit 1; }
  x $N $BIN pod add --ip 169.254.172.2 --host-veth $HV --name default/pod-0 --pin-path $MNT/pin
fi
x $P ping -c1 -W1 192.0.2.20 >/dev/null && echo "$mode up"
