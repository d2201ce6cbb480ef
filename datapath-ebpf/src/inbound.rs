//! Packets from the wire to the node's address that belong to pod flows: replies, their later
//! fragments, and ICMP errors about pod flows, reverse-translated and handed to the pod.

use aya_ebpf::programs::TcContext;
use datapath_common::{
    config::Config,
    counters::Counter,
    flow::{FlowKey, FragKey, PROTO_ICMP},
    headers::{Fragment, Ipv4, L4},
    tcp::{self, Direction},
};

use crate::{
    alloc,
    clock::now_ns,
    conntrack,
    flow_ref::{BindingRef, FlowRef},
    forward, icmp,
    maps::{count, FRAGMENTS},
    nat::{self, Side, Ttl},
    node,
    verdict::pass,
};

/// A TCP/UDP packet or echo reply to the node's address: reverse-translated to the pod whose
/// binding its tuple is, handed to the node's own connection, or (no binding) passed to the
/// node or dropped.
///
/// One map lookup in the common case: while the binding is fresh (a reply took the full path
/// within the revalidation interval and found the flow settled), a reply that cannot change
/// the flow's state is counted and delivered from the binding alone. The rest, and one reply
/// per interval, also look up the flow: expiry, the state machine, the fragment train.
#[inline(always)]
pub fn reply(ctx: &TcContext, cfg: &Config, ip: &Ipv4, l4: &L4) -> Result<i32, Counter> {
    let tuple = FlowKey::from_packet(ip, l4);
    let Some(binding) = BindingRef::find(&tuple) else {
        return untracked(ctx, cfg, ip, l4, &tuple);
    };
    let pod_key = binding.owner();
    if pod_key.src_ip == cfg.node_ip {
        // One of the node's own connections (tracked at egress).
        node::to_node(ctx, ip, l4, &pod_key);
        return pass(Counter::PassNode);
    }
    let now = now_ns();
    if binding.is_fresh(now) && ip.fragment == Fragment::Whole && !tcp::changes_state(l4.tcp_flags)
    {
        forward::check_hop_limit(ip)?;
        binding.count_reply(ip.l3_len, now);
        to_pod_address(ctx, ip, l4, &pod_key)?;
        return forward::to_pod(ctx, binding.delivery());
    }
    let flow = conntrack::for_binding(&pod_key, &tuple)?;
    // As nf_conntrack treats an entry past its timeout: it matches nothing, removed yet or
    // not (the sweep reaches large tables less often).
    if flow.is_expired(binding, ip.proto, &cfg.timeouts, now) {
        count(Counter::ExpiredFlowHit);
        return untracked(ctx, cfg, ip, l4, &tuple);
    }
    forward::check_hop_limit(ip)?;
    binding.count_reply(ip.l3_len, now);
    flow.account_reply(ip.proto, l4.tcp_flags, now);
    let delivery = flow.delivery();
    if flow.is_settled(ip.proto) {
        binding.revalidate(delivery, now);
    }
    if ip.fragment == Fragment::First {
        let _ = FRAGMENTS.insert(FragKey::from_packet(ip), pod_key, 0);
    }
    to_pod_address(ctx, ip, l4, &pod_key)?;
    forward::to_pod(ctx, delivery)
}

/// Rewrites a reply's destination to the pod's address and port (`pod_key`'s source).
#[inline(always)]
fn to_pod_address(ctx: &TcContext, ip: &Ipv4, l4: &L4, pod_key: &FlowKey) -> Result<(), Counter> {
    nat::rewrite(
        ctx,
        ip,
        Some(l4),
        Side::Destination,
        (pod_key.src_ip, pod_key.src_port),
        Ttl::Decrement,
    )?;
    count(Counter::TranslatedIn);
    Ok(())
}

/// A packet to the node's address that no live flow owns: the node's, unless it is to a NAT
/// port no node socket holds (dropped, as the iptables mode's REJECT would). Migrating from
/// iptables, the kernel's conntrack may own it: then it is left to the kernel.
#[inline(always)]
fn untracked(
    ctx: &TcContext,
    cfg: &Config,
    ip: &Ipv4,
    l4: &L4,
    tuple: &FlowKey,
) -> Result<i32, Counter> {
    if ip.proto != PROTO_ICMP
        && cfg.port_in_range(l4.dst_port)
        && !cfg.pass_untracked_inbound()
        && !alloc::node_socket_owns_reply(ctx.skb.skb, tuple)
    {
        return Err(Counter::DropUntrackedInbound);
    }
    pass(Counter::PassNode)
}

/// A non-first fragment to the node's address: translated to the pod when its first fragment
/// was (no ports: the address only).
#[inline(always)]
pub fn later_fragment(ctx: &TcContext, ip: &Ipv4) -> Result<i32, Counter> {
    // SAFETY: a FRAGMENTS value, valid while the program runs; copied out at once.
    let Some(pod_key) = (unsafe { FRAGMENTS.get(FragKey::from_packet(ip)) }).copied() else {
        return pass(Counter::PassFragmentUntracked);
    };
    let Some(flow) = FlowRef::find(&pod_key) else {
        return pass(Counter::PassFragmentUntracked);
    };
    forward::check_hop_limit(ip)?;
    flow.account(ip.proto, Direction::In, ip.l3_len, 0, now_ns());
    nat::rewrite(
        ctx,
        ip,
        None,
        Side::Destination,
        (pod_key.src_ip, 0),
        Ttl::Decrement,
    )?;
    count(Counter::FragmentIn);
    forward::to_pod(ctx, flow.delivery())
}

/// An ICMP error to the node's address: translated outer and inner (RFC 5508) when it is about
/// a pod flow; the node's otherwise.
#[inline(always)]
pub fn icmp_error(ctx: &TcContext, cfg: &Config, ip: &Ipv4) -> Result<i32, Counter> {
    let emb = match icmp::embedded(ctx, ip) {
        Ok(emb) => emb,
        // Not about a flow we could have made: the node's business.
        Err(Counter::DropIcmpUntracked) => return pass(Counter::PassNode),
        Err(other) => return Err(other),
    };
    let Some(binding) = BindingRef::find(&emb.binding_key()) else {
        return pass(Counter::PassNode);
    };
    let pod_key = binding.owner();
    if pod_key.src_ip == cfg.node_ip {
        // About a node connection: the node's, untouched (the rare translated one's quoted
        // port stays as sent; the kernel then finds no socket for it).
        return pass(Counter::PassNode);
    }
    let Some(flow) = FlowRef::find(&pod_key) else {
        return pass(Counter::PassNode);
    };
    let now = now_ns();
    if flow.is_expired(binding, pod_key.proto, &cfg.timeouts, now) {
        count(Counter::ExpiredFlowHit);
        return pass(Counter::PassNode);
    }
    forward::check_hop_limit(ip)?;
    flow.account_icmp_error(ip.l3_len, now);
    icmp::translate(
        ctx,
        ip,
        &emb,
        Side::Destination,
        pod_key.src_ip,
        Side::Source,
        pod_key.src_ip,
        pod_key.src_port,
    )?;
    forward::decrement_ttl(ctx, ip)?;
    count(Counter::IcmpErrorIn);
    forward::to_pod(ctx, flow.delivery())
}
