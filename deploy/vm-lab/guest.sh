#!/bin/bash
# vm-lab guest entry (PID 1 after the initramfs): mounts, then network by role, then the
# role's script. The payload disk (this directory) is mounted read-only at /vmlab. The VM
# stops itself (reboot with QEMU's -no-reboot) when its script returns.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm && mount -t devpts devpts /dev/pts && mount -t tmpfs tmpfs /dev/shm
mount -t bpf bpf /sys/fs/bpf
ln -sf /proc/self/fd /dev/fd 2>/dev/null
role=$(sed -n 's/.*vmlab\.role=\([a-z]*\).*/\1/p' /proc/cmdline)
hostname "$role"
echo "vmlab: $role booted on $(uname -r)"
ip link set lo up

stop() {
    sync
    echo b >/proc/sysrq-trigger
    sleep 10
}

case "$role" in
node)
    ip link set eth0 up
    ip addr add 192.0.2.10/24 dev eth0
    ip route add default via 192.0.2.1
    bash /vmlab/node-suite.sh
    ;;
router)
    ip link set eth0 up
    ip link set eth1 mtu 1280 up
    ip addr add 192.0.2.1/24 dev eth0
    ip addr add 198.51.100.1/24 dev eth1
    sysctl -qw net.ipv4.ip_forward=1
    bash /vmlab/router.sh
    ;;
server)
    ip link set eth0 mtu 1280 up
    ip addr add 198.51.100.20/24 dev eth0
    # A 1460-byte MSS as a host behind a smaller link advertises: senders must learn the
    # 1280-byte path MTU from the router's fragmentation-needed.
    ip route add default via 198.51.100.1 advmss 1460
    bash /vmlab/server.sh
    ;;
*)
    echo "vmlab: unknown role '$role'"
    ;;
esac
stop
