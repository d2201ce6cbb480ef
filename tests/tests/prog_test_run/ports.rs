//! NAT port allocation: distinct ports for clashing pod tuples, exhaustion, the node's
//! sockets, ports of finished connections taken over.

use datapath_common::{
    config::PortRandomisation,
    counters::Counter,
    flow::PROTO_TCP,
    tcp::{TCP_ACK, TCP_FIN, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        addr, pod_tcp, with_harness, HarnessOptions, NODE_IP, OTHER_POD_IP, SERVER_IP, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};

use crate::{open_tcp, pod_key, wire_tcp};

#[test]
fn same_pod_port_from_two_pods_gets_two_nat_ports() {
    with_harness(
        HarnessOptions {
            randomisation: PortRandomisation::None,
            ..HarnessOptions::default()
        },
        |h| {
            let a = Parsed::parse(&h.from_pod(&pod_tcp(25000, 80, TCP_SYN)).1);
            assert_eq!(a.src_port(), 25000, "'none' keeps the pod's port when free");
            let other = Ipv4Packet::new(
                OTHER_POD_IP,
                SERVER_IP,
                PROTO_TCP,
                packet::tcp(OTHER_POD_IP, SERVER_IP, 25000, 80, TCP_SYN, b""),
            )
            .frame(POD_MAC, GW_MAC);
            let ifindex = h.other_pod_ifindex;
            let (verdict, b) = h
                .run(datapath_common::maps::PROG_FROM_POD, &other, ifindex)
                .unwrap();
            assert_eq!(verdict, TC_ACT_REDIRECT);
            let b = Parsed::parse(&b);
            assert_ne!(b.src_port(), 25000, "taken: another port");
            assert!(b.l4_checksum_ok());
        },
    )
    .unwrap();
}

#[test]
fn port_exhaustion_is_a_counted_drop_and_recovers() {
    with_harness(
        HarnessOptions {
            port_range: (30000, 30001),
            ..HarnessOptions::default()
        },
        |h| {
            open_tcp(h, 1);
            open_tcp(h, 2);
            let (verdict, _) = h.from_pod(&pod_tcp(3, 80, TCP_SYN));
            assert_eq!(verdict, TC_ACT_SHOT);
            assert_eq!(h.counter(Counter::DropPortExhausted), 1);
            // Another destination port has its own tuple space.
            assert_eq!(h.from_pod(&pod_tcp(3, 443, TCP_SYN)).0, TC_ACT_REDIRECT);
            // When a flow ends (the sweep removes flow and binding), the port is free again.
            let key = pod_key(PROTO_TCP, 1, SERVER_IP, 80);
            let flow = h.flow(&key).unwrap();
            h.maps
                .bindings
                .remove(&key.reply_tuple(flow.nat_ip, flow.nat_port))
                .unwrap();
            h.maps.conntrack.remove(&key).unwrap();
            assert_eq!(h.from_pod(&pod_tcp(3, 80, TCP_SYN)).0, TC_ACT_REDIRECT);
        },
    )
    .unwrap();
}

#[test]
fn node_sockets_are_never_hijacked() {
    with_harness(
        HarnessOptions {
            port_range: (31000, 31000),
            ..HarnessOptions::default()
        },
        |h| {
            // The node listens on the only NAT port: pod flows must not take it.
            let listener = std::net::TcpListener::bind("0.0.0.0:31000").unwrap();
            let (verdict, _) = h.from_pod(&pod_tcp(4000, 80, TCP_SYN));
            assert_eq!(verdict, TC_ACT_SHOT);
            assert_eq!(h.counter(Counter::DropPortExhausted), 1);
            // And traffic to the node's socket is the node's.
            let (verdict, _) = h.from_wire(&wire_tcp(31000, TCP_SYN));
            assert_eq!(verdict, TC_ACT_OK);
            drop(listener);
            assert_eq!(h.from_pod(&pod_tcp(4000, 80, TCP_SYN)).0, TC_ACT_REDIRECT);
        },
    )
    .unwrap();
}

#[test]
fn ports_of_finished_connections_are_reclaimed() {
    with_harness(
        HarnessOptions {
            port_range: (32000, 32000),
            ..HarnessOptions::default()
        },
        |h| {
            let first = open_tcp(h, 5000);
            let key = pod_key(PROTO_TCP, 5000, SERVER_IP, 80);
            // Both FINs seen: the connection is over.
            h.from_pod(&pod_tcp(5000, 80, TCP_FIN | TCP_ACK));
            assert_eq!(
                h.from_wire(&wire_tcp(first.src_port(), TCP_FIN | TCP_ACK))
                    .0,
                TC_ACT_REDIRECT
            );
            // Within a second the port still belongs to it.
            assert_eq!(h.from_pod(&pod_tcp(5001, 80, TCP_SYN)).0, TC_ACT_SHOT);
            assert_eq!(h.counter(Counter::DropPortExhausted), 1);
            // Idle for over a second: a new connection takes the port over.
            let mut old = h.flow(&key).unwrap();
            old.last_seen_ns -= 2_000_000_000;
            h.maps.conntrack.insert(key, old, 0).unwrap();
            let second = open_tcp(h, 5002);
            assert_eq!(second.src_port(), first.src_port());
            assert_eq!(h.counter(Counter::PortReclaimed), 1);
            assert!(h.flow(&key).is_none(), "the finished flow is gone");
            let reply = key.reply_tuple(addr(NODE_IP), first.src_port());
            assert_eq!(
                h.binding(&reply),
                Some(pod_key(PROTO_TCP, 5002, SERVER_IP, 80))
            );
            // An established connection's port is never taken.
            let (verdict, _) = h.from_pod(&pod_tcp(5003, 80, TCP_SYN));
            assert_eq!(verdict, TC_ACT_SHOT);
        },
    )
    .unwrap();
}
