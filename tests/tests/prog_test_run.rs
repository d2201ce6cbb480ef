//! BPF_PROG_TEST_RUN on crafted frames: every translation and drop case, checked by
//! recomputing checksums, reading the counters and the maps after the run.

use datapath_common::{
    config::PortRandomisation,
    counters::Counter,
    flow::{FlowKey, FlowState, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    maps as names,
    tcp::{TCP_ACK, TCP_FIN, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        addr, with_harness, Harness, HarnessOptions, FAR_IP, NODE_IP, OTHER_POD_IP, POD_IP,
        ROUTER_IP, ROUTER_MAC, SERVER_IP, SERVER_MAC, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};

const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];

fn pod_tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Ipv4Packet::new(
        POD_IP,
        SERVER_IP,
        PROTO_TCP,
        packet::tcp(POD_IP, SERVER_IP, sport, dport, flags, b"hello"),
    )
    .frame(POD_MAC, GW_MAC)
}

fn pod_key(proto: u8, sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey::new(proto, addr(POD_IP), sport, addr(dst), dport)
}

/// Sends a SYN from the pod and returns the translated frame.
fn open_tcp(h: &mut Harness, sport: u16) -> Parsed {
    let (verdict, out) = h.from_pod(&pod_tcp(sport, 80, TCP_SYN));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    Parsed::parse(&out)
}

fn wire_tcp(dst_port: u16, flags: u8) -> Vec<u8> {
    Ipv4Packet::new(
        SERVER_IP,
        NODE_IP,
        PROTO_TCP,
        packet::tcp(SERVER_IP, NODE_IP, 80, dst_port, flags, b"world!"),
    )
    .frame(SERVER_MAC, UPLINK_MAC)
}

#[test]
fn tcp_from_pod_is_translated_checksummed_and_redirected() {
    with_harness(HarnessOptions::default(), tcp_translation).unwrap();
}

#[test]
fn udp_zero_checksum_stays_zero_and_nonzero_stays_valid() {
    with_harness(HarnessOptions::default(), udp_translation).unwrap();
}

/// Kernels before 6.2 have no `bpf_cast_to_kern_ctx`: the loader then leaves TCP/UDP
/// checksums to the kernel's helpers. The same translations, through that path.
#[test]
fn translation_with_the_kernel_checksum_helpers() {
    let opts = HarnessOptions {
        kernel_checksum_helpers: true,
        ..HarnessOptions::default()
    };
    with_harness(opts.clone(), tcp_translation).unwrap();
    with_harness(opts, udp_translation).unwrap();
}

fn tcp_translation(h: &mut Harness) {
    let out = open_tcp(h, 40000);
    assert_eq!(out.src, NODE_IP);
    assert_eq!(out.dst, SERVER_IP);
    assert!(
        (20000..=29999).contains(&out.src_port()),
        "port {}",
        out.src_port()
    );
    assert_eq!(out.dst_port(), 80);
    assert!(out.ip_checksum_ok() && out.l4_checksum_ok());
    assert_eq!(out.ttl, 63, "forwarding decrements the TTL");
    assert_eq!(out.dst_mac, SERVER_MAC, "next hop's MAC from the FIB");
    let flow = h
        .flow(&pod_key(PROTO_TCP, 40000, SERVER_IP, 80))
        .expect("flow");
    assert_eq!(flow.nat_port, out.src_port());
    assert_eq!(flow.state(), Some(FlowState::SynSent));
    assert_eq!((flow.packets_out, flow.pod_ifindex), (1, h.pod_ifindex));
    assert_eq!(flow.pod_mac, POD_MAC);
    let reply = pod_key(PROTO_TCP, 40000, SERVER_IP, 80).reply_tuple(addr(NODE_IP), flow.nat_port);
    assert_eq!(
        h.binding(&reply),
        Some(pod_key(PROTO_TCP, 40000, SERVER_IP, 80))
    );
    assert_eq!(h.counter(Counter::TranslatedOut), 1);
    assert_eq!(h.counter(Counter::FlowCreated), 1);

    // The reply goes to the pod, straight into its namespace.
    let (verdict, back) = h.from_wire(&wire_tcp(flow.nat_port, TCP_SYN | TCP_ACK));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let back = Parsed::parse(&back);
    assert_eq!((back.src, back.dst), (SERVER_IP, POD_IP));
    assert_eq!((back.src_port(), back.dst_port()), (80, 40000));
    assert!(back.ip_checksum_ok() && back.l4_checksum_ok());
    assert_eq!(back.ttl, 63, "the hop to the pod decrements the TTL");
    assert_eq!((back.dst_mac, back.src_mac), (POD_MAC, GW_MAC));
    let flow = h.flow(&pod_key(PROTO_TCP, 40000, SERVER_IP, 80)).unwrap();
    assert_eq!(flow.state(), Some(FlowState::Established));
    assert_eq!((flow.packets_in, flow.bytes_in), (1, back.ip.len() as u64));
    assert_eq!(h.counter(Counter::TranslatedIn), 1);

    // Later packets reuse the flow and its port; FIN moves it to closing.
    let again = Parsed::parse(&h.from_pod(&pod_tcp(40000, 80, TCP_ACK | TCP_FIN)).1);
    assert_eq!(again.src_port(), flow.nat_port);
    let flow = h.flow(&pod_key(PROTO_TCP, 40000, SERVER_IP, 80)).unwrap();
    assert_eq!(flow.state(), Some(FlowState::Closing));
    assert_eq!(h.counter(Counter::FlowCreated), 1);
}

fn udp_translation(h: &mut Harness) {
    for (sport, with_csum) in [(5000u16, false), (5001, true)] {
        let frame = Ipv4Packet::new(
            POD_IP,
            SERVER_IP,
            PROTO_UDP,
            packet::udp(POD_IP, SERVER_IP, sport, 53, b"q", with_csum),
        )
        .frame(POD_MAC, GW_MAC);
        let (verdict, out) = h.from_pod(&frame);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let out = Parsed::parse(&out);
        assert_eq!(out.src, NODE_IP);
        let csum = u16::from_be_bytes([out.l4()[6], out.l4()[7]]);
        if with_csum {
            assert_ne!(csum, 0, "a real checksum never becomes 0");
        } else {
            assert_eq!(csum, 0, "no checksum stays no checksum");
        }
        assert!(out.ip_checksum_ok() && out.l4_checksum_ok());
    }
    // Reply to the checksummed flow.
    let flow = h.flow(&pod_key(PROTO_UDP, 5001, SERVER_IP, 53)).unwrap();
    let reply = Ipv4Packet::new(
        SERVER_IP,
        NODE_IP,
        PROTO_UDP,
        packet::udp(SERVER_IP, NODE_IP, 53, flow.nat_port, b"answer", true),
    )
    .frame(SERVER_MAC, UPLINK_MAC);
    let (verdict, back) = h.from_wire(&reply);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let back = Parsed::parse(&back);
    assert_eq!((back.dst, back.dst_port()), (POD_IP, 5001));
    assert!(back.l4_checksum_ok());
    assert_eq!(
        h.flow(&pod_key(PROTO_UDP, 5001, SERVER_IP, 53))
            .unwrap()
            .state(),
        Some(FlowState::Replied)
    );
}

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
        let arp = {
            let mut f = vec![0u8; 42];
            f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
            f
        };
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
fn ipv4_options_and_fragments_are_translated_correctly() {
    with_harness(HarnessOptions::default(), |h| {
        // IHL 6: a 4-byte option (NOP padding) moves the TCP header.
        let mut with_opts = Ipv4Packet::new(
            POD_IP,
            SERVER_IP,
            PROTO_TCP,
            packet::tcp(POD_IP, SERVER_IP, 42000, 80, TCP_SYN, b""),
        );
        with_opts.options = vec![1, 1, 1, 0];
        let (verdict, out) = h.from_pod(&with_opts.frame(POD_MAC, GW_MAC));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let out = Parsed::parse(&out);
        assert_eq!((out.ihl, out.dst_port()), (24, 80));
        assert!((20000..=29999).contains(&out.src_port()));
        assert!(out.ip_checksum_ok() && out.l4_checksum_ok());

        // Outbound fragments: the first carries the UDP header, the second only data.
        let full = packet::udp(POD_IP, SERVER_IP, 8000, 53, &[7u8; 64], true);
        let mut first = Ipv4Packet::new(POD_IP, SERVER_IP, PROTO_UDP, full[..40].to_vec());
        first.frag = 0x2000; // MF
        first.id = 99;
        let mut second = Ipv4Packet::new(POD_IP, SERVER_IP, PROTO_UDP, full[40..].to_vec());
        second.frag = 5; // offset 40 bytes
        second.id = 99;
        let f1 = Parsed::parse(&h.from_pod(&first.frame(POD_MAC, GW_MAC)).1);
        let (v2, f2) = h.from_pod(&second.frame(POD_MAC, GW_MAC));
        assert_eq!(v2, TC_ACT_REDIRECT);
        let f2 = Parsed::parse(&f2);
        assert_eq!((f1.src, f2.src), (NODE_IP, NODE_IP));
        assert!(f1.ip_checksum_ok() && f2.ip_checksum_ok());
        // Reassembled, the UDP checksum verifies with the node address.
        let mut whole = f1.l4().to_vec();
        whole.extend_from_slice(f2.l4());
        let nat_port = u16::from_be_bytes([whole[0], whole[1]]);
        assert_eq!(
            packet::l4_checksum(NODE_IP, SERVER_IP, PROTO_UDP, &{
                let mut w = whole.clone();
                w[6..8].copy_from_slice(&[0, 0]);
                w
            }),
            u16::from_be_bytes([whole[6], whole[7]])
        );
        assert_eq!(h.counter(Counter::FragmentOut), 1);

        // Inbound fragments of the reply: the later one follows the first to the pod.
        let reply = packet::udp(SERVER_IP, NODE_IP, 53, nat_port, &[9u8; 64], true);
        let mut r1 = Ipv4Packet::new(SERVER_IP, NODE_IP, PROTO_UDP, reply[..40].to_vec());
        r1.frag = 0x2000;
        r1.id = 555;
        let mut r2 = Ipv4Packet::new(SERVER_IP, NODE_IP, PROTO_UDP, reply[40..].to_vec());
        r2.frag = 5;
        r2.id = 555;
        let (v1, o1) = h.from_wire(&r1.frame(SERVER_MAC, UPLINK_MAC));
        let (v2, o2) = h.from_wire(&r2.frame(SERVER_MAC, UPLINK_MAC));
        assert_eq!((v1, v2), (TC_ACT_REDIRECT, TC_ACT_REDIRECT));
        let (o1, o2) = (Parsed::parse(&o1), Parsed::parse(&o2));
        assert_eq!((o1.dst, o2.dst, o1.dst_port()), (POD_IP, POD_IP, 8000));
        assert!(o1.ip_checksum_ok() && o2.ip_checksum_ok());
        assert_eq!(h.counter(Counter::FragmentIn), 1);
        // A later fragment nobody announced goes to the node untouched.
        let mut stray = r2.clone();
        stray.id = 556;
        let frame = stray.frame(SERVER_MAC, UPLINK_MAC);
        assert_eq!(h.from_wire(&frame), (TC_ACT_OK, frame));
        assert_eq!(h.counter(Counter::PassFragmentUntracked), 1);
    })
    .unwrap();
}

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

/// The established-flow path, timed by the kernel (`Harness::run_cost`: 20,000 single runs,
/// interquartile mean); the cost of a call's timing frame is measured with a frame the
/// program passes at its first check and subtracted.
#[test]
fn established_path_cost_is_bounded() {
    // The slowest of ten runs of this test on an otherwise idle moment of this machine kind
    // (kernel 6.18, kfunc path; docs/evidence.md has all ten): outbound 45.0-52.3 ns, reply
    // 61.0-75.0 ns, net of the test-run frame.
    const MEASURED_OUT_MAX_NS: f64 = 52.3;
    const MEASURED_IN_MAX_NS: f64 = 75.0;
    // Machine noise: the same runs during a full `cargo xtask test` on 2 shared cores.
    const NOISE_ALLOWANCE_NS: f64 = 30.0;
    // The helper path costs only 8-17 ns more here (same ten runs), less than the noise, so
    // the bound cannot tell the paths apart: the path itself is asserted.
    let kfunc = with_harness(HarnessOptions::default(), |h| {
        assert_eq!(
            h.checksum_path, "kfunc",
            "the programs fell back to the checksum helpers"
        );
        established_cost(h)
    })
    .unwrap();
    let helpers = with_harness(
        HarnessOptions {
            kernel_checksum_helpers: true,
            ..HarnessOptions::default()
        },
        |h| {
            assert_eq!(h.checksum_path, "helpers");
            established_cost(h)
        },
    )
    .unwrap();
    eprintln!(
        "net of the frame: kfunc out {:.1} in {:.1} ns; helpers out {:.1} in {:.1} ns",
        kfunc.0, kfunc.1, helpers.0, helpers.1
    );
    let (out_bound, in_bound) = (
        MEASURED_OUT_MAX_NS + NOISE_ALLOWANCE_NS,
        MEASURED_IN_MAX_NS + NOISE_ALLOWANCE_NS,
    );
    assert!(
        kfunc.0 < out_bound,
        "established outbound path {:.1} ns, bound {out_bound:.1} ns",
        kfunc.0
    );
    assert!(
        kfunc.1 < in_bound,
        "reply path {:.1} ns, bound {in_bound:.1} ns",
        kfunc.1
    );
}

/// Net cost (outbound, reply) of an established TCP flow's packets, in ns: the
/// interquartile mean of 20000 single runs, less that of a frame the program passes at its
/// first check.
fn established_cost(h: &mut Harness) -> (f64, f64) {
    open_tcp(h, 45000);
    let frame = pod_tcp(45000, 80, TCP_ACK);
    let reply_port = h
        .flow(&pod_key(PROTO_TCP, 45000, SERVER_IP, 80))
        .unwrap()
        .nat_port;
    let reply = wire_tcp(reply_port, TCP_ACK);
    let mut arp = vec![0u8; 42];
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let (pod_if, up_if) = (h.pod_ifindex, h.uplink_ifindex);
    let (from_pod, ingress) = (
        datapath_common::maps::PROG_FROM_POD,
        datapath_common::maps::PROG_UPLINK_INGRESS,
    );
    let base = h
        .run_cost(from_pod, pod_if, 20_000, |_| arp.clone())
        .unwrap();
    let out = h
        .run_cost(from_pod, pod_if, 20_000, |_| frame.clone())
        .unwrap();
    let inbound = h
        .run_cost(ingress, up_if, 20_000, |_| reply.clone())
        .unwrap();
    let out_net = out.interquartile_mean - base.interquartile_mean;
    let in_net = inbound.interquartile_mean - base.interquartile_mean;
    eprintln!(
        "BPF_PROG_TEST_RUN ({} checksums), 20000 calls each, interquartile mean (median): established out {:.1} ns ({}), reply in {:.1} ns ({}), pass-first-check frame {:.1} ns ({}); net of the frame: out {out_net:.1} ns, in {in_net:.1} ns",
        h.checksum_path, out.interquartile_mean, out.median, inbound.interquartile_mean, inbound.median, base.interquartile_mean, base.median
    );
    (out_net, in_net)
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
        assert_eq!(h.counter(Counter::DropTtlExceeded), 2);
        error.ttl = 9;
        let (verdict, back) = h.from_wire(&error.frame(ROUTER_MAC, UPLINK_MAC));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let back = Parsed::parse(&back);
        assert_eq!((back.dst, back.ttl), (POD_IP, 8));
        assert!(back.ip_checksum_ok());
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

/// The slow path run on its own (the pod-side program only tail-calls it with an IPv4 packet
/// from a registered pod, once configured): what it cannot handle is counted for what it is,
/// not as a malformed packet.
#[test]
fn the_slow_path_names_why_it_drops() {
    with_harness(HarnessOptions::default(), |h| {
        let pod_if = h.pod_ifindex;
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let (verdict, _) = h.run(names::PROG_FROM_POD_SLOW, &arp, pod_if).unwrap();
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
