//! End-to-end tests of the datapath on the namespace lab: real programs on real veths, real
//! traffic, the FORWARD REJECT rule installed, no iptables NAT.

use std::time::Duration;

use datapath_tests::{
    lab::{FAR_SERVER_IP, NODE_IP, OTHER_NODE_IP, SERVER_IP},
    netns::{exec, exec_output, ping, traceroute},
    traffic::{self, Server, TcpService},
    Lab, LabOptions,
};

fn lab(opts: LabOptions) -> Lab {
    Lab::new(opts).expect("lab")
}

#[test]
fn ping_tcp_udp_reach_the_server_from_the_node_ip_only() {
    let lab = lab(LabOptions {
        offloads_off: true,
        ..LabOptions::default()
    });
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let sink = Server::tcp(&lab.server, 8081, TcpService::HashSink).unwrap();
    let source = Server::tcp(&lab.server, 8082, TcpService::Source(20 << 20)).unwrap();
    let udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let pod = lab.pod(0).clone();

    exec(
        &pod.ns,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", SERVER_IP],
    )
    .unwrap();
    let mut stream = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut stream, b"hello through the datapath").unwrap();
    assert_eq!(
        traffic::udp_request(&pod.ns, SERVER_IP, 5353, 40001, b"query").unwrap(),
        b"query"
    );
    // 20 MB each way with offloads off: every checksum the datapath touched is verified.
    traffic::bulk_upload(&pod.ns, SERVER_IP, 8081, 20 << 20).unwrap();
    traffic::bulk_download(&pod.ns, SERVER_IP, 8082, 20 << 20).unwrap();

    let node_ip: std::net::Ipv4Addr = NODE_IP.parse().unwrap();
    for server in [&echo, &sink, &source, &udp] {
        assert_eq!(
            server.peer_ips(),
            vec![node_ip],
            "the server must see only the node IP"
        );
    }
    let flows = lab.flows().unwrap();
    let tcp_echo = flows
        .iter()
        .find(|f| f["proto"] == "tcp" && f["dst_port"] == 8080)
        .expect("echo flow listed");
    assert_eq!(tcp_echo["pod"], "default/pod-0");
    assert_eq!(tcp_echo["pod_ip"], pod.ip);
    assert_eq!(tcp_echo["nat_ip"], NODE_IP);
    assert_eq!(tcp_echo["state"], "established");
    let nat_port = tcp_echo["nat_port"].as_u64().unwrap();
    assert!(echo.peers().iter().any(|p| u64::from(p.port()) == nat_port));
    assert!(tcp_echo["packets_out"].as_u64().unwrap() >= 3);
    let udp_flow = flows
        .iter()
        .find(|f| f["proto"] == "udp")
        .expect("udp flow");
    assert_eq!(udp_flow["pod_port"], 40001);
    assert_eq!(udp_flow["state"], "replied");
    assert_eq!(
        (
            udp_flow["packets_out"].as_u64(),
            udp_flow["packets_in"].as_u64()
        ),
        (Some(1), Some(1))
    );
    // UDP datagram: 5 bytes payload + 8 UDP + 20 IPv4.
    assert_eq!(udp_flow["bytes_out"], 33);
    assert!(flows
        .iter()
        .any(|f| f["proto"] == "icmp" && f["packets_in"] == 3));
    assert!(lab.counter("translated_out").unwrap() > 1000);
    assert!(lab.counter("translated_in").unwrap() > 1000);
    assert_eq!(lab.counter("drop_malformed").unwrap(), 0);
    // The node's own traffic is untouched: node → server directly.
    exec(&lab.node, &["ping", "-c", "1", "-W", "2", SERVER_IP]).unwrap();
    drop(stream);
}

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

#[test]
fn two_pods_with_the_same_source_port_to_the_same_server() {
    let lab = lab(LabOptions::default());
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let mut a = traffic::tcp_connect(&lab.pod(0).ns, SERVER_IP, 8080, Some(40000)).unwrap();
    let mut b = traffic::tcp_connect(&lab.pod(1).ns, SERVER_IP, 8080, Some(40000)).unwrap();
    traffic::echo_roundtrip(&mut a, b"from a").unwrap();
    traffic::echo_roundtrip(&mut b, b"from b").unwrap();
    assert_eq!(
        traffic::udp_request(&lab.pod(0).ns, SERVER_IP, 5353, 41000, b"a").unwrap(),
        b"a"
    );
    assert_eq!(
        traffic::udp_request(&lab.pod(1).ns, SERVER_IP, 5353, 41000, b"b").unwrap(),
        b"b"
    );
    let ports: Vec<u16> = echo
        .peers()
        .iter()
        .map(std::net::SocketAddr::port)
        .collect();
    assert_eq!(ports.len(), 2);
    assert_ne!(ports[0], ports[1], "two pods must get distinct NAT ports");
    assert_eq!(udp.peers().len(), 2);
}

#[test]
fn pmtu_discovery_and_traceroute_through_a_1280_byte_link() {
    let lab = lab(LabOptions {
        offloads_off: true,
        ..LabOptions::default()
    });
    let sink = Server::tcp(&lab.far_server, 8081, TcpService::HashSink).unwrap();
    let pod = lab.pod(0).clone();
    // Linux sets DF on TCP: the router's fragmentation-needed must reach the pod translated.
    traffic::bulk_upload(&pod.ns, FAR_SERVER_IP, 8081, 2 << 20).unwrap();
    assert!(
        lab.counter("icmp_error_in").unwrap() >= 1,
        "frag-needed was translated"
    );
    assert_eq!(
        sink.peer_ips(),
        vec![NODE_IP.parse::<std::net::Ipv4Addr>().unwrap()]
    );

    let out = traceroute(&pod.ns, FAR_SERVER_IP).unwrap();
    let hops: Vec<&str> = out.lines().skip(1).collect();
    assert!(
        hops.iter().any(|h| h.contains("192.0.2.1 ")),
        "router hop missing:\n{out}"
    );
    assert!(
        hops.last().is_some_and(|h| h.contains(FAR_SERVER_IP)),
        "destination not reached:\n{out}"
    );
}

#[test]
fn restart_keeps_live_tcp_and_udp_flows() {
    let mut lab = lab(LabOptions::default());
    let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let _udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let pod = lab.pod(0).clone();
    let mut stream = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut stream, b"before restart").unwrap();
    assert_eq!(
        traffic::udp_request(&pod.ns, SERVER_IP, 5353, 42000, b"u1").unwrap(),
        b"u1"
    );
    let flows_before = lab.flows().unwrap().len();
    let (uplink_link, old_prog) = lab.pinned_link("uplink_ingress").unwrap();

    let status = lab.stop_daemon(libc::SIGTERM).unwrap().unwrap();
    assert!(status.success(), "daemon exit status {status}");
    lab.start_daemon().unwrap();
    // The new daemon's program runs in the same link.
    let (link_after, new_prog) = lab.pinned_link("uplink_ingress").unwrap();
    assert_eq!(link_after, uplink_link, "the link was kept");
    assert_ne!(new_prog, old_prog, "the new program was swapped in");
    // Below TCP's minimum retransmission timeout (200 ms): a lost segment fails the read
    // instead of being hidden by a retransmission.
    stream
        .set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    traffic::echo_roundtrip(&mut stream, b"after restart").unwrap();
    assert_eq!(
        traffic::udp_request(&pod.ns, SERVER_IP, 5353, 42000, b"u2").unwrap(),
        b"u2"
    );
    let flows = lab.flows().unwrap();
    assert!(flows.len() >= flows_before);
    let tcp = flows.iter().find(|f| f["proto"] == "tcp").unwrap();
    assert!(
        tcp["packets_out"].as_u64().unwrap() >= 4,
        "counters carried over: {tcp}"
    );

    // A second daemon on the same pin path is refused.
    let out = lab
        .cli_output(&[
            "run",
            "--uplink",
            "eth0",
            "--pin-path",
            lab.pin_path.to_str().unwrap(),
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already uses"));
}

#[test]
fn expired_flows_are_swept() {
    let lab = lab(LabOptions {
        run_args: [
            "--timeout-udp",
            "1",
            "--timeout-udp-replied",
            "1",
            "--timeout-icmp",
            "1",
            "--sweep-interval",
            "0.2",
        ]
        .map(String::from)
        .to_vec(),
        ..LabOptions::default()
    });
    let _udp = Server::udp_echo(&lab.server, 5353).unwrap();
    traffic::udp_request(&lab.pod(0).ns, SERVER_IP, 5353, 43000, b"x").unwrap();
    assert_eq!(lab.flows().unwrap().len(), 1);
    let translated = lab.counter("translated_out").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(lab.flows().unwrap().is_empty(), "expired flow still listed");
    assert_eq!(
        lab.counter("translated_out").unwrap(),
        translated,
        "counters survive the sweep"
    );
    // The port can be used again by a new flow.
    traffic::udp_request(&lab.pod(0).ns, SERVER_IP, 5353, 43000, b"y").unwrap();
}

#[test]
fn pod_del_removes_flows_and_detaches() {
    let lab = lab(LabOptions::default());
    let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let pod = lab.pod(0).clone();
    let mut s = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut s, b"x").unwrap();
    let link_name = format!("pod_{}", lab.node_ifindex(&pod.host_veth).unwrap());
    let (link_id, _) = lab
        .pinned_link(&link_name)
        .expect("the pod's link is pinned");
    assert!(lab.link_exists(link_id));
    let out = lab.cli(&["pod", "del", "--ip", &pod.ip]).unwrap();
    // Detached: the pin is gone and so is the link (the program no longer runs on the veth).
    assert_eq!(
        lab.pinned_link(&link_name),
        None,
        "the pod's link is still pinned"
    );
    assert!(!lab.link_exists(link_id), "link {link_id} still exists");
    assert!(out.contains("removed with 1 flow\n"), "{out}");
    assert!(lab
        .cli(&["pod", "del", "--ip", &pod.ip])
        .unwrap()
        .contains("not registered"));
    assert!(lab.flows().unwrap().iter().all(|f| f["pod_ip"] != pod.ip));
    let list: serde_json::Value =
        serde_json::from_str(&lab.cli(&["pod", "list", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Re-adding restores service.
    lab.register_pod(&pod).unwrap();
    let mut s = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut s, b"y").unwrap();
}

#[test]
fn ipv6_and_other_node_traffic_pass_untouched() {
    let lab = lab(LabOptions::default());
    lab.add_ipv6().unwrap();
    let before = lab.counter("pass_non_ipv4").unwrap();
    exec(
        &lab.node,
        &["ping", "-6", "-c", "2", "-W", "2", "2001:db8::20"],
    )
    .unwrap();
    assert!(lab.counter("pass_non_ipv4").unwrap() >= before + 2);
    exec(&lab.other_node, &["ping", "-c", "1", "-W", "2", NODE_IP]).unwrap();
    exec(&lab.node, &["ping", "-c", "1", "-W", "2", OTHER_NODE_IP]).unwrap();
}

#[test]
fn bad_input_gets_one_clear_line() {
    let lab = lab(LabOptions {
        start_daemon: false,
        ..LabOptions::default()
    });
    let pin = lab.pin_path.to_str().unwrap().to_string();
    let cases: [(&[&str], &str); 5] = [
        (&["run", "--uplink", "nope0"], "does not exist"),
        (
            &["run", "--uplink", "eth0", "--pod-cidr", "169.254.172.1/22"],
            "host bits",
        ),
        (
            &["run", "--uplink", "eth0", "--node-ip", "192.0.2.99"],
            "not an address of",
        ),
        (&["run", "--uplink", "eth0", "--port-range", "9-3"], "empty"),
        (&["flows"], "no datapath maps"),
    ];
    for (args, expected) in cases {
        let mut full = args.to_vec();
        full.extend(["--pin-path", &pin]);
        let out = lab.cli_output(&full).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn pinned_maps_of_another_layout_are_refused() {
    let mut lab = lab(LabOptions::default());
    lab.stop_daemon(libc::SIGTERM).unwrap();
    // Overwrite the pinned layout record as an incompatible version would have written it.
    let layout = lab.pin_path.join("LAYOUT");
    let out = exec_output(
        &lab.node,
        &[
            "bpftool",
            "map",
            "update",
            "pinned",
            layout.to_str().unwrap(),
            "key",
            "0",
            "0",
            "0",
            "0",
            "value",
            "99",
            "0",
            "0",
            "0",
            "16",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
            "0",
        ],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = lab.start_daemon().unwrap_err().to_string();
    assert!(err.contains("layout"), "{err}");
}

/// A plain restart keeps the programs attached: a UDP stream sending throughout keeps its
/// NAT port, every datagram reaches the server translated and every reply reaches the pod;
/// a TCP connection idle during the restart carries on.
#[test]
fn default_restart_keeps_the_udp_streams_nat_port() {
    let mut lab = lab(LabOptions::default());
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let pod = lab.pod(0).clone();
    let mut stream = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut stream, b"before").unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = std::sync::Arc::clone(&stop);
    let ns = pod.ns.clone();
    // The UDP stream uses one socket throughout, like a long-lived client.
    let load = std::thread::spawn(move || {
        let socket = datapath_tests::netns::within(&ns, || {
            std::net::UdpSocket::bind("0.0.0.0:45000").unwrap()
        })
        .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (mut sent, mut replies) = (0u32, 0u32);
        let mut buf = [0u8; 16];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            socket.send_to(b"u", (SERVER_IP, 5353)).unwrap();
            sent += 1;
            if socket.recv_from(&mut buf).is_ok() {
                replies += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // A reply later than the read timeout is still counted.
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        while replies < sent && socket.recv_from(&mut buf).is_ok() {
            replies += 1;
        }
        (sent, replies)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(lab.stop_daemon(libc::SIGTERM).unwrap().unwrap().success());
    lab.start_daemon().unwrap();
    let after_restart = udp.peers().len();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, replies) = load.join().unwrap();
    let seen = udp.peers();
    assert!(seen.len() > after_restart + 10, "the stream resumed");
    // Everything the server saw, whatever its source: one translated address and port, so
    // no packet left untranslated or with another port during the restart.
    let node_ip: std::net::Ipv4Addr = NODE_IP.parse().unwrap();
    let sources: std::collections::BTreeSet<std::net::SocketAddr> = seen.iter().copied().collect();
    assert_eq!(
        sources.len(),
        1,
        "the UDP stream kept its NAT port: {sources:?}"
    );
    assert!(
        sources.iter().all(|p| p.ip() == node_ip),
        "untranslated packets: {sources:?}"
    );
    // Nothing lost either way.
    assert_eq!(
        seen.len() as u32,
        sent,
        "the server saw every datagram sent"
    );
    assert_eq!(replies, sent, "every reply reached the pod");
    traffic::echo_roundtrip(&mut stream, b"after").unwrap();
    assert_eq!(echo.peers().len(), 1);
}

#[test]
fn flows_filters_and_metrics_endpoint() {
    let lab = lab(LabOptions {
        run_args: vec!["--metrics-addr".into(), "127.0.0.1:9465".into()],
        ..LabOptions::default()
    });
    let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let _udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let (p0, p1) = (lab.pod(0).clone(), lab.pod(1).clone());
    let mut s0 = traffic::tcp_connect(&p0.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut s0, b"abc").unwrap();
    traffic::udp_request(&p1.ns, SERVER_IP, 5353, 46000, b"q").unwrap();
    exec(&p1.ns, &["ping", "-c", "1", "-W", "2", SERVER_IP]).unwrap();

    let json = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut full = vec!["flows", "-o", "json"];
        full.extend_from_slice(args);
        serde_json::from_str(&lab.cli(&full).unwrap()).unwrap()
    };
    let by_pod = json(&["--pod", "default/pod-1"]);
    assert_eq!(by_pod.len(), 2);
    assert!(by_pod.iter().all(|f| f["pod_ip"] == p1.ip));
    assert_eq!(json(&["--pod", &p0.ip]).len(), 1);
    assert_eq!(
        json(&["--pod", "pod-0"]).len(),
        1,
        "the short pod name matches too"
    );
    let udp = json(&["--proto", "udp"]);
    assert_eq!(
        (udp.len(), &udp[0]["pod_port"]),
        (1, &serde_json::json!(46000))
    );
    assert_eq!(json(&["--dst", "192.0.2.20/32"]).len(), 3);
    assert_eq!(json(&["--dst", "198.51.100.0/24"]).len(), 0);
    assert_eq!(json(&["--port", "8080"]).len(), 1);
    assert_eq!(json(&["--state", "replied"]).len(), 2);
    // Exact counters for the one UDP exchange: 1-byte payload + 8 UDP + 20 IPv4 each way.
    for field in ["packets_out", "packets_in"] {
        assert_eq!(udp[0][field].as_u64(), Some(1), "{field}");
    }
    assert_eq!(
        (udp[0]["bytes_out"].as_u64(), udp[0]["bytes_in"].as_u64()),
        (Some(29), Some(29))
    );
    // TCP: at least SYN, ACK and the data out; SYN-ACK and the echo in (ACK timing varies).
    let tcp = &json(&["--proto", "tcp"])[0];
    assert!(tcp["packets_out"].as_u64().unwrap() >= 3, "{tcp}");
    assert!(tcp["packets_in"].as_u64().unwrap() >= 2, "{tcp}");
    assert!(tcp["expires_s"].as_u64().unwrap() > 7000);
    let wide = lab.cli(&["flows", "-o", "wide"]).unwrap();
    assert!(
        wide.starts_with("PROTO") && wide.contains("PKTS OUT") && wide.contains("default/pod-1"),
        "{wide}"
    );

    // Prometheus text over HTTP from inside the node.
    let body = datapath_tests::netns::within(&lab.node, || {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect("127.0.0.1:9465").unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        body
    })
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let metric = |line_start: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{line_start} missing in\n{body}"))
    };
    assert!(metric("datapath_packets_total{counter=\"translated_out\"") >= 5.0);
    assert!((metric("datapath_flows ") - 3.0).abs() < f64::EPSILON);
    assert!(metric("datapath_sweep_passes_total ") >= 1.0);
    assert!(body.contains(
        "datapath_nat_port_usage_ratio{proto=\"tcp\",dst_ip=\"192.0.2.20\",dst_port=\"8080\"}"
    ));
}

#[test]
fn follow_reports_open_and_close_with_final_counters() {
    let lab = lab(LabOptions {
        run_args: ["--timeout-tcp-closing", "1", "--sweep-interval", "0.2"]
            .map(String::from)
            .to_vec(),
        ..LabOptions::default()
    });
    let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let mut follow = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node])
        .arg(datapath_tests::datapath_user_bin())
        .args([
            "flows",
            "--follow",
            "-o",
            "json",
            "--interval",
            "0.1",
            "--port",
            "8080",
            "--pin-path",
        ])
        .arg(&lab.pin_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut s = traffic::tcp_connect(&lab.pod(0).ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut s, b"followed").unwrap();
    drop(s); // FIN both ways: closing, swept after 1 s.
    let mut events: Vec<serde_json::Value> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline && !events.iter().any(|e| e["event"] == "close") {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            events.push(serde_json::from_str(&line).unwrap());
        }
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(follow.id().cast_signed(), libc::SIGTERM) };
    let _ = follow.wait();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"open"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"close"), "{kinds:?}");
    let close = events.last().unwrap();
    assert_eq!(close["pod"], "default/pod-0");
    assert_eq!(close["dst_port"], 8080);
    assert_eq!(close["state"], "closing");
    assert!(close["packets_out"].as_u64().unwrap() >= 4, "{close}");
    assert!(close["duration_s"].is_u64());
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

/// Packet sockets (trafgen here) build skbs from page fragments with only part of the headers
/// in the linear area: they must be translated like any other packet, not dropped as malformed.
#[test]
fn packets_with_headers_in_page_fragments_are_translated() {
    let lab = lab(LabOptions::default());
    let pod = lab.pod(0).clone();
    let mac = |ns: &str, dev: &str| {
        exec(ns, &["cat", &format!("/sys/class/net/{dev}/address")])
            .unwrap()
            .trim()
            .to_string()
    };
    let conf = std::env::temp_dir().join(format!("dp-trafgen-{}.cfg", lab.id));
    std::fs::write(
        &conf,
        format!(
            "{{ eth(da={}, sa={}), ipv4(saddr={}, daddr={SERVER_IP}, ttl=64), udp(sp=4000, dp=9), fill(0x00, 18) }}\n",
            mac(&lab.node, &pod.host_veth),
            mac(&pod.ns, "v4if0"),
            pod.ip
        ),
    )
    .unwrap();
    let conf_path = conf.to_str().unwrap();
    let _ = exec_output(
        &pod.ns,
        &[
            "timeout",
            "-s",
            "INT",
            "1",
            "trafgen",
            "--dev",
            "v4if0",
            "--conf",
            conf_path,
            "--cpus",
            "1",
            "--qdisc-path",
        ],
    );
    let _ = std::fs::remove_file(&conf);
    assert!(lab.counter("translated_out").unwrap() > 1000);
    assert_eq!(lab.counter("drop_malformed").unwrap(), 0);
}

/// With checksum offload on (the default, and what pods on a real node hand down), TCP and
/// UDP packets cross the datapath with partial checksums: the checksum field holds the
/// pseudo-header seed the device completes later, and a veth receiver never verifies it. So
/// this test looks at the frames themselves, as the receiving interfaces see them: every
/// partial seed must match the rewritten addresses, every finished checksum must verify, and
/// both kinds must have been seen in both directions.
#[test]
fn partial_checksums_are_updated_for_the_device_to_finish() {
    use datapath_tests::capture::{l4_checksum, Capture, L4Checksum};

    let lab = lab(LabOptions::default());
    let log = std::fs::read_to_string(&lab.daemon_log).unwrap();
    assert!(
        log.contains("checksum state read through bpf_cast_to_kern_ctx"),
        "the datapath must update checksums itself on this kernel:\n{log}"
    );
    let sink = Server::tcp(&lab.server, 8081, TcpService::HashSink).unwrap();
    let source = Server::tcp(&lab.server, 8082, TcpService::Source(2 << 20)).unwrap();
    let udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let pod = lab.pod(0).clone();
    let at_server = Capture::start(&lab.server, "eth0").unwrap();
    let at_pod = Capture::start(&pod.ns, "v4if0").unwrap();

    traffic::bulk_upload(&pod.ns, SERVER_IP, 8081, 2 << 20).unwrap();
    traffic::bulk_download(&pod.ns, SERVER_IP, 8082, 2 << 20).unwrap();
    assert_eq!(
        traffic::udp_request(&pod.ns, SERVER_IP, 5353, 40002, b"partial").unwrap(),
        b"partial"
    );

    let mut seen = std::collections::BTreeMap::new();
    for (side, capture) in [("at the server", at_server), ("at the pod", at_pod)] {
        // Frames this namespace received: the ones the datapath rewrote.
        for frame in capture.finish().unwrap().iter().filter(|f| !f.outgoing) {
            let Some((proto, verdict)) = l4_checksum(frame) else {
                continue;
            };
            assert_ne!(
                verdict,
                L4Checksum::Wrong,
                "proto {proto} frame {side} ({} bytes, partial: {})",
                frame.data.len(),
                frame.partial
            );
            *seen
                .entry((side, proto, format!("{verdict:?}")))
                .or_insert(0u32) += 1;
        }
    }
    eprintln!("checksums seen: {seen:?}");
    for side in ["at the server", "at the pod"] {
        for proto in [6, 17] {
            assert!(
                seen.contains_key(&(side, proto, "ValidSeed".to_string())),
                "no partial proto {proto} checksum {side}: {seen:?}"
            );
        }
    }
    drop((sink, source, udp));
}
