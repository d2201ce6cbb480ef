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
    // Pairs checked entry by entry once the sweep has run: every binding names a live flow
    // that maps back to it, and every flow has its binding.
    let maps = datapath_user::maps::Maps::open(lab.pin_path()).unwrap();
    let mut flows = std::collections::BTreeMap::new();
    maps.for_each_flow(|k, f| {
        flows.insert(*k, (f.nat_ip, f.nat_port));
    })
    .unwrap();
    let mut bindings = std::collections::BTreeMap::new();
    maps.for_each_binding(|reply, binding| {
        bindings.insert(*reply, binding.owner);
    })
    .unwrap();
    assert!(
        !flows.is_empty(),
        "the long-lived connection's flow is there"
    );
    for (reply, owner) in &bindings {
        let (nat_ip, nat_port) = flows
            .get(owner)
            .unwrap_or_else(|| panic!("binding {reply:?} names no flow ({owner:?})"));
        assert_eq!(
            owner.reply_tuple(*nat_ip, *nat_port),
            *reply,
            "binding of {owner:?} disagrees with its flow"
        );
    }
    for (key, (nat_ip, nat_port)) in &flows {
        assert_eq!(
            bindings.get(&key.reply_tuple(*nat_ip, *nat_port)),
            Some(key),
            "flow {key:?} has no binding"
        );
    }
    assert_eq!(lab.counter("drop_table_full").unwrap(), 0);
}

#[test]
fn sigkill_under_load_then_restart_keeps_flows_working() {
    let mut lab = Lab::new(LabOptions::default()).unwrap();
    let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let _udp = Server::udp_echo(&lab.server, 53).unwrap();
    let pod = lab.pod(0).clone();
    let stream = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    let load = traffic::LiveLoad::start(
        &pod.ns,
        stream,
        (SERVER_IP.parse().unwrap(), 53),
        47000,
        Duration::ZERO,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A crash leaves the pinned links, so translation goes on without the daemon.
    lab.stop_daemon(libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.start_daemon().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rounds = load.finish().expect("traffic survived SIGKILL and restart");
    assert!(rounds > 20, "{rounds} rounds");
}
