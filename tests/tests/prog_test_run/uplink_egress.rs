//! The uplink's egress program: the safety net for pod packets that went through the host
//! stack, and the node's own traffic.

use datapath_common::{
    counters::Counter,
    flow::{PROTO_TCP, PROTO_UDP},
    tcp::{TCP_ACK, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed},
    testrun::{
        pod_tcp, with_harness, HarnessOptions, NODE_IP, POD_IP, SERVER_IP, SERVER_MAC, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};

use crate::{wire_tcp, UPLINK_MAC};

#[test]
fn egress_safety_net_translates_pod_packets_from_the_host_stack() {
    with_harness(HarnessOptions::default(), |h| {
        let frame = Ipv4Packet::new(
            POD_IP,
            SERVER_IP,
            PROTO_TCP,
            packet::tcp(POD_IP, SERVER_IP, 44000, 80, TCP_SYN, b""),
        )
        .frame(UPLINK_MAC, SERVER_MAC);
        let (verdict, out) = h.to_wire(&frame);
        assert_eq!(verdict, TC_ACT_OK);
        let out = Parsed::parse(&out);
        assert_eq!(out.src, NODE_IP);
        assert!(out.ip_checksum_ok() && out.l4_checksum_ok());
        assert_eq!(h.counter(Counter::TranslatedEgress), 1);
        // The reply still reaches the pod, via the neighbour path (no MACs learnt).
        let (verdict, _) = h.from_wire(&wire_tcp(out.src_port(), TCP_SYN | TCP_ACK));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        // An unregistered pod-range source leaving the uplink is dropped.
        let stray = Ipv4Packet::new(
            [169, 254, 174, 1],
            SERVER_IP,
            PROTO_UDP,
            packet::udp([169, 254, 174, 1], SERVER_IP, 1, 2, b"", true),
        )
        .frame(UPLINK_MAC, SERVER_MAC);
        assert_eq!(h.to_wire(&stray).0, TC_ACT_SHOT);
    })
    .unwrap();
}

/// The uplink's safety net without a configuration (an install caught half-way): a
/// link-local source never leaves untranslated; the node's own traffic passes.
#[test]
fn an_unconfigured_uplink_drops_pod_sources_and_passes_the_node() {
    with_harness(HarnessOptions::default(), |h| {
        // SAFETY: Config is plain data; all zero is "not configured".
        let unconfigured: datapath_common::config::Config = unsafe { std::mem::zeroed() };
        h.maps.config.set(0, unconfigured, 0).unwrap();
        let (verdict, _) = h.to_wire(&pod_tcp(40200, 80, TCP_SYN));
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::DropNotConfigured), 1);
        let node = Ipv4Packet::new(
            NODE_IP,
            SERVER_IP,
            PROTO_TCP,
            packet::tcp(NODE_IP, SERVER_IP, 40200, 80, TCP_SYN, b""),
        )
        .frame(UPLINK_MAC, SERVER_MAC);
        let (verdict, _) = h.to_wire(&node);
        assert_eq!(verdict, TC_ACT_OK);
    })
    .unwrap();
}
