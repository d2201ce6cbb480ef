//! The maps, pinned by name under the daemon's pin path so a restart re-uses them.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use datapath_common::{
    config::Config,
    counters::Counter,
    flow::{Flow, FlowKey, FragKey},
    maps::{LayoutInfo, DEFAULT_FLOW_TABLE_SIZE, FRAGMENT_TABLE_SIZE, MAX_PODS},
    pod::PodInfo,
    port::{PortHint, HINT_DESTINATIONS},
};

/// Pod-side tuple → flow. Userspace resizes it at load time (`--flow-table-size`).
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Reply tuple (remote → node_ip:nat_port) → pod-side tuple. Same size as CONNTRACK.
#[map(name = "NAT_BINDINGS")]
pub static NAT_BINDINGS: LruHashMap<FlowKey, FlowKey> =
    LruHashMap::pinned(DEFAULT_FLOW_TABLE_SIZE, 0);

/// Pod IPv4 → pod; written by `datapath-user pod add|del`.
/// Per-destination hints of taken NAT ports (`conntrack::probe_port`'s hint phase); rebuilt
/// by userspace on each sweep.
#[map(name = "PORT_HINTS")]
pub static PORT_HINTS: LruHashMap<FlowKey, PortHint> = LruHashMap::pinned(HINT_DESTINATIONS, 0);

/// An all-clear hint, the source of new PORT_HINTS entries (never written).
#[map(name = "EMPTY_HINT")]
pub static EMPTY_HINT: Array<PortHint> = Array::with_max_entries(1, 0);

#[map(name = "PODS")]
pub static PODS: HashMap<u32, PodInfo> = HashMap::pinned(MAX_PODS, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT as u32, 0);

/// Inbound fragment trains of translated flows → pod-side tuple.
#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragKey, FlowKey> = LruHashMap::pinned(FRAGMENT_TABLE_SIZE, 0);

/// Per-CPU scratch space for building a new flow entry: the 512-byte BPF stack cannot spare it.
#[map(name = "SCRATCH_FLOW")]
pub static SCRATCH_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for the FIB lookup's parameter block.
#[map(name = "SCRATCH_FIB")]
pub static SCRATCH_FIB: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU working memory of the NAT port probe (`conntrack::probe_port`).
#[map(name = "SCRATCH_PROBE")]
pub static SCRATCH_PROBE: PerCpuArray<crate::conntrack::ProbeScratch> =
    PerCpuArray::with_max_entries(1, 0);

/// The coarse clock's value for the jiffy it was read in (`conntrack::now_ns`). One slot for
/// all CPUs: a per-CPU slot would cost a second dependent load per packet, and the shared one
/// is written only once a tick.
#[map(name = "CLOCK")]
pub static CLOCK: Array<TickClock> = Array::with_max_entries(1, 0);

#[repr(C)]
pub struct TickClock {
    pub jiffies: u64,
    pub ns: u64,
}

/// A zeroed flow entry in this CPU's scratch slot.
#[inline(always)]
pub fn scratch_flow() -> Option<&'static mut Flow> {
    let flow = SCRATCH_FLOW.get_ptr_mut(0)?;
    // Word by word, volatile: a `write_bytes` here becomes (once the fields set afterwards
    // are subtracted) a call to the byte-loop `memset`, which the 6.1 verifier walks byte by
    // byte on every path into it: tc_from_pod_slow then exceeds its 1M-instruction limit.
    // SAFETY: this CPU's slot, used only while this program runs on it; Flow is 8-byte sized
    // and aligned (a map value), and zero is valid for every field.
    unsafe {
        let words = flow.cast::<u64>();
        for i in 0..size_of::<Flow>() / 8 {
            core::ptr::write_volatile(words.add(i), 0);
        }
        Some(&mut *flow)
    }
}

/// Slot 0: `tc_from_pod_slow`, the pod-side path for packets without an established,
/// routed flow. A tail call gives it a stack of its own (flow creation and the port-probing
/// loop do not fit beside the main program's frame). Pinned, so the entry outlives the daemon
/// (the kernel empties a program array when no process or pin holds it); each load refills it.
#[map(name = "SLOW_PATH")]
pub static SLOW_PATH: ProgramArray = ProgramArray::pinned(1, 0);

#[map(name = "LAYOUT")]
pub static LAYOUT: Array<LayoutInfo> = Array::pinned(1, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    count_index(counter as u32);
}

/// [`count`] by index: one code path for a computed counter (a histogram bucket) where a
/// `match` to the enum would give the verifier a branch per value.
#[inline(always)]
pub fn count_index(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}
