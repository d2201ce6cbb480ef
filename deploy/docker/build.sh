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
# Runs the image with no network. In a private mount namespace with cgroup2 at
# /sys/fs/cgroup (crun refuses a hybrid v1/v2 layout), no cgroup of its own and rlimits at
# most this shell's (CI machines may not allow raising them).
prun() {
    unshare -m sh -ec '
        mount --make-rprivate /
        [ "$(stat -f -c %T /sys/fs/cgroup)" = cgroup2fs ] || mount -t cgroup2 none /sys/fs/cgroup
        exec podman run --rm --network=none --cgroups=disabled \
            --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096 "$@"' prun "$@"
}
prun "$image" --version
prun "$image" run --help | grep -q -- '--cni-conf-dir'
prun --entrypoint /usr/local/bin/datapath-cni "$image" --version
if prun --entrypoint /bin/sh "$image" -c true 2>/dev/null; then
    echo "image: has a shell" >&2
    exit 1
fi
podman image inspect "$image" --format 'image {{.Id}}: {{.Size}} bytes'
