//! The maps userspace pins (by name, under the daemon's pin path, so a restart re-uses them)
//! and reads, with their accessors. Working memory only the programs use lives beside its
//! user: `CLOCK` in `clock`, `SCRATCH_FLOW` in `conntrack`, `SCRATCH_FIB` in `forward`,
//! `SCRATCH_PROBE` and `EMPTY_HINT` in `alloc`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use datapath_common::{
    config::Config,
    counters::Counter,
    flow::{Binding, Flow, FlowKey, FragKey},
    maps::{LayoutInfo, DEFAULT_FLOW_TABLE_SIZE, FRAGMENT_TABLE_SIZE, MAX_PODS},
    pod::PodInfo,
    port::{PortHint, HINT_DESTINATIONS},
};

// The statics' names are the maps' names (`datapath_common::maps`).

/// Pod-side tuple → flow. Userspace resizes it at load time (`--flow-table-size`).
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Reply tuple (remote → node_ip:nat_port) → the owning flow's pod-side tuple and reply
/// direction ([`Binding`]). Same size as CONNTRACK.
#[map]
pub static NAT_BINDINGS: LruHashMap<FlowKey, Binding> =
    LruHashMap::pinned(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Per-destination hints of taken NAT ports (`alloc::probe_hint`); rebuilt by userspace on
/// each sweep.
#[map]
pub static PORT_HINTS: LruHashMap<FlowKey, PortHint> = LruHashMap::pinned(HINT_DESTINATIONS, 0);

/// Pod IPv4 → pod; written by `datapath-user pod add|del`.
#[map]
pub static PODS: HashMap<u32, PodInfo> = HashMap::pinned(MAX_PODS, 0);

#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT as u32, 0);

/// Inbound fragment trains of translated flows → pod-side tuple.
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FlowKey> = LruHashMap::pinned(FRAGMENT_TABLE_SIZE, 0);

/// Slot 0: `tc_from_pod_slow`, the pod-side path for packets without an established,
/// routed flow. A tail call gives it a stack of its own (flow creation and the port-probing
/// loop do not fit beside the main program's frame). Pinned, so the entry outlives the daemon
/// (the kernel empties a program array when no process or pin holds it); each load refills it.
#[map]
pub static SLOW_PATH: ProgramArray = ProgramArray::pinned(1, 0);

#[map]
pub static LAYOUT: Array<LayoutInfo> = Array::pinned(1, 0);

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
    // SAFETY: userspace replaces PODS values only whole (a map update), and the kernel frees
    // a replaced value only after this program returns.
    match unsafe { PODS.get(addr) } {
        Some(pod) if pod.host_ifindex == ifindex => Ok(pod),
        _ => Err(Counter::DropSpoofedSource),
    }
}

/// The pod registered for `addr` on any interface (packets that came through the host stack).
#[inline(always)]
pub fn any_registered_pod(addr: u32) -> Result<&'static PodInfo, Counter> {
    // SAFETY: as in `registered_pod`.
    unsafe { PODS.get(addr) }.ok_or(Counter::DropSpoofedSource)
}

#[inline(always)]
pub fn count(counter: Counter) {
    count_index(counter as u32);
}

/// [`count`] by index: one code path for a computed counter (a histogram bucket) where a
/// `match` to the enum would give the verifier a branch per value.
#[inline(always)]
pub fn count_index(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: only this CPU touches it, and only while this program runs.
        unsafe { *slot += 1 };
    }
}
