#!/usr/bin/env bash
# Server VM: an HTTP server, a UDP echo and iperf3, reachable from the node via the router.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq python3 socat iperf3 nftables
ip route replace 192.0.2.0/24 via 198.51.100.1
mkdir -p /srv/www && echo "hello from 198.51.100.20" > /srv/www/index.html
cat > /etc/systemd/system/lab-services.service <<'UNIT'
[Unit]
Description=Lab services (HTTP :80, UDP echo :5353, iperf3 :5201)
[Service]
ExecStart=/bin/sh -c 'cd /srv/www && (python3 -m http.server 80 &) && (socat UDP-LISTEN:5353,fork EXEC:cat &) && exec iperf3 -s'
[Install]
WantedBy=multi-user.target
UNIT
systemctl daemon-reload && systemctl enable --now lab-services
