//! TCP, UDP, IPv4 options and fragments out of the pod and back: addresses, ports,
//! TTLs, MACs and checksums, through the kfunc path and the kernel's checksum helpers.

use datapath_common::{
    counters::Counter,
    flow::{FlowState, PROTO_TCP, PROTO_UDP},
    tcp::{TCP_ACK, TCP_FIN, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        addr, pod_tcp, with_harness, Harness, HarnessOptions, NODE_IP, POD_IP, SERVER_IP,
        SERVER_MAC, TC_ACT_OK, TC_ACT_REDIRECT,
    },
};

use crate::{open_tcp, pod_key, wire_tcp, UPLINK_MAC};

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
    let flow = h
        .flow_seen(&pod_key(PROTO_TCP, 40000, SERVER_IP, 80))
        .unwrap();
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

/// A TCP GSO packet (pods hand their veth up to 64 KiB at once) whose segments fit the
/// uplink's MTU takes the established fast path: what the MTU check compares is the size of
/// the segments that leave, as the kernel's forwarding check does. Its segments too large, or
/// an oversized packet that is not GSO, and it goes through the FIB.
#[test]
fn gso_packets_of_an_established_flow_take_the_fast_path() {
    with_harness(HarnessOptions::default(), |h| {
        let out = open_tcp(h, 47000);
        let key = pod_key(PROTO_TCP, 47000, SERVER_IP, 80);
        // A next hop only the cached route knows: a frame sent to it took the fast path.
        let cached_mac = [0x02, 0, 0, 0, 0, 0x99];
        let mut flow = h.flow(&key).unwrap();
        flow.out_dst_mac = cached_mac;
        h.maps.conntrack.insert(key, flow, 0).unwrap();
        let frame = Ipv4Packet::new(
            POD_IP,
            SERVER_IP,
            PROTO_TCP,
            packet::tcp(POD_IP, SERVER_IP, 47000, 80, TCP_ACK, &[7u8; 2900]),
        )
        .frame(POD_MAC, GW_MAC);
        let pod = h.pod_ifindex;
        let mut run = |gso_size| {
            h.run_skb(datapath_common::maps::PROG_FROM_POD, &frame, pod, gso_size)
                .unwrap()
        };
        // 1460-byte segments: 1500 bytes each with the IPv4 and TCP headers.
        let (verdict, sent, _) = run(1460);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let sent = Parsed::parse(&sent);
        assert_eq!(sent.dst_mac, cached_mac, "the cached route was used");
        assert_eq!(sent.src_port(), out.src_port());
        // A byte more per segment and they exceed the MTU: the FIB decides (BPF_PROG_TEST_RUN
        // gives the skb no GSO type, so the FIB's own check here leaves out the TCP header).
        let (_, sent, _) = run(1461);
        assert_ne!(
            Parsed::parse(&sent).dst_mac,
            cached_mac,
            "segments over the MTU"
        );
        // Not GSO: one packet of 2,940 bytes, which the host stack answers with
        // fragmentation needed.
        let (verdict, passed, _) = run(0);
        assert_eq!(verdict, TC_ACT_OK, "not GSO");
        assert!(passed == frame, "not GSO: passed untouched");
        assert_eq!(h.counter(Counter::PassHostStack), 1);
    })
    .unwrap();
}
