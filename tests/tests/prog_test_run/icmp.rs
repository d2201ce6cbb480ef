//! ICMP: echo translated by its identifier, errors translated inside and out (RFC 5508) both
//! ways.

use datapath_common::{
    counters::Counter,
    flow::{PROTO_ICMP, PROTO_UDP},
    tcp::TCP_SYN,
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        with_harness, HarnessOptions, FAR_IP, NODE_IP, POD_IP, ROUTER_IP, ROUTER_MAC, SERVER_IP,
        SERVER_MAC, TC_ACT_OK, TC_ACT_REDIRECT,
    },
};

use crate::{open_tcp, pod_key, wire_tcp, UPLINK_MAC};

#[test]
fn icmp_echo_uses_the_identifier_as_port() {
    with_harness(HarnessOptions::default(), |h| {
        let frame = Ipv4Packet::new(POD_IP, SERVER_IP, PROTO_ICMP, packet::echo(8, 777, 1))
            .frame(POD_MAC, GW_MAC);
        let (verdict, out) = h.from_pod(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let out = Parsed::parse(&out);
        let nat_id = out.src_port(); // bytes 0-1 are type/code; the identifier is at 4
        let _ = nat_id;
        let id = u16::from_be_bytes([out.l4()[4], out.l4()[5]]);
        assert!((20000..=29999).contains(&id));
        assert!(out.ip_checksum_ok() && out.l4_checksum_ok());
        let flow = h.flow(&pod_key(PROTO_ICMP, 777, SERVER_IP, 0)).unwrap();
        assert_eq!(flow.nat_port, id);
        let reply = Ipv4Packet::new(SERVER_IP, NODE_IP, PROTO_ICMP, packet::echo(0, id, 1))
            .frame(SERVER_MAC, UPLINK_MAC);
        let (verdict, back) = h.from_wire(&reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let back = Parsed::parse(&back);
        assert_eq!(back.dst, POD_IP);
        assert_eq!(u16::from_be_bytes([back.l4()[4], back.l4()[5]]), 777);
        assert!(back.l4_checksum_ok());
    })
    .unwrap();
}

/// An ICMP error from `from` about the translated packet `quoted` (its IPv4 header and first
/// `quote_len` L4 bytes).
fn icmp_error(
    from: [u8; 4],
    to: [u8; 4],
    ty: u8,
    code: u8,
    rest: [u8; 4],
    quoted: &Parsed,
    quote_len: usize,
) -> Vec<u8> {
    let quote = &quoted.ip[..quoted.ihl + quote_len];
    Ipv4Packet::new(from, to, PROTO_ICMP, packet::icmp(ty, code, rest, quote))
        .frame(ROUTER_MAC, UPLINK_MAC)
}

#[test]
fn icmp_errors_from_the_wire_are_translated_inside_and_out() {
    with_harness(HarnessOptions::default(), |h| {
        // TCP quoted in full (28 bytes, checksum included) and UDP quoted with 8 bytes.
        let tcp_out = open_tcp(h, 41000);
        let udp_frame = Ipv4Packet::new(
            POD_IP,
            FAR_IP,
            PROTO_UDP,
            packet::udp(POD_IP, FAR_IP, 6000, 33434, b"probe", true),
        )
        .frame(POD_MAC, GW_MAC);
        let udp_out = Parsed::parse(&h.from_pod(&udp_frame).1);
        assert_eq!(
            udp_out.dst_mac, ROUTER_MAC,
            "far destination via the router"
        );
        let cases = [
            (3u8, 4u8, [0, 0, 0x05, 0x00], &tcp_out, 25usize, 41000u16), // fragmentation needed, MTU 1280
            (11, 0, [0; 4], &udp_out, 8, 6000),                          // time exceeded
            (3, 3, [0; 4], &udp_out, 13, 6000),                          // port unreachable
            (12, 0, [20, 0, 0, 0], &udp_out, 8, 6000), // parameter problem, pointer 20
        ];
        for (i, (ty, code, rest, quoted, len, pod_port)) in cases.into_iter().enumerate() {
            let (verdict, out) =
                h.from_wire(&icmp_error(ROUTER_IP, NODE_IP, ty, code, rest, quoted, len));
            assert_eq!(verdict, TC_ACT_REDIRECT, "case {i}");
            let out = Parsed::parse(&out);
            assert_eq!(out.dst, POD_IP);
            assert!(out.ip_checksum_ok(), "outer IPv4 checksum, case {i}");
            assert!(out.l4_checksum_ok(), "ICMP checksum, case {i}");
            assert_eq!(&out.l4()[4..8], &rest, "MTU field kept");
            let inner = &out.l4()[8..];
            assert_eq!(&inner[12..16], &POD_IP, "inner source");
            assert_eq!(
                packet::ones_complement_sum(&inner[..20]),
                0xffff,
                "inner IPv4 checksum"
            );
            assert_eq!(
                u16::from_be_bytes([inner[20], inner[21]]),
                pod_port,
                "inner source port"
            );
            if quoted.proto == PROTO_UDP {
                // The quoted UDP checksum covers data we do not have; check it moved by the
                // same amount as the address and port (recompute over the full original).
                let orig = packet::udp(POD_IP, FAR_IP, 6000, 33434, b"probe", true);
                assert_eq!(
                    &inner[26..28],
                    &orig[6..8],
                    "inner UDP checksum back to the pod's"
                );
            }
        }
        assert_eq!(h.counter(Counter::IcmpErrorIn), 4);
        // An error about something we never sent is the node's business.
        let stranger = Parsed::parse(&wire_tcp(12345, TCP_SYN));
        let (verdict, _) = h.from_wire(&icmp_error(ROUTER_IP, NODE_IP, 3, 1, [0; 4], &stranger, 8));
        assert_eq!(verdict, TC_ACT_OK);
    })
    .unwrap();
}

#[test]
fn icmp_error_from_a_pod_about_a_reply_is_translated() {
    with_harness(HarnessOptions::default(), |h| {
        let frame = Ipv4Packet::new(
            POD_IP,
            SERVER_IP,
            PROTO_UDP,
            packet::udp(POD_IP, SERVER_IP, 7000, 53, b"q", true),
        )
        .frame(POD_MAC, GW_MAC);
        h.from_pod(&frame);
        let nat_port = h
            .flow(&pod_key(PROTO_UDP, 7000, SERVER_IP, 53))
            .unwrap()
            .nat_port;
        // The reply as the pod received it (already reverse-translated) ...
        let delivered = Parsed::parse(
            &Ipv4Packet::new(
                SERVER_IP,
                POD_IP,
                PROTO_UDP,
                packet::udp(SERVER_IP, POD_IP, 53, 7000, b"late", true),
            )
            .frame(SERVER_MAC, POD_MAC),
        );
        // ... and the pod's port unreachable about it.
        let err = Ipv4Packet::new(
            POD_IP,
            SERVER_IP,
            PROTO_ICMP,
            packet::icmp(3, 3, [0; 4], &delivered.ip),
        )
        .frame(POD_MAC, GW_MAC);
        let (verdict, out) = h.from_pod(&err);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let out = Parsed::parse(&out);
        assert_eq!(out.src, NODE_IP);
        assert!(out.ip_checksum_ok() && out.l4_checksum_ok());
        let inner = &out.l4()[8..];
        assert_eq!(&inner[16..20], &NODE_IP);
        assert_eq!(u16::from_be_bytes([inner[22], inner[23]]), nat_port);
        // The embedded UDP checksum, fully quoted, verifies after translation.
        let inner = Parsed::parse(&[[0u8; 12].as_slice(), &[0x08, 0x00], inner].concat());
        assert!(inner.l4_checksum_ok());
        assert_eq!(h.counter(Counter::IcmpErrorOut), 1);
    })
    .unwrap();
}
