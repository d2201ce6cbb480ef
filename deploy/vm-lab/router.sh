#!/bin/bash
# vm-lab router: forwards between the node's link (192.0.2.0/24) and the server's 1280-byte
# link (198.51.100.0/24). It also plays the outside world sending what the node must drop:
# pod IPv4 from the wire (cross-node) and UDP to a NAT port with no flow.
ip route add 169.254.172.0/22 via 192.0.2.10
echo "vmlab: router ready"
while true; do
    ping -c 1 -W 1 169.254.172.2 >/dev/null 2>&1
    echo probe | socat -u - UDP:192.0.2.10:20000 2>/dev/null
    sleep 2
done
