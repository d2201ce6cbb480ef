//! The node's own connections from its NAT address. The NAT range may overlap the kernel's
//! ephemeral range, so a connection the node opens is tracked from its first packet (at the
//! uplink's egress) with a binding of its own: pod flows then avoid its port towards that
//! destination. If a pod flow already holds the tuple the node's kernel picked, the node's
//! connection gets another port, as the kernel's NAT translates the later of two clashing
//! connections; the node's packets are never dropped.

use aya_ebpf::{bindings::BPF_NOEXIST, programs::TcContext};
use datapath_common::{
    config::Config,
    counters::Counter,
    flow::{FlowKey, FLAG_NODE, PROTO_TCP, PROTO_UDP},
    headers::{Fragment, Ipv4, L4},
    tcp::{Direction, TCP_ACK, TCP_SYN},
};

use crate::{
    alloc,
    clock::now_ns,
    conntrack::{self, Origin},
    flow_ref::{is_reclaimable, FlowRef},
    maps::{count, CONNTRACK, NAT_BINDINGS},
    nat::{self, Side, Ttl},
    parse,
};

/// A packet the node sends from its NAT address (not one the datapath redirected). Always
/// passes; translated when its connection had to move to another port.
#[inline(always)]
pub fn from_node(ctx: &TcContext, cfg: &Config, ip: &Ipv4) {
    if ip.fragment == Fragment::Later || (ip.proto != PROTO_TCP && ip.proto != PROTO_UDP) {
        return;
    }
    let Ok(l4) = parse::l4(ctx, ip) else {
        return;
    };
    if !cfg.port_in_range(l4.src_port) {
        return;
    }
    let key = FlowKey::from_packet(ip, &l4);
    let now = now_ns();
    let opening = ip.proto == PROTO_UDP || l4.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let flow = match FlowRef::find(&key) {
        Some(flow) if conntrack::keep_binding(&key, flow, now) => flow,
        Some(_) => {
            // A pod flow took the tuple while this one's binding was gone: track it afresh.
            let _ = CONNTRACK.remove(key);
            match track(ctx, cfg, &key, l4.tcp_flags, now) {
                Some(flow) => flow,
                None => return,
            }
        }
        // A connection from before the datapath started, or a listener's reply: the pod
        // side's socket look-up covers those.
        None if !opening => return,
        None => match track(ctx, cfg, &key, l4.tcp_flags, now) {
            Some(flow) => flow,
            None => return,
        },
    };
    flow.account(ip.proto, Direction::Out, ip.l3_len, l4.tcp_flags, now);
    let (_, nat_port) = flow.nat();
    if nat_port != l4.src_port {
        let _ = nat::rewrite(
            ctx,
            ip,
            Some(&l4),
            Side::Source,
            (ip.src, nat_port),
            Ttl::Keep,
        );
    }
}

/// Claims the node connection's own tuple, or another port when a live pod flow holds it.
#[inline(always)]
fn track(ctx: &TcContext, cfg: &Config, key: &FlowKey, tcp_flags: u8, now: u64) -> Option<FlowRef> {
    let reply = key.reply_tuple(cfg.node_ip, key.src_port);
    let claimed = NAT_BINDINGS
        .insert(reply, alloc::claim(key).ok()?, u64::from(BPF_NOEXIST))
        .is_ok();
    let nat_port = if claimed {
        key.src_port
    } else {
        // SAFETY: a NAT_BINDINGS value, valid while the program runs; read in place (a copy
        // here becomes a `memmove` call).
        match unsafe { NAT_BINDINGS.get(reply) } {
            Some(taken) if taken.owner == *key => key.src_port,
            Some(taken) if is_reclaimable(&taken.owner, now) => {
                // A finished (or vanished) pod flow: the node's connection takes the tuple.
                let _ = CONNTRACK.remove(taken.owner);
                let _ = NAT_BINDINGS.insert(reply, alloc::claim(key).ok()?, 0);
                key.src_port
            }
            _ => {
                let port = alloc::allocate(ctx, cfg, key, now).ok()?;
                count(Counter::NodePortTranslated);
                port
            }
        }
    };
    let origin = Origin {
        pod_ifindex: 0,
        macs: None,
        flags: FLAG_NODE,
    };
    let flow = conntrack::insert_flow(cfg, key, nat_port, origin, tcp_flags, now).ok()?;
    count(Counter::NodeFlowTracked);
    Some(flow)
}

/// A packet from the wire whose binding belongs to a node connection (`node_key`): its
/// destination port is translated back if the connection was moved, and it goes to the host.
#[inline(always)]
pub fn to_node(ctx: &TcContext, ip: &Ipv4, l4: &L4, node_key: &FlowKey) {
    let Some(flow) = FlowRef::find(node_key) else {
        return;
    };
    flow.account(ip.proto, Direction::In, ip.l3_len, l4.tcp_flags, now_ns());
    if node_key.src_port != l4.dst_port {
        let _ = nat::rewrite(
            ctx,
            ip,
            Some(l4),
            Side::Destination,
            (ip.dst, node_key.src_port),
            Ttl::Keep,
        );
    }
}
