#!/usr/bin/env bash
# Builds the datapath image from this repository with no network access for the image build:
# static (musl) binaries, FROM scratch, then smoke-tests it (`--version`, `run --help`, the
# plugin's `--version`, no shell inside). Needs podman (Debian: apt-get install podman).
#   deploy/docker/build.sh [IMAGE]        default IMAGE: datapath:dev
set -euo pipefail
cd "$(dirname "$0")/../.."
image=${1:-datapath:dev}
target=x86_64-unknown-linux-musl
target_dir=${CARGO_TARGET_DIR:-$PWD/target}

rustup target list --installed | grep -qx "$target" || rustup target add "$target"
cargo build --release --target "$target" -p datapath-user
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for bin in datapath-user datapath-cni; do
    cp "$target_dir/$target/release/$bin" "$stage/"
    # Static: no program interpreter, no shared libraries.
    if readelf -lW "$stage/$bin" | grep -q 'Requesting program interpreter'; then
        echo "image: $bin is dynamically linked" >&2
        exit 1
    fi
done
cp deploy/docker/Dockerfile "$stage/"
podman build --network=none --pull=never -t "$image" "$stage"

echo "==> smoke test of $image"
podman run --rm --network=none "$image" --version
podman run --rm --network=none "$image" run --help | grep -q -- '--cni-conf-dir'
podman run --rm --network=none --entrypoint /usr/local/bin/datapath-cni "$image" --version
if podman run --rm --network=none --entrypoint /bin/sh "$image" -c true 2>/dev/null; then
    echo "image: has a shell" >&2
    exit 1
fi
podman image inspect "$image" --format 'image {{.Id}}: {{.Size}} bytes'
