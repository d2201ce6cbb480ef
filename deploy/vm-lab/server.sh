#!/bin/bash
# vm-lab server (198.51.100.20): the services the node's suite talks to.
#   7000/tcp  replies with the SHA-256 of what it received (upload check)
#   7001/tcp  sends /vmlab/blob (download check)
#   7002/udp  echo
#   7003/udp  echo with replies sent at TTL 2 (they reach the node with TTL 1)
#   7004/udp  echo with replies sent at TTL 3 (the control for 7003)
#   5201/tcp  iperf3
socat TCP-LISTEN:7000,fork,reuseaddr SYSTEM:sha256sum &
socat -U TCP-LISTEN:7001,fork,reuseaddr OPEN:/vmlab/blob,rdonly &
socat UDP-LISTEN:7002,fork,reuseaddr PIPE &
socat UDP-LISTEN:7003,fork,reuseaddr,ip-ttl=2 PIPE &
socat UDP-LISTEN:7004,fork,reuseaddr,ip-ttl=3 PIPE &
iperf3 -s -D
echo "vmlab: server ready"
wait
