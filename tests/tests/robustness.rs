//! Robustness on real traffic: NAT port exhaustion to one destination, a full flow table,
//! and a daemon killed with SIGKILL under load.

use std::time::Duration;

use datapath_tests::{
    lab::SERVER_IP,
    traffic::{self, Server, TcpService},
    Lab, LabOptions,
};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

#[test]
fn port_exhaustion_is_counted_and_recovers() {
    let lab = Lab::new(LabOptions {
        run_args: args(&[
            "--port-range",
            "30000-30009",
            "--timeout-udp",
            "1",
            "--timeout-udp-replied",
            "1",
            "--sweep-interval",
            "0.2",
        ]),
        ..LabOptions::default()
    })
    .unwrap();
    let udp = Server::udp_echo(&lab.server, 53).unwrap();
    let pod = lab.pod(0).clone();
    for i in 0..10 {
        traffic::udp_request(&pod.ns, SERVER_IP, 53, 31000 + i, b"q").unwrap();
    }
    // The eleventh flow to the same destination finds no port: dropped and counted.
    assert!(traffic::udp_request(&pod.ns, SERVER_IP, 53, 31010, b"q").is_err());
    assert!(lab.counter("drop_port_exhausted").unwrap() >= 1);
    let ports: std::collections::BTreeSet<u16> =
        udp.peers().iter().map(std::net::SocketAddr::port).collect();
    assert_eq!(ports.len(), 10);
    assert!(
        ports.iter().all(|p| (30000..=30009).contains(p)),
        "{ports:?}"
    );
    // Another destination port is another tuple space.
    let _other = Server::udp_echo(&lab.server, 54).unwrap();
    traffic::udp_request(&pod.ns, SERVER_IP, 54, 31011, b"q").unwrap();
    // When the flows expire, their ports are free again.
    std::thread::sleep(Duration::from_millis(2500));
    traffic::udp_request(&pod.ns, SERVER_IP, 53, 31010, b"q").unwrap();
    let stats: serde_json::Value =
        serde_json::from_str(&lab.cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    assert!(
        stats["nat_bindings"].as_u64().unwrap() <= 3,
        "no bindings left behind: {stats}"
    );
}

#[test]
fn a_full_flow_table_evicts_without_stale_half_pairs() {
    let lab = Lab::new(LabOptions {
        run_args: args(&["--flow-table-size", "128", "--sweep-interval", "0.2"]),
        ..LabOptions::default()
    })
    .unwrap();
    let _udp = Server::udp_echo(&lab.server, 53).unwrap();
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let pod = lab.pod(0).clone();
    let mut long_lived = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    // Four times the table's size in short UDP flows, the TCP connection talking throughout.
    for i in 0..512u16 {
        traffic::udp_request(&pod.ns, SERVER_IP, 53, 20000 + i, b"q").unwrap();
        if i % 32 == 0 {
            traffic::echo_roundtrip(&mut long_lived, b"still here").unwrap();
        }
    }
    traffic::echo_roundtrip(&mut long_lived, b"after the flood").unwrap();
    assert_eq!(echo.peers().len(), 1, "the connection kept its NAT port");
    std::thread::sleep(Duration::from_millis(800));
    let stats: serde_json::Value =
        serde_json::from_str(&lab.cli(&["stats", "-o", "json"]).unwrap()).unwrap();
    let (flows, bindings) = (
        stats["flows"].as_u64().unwrap(),
        stats["nat_bindings"].as_u64().unwrap(),
    );
    assert!(flows <= 128, "{stats}");
    // Every binding belongs to a live flow once the sweep has run twice.
    assert!(bindings <= flows, "{bindings} bindings for {flows} flows");
    assert_eq!(lab.counter("drop_table_full").unwrap(), 0);
}

#[test]
fn sigkill_under_load_then_restart_keeps_flows_working() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let _udp = Server::udp_echo(&lab.server, 53).unwrap();
    let pod = lab.pod(0).clone();
    let mut stream = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let ns = pod.ns.clone();
    let load = std::thread::spawn(move || {
        // One UDP socket for the whole run, like a long-lived client.
        let socket = datapath_tests::netns::within(&ns, || {
            std::net::UdpSocket::bind("0.0.0.0:47000").unwrap()
        })
        .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 16];
        let mut rounds = 0u32;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            traffic::echo_roundtrip(&mut stream, b"load").expect("TCP through the crash");
            socket.send_to(b"u", (SERVER_IP, 53)).unwrap();
            socket.recv_from(&mut buf).expect("UDP through the crash");
            rounds += 1;
        }
        rounds
    });
    std::thread::sleep(Duration::from_millis(300));
    // A crash leaves the pinned links, so translation goes on without the daemon.
    lab.stop_daemon(libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.start_daemon().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = load.join().expect("traffic survived SIGKILL and restart");
    assert!(rounds > 20, "{rounds} rounds");
}
