#!/usr/bin/env bash
# Node VM: the toolchain and the project, built with the same xtask commands as anywhere.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq curl build-essential git
ip route replace 198.51.100.0/24 via 192.0.2.1
if ! command -v cargo >/dev/null && [ ! -x /root/.cargo/bin/cargo ]; then
  curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
  /root/.cargo/bin/rustup toolchain install nightly --profile minimal
fi
export PATH=/root/.cargo/bin:$PATH
cd /vagrant
cargo xtask setup
cargo build --release -p datapath-user
