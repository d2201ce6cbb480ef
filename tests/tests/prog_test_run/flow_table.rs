//! The LRU flow and binding tables: evicted halves repaired, a full table evicting, expired
//! flows matching nothing before the sweep removes them.

use datapath_common::{
    counters::Counter,
    flow::{FlowState, PROTO_TCP},
    tcp::{TCP_ACK, TCP_SYN},
};
use datapath_tests::{
    packet::Parsed,
    testrun::{
        pod_tcp, with_harness, HarnessOptions, POD_IP, SERVER_IP, TC_ACT_REDIRECT, TC_ACT_SHOT,
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
