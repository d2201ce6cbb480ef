//! Random and mutated frames through the real programs (BPF_PROG_TEST_RUN). Every frame gets a
//! valid verdict, exactly one verdict counter, and is only rewritten when it is translated:
//! a frame from a pod only if its source is the registered pod, a frame from the wire only
//! if it is addressed to the node. `DATAPATH_FUZZ_FRAMES` sets the count (100,000 by default).

use datapath_common::{
    counters::{Counter, Kind},
    flow::{FlowKey, PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    maps as names,
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{
        with_harness, Harness, HarnessOptions, FAR_IP, NODE_IP, OTHER_POD_IP, POD_IP, SERVER_IP,
        SERVER_MAC, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn verdict_total(h: &Harness) -> u64 {
    h.maps
        .counters()
        .unwrap()
        .into_iter()
        .filter(|(c, _)| c.kind() != Kind::Event)
        .map(|(_, v)| v)
        .sum()
}

/// A whole, unfragmented IPv4 packet (total length = what the frame holds) whose checksums
/// verify: its rewrite must keep them verifying.
fn well_formed(p: &Parsed) -> bool {
    let total = usize::from(u16::from_be_bytes([p.ip[2], p.ip[3]]));
    let fragment = u16::from_be_bytes([p.ip[6], p.ip[7]]) & 0x3fff != 0;
    p.ip[0] >> 4 == 4
        && p.ihl >= 20
        && total == p.ip.len()
        && p.ip.len() >= p.ihl + 8
        && !fragment
        && p.ip_checksum_ok()
        && p.l4_checksum_ok()
}

/// Ports and checksums of a translated well-formed packet: the translated side's port is the
/// flow's NAT port (outbound) or the pod's own port (replies), the other port is unchanged,
/// and both checksums still verify.
fn check_rewrite(h: &Harness, from_pod: bool, input: &Parsed, output: &Parsed, frame: &[u8]) {
    assert!(
        output.ip_checksum_ok(),
        "IPv4 checksum broken by the rewrite of {frame:02x?}"
    );
    assert!(
        output.l4_checksum_ok(),
        "L4 checksum broken by the rewrite of {frame:02x?}"
    );
    if ![PROTO_TCP, PROTO_UDP].contains(&input.proto) {
        return;
    }
    let key = |p: &Parsed| {
        FlowKey::new(
            p.proto,
            u32::from_be_bytes(p.src),
            p.src_port(),
            u32::from_be_bytes(p.dst),
            p.dst_port(),
        )
    };
    if from_pod {
        assert_eq!(
            output.dst_port(),
            input.dst_port(),
            "destination port changed: {frame:02x?}"
        );
        let flow = h
            .flow(&key(input))
            .expect("a translated packet has its flow");
        assert_eq!(
            output.src_port(),
            flow.nat_port,
            "not the flow's NAT port: {frame:02x?}"
        );
    } else {
        assert_eq!(
            output.src_port(),
            input.src_port(),
            "remote port changed: {frame:02x?}"
        );
        let owner = h
            .binding(&key(input))
            .expect("a translated reply has its binding");
        assert_eq!(
            output.dst_port(),
            owner.src_port,
            "not the pod's port: {frame:02x?}"
        );
    }
}

/// A plausible frame: one of the shapes the programs care about.
fn seed_frame(rng: &mut Rng, from_pod: bool) -> Vec<u8> {
    let addrs: [[u8; 4]; 6] = [
        POD_IP,
        OTHER_POD_IP,
        SERVER_IP,
        NODE_IP,
        FAR_IP,
        [169, 254, 172, 1],
    ];
    let (src, dst) = if from_pod {
        (
            if rng.below(4) == 0 {
                addrs[rng.below(6)]
            } else {
                POD_IP
            },
            addrs[rng.below(6)],
        )
    } else {
        (
            addrs[rng.below(6)],
            if rng.below(4) == 0 {
                addrs[rng.below(6)]
            } else {
                NODE_IP
            },
        )
    };
    let sport = 1024 + rng.below(60000) as u16;
    let dport = [53, 80, 443, 20000 + rng.below(10000) as u16][rng.below(4)];
    let (proto, payload) = match rng.below(5) {
        0 => (
            PROTO_TCP,
            packet::tcp(src, dst, sport, dport, rng.byte(), b"data"),
        ),
        1 => (
            PROTO_UDP,
            packet::udp(src, dst, sport, dport, b"data", rng.below(2) == 0),
        ),
        2 => (PROTO_ICMP, packet::echo([0, 8][rng.below(2)], sport, 1)),
        3 => {
            let inner = Ipv4Packet::new(
                dst,
                src,
                PROTO_UDP,
                packet::udp(dst, src, dport, sport, b"x", true),
            )
            .bytes();
            (
                PROTO_ICMP,
                packet::icmp([3, 11, 12][rng.below(3)], rng.byte() % 5, [0; 4], &inner),
            )
        }
        _ => (rng.byte(), vec![rng.byte(); rng.below(40)]),
    };
    let mut p = Ipv4Packet::new(src, dst, proto, payload);
    if rng.below(8) == 0 {
        p.options = vec![1; 4 * (1 + rng.below(10))];
    }
    if rng.below(8) == 0 {
        p.frag = [0x2000, 5, 0x2000 | 3][rng.below(3)];
    }
    p.ttl = [0, 1, 64][rng.below(3)];
    if from_pod {
        p.frame(POD_MAC, GW_MAC)
    } else {
        p.frame(SERVER_MAC, [2, 0, 0, 0, 0, 0x10])
    }
}

fn mutate(rng: &mut Rng, frame: &mut Vec<u8>) {
    for _ in 0..rng.below(4) {
        match rng.below(4) {
            0 if !frame.is_empty() => {
                let i = rng.below(frame.len());
                frame[i] = rng.byte();
            }
            1 => {
                let keep = 14 + rng.below(frame.len().saturating_sub(14).max(1));
                frame.truncate(keep.max(34));
            }
            2 => frame.extend((0..rng.below(64)).map(|_| rng.byte())),
            _ => {}
        }
    }
}

#[test]
fn random_and_mutated_frames_are_accounted_and_never_mistranslated() {
    let frames: usize = std::env::var("DATAPATH_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    with_harness(HarnessOptions::default(), move |h| {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let before = verdict_total(h);
        let (pod_if, up_if) = (h.pod_ifindex, h.uplink_ifindex);
        let (mut translated, mut checked) = (0usize, 0usize);
        for i in 0..frames {
            let from_pod = i % 2 == 0;
            let mut frame = match rng.below(10) {
                // Pure noise, with an IPv4 ethertype most of the time.
                0 => {
                    let mut f: Vec<u8> = (0..34 + rng.below(100)).map(|_| rng.byte()).collect();
                    if rng.below(4) != 0 {
                        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
                    }
                    f
                }
                _ => seed_frame(&mut rng, from_pod),
            };
            if rng.below(3) != 0 {
                mutate(&mut rng, &mut frame);
            }
            if frame.len() < 34 {
                frame.resize(34, 0); // BPF_PROG_TEST_RUN refuses shorter IPv4 frames
            }
            let (prog, ifindex) = if from_pod { (names::PROG_FROM_POD, pod_if) } else { (names::PROG_UPLINK_INGRESS, up_if) };
            let (verdict, out) = h.run(prog, &frame, ifindex).expect("test run");
            assert!([TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict), "verdict {verdict} for {frame:02x?}");
            if out != frame && verdict != TC_ACT_SHOT {
                assert_eq!(verdict, TC_ACT_REDIRECT, "rewritten but passed: {frame:02x?}");
                let (input, output) = (Parsed::parse(&frame), Parsed::parse(&out));
                if from_pod {
                    assert_eq!(input.src, POD_IP, "translated a frame not from the pod: {frame:02x?}");
                    assert_eq!(output.src, NODE_IP);
                } else {
                    assert_eq!(input.dst, NODE_IP, "translated a frame not for the node: {frame:02x?}");
                    assert_eq!(output.dst, POD_IP);
                }
                if well_formed(&input) {
                    check_rewrite(h, from_pod, &input, &output, &frame);
                    checked += 1;
                }
                translated += 1;
            }
        }
        let accounted = verdict_total(h) - before;
        eprintln!("{frames} frames: {translated} translated ({checked} well-formed ones checked for ports and checksums), every one accounted ({accounted} verdict counts)");
        assert!(checked > frames / 200, "the port and checksum checks ran");
        assert_eq!(accounted, frames as u64, "every frame counts exactly one verdict");
        assert!(translated > frames / 100, "the generator reaches the translation paths");
        assert!(h.counter(Counter::DropMalformed) > 0);
    })
    .unwrap();
}
