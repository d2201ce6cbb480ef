//! The flow table: creating flows (with their NAT port), keeping their bindings, and
//! rebuilding a flow from its binding.

use aya_ebpf::{bindings::BPF_NOEXIST, macros::map, maps::PerCpuArray, programs::TcContext};
use datapath_common::{
    config::Config,
    counters::Counter,
    flow::{Flow, FlowKey, FlowState, PodMacs},
};

use crate::{
    alloc,
    clock::now_ns,
    flow_ref::FlowRef,
    maps::{any_registered_pod, count, CONNTRACK, NAT_BINDINGS},
};

/// Per-CPU scratch space for building a new flow entry: the 512-byte BPF stack cannot spare it.
#[map]
static SCRATCH_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// A zeroed flow entry in this CPU's scratch slot.
#[inline(always)]
fn scratch_flow() -> Result<&'static mut Flow, Counter> {
    let flow = SCRATCH_FLOW.get_ptr_mut(0).ok_or(Counter::DropInternal)?;
    // Word by word, volatile: a `write_bytes` here becomes (once the fields set afterwards
    // are subtracted) a call to the byte-loop `memset`, which the 6.1 verifier walks byte by
    // byte on every path into it: tc_from_pod_slow then exceeds its 1M-instruction limit.
    // SAFETY: this CPU's slot, used only while this program runs on it (so the `&mut` is the
    // only reference); Flow is a multiple of 8 bytes long and 8-byte aligned (a map value),
    // and zero is valid for every field.
    unsafe {
        let words = flow.cast::<u64>();
        for i in 0..size_of::<Flow>() / size_of::<u64>() {
            core::ptr::write_volatile(words.add(i), 0);
        }
        Ok(&mut *flow)
    }
}

/// Where a new flow comes from.
#[derive(Clone, Copy)]
pub struct Origin {
    /// The pod's host veth; 0 for a node connection.
    pub pod_ifindex: u32,
    /// The pod's link-layer addresses, when its own packet brought them.
    pub macs: Option<PodMacs>,
    /// `FLAG_*` bits saying who created the flow.
    pub flags: u8,
}

/// Creates the flow for pod tuple `key`, allocating a NAT port whose reply tuple is free both
/// in the binding table and among the node's own sockets.
#[inline(always)]
pub fn create(
    ctx: &TcContext,
    cfg: &Config,
    key: &FlowKey,
    origin: Origin,
    tcp_flags: u8,
    now: u64,
) -> Result<FlowRef, Counter> {
    let nat_port = alloc::allocate(ctx, cfg, key, now)?;
    insert_flow(cfg, key, nat_port, origin, tcp_flags, now)
}

/// Inserts the flow entry for `key` whose binding to `nat_port` is already claimed.
#[inline(always)]
pub fn insert_flow(
    cfg: &Config,
    key: &FlowKey,
    nat_port: u16,
    origin: Origin,
    tcp_flags: u8,
    now: u64,
) -> Result<FlowRef, Counter> {
    let (state, fin_flags) = FlowState::opened_by(key.proto, tcp_flags);
    let flow = scratch_flow()?;
    flow.start(
        now,
        (cfg.node_ip, nat_port),
        origin.pod_ifindex,
        (state, fin_flags | origin.flags),
        origin.macs,
    );
    // Another CPU may have created it meanwhile: then use theirs (the insert fails).
    if CONNTRACK.insert(key, *flow, u64::from(BPF_NOEXIST)).is_ok() {
        count(Counter::FlowCreated);
    } else {
        let _ = NAT_BINDINGS.remove(key.reply_tuple(cfg.node_ip, nat_port));
    }
    FlowRef::find(key).ok_or(Counter::DropTableFull)
}

/// The flow behind a NAT binding (`pod_key`, found under `reply`). If LRU pressure evicted the
/// flow but not its binding, the flow is rebuilt from the binding and the pod map rather than
/// dropping the reply.
#[inline(always)]
pub fn for_binding(pod_key: &FlowKey, reply: &FlowKey) -> Result<FlowRef, Counter> {
    if let Some(flow) = FlowRef::find(pod_key) {
        return Ok(flow);
    }
    let Ok(pod) = any_registered_pod(pod_key.src_ip) else {
        let _ = NAT_BINDINGS.remove(reply);
        return Err(Counter::DropUntrackedInbound);
    };
    let now = now_ns();
    let flow = scratch_flow()?;
    flow.start(
        now,
        (reply.dst_ip, reply.dst_port),
        pod.host_ifindex,
        (FlowState::rebuilt(pod_key.proto), 0),
        None,
    );
    let _ = CONNTRACK.insert(pod_key, *flow, 0);
    count(Counter::HalfPairRepaired);
    FlowRef::find(pod_key).ok_or(Counter::DropTableFull)
}

/// Re-inserts a flow's NAT binding if LRU pressure evicted it, at most once per interval.
/// Returns false when the binding's reply tuple now belongs to another flow.
#[inline(always)]
pub fn keep_binding(key: &FlowKey, flow: FlowRef, now: u64) -> bool {
    if flow.read(|f| f.is_fresh(now)) {
        return true;
    }
    flow.set_revalidated(now);
    let (nat_ip, nat_port) = flow.nat();
    let binding = key.reply_tuple(nat_ip, nat_port);
    // SAFETY: a NAT_BINDINGS value, valid while the program runs; only compared.
    if let Some(taken) = unsafe { NAT_BINDINGS.get(binding) } {
        taken.owner == *key
    } else {
        count(Counter::BindingRepaired);
        alloc::claim(key).is_ok_and(|claim| {
            NAT_BINDINGS
                .insert(binding, claim, u64::from(BPF_NOEXIST))
                .is_ok()
        })
    }
}
