//! Connection churn on the namespace lab with the default configuration, and the node's own
//! connections beside pod flows to the same destination, in both orders.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use datapath_tests::{
    churn::{self, EchoServer},
    lab::{NODE_IP, SERVER_IP},
    netns::{exec, spawn_within, within},
    Lab, LabOptions,
};

fn server(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(SERVER_IP.parse().unwrap(), port)
}

/// The pod's port range, all of which the churn cycles through.
const POD_PORTS: u64 = 65535 - 1024 + 1;

/// One pod, four clients, the client closing first, pod sysctls as many images set them
/// (`ip_local_port_range 1024 65535`, `tcp_tw_reuse=1`), offloads on, the daemon's default
/// configuration: the pod cycles through its whole port range to one destination, and no SYN
/// may be dropped for want of a NAT port (each drop stalls a client for a second).
#[test]
fn churn_through_the_whole_pod_port_range_drops_no_syn() {
    let lab = Lab::new(LabOptions {
        pods: 1,
        ..LabOptions::default()
    })
    .unwrap();
    let pod = lab.pod(0).clone();
    churn::churn_sysctls(&pod.ns).unwrap();
    let _echo = EchoServer::start(&lab.server, SERVER_IP, 7100, 4).unwrap();
    let retrans_before = churn::syn_retransmissions(&pod.ns).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = churn::start_clients(&pod.ns, server(7100), 4, Duration::ZERO, &stop).unwrap();
    // Sustained: at least 10 s, and until the pod has gone through its port range twice
    // (at most 60 s on a slow machine).
    let start = Instant::now();
    let flows_created = |lab: &Lab| lab.counter("flow_created").unwrap_or(0);
    while start.elapsed() < Duration::from_secs(10)
        || (flows_created(&lab) + lab.counter("flow_reused").unwrap_or(0) < 2 * POD_PORTS
            && start.elapsed() < Duration::from_mins(1))
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::Relaxed);
    let report = churn::join_clients(clients);
    let secs = start.elapsed().as_secs_f64();
    let retrans = churn::syn_retransmissions(&pod.ns).unwrap() - retrans_before;
    let stats = lab.cli(&["stats"]).unwrap();
    eprintln!(
        "{} connections in {secs:.1} s ({:.0}/s), slowest connect {:?}, SYN retransmissions {retrans}\n{stats}",
        report.connections,
        report.connections as f64 / secs,
        report.slowest_connect
    );
    assert_eq!(report.errors, 0, "{:?}", report.first_errors);
    assert!(
        report.connections > POD_PORTS,
        "only {} connections: the pod's port range was not cycled",
        report.connections
    );
    assert_eq!(lab.counter("drop_port_exhausted").unwrap(), 0);
    assert_eq!(retrans, 0, "SYNs were retransmitted");
    assert!(
        report.slowest_connect < Duration::from_millis(900),
        "a connect took {:?}",
        report.slowest_connect
    );
    // The pod's tuples came back in TIME_WAIT and re-used their flows and NAT ports.
    assert!(lab.counter("flow_reused").unwrap() > 0);
}

/// The lab for the collision tests: a NAT range of 1,000 ports that is also the node's
/// ephemeral range, so the node's connections and pod flows compete for the same ports.
fn collision_lab() -> Lab {
    let lab = Lab::new(LabOptions {
        pods: 2,
        run_args: vec!["--port-range".into(), "40000-40999".into()],
        ..LabOptions::default()
    })
    .unwrap();
    exec(
        &lab.node,
        &["sysctl", "-qw", "net.ipv4.ip_local_port_range=40000 40999"],
    )
    .unwrap();
    lab
}

/// Pod churn paced to about 400 connections/s (2 pods x 2 clients), well within what 1,000
/// ports recycled after a second can carry.
fn pod_churn(
    lab: &Lab,
    dst: SocketAddrV4,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<churn::ClientReport>> {
    let mut clients = Vec::new();
    for i in 0..2 {
        clients.extend(
            churn::start_clients(&lab.pod(i).ns, dst, 2, Duration::from_millis(10), stop).unwrap(),
        );
    }
    clients
}

fn assert_pods_unharmed(lab: &Lab, report: &churn::ClientReport) {
    eprintln!("pods: {report:?}");
    assert_eq!(
        report.errors, 0,
        "pod exchanges failed: {:?}",
        report.first_errors
    );
    assert!(report.connections > 100, "{report:?}");
    assert_eq!(lab.counter("drop_port_exhausted").unwrap(), 0);
}

/// Node first: a node connection (in the NAT range) to the destination the pods then churn
/// to, and a node listener in the NAT range, keep working while pod flows cycle through every
/// port of the range; no pod flow is given the node connection's port.
#[test]
fn node_connections_opened_first_keep_working_while_pods_churn() {
    let lab = collision_lab();
    let _echo = EchoServer::start(&lab.server, SERVER_IP, 7200, 4).unwrap();
    let _node_echo = EchoServer::start(&lab.node, NODE_IP, 40500, 1).unwrap();
    let mut node_conn = within(&lab.node, || std::net::TcpStream::connect(server(7200)))
        .unwrap()
        .unwrap();
    let node_port = node_conn.local_addr().unwrap().port();
    assert!((40000..=40999).contains(&node_port));
    node_conn
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let pods = pod_churn(&lab, server(7200), &stop);
    // The server connects to the node's listener meanwhile.
    let inbound_ok = Arc::new(AtomicU64::new(0));
    let (stop2, ok2) = (Arc::clone(&stop), Arc::clone(&inbound_ok));
    let inbound = spawn_within(&lab.server, move || -> anyhow::Result<()> {
        let node = SocketAddrV4::new(NODE_IP.parse::<Ipv4Addr>()?, 40500);
        while !stop2.load(Ordering::Relaxed) {
            let took = churn::exchange(node, 7)?;
            anyhow::ensure!(
                took < Duration::from_millis(900),
                "connect to the node took {took:?}"
            );
            ok2.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })
    .unwrap();
    let start = Instant::now();
    let mut rounds = 0u32;
    while start.elapsed() < Duration::from_secs(6) {
        use std::io::{Read as _, Write as _};
        let tag = [b'a' + (rounds % 26) as u8];
        node_conn.write_all(&tag).unwrap();
        let mut buf = [0u8; 1];
        node_conn
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("node connection broke after {rounds} rounds: {e}"));
        assert_eq!(buf, tag, "the node's connection got someone else's bytes");
        rounds += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let report = churn::join_clients(pods);
    inbound
        .join()
        .unwrap()
        .expect("connections to the node's listener");
    assert!(inbound_ok.load(Ordering::Relaxed) > 20);
    assert_pods_unharmed(&lab, &report);
    // Pods went through the whole range (thousands of flows for 1,000 ports), never through
    // the node's port or its listener's.
    assert!(lab.counter("flow_created").unwrap() > 1000);
    let flows = lab.flows().unwrap();
    for f in &flows {
        let nat_port = f["nat_port"].as_u64().unwrap();
        assert!(
            nat_port != u64::from(node_port) || f["dst_port"] != 7200,
            "a pod flow holds the node connection's port: {f}"
        );
        assert_ne!(
            nat_port, 40500,
            "a pod flow holds the node listener's port: {f}"
        );
    }
}

/// Pod first: pods churn to a destination until its NAT ports are all in use, then the node
/// opens connections to the same destination from its ephemeral range (the same ports). Each
/// connects at once (no SYN lost to a clash), the ones whose port a pod flow held are
/// translated to another port, and neither side gets the other's replies.
#[test]
fn node_connections_opened_after_pod_churn_keep_working() {
    let lab = collision_lab();
    let _echo = EchoServer::start(&lab.server, SERVER_IP, 7300, 4).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pods = pod_churn(&lab, server(7300), &stop);
    std::thread::sleep(Duration::from_secs(3));
    let node = within(&lab.node, || -> anyhow::Result<Vec<Duration>> {
        (0..150u32)
            .map(|i| churn::exchange(server(7300), 100 + (i % 100) as u8))
            .collect()
    })
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let report = churn::join_clients(pods);
    let times = node.expect("the node's connections");
    let slowest = times.iter().max().copied().unwrap_or_default();
    eprintln!(
        "node: {} connections, slowest connect {slowest:?}",
        times.len()
    );
    assert!(
        slowest < Duration::from_millis(900),
        "a node SYN was lost: {slowest:?}"
    );
    assert_pods_unharmed(&lab, &report);
    assert!(lab.counter("node_flow_tracked").unwrap() >= 150);
    assert!(
        lab.counter("node_port_translated").unwrap() > 0,
        "no node connection clashed with a pod flow: the test did not test the clash"
    );
}
