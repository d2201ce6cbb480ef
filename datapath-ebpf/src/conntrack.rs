//! The flow table: lookup, creation with NAT port allocation, per-packet accounting.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_NOEXIST},
    cty::c_void,
    helpers::{
        bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_loop, bpf_sk_lookup_udp,
        bpf_sk_release, bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};
use datapath_common::{
    config::{Config, PortRandomisation},
    counters::Counter,
    flow::{
        Flow, FlowKey, FlowState, FLAG_FIN_IN, FLAG_FIN_OUT, FLAG_HAS_MACS, PROTO_TCP, PROTO_UDP,
        REVALIDATE_INTERVAL_NS,
    },
    pod::PodInfo,
    port::{self, MAX_PORT_PROBES},
    tcp::{self, Direction},
};

use crate::maps::{
    count, scratch_flow, CLOCK, CONFIG, CONNTRACK, NAT_BINDINGS, PODS, SCRATCH_PROBE,
};

/// CLOCK_MONOTONIC (coarse) nanoseconds. The coarse clock only moves when the tick advances
/// jiffies, and the verifier inlines `bpf_jiffies64` into one load, so the clock's value for
/// the current jiffy is kept in `CLOCK` and the helper is called once a tick instead of once
/// a packet. (Two CPUs refreshing the slot at once may pair a jiffy with the previous tick's
/// time: at most a tick off, and timeouts are seconds.)
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cached) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: a map value of plain integers; racing writers are covered above.
    let cached = unsafe { &mut *cached };
    if cached.jiffies != jiffies {
        cached.jiffies = jiffies;
        // SAFETY: as above.
        cached.ns = unsafe { bpf_ktime_get_coarse_ns() };
    }
    cached.ns
}

#[inline(always)]
pub fn config() -> Result<&'static Config, Counter> {
    match CONFIG.get(0) {
        Some(cfg) if cfg.node_ip != 0 => Ok(cfg),
        _ => Err(Counter::DropNotConfigured),
    }
}

/// The pod registered for `addr`, if it is attached to `ifindex`.
#[inline(always)]
pub fn registered_pod(addr: u32, ifindex: u32) -> Result<&'static PodInfo, Counter> {
    // SAFETY: PODS values are only replaced whole by userspace.
    match unsafe { PODS.get(addr) } {
        Some(pod) if pod.host_ifindex == ifindex => Ok(pod),
        _ => Err(Counter::DropSpoofedSource),
    }
}

/// The pod registered for `addr` on any interface (packets that came through the host stack).
#[inline(always)]
pub fn any_registered_pod(addr: u32) -> Result<&'static PodInfo, Counter> {
    // SAFETY: as above.
    unsafe { PODS.get(addr) }.ok_or(Counter::DropSpoofedSource)
}

/// Link-layer addresses seen on a pod's packet: replies can then be handed to the pod's
/// interface without a neighbour lookup.
#[derive(Clone, Copy)]
pub struct PodMacs {
    pub pod: [u8; 6],
    pub gateway: [u8; 6],
}

/// Creates the flow for pod tuple `key`, allocating a NAT port whose reply tuple is free both
/// in the binding table and among the node's own sockets.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn create(
    ctx: &TcContext,
    cfg: &Config,
    key: &FlowKey,
    pod_ifindex: u32,
    macs: Option<PodMacs>,
    extra_flags: u8,
    tcp_flags: u8,
    now: u64,
) -> Result<*mut Flow, Counter> {
    let mut search = PortSearch {
        skb: ctx.skb.skb,
        key: *key,
        // SAFETY: helper without arguments.
        seed: port::probe_seed(cfg.randomisation(), key, unsafe { bpf_get_prandom_u32() }),
        port_count: cfg.port_count(),
        node_ip: cfg.node_ip,
        port_min: cfg.port_min,
        mode: cfg.randomisation,
        found: 0,
        port: 0,
        now,
    };
    // bpf_loop: the verifier checks the probe once instead of once per attempt.
    // SAFETY: the callback matches bpf_loop's contract and only touches `search`.
    unsafe {
        bpf_loop(
            MAX_PORT_PROBES,
            probe_port as *mut c_void,
            (&raw mut search).cast(),
            0,
        );
    }
    let nat_port = (search.found != 0).then_some(search.port);
    let nat_port = nat_port.ok_or(Counter::DropPortExhausted)?;

    let (state, fin_flags) = match key.proto {
        PROTO_TCP => tcp::initial_state(tcp_flags),
        _ => (FlowState::Unreplied, 0),
    };
    let (pod_mac, gateway_mac, mac_flag) = match macs {
        Some(m) => (m.pod, m.gateway, FLAG_HAS_MACS),
        None => ([0; 6], [0; 6], 0),
    };
    let flow = scratch_flow().ok_or(Counter::DropTableFull)?;
    flow.created_ns = now;
    flow.last_seen_ns = now;
    flow.revalidated_ns = now;
    flow.nat_ip = cfg.node_ip;
    flow.pod_ifindex = pod_ifindex;
    flow.nat_port = nat_port;
    flow.state = state as u8;
    flow.flags = fin_flags | mac_flag | extra_flags;
    flow.pod_mac = pod_mac;
    flow.gateway_mac = gateway_mac;
    // Another CPU may have created it meanwhile: then use theirs (the insert fails).
    if CONNTRACK.insert(key, *flow, u64::from(BPF_NOEXIST)).is_ok() {
        count(Counter::FlowCreated);
    } else {
        let _ = NAT_BINDINGS.remove(key.reply_tuple(cfg.node_ip, nat_port));
    }
    CONNTRACK.get_ptr_mut(key).ok_or(Counter::DropTableFull)
}

/// State of a NAT port search, shared with the `bpf_loop` callback.
#[repr(C)]
struct PortSearch {
    skb: *mut __sk_buff,
    key: FlowKey,
    seed: u32,
    port_count: u32,
    node_ip: u32,
    port_min: u16,
    mode: u8,
    found: u8,
    port: u16,
    now: u64,
}

/// The probe callback's working memory, in a per-CPU map: its frame counts against the
/// 512-byte stack on top of its caller's, which has none to spare.
#[repr(C)]
pub struct ProbeScratch {
    binding: FlowKey,
    owner: FlowKey,
    tuple: bpf_sock_tuple,
}

/// One probe: claims the candidate's reply tuple in NAT_BINDINGS unless it is taken (by
/// another flow or a node socket). Returns 1 to stop the loop.
extern "C" fn probe_port(attempt: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the PortSearch given to it.
    let s = unsafe { &mut *ctx.cast::<PortSearch>() };
    let candidate = port::candidate(
        PortRandomisation::from_u8(s.mode),
        s.seed,
        attempt as u32,
        s.key.src_port,
        s.port_min,
        s.port_count,
    );
    let Some(scratch) = SCRATCH_PROBE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot, used only while this program runs on it.
    let w = unsafe { &mut *scratch };
    w.binding = s.key.reply_tuple(s.node_ip, candidate);
    if NAT_BINDINGS
        .insert(w.binding, s.key, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Taken. If it is ours (the flow entry was evicted, the binding survived), keep it;
        // if its connection is over, take it over.
        // SAFETY: FlowKey is plain data, copied out.
        let Some(owner) = (unsafe { NAT_BINDINGS.get(w.binding) }).copied() else {
            return 0;
        };
        w.owner = owner;
        if w.owner != s.key {
            if !is_reclaimable(&w.owner, s.now) {
                return 0;
            }
            let _ = CONNTRACK.remove(w.owner);
            if NAT_BINDINGS.insert(w.binding, s.key, 0).is_err() {
                return 0;
            }
            count(Counter::PortReclaimed);
        }
    } else if node_socket_owns(s.skb, &w.binding, &mut w.tuple) {
        let _ = NAT_BINDINGS.remove(w.binding);
        return 0;
    }
    s.found = 1;
    s.port = candidate;
    1
}

/// How long a finished TCP connection keeps its NAT port before a new flow may take it: late
/// packets of the old connection (the last ACK, a retransmitted FIN) still find it meanwhile.
const RECLAIM_AFTER_NS: u64 = 1_000_000_000;

/// True when the flow holding a NAT binding is a TCP connection that is over (both FINs or a
/// RST) and idle, or is gone: its port can serve a new flow. Without this, a pod opening
/// connections to one destination faster than range / closing-timeout runs out of ports.
#[inline(always)]
fn is_reclaimable(owner: &FlowKey, now: u64) -> bool {
    // SAFETY: map value read.
    match unsafe { CONNTRACK.get(owner) } {
        None => true,
        Some(flow) => {
            let finished = match flow.state() {
                Some(FlowState::Reset) => true,
                Some(FlowState::Closing) => {
                    flow.flags & (FLAG_FIN_OUT | FLAG_FIN_IN) == (FLAG_FIN_OUT | FLAG_FIN_IN)
                }
                _ => false,
            };
            owner.proto == PROTO_TCP
                && finished
                && now.wrapping_sub(flow.last_seen_ns) >= RECLAIM_AFTER_NS
        }
    }
}

/// True when the node itself has a socket that would take packets with this reply tuple
/// (a connected socket with the same 4-tuple or a listener on the port).
#[inline(always)]
pub fn node_socket_owns(skb: *mut __sk_buff, reply: &FlowKey, tuple: &mut bpf_sock_tuple) -> bool {
    if reply.proto != PROTO_TCP && reply.proto != PROTO_UDP {
        return false;
    }
    // SAFETY: writing the IPv4 member of the union.
    unsafe {
        let v4 = &mut tuple.__bindgen_anon_1.ipv4;
        v4.saddr = reply.src_ip.to_be();
        v4.daddr = reply.dst_ip.to_be();
        v4.sport = reply.src_port.to_be();
        v4.dport = reply.dst_port.to_be();
    }
    let size = 12; // sizeof(tuple.ipv4)
    let netns = BPF_F_CURRENT_NETNS as u64;
    let skb = skb.cast();
    // SAFETY: valid context, tuple and size; a returned socket is released right away.
    unsafe {
        let sk = if reply.proto == PROTO_TCP {
            bpf_skc_lookup_tcp(skb, &raw mut *tuple, size, netns, 0)
        } else {
            bpf_sk_lookup_udp(skb, &raw mut *tuple, size, netns, 0)
        };
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk.cast());
    }
    true
}

/// Accounts one packet of `l3_len` bytes going `dir` and advances the state machine.
#[inline(always)]
pub fn account(flow: *mut Flow, proto: u8, dir: Direction, l3_len: u32, tcp_flags: u8, now: u64) {
    count_packet(flow, dir, l3_len, now);
    // SAFETY: as in `count_packet`; state bytes are written whole.
    unsafe {
        let f = &mut *flow;
        let Some(state) = f.state() else { return };
        if proto == PROTO_TCP {
            let fins = f.flags & (FLAG_FIN_OUT | FLAG_FIN_IN);
            let (next, next_fins) = tcp::next_state(state, fins, tcp_flags, dir);
            if next != state || next_fins != fins {
                f.state = next as u8;
                f.flags = (f.flags & !(FLAG_FIN_OUT | FLAG_FIN_IN)) | next_fins;
            }
        } else if dir == Direction::In {
            let next = state.after_inbound(false);
            if next != state {
                f.state = next as u8;
            }
        }
    }
}

/// Accounts an ICMP error about the flow coming in: counted, but it is no reply (a UDP flow
/// answered only by port-unreachable stays unreplied, as in nf_conntrack).
#[inline(always)]
pub fn account_icmp_error(flow: *mut Flow, l3_len: u32, now: u64) {
    count_packet(flow, Direction::In, l3_len, now);
}

#[inline(always)]
fn count_packet(flow: *mut Flow, dir: Direction, l3_len: u32, now: u64) {
    // SAFETY: `flow` points into a map value; counters are updated atomically because
    // packets of one flow may be processed on several CPUs at once.
    unsafe {
        let f = &mut *flow;
        f.last_seen_ns = now;
        let (packets, bytes) = match dir {
            Direction::Out => (&raw mut f.packets_out, &raw mut f.bytes_out),
            Direction::In => (&raw mut f.packets_in, &raw mut f.bytes_in),
        };
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(bytes, u64::from(l3_len));
    }
}

/// True when the flow's binding check and cached route are recent enough to trust.
#[inline(always)]
pub fn is_fresh(flow: &Flow, now: u64) -> bool {
    now.wrapping_sub(flow.revalidated_ns) < REVALIDATE_INTERVAL_NS
}

/// Puts `flow` back if the sweep removed it while this packet was using it. The sweep only
/// removes flows idle for over the revalidation interval, and such a flow's next packet comes
/// through here, so the flow keeps its NAT port whatever the interleaving.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "a reference hands the helper the map value itself; a copy would take 96 bytes of stack"
)]
pub fn restore_if_swept(key: &FlowKey, flow: *mut Flow) {
    if CONNTRACK.get_ptr(key).is_none() {
        // SAFETY: `flow` still points at the unlinked value, which the kernel frees only
        // after this program returns.
        if CONNTRACK
            .insert(key, unsafe { &*flow }, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            count(Counter::FlowRestored);
        }
    }
}

/// Re-inserts a flow's NAT binding if LRU pressure evicted it, at most once per interval.
/// Returns false when the binding's reply tuple now belongs to another flow.
#[inline(always)]
pub fn keep_binding(key: &FlowKey, flow: *mut Flow, now: u64) -> bool {
    // SAFETY: `flow` points into a map value.
    let f = unsafe { &mut *flow };
    if is_fresh(f, now) {
        return true;
    }
    f.revalidated_ns = now;
    let binding = key.reply_tuple(f.nat_ip, f.nat_port);
    // SAFETY: FlowKey is plain data.
    if let Some(owner) = unsafe { NAT_BINDINGS.get(binding) } {
        owner == key
    } else {
        count(Counter::BindingRepaired);
        NAT_BINDINGS
            .insert(binding, key, u64::from(BPF_NOEXIST))
            .is_ok()
    }
}
