//! Flows over their life: swept when expired, removed with their pod, listed with filters,
//! followed, exported as metrics.

use std::time::Duration;

use datapath_tests::{
    lab::SERVER_IP,
    netns::exec,
    traffic::{self, Server, TcpService},
    LabOptions,
};

use crate::lab;

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
