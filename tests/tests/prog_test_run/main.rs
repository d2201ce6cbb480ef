//! BPF_PROG_TEST_RUN on crafted frames: every translation and drop case, checked by
//! recomputing checksums, reading the counters and the maps after the run. One binary, a
//! module per theme; the frame builders all of them use are here.

mod cost;
mod drops_and_passes;
mod flow_table;
mod icmp;
mod ports;
mod translation;
mod uplink_egress;

use datapath_common::{
    flow::{FlowKey, PROTO_TCP},
    tcp::TCP_SYN,
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed},
    testrun::{addr, pod_tcp, Harness, NODE_IP, POD_IP, SERVER_IP, SERVER_MAC, TC_ACT_REDIRECT},
};

const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];

/// The key of the test pod's flow from `sport` to `dst:dport`.
fn pod_key(proto: u8, sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey::new(proto, addr(POD_IP), sport, addr(dst), dport)
}

/// Sends a SYN from the pod and returns the translated frame.
fn open_tcp(h: &mut Harness, sport: u16) -> Parsed {
    let (verdict, out) = h.from_pod(&pod_tcp(sport, 80, TCP_SYN));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    Parsed::parse(&out)
}

/// A TCP frame from the server's port 80 to the node's `dst_port`, as the uplink receives it.
fn wire_tcp(dst_port: u16, flags: u8) -> Vec<u8> {
    Ipv4Packet::new(
        SERVER_IP,
        NODE_IP,
        PROTO_TCP,
        packet::tcp(SERVER_IP, NODE_IP, 80, dst_port, flags, b"world!"),
    )
    .frame(SERVER_MAC, UPLINK_MAC)
}
