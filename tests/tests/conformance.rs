//! Conformance: the same scenarios against the iptables egress-v4 setup (per-pod SNAT chain
//! with --random-fully, the FORWARD REJECT rule) and against the datapath. Every scenario
//! that passes on iptables must pass on the datapath; where the two differ on purpose the
//! scenario says so (see docs/conformance.md).

use std::{net::Ipv4Addr, time::Duration};

use datapath_tests::{
    lab::{Mode, FAR_SERVER_IP, NODE_IP, OTHER_NODE_IP, SERVER_IP},
    netns::{self, exec},
    traffic::{self, Server, TcpService},
    Lab, LabOptions,
};

fn lab(mode: Mode) -> Lab {
    Lab::new(LabOptions {
        mode,
        ..LabOptions::default()
    })
    .expect("lab")
}

/// Runs `scenario` and, in datapath mode, checks that the datapath's own counters (the
/// sum of `names`) moved by at least `at_least`: the outcome is the datapath's doing, not
/// only the FORWARD REJECT rule's (which gives the same outcome with no datapath at all).
fn counted_by_datapath(lab: &Lab, names: &[&str], at_least: u64, scenario: impl FnOnce()) {
    let sum = || -> u64 {
        if lab.opts.mode == Mode::Datapath {
            names.iter().map(|n| lab.counter(n).unwrap()).sum()
        } else {
            0
        }
    };
    let before = sum();
    scenario();
    if lab.opts.mode == Mode::Datapath {
        let moved = sum() - before;
        assert!(
            moved >= at_least,
            "the datapath counted {moved} packets in {names:?}, expected at least {at_least}"
        );
    }
}

fn node_ip() -> Ipv4Addr {
    NODE_IP.parse().unwrap()
}

fn ping(mode: Mode) {
    let lab = lab(mode);
    exec(
        &lab.pod(0).ns,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER_IP],
    )
    .unwrap();
}

fn tcp_short(mode: Mode) {
    let lab = lab(mode);
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    for i in 0..20u8 {
        let mut s = traffic::tcp_connect(&lab.pod(0).ns, SERVER_IP, 8080, None).unwrap();
        traffic::echo_roundtrip(&mut s, &[i; 100]).unwrap();
    }
    assert_eq!(echo.peer_ips(), vec![node_ip()]);
    assert_eq!(echo.peers().len(), 20);
}

fn tcp_bulk(mode: Mode) {
    let lab = lab(mode);
    let sink = Server::tcp(&lab.server, 8081, TcpService::HashSink).unwrap();
    let source = Server::tcp(&lab.server, 8082, TcpService::Source(20 << 20)).unwrap();
    traffic::bulk_upload(&lab.pod(0).ns, SERVER_IP, 8081, 20 << 20).unwrap();
    traffic::bulk_download(&lab.pod(0).ns, SERVER_IP, 8082, 20 << 20).unwrap();
    assert_eq!(sink.peer_ips(), vec![node_ip()]);
    assert_eq!(source.peer_ips(), vec![node_ip()]);
}

fn udp_request_response(mode: Mode) {
    let lab = lab(mode);
    let udp = Server::udp_echo(&lab.server, 5353).unwrap();
    assert_eq!(
        traffic::udp_request(&lab.pod(0).ns, SERVER_IP, 5353, 40001, b"query").unwrap(),
        b"query"
    );
    assert_eq!(udp.peer_ips(), vec![node_ip()]);
}

fn udp_stream(mode: Mode) {
    let lab = lab(mode);
    let udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let replies = netns::within(&lab.pod(0).ns, || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:40002").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut buf = [0u8; 64];
        (0..200)
            .filter(|i| {
                socket.send_to(&[*i as u8; 32], (SERVER_IP, 5353)).unwrap();
                socket.recv_from(&mut buf).is_ok()
            })
            .count()
    })
    .unwrap();
    assert!(replies >= 195, "{replies} of 200 replies");
    let ports: std::collections::BTreeSet<u16> =
        udp.peers().iter().map(std::net::SocketAddr::port).collect();
    assert_eq!(ports.len(), 1, "one NAT port for the stream");
}

fn dns_like_bursts(mode: Mode) {
    let lab = lab(mode);
    let udp = Server::udp_echo(&lab.server, 53).unwrap();
    for i in 0..200u16 {
        let reply =
            traffic::udp_request(&lab.pod(0).ns, SERVER_IP, 53, 30000 + i, b"A? example.").unwrap();
        assert_eq!(reply, b"A? example.");
    }
    assert_eq!(udp.peers().len(), 200);
    assert_eq!(udp.peer_ips(), vec![node_ip()]);
}

fn same_source_port_two_pods(mode: Mode) {
    let lab = lab(mode);
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let mut a = traffic::tcp_connect(&lab.pod(0).ns, SERVER_IP, 8080, Some(40000)).unwrap();
    let mut b = traffic::tcp_connect(&lab.pod(1).ns, SERVER_IP, 8080, Some(40000)).unwrap();
    traffic::echo_roundtrip(&mut a, b"a").unwrap();
    traffic::echo_roundtrip(&mut b, b"b").unwrap();
    let peers = echo.peers();
    assert_eq!(peers.len(), 2);
    assert_ne!(peers[0].port(), peers[1].port());
}

fn traceroute(mode: Mode) {
    let lab = lab(mode);
    let out = netns::traceroute(&lab.pod(0).ns, FAR_SERVER_IP).unwrap();
    assert!(out.contains("192.0.2.1 "), "router hop missing:\n{out}");
    assert!(
        out.lines()
            .last()
            .is_some_and(|h| h.contains(FAR_SERVER_IP)),
        "not reached:\n{out}"
    );
}

fn pmtu_1280(mode: Mode) {
    let lab = lab(mode);
    let _sink = Server::tcp(&lab.far_server, 8081, TcpService::HashSink).unwrap();
    traffic::bulk_upload(&lab.pod(0).ns, FAR_SERVER_IP, 8081, 2 << 20).unwrap();
}

fn unsolicited_inbound_never_reaches_a_pod(mode: Mode) {
    let lab = lab(mode);
    let pod_listener = Server::tcp(&lab.pod(0).ns, 20000, TcpService::Echo).unwrap();
    // The uplink program sees each SYN: it drops it (a NAT port with no flow) or passes it to
    // the node, which has no listener there.
    counted_by_datapath(&lab, &["drop_untracked_inbound", "pass_node"], 2, || {
        for port in [20000, 40000] {
            assert!(traffic::tcp_connect(&lab.server, NODE_IP, port, None).is_err());
        }
    });
    assert!(pod_listener.peers().is_empty());
}

fn other_node_to_a_pod_is_dropped(mode: Mode) {
    let lab = lab(mode);
    exec(
        &lab.other_node,
        &["ip", "route", "add", "169.254.172.0/22", "via", NODE_IP],
    )
    .unwrap();
    counted_by_datapath(&lab, &["drop_cross_node"], 1, || {
        assert!(!netns::ping(&lab.other_node, &lab.pod(0).ip));
    });
}

fn pod_to_pod_ipv4_is_refused(mode: Mode) {
    let lab = lab(mode);
    counted_by_datapath(&lab, &["drop_pod_to_pod"], 1, || {
        assert!(!netns::ping(&lab.pod(0).ns, &lab.pod(1).ip));
    });
}

/// A pod sending from an address it was not given. The datapath drops it at the veth; the
/// iptables setup has no anti-spoofing: the packet matches no pod chain and leaves the node
/// untranslated (the server sees 169.254.172.77).
fn spoofed_source_never_leaves(mode: Mode) {
    let lab = lab(mode);
    let udp = Server::udp_echo(&lab.server, 5353).unwrap();
    exec(
        &lab.pod(0).ns,
        &["ip", "addr", "add", "169.254.172.77/32", "dev", "v4if0"],
    )
    .unwrap();
    // Sent for sure (bind and send must succeed), and in datapath mode seen and dropped by
    // the pod-side program.
    counted_by_datapath(&lab, &["drop_spoofed_source"], 1, || {
        netns::within(&lab.pod(0).ns, || -> std::io::Result<usize> {
            let s = std::net::UdpSocket::bind("169.254.172.77:40003")?;
            s.send_to(b"spoof", (SERVER_IP, 5353))
        })
        .unwrap()
        .expect("the spoofed datagram was sent");
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(
        udp.peers().is_empty(),
        "spoofed packet reached the server: {:?}",
        udp.peers()
    );
}

fn node_connections_unaffected(mode: Mode) {
    let lab = lab(mode);
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let mut s = traffic::tcp_connect(&lab.node, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut s, b"node").unwrap();
    let local = s.local_addr().unwrap();
    assert_eq!(
        echo.peers(),
        vec![local],
        "the node's own socket address, untranslated"
    );
    exec(&lab.node, &["ping", "-c", "1", "-W", "2", OTHER_NODE_IP]).unwrap();
}

fn ipv6_untouched(mode: Mode) {
    let lab = lab(mode);
    lab.add_ipv6().unwrap();
    // Two echo requests out and two replies in, each seen and passed by the uplink programs.
    counted_by_datapath(&lab, &["pass_non_ipv4"], 4, || {
        exec(
            &lab.node,
            &["ping", "-6", "-c", "2", "-W", "2", "2001:db8::20"],
        )
        .unwrap();
    });
}

macro_rules! in_both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod iptables {
            $( #[test] fn $scenario() { super::$scenario(super::Mode::Iptables) } )*
        }
        mod datapath {
            $( #[test] fn $scenario() { super::$scenario(super::Mode::Datapath) } )*
        }
    };
}

in_both_modes!(
    ping,
    tcp_short,
    tcp_bulk,
    udp_request_response,
    udp_stream,
    dns_like_bursts,
    same_source_port_two_pods,
    traceroute,
    pmtu_1280,
    unsolicited_inbound_never_reaches_a_pod,
    other_node_to_a_pod_is_dropped,
    pod_to_pod_ipv4_is_refused,
    node_connections_unaffected,
    ipv6_untouched,
);

/// The documented difference: only the datapath stops spoofed pod sources.
#[test]
fn datapath_spoofed_source_never_leaves() {
    spoofed_source_never_leaves(Mode::Datapath);
}

#[test]
#[should_panic(expected = "spoofed packet reached the server")]
fn iptables_lets_a_spoofed_source_leave() {
    spoofed_source_never_leaves(Mode::Iptables);
}
