//! TC programs of the pod IPv4 egress datapath: the entry points and the checks that send a
//! packet down its path (`outbound`, `inbound`, `node`). Each entry point returns the verdict
//! of its `try_*` function, which is the action or the drop counter (`verdict`).
#![no_std]
#![no_main]
// Atomic adds on flow counters: the BPF target has no core::sync::atomic read-modify-write.
#![allow(internal_features)]
#![feature(core_intrinsics, asm_experimental_arch)]
// Everything inlines into the three programs: BPF-to-BPF calls would cost verifier state and
// stack, and the helpers here are a few instructions each.
#![allow(clippy::inline_always)]
// Entry points take the context by value (the classifier macro's signature); struct sizes
// passed to helpers are small constants.
#![allow(clippy::needless_pass_by_value, clippy::cast_possible_wrap)]

mod alloc;
mod clock;
mod conntrack;
mod csum;
mod flow_ref;
mod forward;
mod icmp;
mod inbound;
mod maps;
mod nat;
mod node;
mod outbound;
mod parse;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use datapath_common::{
    counters::Counter,
    flow::PROTO_ICMP,
    headers::Fragment,
    ipv4::{is_link_local, is_multicast_or_broadcast},
};

use crate::{
    maps::{any_registered_pod, config, registered_pod, SLOW_PATH},
    parse::{ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST},
    verdict::{pass, PASS},
};

/// TC ingress of a pod's host veth: anti-spoofing, pod-to-pod drop, SNAT and redirect to the
/// uplink.
#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    verdict::of(try_from_pod(&ctx))
}

fn try_from_pod(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(ip) = parse::ipv4(ctx)? else {
        return pass(Counter::PassNonIpv4);
    };
    let ifindex = parse::ifindex(ctx);
    if let Some(verdict) = outbound::established(ctx, &ip, ifindex)? {
        return Ok(verdict);
    }
    let cfg = config()?;
    if !cfg.pod_cidr.contains(ip.src) {
        return Err(Counter::DropSpoofedSource);
    }
    if is_multicast_or_broadcast(ip.dst) {
        registered_pod(ip.src, ifindex)?;
        return pass(Counter::PassMulticast);
    }
    if cfg.pod_cidr.contains(ip.dst) {
        if ip.dst != cfg.gateway_ip {
            return Err(Counter::DropPodToPod);
        }
        registered_pod(ip.src, ifindex)?;
        return pass(Counter::PassLocal);
    }
    registered_pod(ip.src, ifindex)?;
    if ip.fragment == Fragment::Later {
        return outbound::later_fragment(ctx, &ip, cfg.node_ip, ifindex);
    }
    let l4 = parse::l4(ctx, &ip)?;
    if ip.proto == PROTO_ICMP && l4.icmp_type != ICMP_ECHO_REQUEST {
        return outbound::icmp_error(ctx, &ip, &l4, ifindex);
    }
    // SAFETY: `ctx` is this program's context; on success the call does not return.
    unsafe { SLOW_PATH.tail_call(ctx, 0) };
    // Only reachable if the slow path is not installed: the host stack forwards the packet
    // and the uplink's egress program translates it.
    pass(Counter::PassHostStack)
}

/// Tail-called by `tc_from_pod` for a packet from a validated pod whose flow is new or whose
/// cached route is stale: FIB lookup, flow creation with port allocation, rewrite, redirect.
#[classifier]
pub fn tc_from_pod_slow(ctx: TcContext) -> i32 {
    verdict::of(try_from_pod_slow(&ctx))
}

fn try_from_pod_slow(ctx: &TcContext) -> Result<i32, Counter> {
    // Parsed again: a tail call keeps only the packet. The caller checked everything else.
    // One match for both: separate early returns cost this program 24 bytes of stack, which
    // the port probe's callback chain cannot spare on 6.1.
    let (ip, cfg) = match (parse::ipv4(ctx)?, config()) {
        (Some(ip), Ok(cfg)) => (ip, cfg),
        (None, _) => return Err(Counter::DropInternal),
        (_, Err(not_configured)) => return Err(not_configured),
    };
    let l4 = parse::l4(ctx, &ip)?;
    outbound::routed(ctx, cfg, &ip, &l4, parse::ifindex(ctx))
}

/// TC ingress of the uplink: reverse translation of replies and ICMP errors, redirect to the
/// pod; drop of pod-range IPv4 from the wire; everything else passes untouched.
#[classifier]
pub fn tc_uplink_ingress(ctx: TcContext) -> i32 {
    verdict::of(try_uplink_ingress(&ctx))
}

fn try_uplink_ingress(ctx: &TcContext) -> Result<i32, Counter> {
    let Some(ip) = parse::ipv4(ctx)? else {
        return pass(Counter::PassNonIpv4);
    };
    // Unconfigured, the uplink must not lose the node's own traffic.
    let Ok(cfg) = config() else {
        return Ok(PASS);
    };
    if cfg.pod_cidr.contains(ip.dst) {
        return Err(Counter::DropCrossNode);
    }
    if ip.dst != cfg.node_ip {
        return pass(Counter::PassNode);
    }
    if ip.fragment == Fragment::Later {
        return inbound::later_fragment(ctx, &ip);
    }
    let l4 = match parse::l4(ctx, &ip) {
        Ok(l4) => l4,
        Err(Counter::DropUnsupportedProtocol) => return pass(Counter::PassNode),
        Err(other) => return Err(other),
    };
    if ip.proto == PROTO_ICMP {
        if parse::is_icmp_error(l4.icmp_type) {
            return inbound::icmp_error(ctx, cfg, &ip);
        }
        if l4.icmp_type != ICMP_ECHO_REPLY {
            return pass(Counter::PassNode);
        }
    }
    inbound::reply(ctx, cfg, &ip, &l4)
}

/// TC egress of the uplink: the safety net for pod packets that went through the host stack
/// untranslated (the pod-side program handed them over, or was not attached yet).
#[classifier]
pub fn tc_uplink_egress(ctx: TcContext) -> i32 {
    verdict::of(try_uplink_egress(&ctx))
}

fn try_uplink_egress(ctx: &TcContext) -> Result<i32, Counter> {
    let Ok(Some(ip)) = parse::ipv4(ctx) else {
        return Ok(PASS);
    };
    let Ok(cfg) = config() else {
        // Without a configuration nothing can be translated; a link-local source (every pod
        // range is one) must not leave the node as it is.
        if is_link_local(ip.src) {
            return Err(Counter::DropNotConfigured);
        }
        return Ok(PASS);
    };
    // The node's own traffic: the common case. Only what the node itself sends from its NAT
    // address (no ingress interface: not a packet the datapath redirected) is looked at.
    if !cfg.pod_cidr.contains(ip.src) {
        if ip.src == cfg.node_ip && parse::ingress_ifindex(ctx) == 0 {
            node::from_node(ctx, cfg, &ip);
        }
        return Ok(PASS);
    }
    let pod = any_registered_pod(ip.src)?;
    if is_multicast_or_broadcast(ip.dst) {
        return pass(Counter::PassMulticast);
    }
    if cfg.pod_cidr.contains(ip.dst) {
        return Err(Counter::DropPodToPod);
    }
    if ip.fragment == Fragment::Later {
        return outbound::later_fragment_at_egress(ctx, &ip, cfg.node_ip);
    }
    let l4 = parse::l4(ctx, &ip)?;
    if ip.proto == PROTO_ICMP && l4.icmp_type != ICMP_ECHO_REQUEST {
        return outbound::icmp_error(ctx, &ip, &l4, 0);
    }
    outbound::at_egress(ctx, cfg, &ip, &l4, pod)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
