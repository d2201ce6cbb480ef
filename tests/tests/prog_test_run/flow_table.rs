//! The LRU flow and binding tables: evicted halves repaired, a full table evicting, expired
//! flows matching nothing before the sweep removes them, replies served by the binding alone.

use datapath_common::{
    counters::Counter,
    flow::{Binding, FlowState, FLAG_FIN_IN, PROTO_TCP, PROTO_UDP},
    tcp::{TCP_ACK, TCP_FIN, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        addr, pod_tcp, with_harness, HarnessOptions, NODE_IP, POD_IP, SERVER_IP, SERVER_MAC,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};

use crate::{open_tcp, pod_key, wire_tcp};

#[test]
fn lru_half_pairs_are_repaired() {
    with_harness(HarnessOptions::default(), |h| {
        let out = open_tcp(h, 43000);
        let key = pod_key(PROTO_TCP, 43000, SERVER_IP, 80);
        // The flow entry is evicted, its binding survives: the reply rebuilds it.
        h.maps.conntrack.remove(&key).unwrap();
        let (verdict, back) = h.from_wire(&wire_tcp(out.src_port(), TCP_ACK));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(Parsed::parse(&back).dst, POD_IP);
        assert_eq!(h.counter(Counter::HalfPairRepaired), 1);
        let flow = h.flow(&key).expect("flow rebuilt");
        assert_eq!(flow.nat_port, out.src_port());
        // The binding is evicted, the flow survives: the next outbound packet restores it.
        let reply = key.reply_tuple(flow.nat_ip, flow.nat_port);
        h.maps.bindings.remove(&reply).unwrap();
        let mut stale = flow;
        stale.revalidated_ns = 0;
        h.maps.conntrack.insert(key, stale, 0).unwrap();
        let again = Parsed::parse(&h.from_pod(&pod_tcp(43000, 80, TCP_ACK)).1);
        assert_eq!(again.src_port(), out.src_port(), "same port kept");
        assert_eq!(h.binding(&reply), Some(key));
        assert_eq!(h.counter(Counter::BindingRepaired), 1);
    })
    .unwrap();
}

/// Why `drop_table_full` does not move: the flow table is an LRU map, so a new flow in a full
/// table evicts the least recently used one instead of being refused (the counter is left
/// for an insert that fails anyway, which the kernel's LRU does only under memory pressure
/// across CPUs). Four times the table's size in new flows: all translated, none refused.
#[test]
fn a_full_lru_flow_table_evicts_rather_than_refuses() {
    with_harness(
        HarnessOptions {
            flow_table_size: 64,
            ..HarnessOptions::default()
        },
        |h| {
            for sport in 0..256u16 {
                let (verdict, _) = h.from_pod(&pod_tcp(30000 + sport, 80, TCP_SYN));
                assert_eq!(verdict, TC_ACT_REDIRECT, "new flow {sport} refused");
            }
            assert_eq!(h.counter(Counter::FlowCreated), 256);
            assert_eq!(h.counter(Counter::DropTableFull), 0);
            let mut live = 0;
            for sport in 0..256u16 {
                live += usize::from(
                    h.flow(&pod_key(PROTO_TCP, 30000 + sport, SERVER_IP, 80))
                        .is_some(),
                );
            }
            assert!(
                live <= 64 * 2,
                "{live} flows in a table of 64 (rounded up per CPU)"
            );
            assert!(
                h.flow(&pod_key(PROTO_TCP, 30255, SERVER_IP, 80)).is_some(),
                "the newest flow is kept"
            );
        },
    )
    .unwrap();
}

/// nf_conntrack's rule: an entry past its timeout matches nothing, whether or not its
/// collector has reached it. The sweep reaches large tables less often, so the programs check:
/// a reply to a flow past its timeout is not translated, and does not bring the flow back.
#[test]
fn a_reply_to_a_flow_past_its_timeout_matches_nothing() {
    with_harness(HarnessOptions::default(), |h| {
        let nat_port = open_tcp(h, 43100).src_port();
        let (verdict, _) = h.from_wire(&wire_tcp(nat_port, TCP_ACK));
        assert_eq!(
            verdict, TC_ACT_REDIRECT,
            "a live flow's reply is translated"
        );
        // A reset connection (10 s timeout) last seen 12 s ago, not yet swept.
        let key = pod_key(PROTO_TCP, 43100, SERVER_IP, 80);
        let mut flow = h.maps.conntrack.get(&key, 0).unwrap();
        flow.state = FlowState::Reset as u8;
        flow.last_seen_ns = datapath_user::maps::monotonic_coarse_ns() - 12_000_000_000;
        h.maps.conntrack.insert(key, flow, 0).unwrap();
        // Its binding timed the last reply then too.
        let reply = key.reply_tuple(addr(NODE_IP), nat_port);
        let mut binding = h.binding_entry(&reply).unwrap();
        (binding.last_seen_ns, binding.revalidated_ns) = (flow.last_seen_ns, flow.last_seen_ns);
        h.maps.bindings.insert(reply, binding, 0).unwrap();
        let (hits, untracked) = (
            h.counter(Counter::ExpiredFlowHit),
            h.counter(Counter::DropUntrackedInbound),
        );
        let (verdict, _) = h.from_wire(&wire_tcp(nat_port, TCP_ACK));
        assert_eq!(
            verdict, TC_ACT_SHOT,
            "no node socket holds the port: dropped"
        );
        assert_eq!(h.counter(Counter::ExpiredFlowHit), hits + 1);
        assert_eq!(h.counter(Counter::DropUntrackedInbound), untracked + 1);
        let after = h.maps.conntrack.get(&key, 0).unwrap();
        assert_eq!(
            after.last_seen_ns, flow.last_seen_ns,
            "the reply refreshed nothing"
        );
    })
    .unwrap();
}

/// While a binding is fresh (a reply took the full path less than a revalidation interval ago
/// and found the flow settled), replies that cannot change the flow's state are counted and
/// delivered from the binding alone: the flow entry is not looked up. A reply with FIN, and
/// the first reply after the interval, take the full path again.
#[test]
fn replies_use_the_binding_alone_while_it_is_fresh() {
    with_harness(HarnessOptions::default(), |h| {
        let nat_port = open_tcp(h, 43200).src_port();
        let key = pod_key(PROTO_TCP, 43200, SERVER_IP, 80);
        let reply = key.reply_tuple(addr(NODE_IP), nat_port);
        assert_eq!(
            h.binding_entry(&reply).unwrap().revalidated_ns,
            0,
            "a new binding is not fresh"
        );
        // The handshake's answer moves the state: the full path, which opens the binding.
        let (verdict, _) = h.from_wire(&wire_tcp(nat_port, TCP_SYN | TCP_ACK));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(h.flow(&key).unwrap().state(), Some(FlowState::Established));
        let opened = h.binding_entry(&reply).unwrap();
        assert_ne!(opened.revalidated_ns, 0);
        assert_eq!(
            (opened.pod_ifindex, opened.pod_mac),
            (h.pod_ifindex, POD_MAC)
        );
        // A mark the full path would overwrite: the flow seen half a second earlier.
        let mut flow = h.flow(&key).unwrap();
        let mark = flow.last_seen_ns - 500_000_000;
        flow.last_seen_ns = mark;
        h.maps.conntrack.insert(key, flow, 0).unwrap();
        for _ in 0..3 {
            let (verdict, back) = h.from_wire(&wire_tcp(nat_port, TCP_ACK));
            assert_eq!(verdict, TC_ACT_REDIRECT);
            let back = Parsed::parse(&back);
            assert_eq!((back.dst, back.dst_port()), (POD_IP, 43200));
            assert_eq!((back.dst_mac, back.src_mac), (POD_MAC, GW_MAC));
            assert!(back.ip_checksum_ok() && back.l4_checksum_ok());
            assert_eq!(back.ttl, 63);
        }
        assert_eq!(
            h.flow(&key).unwrap().last_seen_ns,
            mark,
            "the flow entry was not touched"
        );
        let binding = h.binding_entry(&reply).unwrap();
        assert_eq!(binding.packets, 4, "every reply counted in the binding");
        assert!(binding.last_seen_ns > mark);
        let seen = h.flow_seen(&key).unwrap();
        assert_eq!(seen.packets_in, 4);
        assert_eq!(seen.last_seen_ns, binding.last_seen_ns);
        assert_eq!(h.counter(Counter::TranslatedIn), 4);

        // A FIN may move the state: the full path, whatever the binding says.
        let (verdict, _) = h.from_wire(&wire_tcp(nat_port, TCP_FIN | TCP_ACK));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let flow = h.flow(&key).unwrap();
        assert_eq!(flow.state(), Some(FlowState::Closing));
        assert_ne!(flow.flags & FLAG_FIN_IN, 0);
        assert!(flow.last_seen_ns > mark);

        // The interval over: the next reply looks the flow up again and re-opens the binding.
        let mut flow = flow;
        flow.last_seen_ns = mark;
        h.maps.conntrack.insert(key, flow, 0).unwrap();
        let mut stale = h.binding_entry(&reply).unwrap();
        stale.revalidated_ns -= 2_000_000_000;
        h.maps.bindings.insert(reply, stale, 0).unwrap();
        let (verdict, _) = h.from_wire(&wire_tcp(nat_port, TCP_ACK));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert!(
            h.flow(&key).unwrap().last_seen_ns > mark,
            "the full path timed the flow"
        );
        assert!(h.binding_entry(&reply).unwrap().revalidated_ns > stale.revalidated_ns);
        assert_eq!(h.flow_seen(&key).unwrap().packets_in, 6);
    })
    .unwrap();
}

/// A UDP flow is settled once answered: its first reply takes the full path (unreplied to
/// replied), later ones the binding alone; a reply that comes back after the binding lost
/// its owner to another flow (a new claim is never fresh) takes the full path.
#[test]
fn udp_replies_after_the_first_use_the_binding_alone() {
    with_harness(HarnessOptions::default(), |h| {
        let query = |sport| {
            Ipv4Packet::new(
                POD_IP,
                SERVER_IP,
                PROTO_UDP,
                packet::udp(POD_IP, SERVER_IP, sport, 53, b"q", true),
            )
            .frame(POD_MAC, GW_MAC)
        };
        let answer = |nat_port| {
            Ipv4Packet::new(
                SERVER_IP,
                NODE_IP,
                PROTO_UDP,
                packet::udp(SERVER_IP, NODE_IP, 53, nat_port, b"a", true),
            )
            .frame(SERVER_MAC, GW_MAC)
        };
        let nat_port = Parsed::parse(&h.from_pod(&query(5353)).1).src_port();
        let key = pod_key(PROTO_UDP, 5353, SERVER_IP, 53);
        let reply = key.reply_tuple(addr(NODE_IP), nat_port);
        let (verdict, _) = h.from_wire(&answer(nat_port));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(h.flow(&key).unwrap().state(), Some(FlowState::Replied));
        assert_ne!(h.binding_entry(&reply).unwrap().revalidated_ns, 0);
        let mut flow = h.flow(&key).unwrap();
        let mark = flow.last_seen_ns - 500_000_000;
        flow.last_seen_ns = mark;
        h.maps.conntrack.insert(key, flow, 0).unwrap();
        let (verdict, back) = h.from_wire(&answer(nat_port));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let back = Parsed::parse(&back);
        assert_eq!((back.dst, back.dst_port()), (POD_IP, 5353));
        assert!(back.l4_checksum_ok());
        assert_eq!(
            h.flow(&key).unwrap().last_seen_ns,
            mark,
            "the flow entry was not touched"
        );
        assert_eq!(h.flow_seen(&key).unwrap().packets_in, 2);
        // A new claim of the tuple (what a reclaim writes) is never fresh.
        h.maps
            .bindings
            .insert(reply, Binding::claim(key), 0)
            .unwrap();
        let (verdict, _) = h.from_wire(&answer(nat_port));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert!(
            h.flow(&key).unwrap().last_seen_ns > mark,
            "the full path timed the flow"
        );
    })
    .unwrap();
}
