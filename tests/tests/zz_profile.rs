use datapath_common::{
    flow::PROTO_TCP,
    tcp::{TCP_ACK, TCP_SYN},
};
use datapath_tests::{
    packet::{self, Ipv4Packet, GW_MAC, POD_MAC},
    testrun::{with_harness, HarnessOptions, POD_IP, SERVER_IP},
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
        h.from_pod(&f(TCP_SYN));
        let frame = f(TCP_ACK);
        let n: usize = std::env::var("N")
            .map(|v| v.parse().unwrap())
            .unwrap_or(1_000_000);
        let pod_if = h.pod_ifindex;
        let mut tot = 0u128;
        for _ in 0..n {
            tot += h
                .run_timed(datapath_common::maps::PROG_FROM_POD, &frame, pod_if)
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
