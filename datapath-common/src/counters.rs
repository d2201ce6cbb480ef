//! Verdict counters: one per-CPU slot for each way a packet can leave the programs.

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
    /// Truncated or malformed IPv4/TCP/UDP/ICMP headers.
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
    /// New flows the flow table refused.
    DropTableFull = 22, "drop_table_full", Dropped;
    /// Pod IPv4 with a protocol other than TCP, UDP and ICMP.
    DropUnsupportedProtocol = 23, "drop_unsupported_protocol", Dropped;
    /// Pod ICMP other than echo request or an error about a tracked flow.
    DropIcmpUntracked = 24, "drop_icmp_untracked", Dropped;
    /// Packets seen before userspace wrote the configuration.
    DropNotConfigured = 25, "drop_not_configured", Dropped;
    /// Packets a redirect helper refused.
    DropRedirectFailed = 26, "drop_redirect_failed", Dropped;
    /// NAT ports taken over from TCP connections that were over (both FINs or a RST) and idle for a second.
    PortReclaimed = 27, "port_reclaimed", Event;
    /// Replies, ICMP errors and fragments for a pod that arrived with TTL 1 or less: a router does not forward them, and the instance metadata service's hop limit of 1 relies on it.
    DropTtlExceeded = 28, "drop_ttl_exceeded", Dropped;
    /// Flows the sweep removed while a packet was using them, put back with their NAT port.
    FlowRestored = 29, "flow_restored", Event;
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
}
