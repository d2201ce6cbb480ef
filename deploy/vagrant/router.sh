#!/usr/bin/env bash
# Router VM: forwards between the node's network and the server's, with a 1280-byte MTU on
# the server side so PMTU discovery is exercised.
set -euo pipefail
sysctl -qw net.ipv4.ip_forward=1
far=$(ip -o -4 addr show | awk '/198\.51\.100\.1\//{print $2}')
ip link set "$far" mtu 1280
