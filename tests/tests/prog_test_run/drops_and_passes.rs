//! What is dropped and what passes untouched, each with its counter; TTLs that end at the
//! node; a drop counter that cannot move.

use datapath_common::{
    counters::Counter,
    flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    maps as names,
    tcp::{TCP_ACK, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        pod_tcp, with_harness, Harness, HarnessOptions, FAR_IP, NODE_IP, OTHER_POD_IP, POD_IP,
        ROUTER_IP, ROUTER_MAC, SERVER_IP, SERVER_MAC, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};

use crate::{open_tcp, pod_key, wire_tcp, UPLINK_MAC};

#[test]
fn every_drop_reason_is_counted() {
    with_harness(HarnessOptions::default(), |h| {
        let expect_drop = |h: &mut Harness, frame: Vec<u8>, wire: bool, counter: Counter| {
            let before = h.counter(counter);
            let (verdict, _) = if wire {
                h.from_wire(&frame)
            } else {
                h.from_pod(&frame)
            };
            assert_eq!(verdict, TC_ACT_SHOT, "{counter:?}");
            assert_eq!(h.counter(counter), before + 1, "{counter:?}");
        };
        let udp_to = |src: [u8; 4], dst: [u8; 4]| {
            Ipv4Packet::new(
                src,
                dst,
                PROTO_UDP,
                packet::udp(src, dst, 1000, 53, b"x", true),
            )
            .frame(POD_MAC, GW_MAC)
        };
        expect_drop(
            h,
            udp_to(POD_IP, OTHER_POD_IP),
            false,
            Counter::DropPodToPod,
        );
        // The other pod's address, but from this pod's veth.
        expect_drop(
            h,
            udp_to(OTHER_POD_IP, SERVER_IP),
            false,
            Counter::DropSpoofedSource,
        );
        // An unregistered pod address, and an address outside the pod range.
        expect_drop(
            h,
            udp_to([169, 254, 173, 9], SERVER_IP),
            false,
            Counter::DropSpoofedSource,
        );
        expect_drop(
            h,
            udp_to([10, 0, 0, 1], SERVER_IP),
            false,
            Counter::DropSpoofedSource,
        );
        // Wire → pod range (another node, or anyone).
        let cross = Ipv4Packet::new(
            [192, 0, 2, 11],
            POD_IP,
            PROTO_UDP,
            packet::udp([192, 0, 2, 11], POD_IP, 9, 9, b"x", true),
        )
        .frame(SERVER_MAC, UPLINK_MAC);
        expect_drop(h, cross, true, Counter::DropCrossNode);
        // Unsolicited TCP to a NAT port.
        expect_drop(
            h,
            wire_tcp(25000, TCP_SYN),
            true,
            Counter::DropUntrackedInbound,
        );
        // GRE from a pod.
        let gre = Ipv4Packet::new(POD_IP, SERVER_IP, 47, vec![0; 8]).frame(POD_MAC, GW_MAC);
        expect_drop(h, gre, false, Counter::DropUnsupportedProtocol);
        // An ICMP timestamp request from a pod.
        let ts = Ipv4Packet::new(
            POD_IP,
            SERVER_IP,
            PROTO_ICMP,
            packet::icmp(13, 0, [0; 4], &[0; 12]),
        )
        .frame(POD_MAC, GW_MAC);
        expect_drop(h, ts, false, Counter::DropIcmpUntracked);
        // Malformed: truncated TCP, IHL < 5, total length beyond the frame, truncated IPv4.
        let mut short_tcp = pod_tcp(1, 80, TCP_SYN);
        short_tcp.truncate(14 + 20 + 10);
        short_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
        let ck = {
            short_tcp[24..26].copy_from_slice(&[0, 0]);
            packet::internet_checksum(&short_tcp[14..34])
        };
        short_tcp[24..26].copy_from_slice(&ck.to_be_bytes());
        expect_drop(h, short_tcp, false, Counter::DropMalformed);
        let mut bad_ihl = pod_tcp(2, 80, TCP_SYN);
        bad_ihl[14] = 0x44;
        expect_drop(h, bad_ihl, false, Counter::DropMalformed);
        let mut long_len = pod_tcp(3, 80, TCP_SYN);
        long_len[16..18].copy_from_slice(&1500u16.to_be_bytes());
        expect_drop(h, long_len, false, Counter::DropMalformed);
        // A total length shorter than the header (BPF_PROG_TEST_RUN itself refuses frames
        // too short for an IPv4 header, as the stack does).
        let mut short_len = wire_tcp(4, TCP_SYN);
        short_len[16..18].copy_from_slice(&12u16.to_be_bytes());
        expect_drop(h, short_len, true, Counter::DropMalformed);
        // Nothing was translated by any of these.
        assert_eq!(h.counter(Counter::TranslatedOut), 0);
        assert_eq!(h.counter(Counter::FlowCreated), 0);
    })
    .unwrap();
}

#[test]
fn passes_leave_packets_untouched() {
    with_harness(HarnessOptions::default(), |h| {
        let ipv6 = {
            let mut f = vec![0u8; 14 + 40];
            f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            f[14] = 0x60;
            f
        };
        let arp = packet::arp();
        let mcast = Ipv4Packet::new(
            POD_IP,
            [224, 0, 0, 251],
            PROTO_UDP,
            packet::udp(POD_IP, [224, 0, 0, 251], 5353, 5353, b"m", true),
        )
        .frame(POD_MAC, GW_MAC);
        let to_gw = Ipv4Packet::new(
            POD_IP,
            [169, 254, 172, 1],
            PROTO_ICMP,
            packet::echo(8, 1, 1),
        )
        .frame(POD_MAC, GW_MAC);
        let to_node = Ipv4Packet::new(
            POD_IP,
            NODE_IP,
            PROTO_TCP,
            packet::tcp(POD_IP, NODE_IP, 1, 10250, TCP_SYN, b""),
        )
        .frame(POD_MAC, GW_MAC);
        let node_reply = Ipv4Packet::new(
            SERVER_IP,
            NODE_IP,
            PROTO_TCP,
            packet::tcp(SERVER_IP, NODE_IP, 22, 50000, TCP_ACK, b""),
        )
        .frame(SERVER_MAC, UPLINK_MAC);
        let cases: [(&[u8], bool, Counter); 7] = [
            (&ipv6, false, Counter::PassNonIpv4),
            (&ipv6, true, Counter::PassNonIpv4),
            (&arp, false, Counter::PassNonIpv4),
            (&mcast, false, Counter::PassMulticast),
            (&to_gw, false, Counter::PassLocal),
            (&to_node, false, Counter::PassLocal),
            (&node_reply, true, Counter::PassNode),
        ];
        for (frame, wire, counter) in cases {
            let before = h.counter(counter);
            let (verdict, out) = if wire {
                h.from_wire(frame)
            } else {
                h.from_pod(frame)
            };
            assert_eq!(verdict, TC_ACT_OK, "{counter:?}");
            assert_eq!(out, frame, "{counter:?}: untouched");
            assert_eq!(h.counter(counter), before + 1, "{counter:?}");
        }
        // The node's own traffic at the uplink's egress: untouched, uncounted.
        let own = Ipv4Packet::new(
            NODE_IP,
            SERVER_IP,
            PROTO_TCP,
            packet::tcp(NODE_IP, SERVER_IP, 50000, 22, TCP_ACK, b""),
        )
        .frame(UPLINK_MAC, SERVER_MAC);
        let (verdict, out) = h.to_wire(&own);
        assert_eq!((verdict, out), (TC_ACT_OK, own));
    })
    .unwrap();
}

#[test]
fn ttl_exhausted_packets_go_to_the_host_stack() {
    with_harness(HarnessOptions::default(), |h| {
        let mut p = Ipv4Packet::new(
            POD_IP,
            FAR_IP,
            PROTO_UDP,
            packet::udp(POD_IP, FAR_IP, 33000, 33434, b"", true),
        );
        p.ttl = 1;
        let frame = p.frame(POD_MAC, GW_MAC);
        assert_eq!(
            h.from_pod(&frame),
            (TC_ACT_OK, frame),
            "the host answers with time exceeded"
        );
        assert_eq!(h.counter(Counter::PassHostStack), 1);
    })
    .unwrap();
}

/// A router does not forward a packet whose TTL is 1: neither does the datapath towards a
/// pod (the instance metadata service's hop limit relies on it), whatever the packet is.
#[test]
fn replies_errors_and_fragments_with_ttl_one_never_reach_a_pod() {
    with_harness(HarnessOptions::default(), |h| {
        let out = open_tcp(h, 40100);
        let mut reply = Ipv4Packet::new(
            SERVER_IP,
            NODE_IP,
            PROTO_TCP,
            packet::tcp(
                SERVER_IP,
                NODE_IP,
                80,
                out.src_port(),
                TCP_SYN | TCP_ACK,
                b"",
            ),
        );
        reply.ttl = 1;
        let (verdict, _) = h.from_wire(&reply.frame(SERVER_MAC, UPLINK_MAC));
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::DropTtlExceeded), 1);
        assert_eq!(h.counter(Counter::TranslatedIn), 0);
        reply.ttl = 2;
        let (verdict, back) = h.from_wire(&reply.frame(SERVER_MAC, UPLINK_MAC));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let back = Parsed::parse(&back);
        assert_eq!(back.ttl, 1);
        assert!(back.ip_checksum_ok() && back.l4_checksum_ok());
        // The flow is established: its next replies take the one-lookup path, which checks
        // the TTL too.
        let mut data = Ipv4Packet::new(
            SERVER_IP,
            NODE_IP,
            PROTO_TCP,
            packet::tcp(SERVER_IP, NODE_IP, 80, out.src_port(), TCP_ACK, b"d"),
        );
        data.ttl = 1;
        let (verdict, _) = h.from_wire(&data.frame(SERVER_MAC, UPLINK_MAC));
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::DropTtlExceeded), 2);
        data.ttl = 2;
        let (verdict, back) = h.from_wire(&data.frame(SERVER_MAC, UPLINK_MAC));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(Parsed::parse(&back).ttl, 1);

        // An ICMP error about the flow, sent with TTL 1.
        let quoted = Ipv4Packet::new(
            NODE_IP,
            SERVER_IP,
            PROTO_TCP,
            packet::tcp(NODE_IP, SERVER_IP, out.src_port(), 80, TCP_SYN, b""),
        )
        .bytes();
        let mut error = Ipv4Packet::new(
            ROUTER_IP,
            NODE_IP,
            PROTO_ICMP,
            packet::icmp(3, 4, [0, 0, 0x05, 0x00], &quoted[..28]),
        );
        error.ttl = 1;
        let (verdict, _) = h.from_wire(&error.frame(ROUTER_MAC, UPLINK_MAC));
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::DropTtlExceeded), 3);
        error.ttl = 9;
        let (verdict, back) = h.from_wire(&error.frame(ROUTER_MAC, UPLINK_MAC));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let back = Parsed::parse(&back);
        assert_eq!((back.dst, back.ttl), (POD_IP, 8));
        assert!(back.ip_checksum_ok());
    })
    .unwrap();
}

/// Why `drop_redirect_failed` does not move: the redirect helpers refuse only invalid flags
/// (which the programs never pass); a redirect to a device that does not exist is accepted by
/// the helper and fails later in the kernel, after the program has returned. A reply whose
/// flow names a vanished pod interface still gets TC_ACT_REDIRECT and no count.
#[test]
fn a_redirect_to_a_vanished_device_is_not_refused_by_the_helper() {
    with_harness(HarnessOptions::default(), |h| {
        let out = open_tcp(h, 46000);
        let key = pod_key(PROTO_TCP, 46000, SERVER_IP, 80);
        let mut flow = h.flow(&key).unwrap();
        flow.pod_ifindex = 0x7fff_fff0;
        h.maps.conntrack.insert(key, flow, 0).unwrap();
        let (verdict, _) = h.from_wire(&wire_tcp(out.src_port(), TCP_SYN | TCP_ACK));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(h.counter(Counter::DropRedirectFailed), 0);
    })
    .unwrap();
}

/// The slow path run on its own (the pod-side program only tail-calls it with an IPv4 packet
/// from a registered pod, once configured): what it cannot handle is counted for what it is,
/// not as a malformed packet.
#[test]
fn the_slow_path_names_why_it_drops() {
    with_harness(HarnessOptions::default(), |h| {
        let pod_if = h.pod_ifindex;
        let (verdict, _) = h
            .run(names::PROG_FROM_POD_SLOW, &packet::arp(), pod_if)
            .unwrap();
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::DropInternal), 1);
        // SAFETY: Config is plain data; all zero is "not configured".
        let unconfigured: datapath_common::config::Config = unsafe { std::mem::zeroed() };
        h.maps.config.set(0, unconfigured, 0).unwrap();
        let syn = pod_tcp(40300, 80, TCP_SYN);
        let (verdict, _) = h.run(names::PROG_FROM_POD_SLOW, &syn, pod_if).unwrap();
        assert_eq!(verdict, TC_ACT_SHOT);
        assert_eq!(h.counter(Counter::DropNotConfigured), 1);
        assert_eq!(h.counter(Counter::DropMalformed), 0);
    })
    .unwrap();
}
