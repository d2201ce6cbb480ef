use datapath_common::{
    flow::PROTO_TCP,
    tcp::{TCP_ACK, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, Parsed, GW_MAC, POD_MAC},
    testrun::{with_harness, HarnessOptions, NODE_IP, POD_IP, SERVER_IP, SERVER_MAC},
};
#[test]
fn zz_profile() {
    with_harness(HarnessOptions::default(), |h| {
        let f = |fl| {
            Ipv4Packet::new(
                POD_IP,
                SERVER_IP,
                PROTO_TCP,
                packet::tcp(POD_IP, SERVER_IP, 45000, 80, fl, b"hello"),
            )
            .frame(POD_MAC, GW_MAC)
        };
        let nat_port = Parsed::parse(&h.from_pod(&f(TCP_SYN)).1).src_port();
        let reply = Ipv4Packet::new(
            SERVER_IP,
            NODE_IP,
            PROTO_TCP,
            packet::tcp(SERVER_IP, NODE_IP, 80, nat_port, TCP_ACK, b"y"),
        )
        .frame(SERVER_MAC, GW_MAC);
        let n: usize = std::env::var("N")
            .map(|v| v.parse().unwrap())
            .unwrap_or(1_000_000);
        let up_if = h.uplink_ifindex;
        let mut tot = 0u128;
        for _ in 0..n {
            tot += h
                .run_timed(datapath_common::maps::PROG_UPLINK_INGRESS, &reply, up_if)
                .unwrap()
                .2
                .as_nanos();
        }
        eprintln!("mean {} ns", tot / n as u128);
        if let Ok(s) = std::env::var("SLEEP") {
            std::thread::sleep(std::time::Duration::from_secs(s.parse().unwrap()));
        }
    })
    .unwrap();
}
