//! Verdict counters: one per-CPU slot for each way a packet can leave the programs.
//!
//! A new counter goes at the end, so every other keeps its index. The pinned layout records
//! how many there are ([`crate::maps::LayoutInfo`]): a daemon refuses a `COUNTERS` map pinned
//! by a build with another count rather than misread it.

/// Whether a counter counts translated, passed or dropped packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Translated,
    Passed,
    Dropped,
    Event,
}

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $variant:ident = $value:literal, $name:literal, $kind:ident; )*) => {
        /// Index into the `COUNTERS` per-CPU array.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[doc = $doc])* $variant = $value, )*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];
            pub const COUNT: usize = Self::ALL.len();

            /// Stable snake_case name used by `stats` and the metrics endpoint.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }

            #[must_use]
            pub const fn kind(self) -> Kind {
                match self { $(Counter::$variant => Kind::$kind,)* }
            }

            /// One-line meaning, shown by `stats` and in the docs (without the space doc
            /// comments start with).
            #[must_use]
            pub const fn description(self) -> &'static str {
                match self { $(Counter::$variant => concat!($($doc),*),)* }.trim_ascii_start()
            }
        }
    };
}

counters! {
    /// Pod packets translated to node_ip:nat_port and redirected to the uplink.
    TranslatedOut = 0, "translated_out", Translated;
    /// Replies reverse-translated and redirected to the pod.
    TranslatedIn = 1, "translated_in", Translated;
    /// Pod packets that reached the uplink through the host stack and were translated there.
    TranslatedEgress = 2, "translated_egress", Translated;
    /// ICMP errors from the wire about a pod flow, translated (outer and inner) to the pod.
    IcmpErrorIn = 3, "icmp_error_in", Translated;
    /// ICMP errors sent by a pod about a tracked flow, translated to the node address.
    IcmpErrorOut = 4, "icmp_error_out", Translated;
    /// Non-first fragments of pod packets translated on the way out.
    FragmentOut = 5, "fragment_out", Translated;
    /// Non-first fragments of replies translated to the pod.
    FragmentIn = 6, "fragment_in", Translated;
    /// New flows created in the flow table.
    FlowCreated = 7, "flow_created", Event;
    /// Replies whose flow entry had been evicted while its NAT binding survived: the entry was rebuilt.
    HalfPairRepaired = 8, "half_pair_repaired", Event;
    /// Flows whose NAT binding had been evicted: the binding was re-inserted.
    BindingRepaired = 9, "binding_repaired", Event;
    /// Packets that are not IPv4 (IPv6, ARP, ...), passed untouched.
    PassNonIpv4 = 10, "pass_non_ipv4", Passed;
    /// Pod packets to multicast or broadcast addresses, passed untranslated.
    PassMulticast = 11, "pass_multicast", Passed;
    /// Pod packets to the gateway or the node's own addresses, passed untranslated to the host.
    PassLocal = 12, "pass_local", Passed;
    /// Pod packets the FIB could not forward directly (no route, fragmentation needed): handed to the host stack, which answers with ICMP or forwards them through the egress safety net.
    PassHostStack = 13, "pass_host_stack", Passed;
    /// Uplink packets that are the node's own traffic, passed untouched.
    PassNode = 14, "pass_node", Passed;
    /// Inbound non-first fragments with no tracked first fragment, passed to the node.
    PassFragmentUntracked = 15, "pass_fragment_untracked", Passed;
    /// Truncated or malformed IPv4/TCP/UDP/ICMP headers (the outer ones, or those an ICMP error quotes).
    DropMalformed = 16, "drop_malformed", Dropped;
    /// Pod packets whose source is not the pod registered on the interface they came from.
    DropSpoofedSource = 17, "drop_spoofed_source", Dropped;
    /// Pod IPv4 to another pod's address (only the gateway is reachable).
    DropPodToPod = 18, "drop_pod_to_pod", Dropped;
    /// IPv4 from the wire addressed to the pod range (cross-node pod IPv4).
    DropCrossNode = 19, "drop_cross_node", Dropped;
    /// TCP/UDP from the wire to a NAT port with no flow and no node socket.
    DropUntrackedInbound = 20, "drop_untracked_inbound", Dropped;
    /// New flows for which no free NAT port was found within the probe budget.
    DropPortExhausted = 21, "drop_port_exhausted", Dropped;
    /// New flows the flow table refused (the entry was not there right after its insert).
    DropTableFull = 22, "drop_table_full", Dropped;
    /// Pod IPv4 with a protocol other than TCP, UDP and ICMP.
    DropUnsupportedProtocol = 23, "drop_unsupported_protocol", Dropped;
    /// Pod ICMP other than echo request or an error about a tracked flow.
    DropIcmpUntracked = 24, "drop_icmp_untracked", Dropped;
    /// Packets seen before userspace wrote the configuration.
    DropNotConfigured = 25, "drop_not_configured", Dropped;
    /// Packets a redirect helper refused.
    DropRedirectFailed = 26, "drop_redirect_failed", Dropped;
    /// NAT ports taken over from TCP connections that were over (both FINs or a RST) and idle long enough to be safe for the remote (a second; a minute when the remote closed first and holds TIME_WAIT).
    PortReclaimed = 27, "port_reclaimed", Event;
    /// Replies, ICMP errors and fragments for a pod that arrived with TTL 1 or less: a router does not forward them, and the instance metadata service's hop limit of 1 relies on it.
    DropTtlExceeded = 28, "drop_ttl_exceeded", Dropped;
    /// Flows the sweep removed while a packet was using them, put back with their NAT port.
    FlowRestored = 29, "flow_restored", Event;
    /// A new SYN from a pod on a tuple whose connection was over: the flow and its NAT port were reused (as nf_conntrack re-opens a TIME_WAIT entry).
    FlowReused = 30, "flow_reused", Event;
    /// Connections the node itself opened from its NAT address (seen at uplink egress), tracked so pod flows avoid their ports.
    NodeFlowTracked = 31, "node_flow_tracked", Event;
    /// Node connections whose port a pod flow already held towards the same destination: the node's packets were given another port, as the kernel's NAT does.
    NodePortTranslated = 32, "node_port_translated", Event;
    /// NAT port allocations that succeeded at the first candidate.
    AllocProbes1 = 33, "alloc_probes_1", Event;
    /// NAT port allocations that succeeded with 2 candidates.
    AllocProbes2 = 34, "alloc_probes_2", Event;
    /// NAT port allocations that succeeded with 3 to 4 candidates.
    AllocProbes3To4 = 35, "alloc_probes_3_4", Event;
    /// NAT port allocations that succeeded with 5 to 8 candidates.
    AllocProbes5To8 = 36, "alloc_probes_5_8", Event;
    /// NAT port allocations that succeeded with 9 to 16 candidates.
    AllocProbes9To16 = 37, "alloc_probes_9_16", Event;
    /// NAT port allocations that succeeded with 17 to 32 candidates.
    AllocProbes17To32 = 38, "alloc_probes_17_32", Event;
    /// NAT port allocations that succeeded with 33 to 64 candidates.
    AllocProbes33To64 = 39, "alloc_probes_33_64", Event;
    /// NAT port allocations that succeeded with 65 to 128 candidates.
    AllocProbes65To128 = 40, "alloc_probes_65_128", Event;
    /// NAT port allocations that succeeded with 129 to 256 candidates.
    AllocProbes129To256 = 41, "alloc_probes_129_256", Event;
    /// NAT port allocations that succeeded with 257 to 512 candidates.
    AllocProbes257To512 = 42, "alloc_probes_257_512", Event;
    /// NAT port allocations that succeeded with 513 to 1024 candidates.
    AllocProbes513To1024 = 43, "alloc_probes_513_1024", Event;
    /// NAT port allocations that succeeded with more than 1024 candidates.
    AllocProbesOver1024 = 44, "alloc_probes_over_1024", Event;
    /// Translations that could not write the packet: a header field parsing had found could not be read back or written (a load or store helper refused, or the data was no longer directly reachable).
    DropWriteError = 45, "drop_write_error", Dropped;
    /// Translations whose TCP/UDP or IPv4 checksum update a kernel helper (bpf_l4_csum_replace, bpf_l3_csum_replace) refused.
    DropChecksumError = 46, "drop_checksum_error", Dropped;
    /// Packets the programs could not handle for a reason of their own: a per-CPU working-memory slot missing, or the slow path finding a packet that is not the one the fast path checked. A datapath bug.
    DropInternal = 47, "drop_internal", Dropped;
    /// Packets from the wire (replies, ICMP errors) whose flow was past its timeout but not yet removed by the sweep: they matched no flow, as in nf_conntrack, and were then dropped or passed to the node as such.
    ExpiredFlowHit = 48, "expired_flow_hit", Event;
}

/// The first bucket of the probe-count histogram of NAT port allocations: bucket `i` counts
/// allocations that took `2^(i-1)+1 ..= 2^i` candidates (bucket 0: one), the last bucket
/// everything above 1024.
pub const ALLOC_PROBE_FIRST: Counter = Counter::AllocProbes1;
/// Number of histogram buckets.
pub const ALLOC_PROBE_BUCKETS: u32 = 12;

/// Index into `COUNTERS` of the histogram bucket for an allocation that took `probes`
/// candidates. Branch-free (a bit length), so the eBPF verifier sees one path.
#[must_use]
pub const fn alloc_probe_index(probes: u32) -> u32 {
    let bits = 32 - probes.saturating_sub(1).leading_zeros();
    let bucket = if bits < ALLOC_PROBE_BUCKETS - 1 {
        bits
    } else {
        ALLOC_PROBE_BUCKETS - 1
    };
    ALLOC_PROBE_FIRST as u32 + bucket
}

/// The inclusive upper bound of histogram bucket `bucket` (`u32::MAX` for the last).
#[must_use]
pub const fn alloc_probe_upper(bucket: u32) -> u32 {
    if bucket + 1 >= ALLOC_PROBE_BUCKETS {
        u32::MAX
    } else {
        1 << bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_dense_and_names_unique() {
        for (i, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, i);
            assert!(!counter.description().is_empty());
            assert!(
                !counter.description().starts_with(' '),
                "{}",
                counter.name()
            );
            for other in &Counter::ALL[i + 1..] {
                assert_ne!(counter.name(), other.name());
            }
            let prefix_ok = match counter.kind() {
                Kind::Dropped => counter.name().starts_with("drop_"),
                Kind::Passed => counter.name().starts_with("pass_"),
                Kind::Translated | Kind::Event => {
                    !counter.name().starts_with("drop_") && !counter.name().starts_with("pass_")
                }
            };
            assert!(prefix_ok, "{}", counter.name());
        }
    }

    #[test]
    fn probe_histogram_buckets_match_their_bounds() {
        let mut lower = 1;
        for bucket in 0..ALLOC_PROBE_BUCKETS {
            let upper = alloc_probe_upper(bucket);
            let index = ALLOC_PROBE_FIRST as u32 + bucket;
            assert_eq!(alloc_probe_index(lower), index, "{lower}");
            assert_eq!(alloc_probe_index(upper), index, "{upper}");
            let name = Counter::ALL[index as usize].name();
            assert!(name.starts_with("alloc_probes_"), "{name}");
            lower = upper.saturating_add(1);
        }
        assert_eq!(alloc_probe_index(0), Counter::AllocProbes1 as u32);
        assert_eq!(
            alloc_probe_index(70_000),
            Counter::AllocProbesOver1024 as u32
        );
        assert_eq!(
            ALLOC_PROBE_FIRST as u32 + ALLOC_PROBE_BUCKETS - 1,
            Counter::AllocProbesOver1024 as u32,
            "the histogram ends at its last bucket"
        );
    }
}
