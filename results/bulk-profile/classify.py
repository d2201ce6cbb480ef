#!/usr/bin/env python3
"""Splits the perf samples of our iperf3 processes (and ksoftirqd) by where in the path they fall.

Usage: classify.py OUT[,OUT...] MODE...  (reads OUT-MODE.data/.json/.pids from profile.sh;
several OUTs are added up)
Each sample is 1/999 s of one CPU. A hop is everything above the innermost process_backlog
(one veth hand-over each: node, wire bridge, server / pod)."""
import json, subprocess, sys, collections

HOP_RULES = [  # first match wins, checked against the frames of the innermost hop
    ("dp: tc_from_pod_slow", ["tc_from_pod_slow"]),
    ("dp: tc_from_pod", ["_tc_from_pod"]),
    ("dp: tc_uplink_ingress", ["tc_uplink_ingress"]),
    ("dp: tc_uplink_egress", ["tc_uplink_egress"]),
    ("dp: redirect (skb_do_redirect)", ["skb_do_redirect"]),
    ("node: ip_forward (+nf, output)", ["ip_forward"]),
    ("wire: bridge", ["br_handle_frame"]),
    ("local TCP rx (server data, pod ACKs)", ["ip_local_deliver", "tcp_v4_rcv", "ip_local_deliver_finish", "tcp_v4_early_demux"]),
    ("node: prerouting conntrack, route lookup", ["nf_hook_slow", "ip_route_input"]),
    ("ip_rcv, other (node forwarding or local delivery)", ["ip_rcv", "ip_rcv_finish", "ip_sabotage_in"]),
]

def classify(frames):
    # frames: leaf first
    names = [f for f in frames]
    try:
        cut = next(i for i, n in enumerate(names) if n == "process_backlog")
    except StopIteration:
        s = set(names)
        if "tcp_sendmsg" in s or "tcp_sendmsg_locked" in s:
            return "sender: tcp_sendmsg (copy, segments built)"
        if "tcp_recvmsg" in s:
            return "receiver: tcp_recvmsg (copy)"
        if "net_rx_action" in s:
            return "softirq, other"
        return "other (select, scheduling, user space, timers)"
    hop = set(names[:cut])
    for name, keys in HOP_RULES:
        if any(any(k in n for n in hop) for k in keys):
            return name
    return "rx core (netif_receive, backlog)"

def samples(path):
    out = subprocess.run(["perf", "script", "-i", path, "-F", "comm,pid,ip,sym"],
                         capture_output=True, text=True).stdout
    for block in out.split("\n\n"):
        lines = block.strip().split("\n")
        if not lines or not lines[0].strip():
            continue
        head = lines[0].split()
        comm, pid = head[0], head[1] if len(head) > 1 else "0"
        frames = []
        for l in lines[1:]:
            parts = l.split(None, 1)
            if len(parts) == 2:
                frames.append(parts[1].split("+")[0].strip())
        yield comm, int(pid) if pid.isdigit() else 0, frames

def runs(outs, mode):
    """Each run OUT of `outs` (comma-separated) in `mode`: the pids of our two iperf3 processes
    (server, client), what iperf3 received, and the perf samples."""
    for prefix in outs.split(","):
        srv, cli = (int(p) for p in open(f"{prefix}-{mode}.pids").read().split())
        received = json.load(open(f"{prefix}-{mode}.json"))["end"]["sum_received"]
        yield (srv, cli), received, samples(f"{prefix}-{mode}.data")

def per_gb(outs, modes, count):
    """For each mode: a Counter filled by `count(counter, comm, pid, frames, (srv, cli))` over
    every sample of its runs, the GB received and the seconds it took."""
    res, gbs, secs = {}, {}, {}
    for mode in modes:
        c, gb, seconds = collections.Counter(), 0.0, 0.0
        for pids, received, run_samples in runs(outs, mode):
            gb += received["bytes"] / 1e9
            seconds += received["seconds"]
            for comm, pid, frames in run_samples:
                count(c, comm, pid, frames, pids)
        res[mode], gbs[mode], secs[mode] = c, gb, seconds
    return res, gbs, secs

def count_where(c, comm, pid, frames, pids):
    srv, cli = pids
    if pid in pids:
        c[classify(frames)] += 1
        c["TOTAL (our iperf3 processes)"] += 1
        c["  of which in the sender (pod 0, iperf3 -c)" if pid == cli else "  of which in the receiver (server, iperf3 -s)"] += 1
    elif comm.startswith("ksoftirqd"):
        c["ksoftirqd (any traffic): " + classify(frames)] += 1

def main():
    out, modes = sys.argv[1], sys.argv[2:]
    table, gb, secs = per_gb(out, modes, count_where)
    rate = {m: gb[m] * 8 / secs[m] for m in modes}
    keys = sorted({k for c in table.values() for k in c}, key=lambda k: -max(t[k] for t in table.values()))
    print("CPU ms per GB received (samples at 999 Hz / GB); Gbit/s: " +
          ", ".join(f"{m} {rate[m]:.2f}" for m in modes))
    print(f"| {'where':<50} | " + " | ".join(f"{m:>9}" for m in modes) + " |")
    print(f"| {'-'*50} | " + " | ".join("-"*9 for m in modes) + " |")
    for k in keys:
        print(f"| {k:<50} | " + " | ".join(f"{table[m][k]/gb[m]:9.2f}" for m in modes) + " |")

if __name__ == "__main__":
    main()
