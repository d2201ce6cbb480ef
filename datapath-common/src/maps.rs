//! Names of the maps and programs, shared so the loader, the CLI and the programs agree.

/// Flow table keyed by the pod-side tuple ([`crate::flow::FlowKey`] → [`crate::flow::Flow`]).
pub const CONNTRACK: &str = "CONNTRACK";
/// NAT bindings keyed by the reply tuple (remote → node_ip:nat_port) → [`crate::flow::Binding`].
pub const NAT_BINDINGS: &str = "NAT_BINDINGS";
/// Registered pods keyed by pod IPv4 (host order) → [`crate::pod::PodInfo`].
pub const PODS: &str = "PODS";
/// Single-entry array holding the [`crate::config::Config`].
pub const CONFIG: &str = "CONFIG";
/// Per-CPU verdict counters, indexed by [`crate::counters::Counter`].
pub const COUNTERS: &str = "COUNTERS";
/// Inbound fragments of translated flows: (src, dst, id, proto) → pod-side tuple.
pub const FRAGMENTS: &str = "FRAGMENTS";
/// Per-destination hints of taken NAT ports ([`crate::port::PortHint`]).
pub const PORT_HINTS: &str = "PORT_HINTS";
/// Single-entry array describing the map layout, checked when re-using pinned maps.
pub const LAYOUT: &str = "LAYOUT";

/// Program attached to TC ingress of every pod's host-side veth.
pub const PROG_FROM_POD: &str = "tc_from_pod";
/// Tail-called by [`PROG_FROM_POD`] for new flows and stale routes (slot 0 of [`SLOW_PATH`]).
pub const PROG_FROM_POD_SLOW: &str = "tc_from_pod_slow";
/// Program array holding [`PROG_FROM_POD_SLOW`].
pub const SLOW_PATH: &str = "SLOW_PATH";
/// Program attached to TC ingress of the uplink.
pub const PROG_UPLINK_INGRESS: &str = "tc_uplink_ingress";
/// Program attached to TC egress of the uplink.
pub const PROG_UPLINK_EGRESS: &str = "tc_uplink_egress";

/// Every map named above: each must be a map of the eBPF object (a test of `datapath-user`
/// checks the built object).
pub const MAPS: [&str; 9] = [
    CONNTRACK,
    NAT_BINDINGS,
    PODS,
    CONFIG,
    COUNTERS,
    FRAGMENTS,
    PORT_HINTS,
    LAYOUT,
    SLOW_PATH,
];
/// Every program, in the order the loader loads them.
pub const PROGRAMS: [&str; 4] = [
    PROG_FROM_POD,
    PROG_FROM_POD_SLOW,
    PROG_UPLINK_INGRESS,
    PROG_UPLINK_EGRESS,
];

/// Default size of the flow table (512Ki flows).
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 512 * 1024;
/// Maximum number of pods on a node (the /22 holds 1,024 addresses).
pub const MAX_PODS: u32 = 1024;
/// Size of the inbound fragment table.
pub const FRAGMENT_TABLE_SIZE: u32 = 8192;

/// Bumped whenever a pinned map's key or value layout changes: a daemon refuses pinned maps
/// written by an incompatible version instead of misreading them. Version 2: `NAT_BINDINGS`
/// values are [`crate::flow::Binding`]s (in version 1, the owner's tuple alone).
pub const LAYOUT_VERSION: u32 = 2;

/// Content of the [`LAYOUT`] map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayoutInfo {
    pub version: u32,
    pub flow_key_size: u32,
    pub flow_size: u32,
    pub pod_info_size: u32,
    pub config_size: u32,
    pub counters: u32,
}

impl LayoutInfo {
    /// The layout this build writes and expects.
    #[must_use]
    pub const fn current() -> Self {
        Self {
            version: LAYOUT_VERSION,
            flow_key_size: size_of::<crate::flow::FlowKey>() as u32,
            flow_size: size_of::<crate::flow::Flow>() as u32,
            pod_info_size: size_of::<crate::pod::PodInfo>() as u32,
            config_size: size_of::<crate::config::Config>() as u32,
            counters: crate::counters::Counter::COUNT as u32,
        }
    }
}
