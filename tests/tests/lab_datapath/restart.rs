//! Restarting the daemon: live flows, their counters and NAT ports carry on, also across an
//! upgrade of the pinned maps' layout.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use datapath_tests::{
    lab::{Lab, NODE_IP, SERVER_IP},
    netns::{exec, exec_output, ifindex_of, within},
    traffic::{self, Server, TcpService},
    LabOptions,
};

use crate::lab;

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
    let pod_link = format!("pod_{}", ifindex_of(&lab.node, &pod.host_veth).unwrap());
    let (pod_link_before, old_pod_prog) = lab.pinned_link(&pod_link).unwrap();

    let status = lab.stop_daemon(libc::SIGTERM).unwrap().unwrap();
    assert!(status.success(), "daemon exit status {status}");
    lab.start_daemon().unwrap();
    // The new daemon's programs run in the same links: the uplink's and every pod's (an
    // upgrade reaches pods that already have a link too).
    let (link_after, new_prog) = lab.pinned_link("uplink_ingress").unwrap();
    assert_eq!(link_after, uplink_link, "the link was kept");
    assert_ne!(new_prog, old_prog, "the new program was swapped in");
    let (pod_link_after, new_pod_prog) = lab.pinned_link(&pod_link).unwrap();
    assert_eq!(pod_link_after, pod_link_before, "the pod's link was kept");
    assert_ne!(
        new_pod_prog, old_pod_prog,
        "the new pod-side program was swapped in"
    );
    let pinned = bpftool(
        &lab,
        &[
            "prog",
            "show",
            "pinned",
            lab.pin_path.join("prog_tc_from_pod").to_str().unwrap(),
        ],
    );
    assert_eq!(
        pinned["id"].as_u64(),
        Some(new_pod_prog),
        "the pod runs the program `pod add` attaches"
    );
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
        let socket = within(&ns, || UdpSocket::bind("0.0.0.0:45000").unwrap()).unwrap();
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
    let sources: std::collections::BTreeSet<SocketAddr> = seen.iter().copied().collect();
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

/// Maps pinned by the previous version (layout 1: a binding held its owner's pod tuple alone)
/// are upgraded in place by the next `run`: every binding is carried over with its owner, and
/// the flows carry on through their NAT ports. Until then the CLI says to start the daemon.
#[test]
fn layout_1_maps_are_upgraded_in_place_keeping_every_flow() {
    let mut lab = lab(LabOptions::default());
    let pod = lab.pod(0).clone();
    // A TCP connection and a UDP flow whose server side the test drives, so that after the
    // upgrade the remote speaks first: a pod packet would re-create a lost binding.
    let listener = within(&lab.server, || TcpListener::bind(("0.0.0.0", 8080)))
        .unwrap()
        .unwrap();
    let mut pod_tcp = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    let (mut server_tcp, _) = listener.accept().unwrap();
    let server_udp = within(&lab.server, || UdpSocket::bind(("0.0.0.0", 5353)))
        .unwrap()
        .unwrap();
    let pod_udp = within(&pod.ns, || UdpSocket::bind(("0.0.0.0", 42000)))
        .unwrap()
        .unwrap();
    // Below TCP's minimum retransmission timeout (200 ms): a lost segment fails the read.
    let timeout = Some(Duration::from_millis(150));
    for socket in [&server_udp, &pod_udp] {
        socket.set_read_timeout(timeout).unwrap();
    }
    for stream in [&pod_tcp, &server_tcp] {
        stream.set_read_timeout(timeout).unwrap();
    }
    pod_udp.send_to(b"u1", (SERVER_IP, 5353)).unwrap();
    let nat_udp = receive_udp(&server_udp, b"u1");
    server_udp.send_to(b"r1", nat_udp).unwrap();
    receive_udp(&pod_udp, b"r1");
    send_and_receive(&mut server_tcp, &mut pod_tcp, b"before upgrade");
    assert!(lab.stop_daemon(libc::SIGTERM).unwrap().unwrap().success());

    let old = pin_layout_1(&lab);
    let (bindings, layout) = (
        lab.pin_path.join("NAT_BINDINGS"),
        lab.pin_path.join("LAYOUT"),
    );
    let capacity = map_info(&lab, &bindings)["max_entries"].clone();

    let out = lab
        .cli_output(&["flows", "--pin-path", lab.pin_path.to_str().unwrap()])
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "flows read layout-1 maps");
    assert!(
        stderr.contains("layout (1)") && stderr.contains("`datapath-user run`"),
        "{stderr}"
    );
    failed_start_pins_layout_1_back(&mut lab);
    // The flags are still checked against the pods registered in layout-1 maps (bounded: a
    // `run` that accepted them would stay in the foreground).
    let bin = datapath_tests::datapath_user_bin();
    let out = exec_output(
        &lab.node,
        &[
            "timeout",
            "30",
            bin.to_str().unwrap(),
            "run",
            "--uplink",
            "eth0",
            "--gateway",
            &pod.ip,
            "--pin-path",
            lab.pin_path.to_str().unwrap(),
        ],
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a registered pod as the gateway");
    assert!(stderr.contains("does not fit these flags"), "{stderr}");

    lab.start_daemon().unwrap();
    let log = std::fs::read_to_string(&lab.daemon_log).unwrap();
    let line = format!(
        "upgraded pinned maps from layout 1: {} NAT bindings carried over",
        old.len()
    );
    assert!(log.contains(&line), "{log}");
    let (_, info) = dump(&lab, &layout).pop_first().unwrap();
    assert_eq!(info[0], "0x02", "LAYOUT says 2 again");
    let info = map_info(&lab, &bindings);
    assert_eq!(info["bytes_value"], 72, "{info}");
    assert_eq!(info["max_entries"], capacity, "{info}");
    let new = dump(&lab, &bindings);
    for (reply, owner) in &old {
        let binding = new.get(reply).unwrap_or_else(|| panic!("{reply:?} lost"));
        assert_eq!(&binding[..16], owner, "the owner of {reply:?}");
    }

    // The remote first: only the carried bindings can take these to the pod; then the pod
    // answers through the same NAT ports.
    send_and_receive(
        &mut server_tcp,
        &mut pod_tcp,
        b"from the server after the upgrade",
    );
    server_udp.send_to(b"r2", nat_udp).unwrap();
    receive_udp(&pod_udp, b"r2");
    send_and_receive(
        &mut pod_tcp,
        &mut server_tcp,
        b"from the pod after the upgrade",
    );
    pod_udp.send_to(b"u2", (SERVER_IP, 5353)).unwrap();
    assert_eq!(
        receive_udp(&server_udp, b"u2"),
        nat_udp,
        "the UDP flow kept its NAT port"
    );
}

/// Writes `msg` on `from` and reads it whole on `to`.
fn send_and_receive(from: &mut TcpStream, to: &mut TcpStream, msg: &[u8]) {
    from.write_all(msg).unwrap();
    let mut got = vec![0; msg.len()];
    to.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{:?} not received: {e}", String::from_utf8_lossy(msg)));
    assert_eq!(got, msg);
}

/// Receives `msg` on `socket`; returns where it came from.
fn receive_udp(socket: &UdpSocket, msg: &[u8]) -> SocketAddr {
    let mut buf = [0; 64];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{:?} not received: {e}", String::from_utf8_lossy(msg)));
    assert_eq!(&buf[..n], msg);
    from
}

/// Makes the pin directory what the previous version left (the programs attached keep
/// theirs): `NAT_BINDINGS` of the same size with each binding's reply tuple → owner (a
/// binding's first 16 bytes), and layout 1 in `LAYOUT`. Returns those bindings.
fn pin_layout_1(lab: &Lab) -> BTreeMap<Vec<String>, Vec<String>> {
    let bindings = lab.pin_path.join("NAT_BINDINGS");
    let old: BTreeMap<_, _> = dump(lab, &bindings)
        .into_iter()
        .map(|(reply, binding)| (reply, binding[..16].to_vec()))
        .collect();
    assert!(old.len() >= 2, "the TCP and UDP flows' bindings: {old:?}");
    let capacity = map_info(lab, &bindings)["max_entries"].to_string();
    std::fs::remove_file(&bindings).unwrap();
    let path = bindings.to_str().unwrap();
    bpftool(
        lab,
        &[
            "map",
            "create",
            path,
            "type",
            "lru_hash",
            "key",
            "16",
            "value",
            "16",
            "entries",
            &capacity,
            "name",
            "NAT_BINDINGS",
        ],
    );
    for (reply, owner) in &old {
        update(lab, &bindings, reply, owner);
    }
    let layout = lab.pin_path.join("LAYOUT");
    let (key, mut info) = dump(lab, &layout).pop_first().unwrap();
    assert_eq!(info[0], "0x02", "this version writes layout 2");
    info[0] = "0x01".into();
    update(lab, &layout, &key, &info);
    old
}

/// A start that fails before the bindings are carried over (here: a directory where a map's
/// pin goes) pins the layout-1 `NAT_BINDINGS` back, so the previous version could take over.
fn failed_start_pins_layout_1_back(lab: &mut Lab) {
    let bindings = lab.pin_path.join("NAT_BINDINGS");
    let before = map_info(lab, &bindings);
    let hints = lab.pin_path.join("PORT_HINTS");
    std::fs::remove_file(&hints).unwrap();
    std::fs::create_dir(&hints).unwrap();
    assert!(lab.start_daemon().is_err(), "started over a directory");
    std::fs::remove_dir(&hints).unwrap();
    let log = std::fs::read_to_string(&lab.daemon_log).unwrap();
    assert!(log.contains("NAT_BINDINGS is pinned back"), "{log}");
    let after = map_info(lab, &bindings);
    assert_eq!(after["id"], before["id"], "{after}");
    let (_, layout) = dump(lab, &lab.pin_path.join("LAYOUT")).pop_first().unwrap();
    assert_eq!(layout[0], "0x01", "LAYOUT still says 1");
}

/// `bpftool -j ARGS` in the node, parsed.
fn bpftool(lab: &Lab, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["bpftool", "-j"];
    full.extend_from_slice(args);
    let out = exec(&lab.node, &full).unwrap();
    serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
}

/// The map pinned at `path` as bpftool shows it (type, sizes, max_entries).
fn map_info(lab: &Lab, path: &Path) -> serde_json::Value {
    bpftool(lab, &["map", "show", "pinned", path.to_str().unwrap()])
}

/// The entries of the map pinned at `path`, each key and value as bpftool's bytes ("0x1f").
fn dump(lab: &Lab, path: &Path) -> BTreeMap<Vec<String>, Vec<String>> {
    let bytes = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect()
    };
    bpftool(lab, &["map", "dump", "pinned", path.to_str().unwrap()])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (bytes(&e["key"]), bytes(&e["value"])))
        .collect()
}

fn update(lab: &Lab, path: &Path, key: &[String], value: &[String]) {
    let mut args = vec!["map", "update", "pinned", path.to_str().unwrap(), "key"];
    args.extend(key.iter().map(String::as_str));
    args.push("value");
    args.extend(value.iter().map(String::as_str));
    bpftool(lab, &args);
}
