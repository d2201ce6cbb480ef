#!/usr/bin/env bash
# Builds a libvirt Vagrant box from the VM lab's cached rootfs (run `cargo xtask vm-lab`
# first), for machines with a real hypervisor:
#
#   sudo cargo xtask vm-lab --kernel 6.1          # builds target/vm-lab/ (and runs the suite)
#   sudo deploy/vm-lab/make-box.sh                # -> target/vm-lab/datapath-vmlab.box
#   vagrant box add --name datapath-vmlab target/vm-lab/datapath-vmlab.box
#   vagrant up --provider libvirt
#
# The box is the same Debian rootfs plus what Vagrant needs (systemd, sshd, sudo, a DHCP
# client, a `vagrant` user with a key generated here); it has no boot loader: the Vagrantfile
# boots the lab's kernel and initramfs directly (libvirt's direct kernel boot). Needs root,
# qemu-img (qemu-utils) and the Debian archive reachable through apt.
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=${CARGO_TARGET_DIR:-$PWD/target}/vm-lab
[ -d "$cache/rootfs" ] || { echo "make-box: $cache/rootfs missing: run cargo xtask vm-lab first" >&2; exit 1; }
stage=$cache/box-rootfs
rm -rf "$stage" && cp -a "$cache/rootfs" "$stage"
cp /etc/resolv.conf "$stage/etc/resolv.conf"
mount -t proc proc "$stage/proc"
trap 'umount "$stage/proc" 2>/dev/null || true' EXIT
chroot "$stage" apt-get install -y -qq --no-install-recommends \
    systemd-sysv openssh-server sudo ifupdown isc-dhcp-client rsync >/dev/null
umount "$stage/proc"
printf 'auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet dhcp\n' >"$stage/etc/network/interfaces"
echo datapath-vmlab >"$stage/etc/hostname"
printf '/dev/vda / ext4 defaults 0 1\n' >"$stage/etc/fstab"
chroot "$stage" useradd -m -s /bin/bash vagrant 2>/dev/null || true
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$stage/etc/sudoers.d/vagrant"
[ -f "$cache/box-key" ] || ssh-keygen -q -t ed25519 -N '' -f "$cache/box-key"
install -d -m 700 -o 1000 -g 1000 "$stage/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$cache/box-key.pub" "$stage/home/vagrant/.ssh/authorized_keys"
mkfs.ext4 -q -F -E root_owner=0:0 -d "$stage" "$cache/box.raw" 8G
qemu-img convert -O qcow2 "$cache/box.raw" "$cache/box.img"
rm -f "$cache/box.raw"
echo '{"provider": "libvirt", "format": "qcow2", "virtual_size": 8}' >"$cache/metadata.json"
tar -C "$cache" -czf "$cache/datapath-vmlab.box" metadata.json box.img
echo "make-box: $cache/datapath-vmlab.box (vagrant box add --name datapath-vmlab $cache/datapath-vmlab.box)"
