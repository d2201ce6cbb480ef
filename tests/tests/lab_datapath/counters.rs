//! The counters: drops counted and logged by the daemon, every counter documented.

use std::time::Duration;

use datapath_tests::{
    lab::{NODE_IP, SERVER_IP},
    netns::{exec, exec_output, ping},
    traffic::{self, Server, TcpService},
    LabOptions,
};

use crate::lab;

#[test]
fn drops_are_counted_pod_to_pod_spoofed_cross_node_untracked() {
    let lab = lab(LabOptions::default());
    let (p0, p1) = (lab.pod(0).clone(), lab.pod(1).clone());

    // Pod-to-pod IPv4.
    let before = lab.counter("drop_pod_to_pod").unwrap();
    assert!(!ping(&p0.ns, &p1.ip));
    assert_eq!(lab.counter("drop_pod_to_pod").unwrap(), before + 1);

    // A source that is not the pod registered on that veth.
    exec(
        &p0.ns,
        &["ip", "addr", "add", "169.254.172.77/32", "dev", "v4if0"],
    )
    .unwrap();
    let before = lab.counter("drop_spoofed_source").unwrap();
    assert!(!exec_output(
        &p0.ns,
        &[
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "-I",
            "169.254.172.77",
            SERVER_IP
        ]
    )
    .unwrap()
    .status
    .success());
    assert_eq!(lab.counter("drop_spoofed_source").unwrap(), before + 1);

    // Another node sending to a pod's node-local address.
    exec(
        &lab.other_node,
        &["ip", "route", "add", "169.254.172.0/22", "via", NODE_IP],
    )
    .unwrap();
    let before = lab.counter("drop_cross_node").unwrap();
    assert!(!ping(&lab.other_node, &p0.ip));
    assert_eq!(lab.counter("drop_cross_node").unwrap(), before + 1);

    // Unsolicited TCP to the node IP on a NAT port with no flow and no socket.
    let before = lab.counter("drop_untracked_inbound").unwrap();
    let refused = traffic::tcp_connect(&lab.server, NODE_IP, 20000, None);
    assert!(refused.is_err(), "unsolicited inbound must not connect");
    assert!(lab.counter("drop_untracked_inbound").unwrap() > before);

    // The node's own listener in the NAT range is still reachable (node socket found).
    let node_service = Server::tcp(&lab.node, 20001, TcpService::Echo).unwrap();
    let mut s = traffic::tcp_connect(&lab.server, NODE_IP, 20001, None).unwrap();
    traffic::echo_roundtrip(&mut s, b"node service").unwrap();
    drop(node_service);

    // The daemon's log reports what the datapath dropped.
    std::thread::sleep(Duration::from_millis(1500));
    let log = std::fs::read_to_string(&lab.daemon_log).unwrap();
    for counter in [
        "drop_pod_to_pod",
        "drop_spoofed_source",
        "drop_cross_node",
        "drop_untracked_inbound",
    ] {
        assert!(
            log.contains(&format!("datapath: {counter} +")),
            "{counter} not logged:\n{log}"
        );
    }
}

/// The operator docs list every counter the datapath keeps.
#[test]
fn every_counter_is_documented() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/observability.md"
    ))
    .unwrap();
    for counter in datapath_common::counters::Counter::ALL {
        assert!(
            doc.contains(&format!("`{}`", counter.name())),
            "{} is not documented",
            counter.name()
        );
    }
}
