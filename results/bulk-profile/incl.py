#!/usr/bin/env python3
"""Inclusive ms per GB of chosen kernel functions (samples of our iperf3 processes whose
stack contains the function), per mode. Usage: incl.py OUT[,OUT...] MODE..."""
import sys
from classify import per_gb

FUNCS = ["skb_gso_segment", "__skb_gso_segment", "skb_segment", "validate_xmit_skb",
         "skb_checksum_help", "bpf_l4_csum_replace", "bpf_l3_csum_replace", "bpf_skb_store_bytes",
         "bpf_skb_pull_data", "skb_ensure_writable", "pskb_expand_head", "skb_cow_data",
         "bpf_skb_fib_lookup", "fib_table_lookup", "bpf_redirect", "skb_do_redirect",
         "bpf_redirect_peer", "bpf_redirect_neigh", "skb_gso_validate_network_len", "is_skb_forwardable",
         "bpf_skb_check_mtu", "nf_conntrack_in", "nf_hook_slow", "ip_forward", "tcp_wfree",
         "tcp_sacktag_write_queue", "tcp_retransmit_skb", "tcp_data_queue_ofo", "tail_call"]

def count(c, comm, pid, frames, pids):
    if pid in pids:
        s = set(frames)
        for f in FUNCS:
            if f in s:
                c[f] += 1

outs, modes = sys.argv[1], sys.argv[2:]
res, gbs, _ = per_gb(outs, modes, count)
print(f"| {'function (inclusive)':<30} | " + " | ".join(f"{m:>9}" for m in modes) + " |")
for f in FUNCS:
    if any(res[m][f] for m in modes):
        print(f"| {f:<30} | " + " | ".join(f"{res[m][f]/gbs[m]:9.2f}" for m in modes) + " |")
