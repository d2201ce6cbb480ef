//! Drop-in safety of the packet path and the daemon's lifecycle (issue 12): what an operator
//! swapping the iptables mode for the datapath relies on. Hop limits as the node's forwarding
//! code enforces them, nothing leaving untranslated once a pod is registered, programs that
//! outlive the daemon, probes that tell the truth, and a sweep that never removes a flow a
//! packet is using.

use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use datapath_common::flow::{Flow, FlowKey, FlowState, PROTO_TCP};
use datapath_tests::{
    lab::{NODE_IP, SERVER_IP},
    netns::{exec, exec_line, exec_output, within},
    traffic::{self, Server, TcpService},
    Lab, LabOptions, Mode,
};

/// Pod sockets of the sweep race test.
const SOCKETS: u32 = 48;

fn lab(opts: LabOptions) -> Lab {
    Lab::new(opts).expect("lab")
}

/// A UDP sink in `ns` recording, for every datagram, its source and the two u32 the senders
/// below put first in the payload (sender index, sequence number).
struct Sink {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(SocketAddr, u32, u32)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start(ns: &str, port: u16) -> Sink {
        let socket = within(ns, move || UdpSocket::bind(("0.0.0.0", port)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                    if n >= 8 {
                        let who = u32::from_be_bytes(buf[..4].try_into().unwrap());
                        let seq = u32::from_be_bytes(buf[4..8].try_into().unwrap());
                        seen2.lock().unwrap().push((peer, who, seq));
                    }
                }
            }
        });
        Sink {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<(SocketAddr, u32, u32)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

fn datagram(who: u32, seq: u32) -> [u8; 8] {
    let mut d = [0u8; 8];
    d[..4].copy_from_slice(&who.to_be_bytes());
    d[4..].copy_from_slice(&seq.to_be_bytes());
    d
}

fn is_link_local(addr: &SocketAddr) -> bool {
    matches!(addr, SocketAddr::V4(v4) if v4.ip().octets()[..2] == [169, 254])
}

/// The hop-limit checks a pod's replies go through, in either mode.
fn replies_with_server_ttl(lab: &Lab, ttl: u8) -> (bool, bool, bool, bool) {
    exec_line(
        &lab.server,
        &format!("sysctl -qw net.ipv4.ip_default_ttl={ttl}"),
    )
    .unwrap();
    let pod = lab.pod(0).ns.clone();
    let udp = traffic::udp_request(&pod, SERVER_IP, 5353, 41000 + u16::from(ttl), b"t").is_ok();
    let tcp = traffic::tcp_connect(&pod, SERVER_IP, 8080, None)
        .and_then(|mut s| traffic::echo_roundtrip(&mut s, b"t"))
        .is_ok();
    let ping = exec_output(&pod, &["ping", "-c", "1", "-W", "2", SERVER_IP])
        .unwrap()
        .status
        .success();
    // A connected UDP socket reports the server's port-unreachable as ECONNREFUSED; a
    // dropped error leaves it waiting.
    let icmp_error = within(&pod, || {
        let s = UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        s.connect((SERVER_IP, 9)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        s.send(b"closed port").unwrap();
        let mut buf = [0u8; 16];
        matches!(s.recv(&mut buf), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
    })
    .unwrap();
    (udp, tcp, ping, icmp_error)
}

#[test]
fn ttl_one_replies_never_reach_the_pod_in_either_mode() {
    for mode in [Mode::Iptables, Mode::Datapath] {
        let lab = lab(LabOptions {
            mode,
            ..LabOptions::default()
        });
        let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
        let _udp = Server::udp_echo(&lab.server, 5353).unwrap();
        // TTL 1 at the server: a router must not forward the replies, so the pod gets none
        // (the instance metadata service's hop limit works this way).
        assert_eq!(
            replies_with_server_ttl(&lab, 1),
            (false, false, false, false),
            "{mode:?}: a TTL-1 reply (udp, tcp, ping, icmp error) reached the pod"
        );
        if mode == Mode::Datapath {
            let dropped = lab.counter("drop_ttl_exceeded").unwrap();
            assert!(dropped >= 4, "drop_ttl_exceeded = {dropped}");
        }
        // TTL 2 reaches it, decremented by the hop.
        assert_eq!(
            replies_with_server_ttl(&lab, 2),
            (true, true, true, true),
            "{mode:?}: a TTL-2 reply did not reach the pod"
        );
        let out = exec(&lab.pod(0).ns, &["ping", "-c", "1", "-W", "2", SERVER_IP]).unwrap();
        assert!(out.contains("ttl=1"), "{mode:?}: {out}");
    }
}

#[test]
fn nothing_leaves_untranslated_once_pod_add_succeeds_while_the_daemon_starts() {
    let mut lab = lab(LabOptions {
        start_daemon: false,
        ..LabOptions::default()
    });
    let pod = lab.pod(0).clone();
    let sink = Sink::start(&lab.server, 7000);
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (sent2, stop2) = (Arc::clone(&sent), Arc::clone(&stop));
    let sender = traffic::background(&pod.ns, move || {
        let socket = UdpSocket::bind(("0.0.0.0", 47000)).unwrap();
        let dst: SocketAddr = (SERVER_IP.parse::<Ipv4Addr>().unwrap(), 7000).into();
        let mut seq = 0u32;
        while !stop2.load(Ordering::Relaxed) {
            seq += 1;
            // Counted before sending: any datagram numbered above a reading of the counter
            // was sent after that reading.
            sent2.store(u64::from(seq), Ordering::SeqCst);
            let _ = socket.send_to(&datagram(0, seq), dst);
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap();

    // Before any daemon: refused, with the reason.
    let out = lab.try_register_pod(&pod).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not attached"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The daemon starts while `pod add` is retried, as kubelet retries CNI ADD.
    let ready = lab.spawn_daemon().unwrap();
    let deadline = Instant::now() + Duration::from_mins(1);
    let registered_at = loop {
        let out = lab.try_register_pod(&pod).unwrap();
        if out.status.success() {
            break sent.load(Ordering::SeqCst);
        }
        assert!(Instant::now() < deadline, "pod add never succeeded");
        std::thread::sleep(Duration::from_millis(5));
    };
    lab.wait_ready(&ready, Duration::from_mins(1)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let seen = sink.finish();

    let after: Vec<_> = seen
        .iter()
        .filter(|(_, _, seq)| u64::from(*seq) > registered_at)
        .collect();
    let leaked: Vec<_> = after
        .iter()
        .filter(|(src, _, _)| is_link_local(src))
        .collect();
    assert!(
        leaked.is_empty(),
        "{} of {} datagrams sent after `pod add` succeeded left with the pod's source",
        leaked.len(),
        after.len()
    );
    let translated = after
        .iter()
        .filter(|(src, _, _)| src.ip().to_string() == NODE_IP)
        .count();
    assert!(
        translated > 100,
        "only {translated} translated datagrams arrived"
    );
}

fn link_prog_id(lab: &Lab, link: &str) -> u64 {
    let path = lab.pin_path.join("links").join(link);
    let out = exec(
        &lab.node,
        &[
            "bpftool",
            "-j",
            "link",
            "show",
            "pinned",
            path.to_str().unwrap(),
        ],
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["prog_id"].as_u64().unwrap()
}

#[test]
fn the_datapath_outlives_the_daemon_and_the_next_one_takes_it_over() {
    let mut lab = lab(LabOptions::default());
    let _echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let _udp = Server::udp_echo(&lab.server, 5353).unwrap();
    let pod = lab.pod(0).clone();
    let stream = traffic::tcp_connect(&pod.ns, SERVER_IP, 8080, None).unwrap();
    let load = traffic::LiveLoad::start(
        &pod.ns,
        stream,
        (SERVER_IP.parse().unwrap(), 5353),
        44100,
        Duration::from_millis(10),
    )
    .unwrap();
    let before = link_prog_id(&lab, "uplink_ingress");
    assert!(lab.stop_daemon(libc::SIGTERM).unwrap().unwrap().success());
    // No daemon: the programs keep translating, and a pod can still be registered.
    let translated = lab.counter("translated_out").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.counter("translated_out").unwrap() > translated + 10,
        "nothing translated while the daemon was down"
    );
    let late = lab.pod(1).clone();
    lab.cli(&["pod", "del", "--ip", &late.ip]).unwrap();
    let out = lab.register_pod(&late).unwrap();
    assert!(out.contains("attached"), "{out}");
    traffic::udp_request(&late.ns, SERVER_IP, 5353, 44200, b"late").unwrap();

    lab.start_daemon().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let rounds = load.finish().expect("traffic survived the restart");
    assert!(rounds > 40, "only {rounds} rounds");
    let after = link_prog_id(&lab, "uplink_ingress");
    assert_ne!(before, after, "the new daemon did not swap its program in");
    assert_eq!(lab.counter("drop_untracked_inbound").unwrap(), 0);

    // Uninstall: detach (no daemon), after which pods cannot be registered.
    assert!(lab.stop_daemon(libc::SIGTERM).unwrap().unwrap().success());
    let out = lab.cli(&["detach"]).unwrap();
    assert!(out.contains("detached 4 programs"), "{out}");
    let out = lab.try_register_pod(&late).unwrap();
    assert!(
        !out.status.success(),
        "pod add succeeded with nothing attached"
    );
    // A new start attaches every pod still registered, then says ready.
    lab.start_daemon().unwrap();
    let status = lab.cli(&["status", "-o", "json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(
        status["attachments"].as_array().unwrap().len(),
        4,
        "{status}"
    );
}

/// One HTTP GET against the metrics server in the node namespace.
fn http_get(lab: &Lab, addr: &str, path: &str) -> (u16, String) {
    let (addr, path) = (addr.to_string(), path.to_string());
    within(&lab.node, move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let mut body = String::new();
        s.read_to_string(&mut body)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let code = body
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, body)
    })
    .unwrap()
}

#[test]
fn status_probes_and_detach_tell_the_truth() {
    let metrics = "127.0.0.1:19465";
    let mut lab = lab(LabOptions {
        run_args: vec!["--metrics-addr".into(), metrics.into()],
        ..LabOptions::default()
    });
    let pin = lab.pin_path.to_str().unwrap().to_string();
    let out = lab.cli(&["status", "-o", "json"]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(
        status["daemon"]["pid"].as_u64(),
        lab.daemon_pid().map(u64::from)
    );
    assert_eq!(status["daemon"]["checksum_path"], "kfunc");
    assert_eq!(status["attachments"].as_array().unwrap().len(), 4);
    assert_eq!(http_get(&lab, metrics, "/healthz").0, 200);
    assert_eq!(http_get(&lab, metrics, "/readyz").0, 200);
    assert_eq!(http_get(&lab, metrics, "/nope").0, 404);

    // An idle client does not hold scrapes up.
    let idle_addr = metrics.to_string();
    let _idle = within(&lab.node, move || TcpStream::connect(idle_addr).unwrap()).unwrap();
    let start = Instant::now();
    let (code, body) = http_get(&lab, metrics, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("datapath_packets_total"));
    assert!(
        body.contains("datapath_events_total{event=\"flow_created\"}")
            && !body.contains("counter=\"flow_created\""),
        "events are not packets: {body}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "scrape took {:?}",
        start.elapsed()
    );

    // A start that cannot serve its metrics port attaches nothing.
    let second = lab.bpf_mount.join("second");
    let out = lab
        .cli_output(&[
            "run",
            "--uplink",
            "eth0",
            "--metrics-addr",
            metrics,
            "--pin-path",
            second.to_str().unwrap(),
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics address"));
    assert!(
        !second.join("links").exists(),
        "a failed start left links behind"
    );

    // `detach` under a live daemon is refused; as another user it is a permission error.
    let out = lab.cli_output(&["detach", "--pin-path", &pin]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("a daemon (pid"), "{stderr}");
    let out = lab
        .cli_as_nobody(&["detach", "--force", "--pin-path", &pin])
        .unwrap();
    assert!(!out.status.success(), "unprivileged detach succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lab.pin_path.join("links/uplink_ingress").exists());

    // --force detaches; the daemon notices, and status and /readyz say what is missing.
    let out = lab.cli(&["detach", "--force"]).unwrap();
    assert!(out.contains("detached 4 programs"), "{out}");
    std::thread::sleep(Duration::from_millis(2500));
    let out = lab.cli_output(&["status", "--pin-path", &pin]).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("uplink ingress program not attached"),
        "{stderr}"
    );
    let (code, body) = http_get(&lab, metrics, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(http_get(&lab, metrics, "/healthz").0, 200);
    let log = std::fs::read_to_string(&lab.daemon_log).unwrap();
    assert!(log.contains("not serving fully"), "{log}");

    // No daemon at all.
    lab.stop_daemon(libc::SIGTERM).unwrap();
    let out = lab.cli_output(&["status", "--pin-path", &pin]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon serves"));
}

#[test]
fn the_sweep_never_removes_a_flow_a_packet_refreshed() {
    // Flows time out after a second. Each pod socket alternates a long gap (just over the
    // timeout, so its packet may come while the sweep is deciding to remove the flow) and a
    // short one (half the timeout). The sweep is busy with a large table, so its decisions are
    // hundreds of milliseconds old by the time it acts. A packet after a long gap may find
    // its flow gone (a new flow, a new NAT port: fine); but if it found the flow, the flow
    // was refreshed, so the next packet, half a timeout later, must find it too.
    let lab = lab(LabOptions {
        run_args: [
            "--timeout-udp",
            "1",
            "--timeout-udp-replied",
            "1",
            "--sweep-interval",
            "0.1",
            "--flow-table-size",
            "1048576",
        ]
        .map(String::from)
        .to_vec(),
        ..LabOptions::default()
    });
    let mut maps = datapath_user::maps::Maps::open(&lab.pin_path).unwrap();
    let now = datapath_user::maps::monotonic_coarse_ns();
    for i in 0..400_000u32 {
        let key = FlowKey::new(
            PROTO_TCP,
            0xa9fe_ad00 | (i % 256),
            (i / 256) as u16 + 1024,
            0xcb00_7100 | (i % 200),
            443,
        );
        let flow = Flow {
            created_ns: now,
            last_seen_ns: now,
            nat_ip: 0xc000_020a,
            nat_port: 1024,
            state: FlowState::Established as u8,
            ..Flow::default()
        };
        maps.conntrack.insert(key, flow, 0).unwrap();
    }
    let sink = Sink::start(&lab.server, 7001);
    let pod = lab.pod(0).ns.clone();
    let sender = traffic::background(&pod, move || {
        let sockets: Vec<UdpSocket> = (0..SOCKETS)
            .map(|_| UdpSocket::bind(("0.0.0.0", 0)).unwrap())
            .collect();
        let dst: SocketAddr = (SERVER_IP.parse::<Ipv4Addr>().unwrap(), 7001).into();
        let start = Instant::now();
        let mut next: Vec<Instant> = (0..SOCKETS).map(|_| start).collect();
        let mut seq = vec![0u32; SOCKETS as usize];
        while start.elapsed() < Duration::from_secs(10) {
            for k in 0..SOCKETS as usize {
                if Instant::now() >= next[k] {
                    seq[k] += 1;
                    let _ = sockets[k].send_to(&datagram(k as u32, seq[k]), dst);
                    // Odd packets are followed by a long gap (1 s + up to 282 ms), even ones
                    // by a short one (0.5 s).
                    next[k] += if seq[k] % 2 == 1 {
                        Duration::from_millis(1000 + 6 * k as u64)
                    } else {
                        Duration::from_millis(500)
                    };
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .unwrap();
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let seen = sink.finish();
    let mut port_of: HashMap<(u32, u32), u16> = HashMap::new();
    for (src, who, seq) in &seen {
        assert_eq!(src.ip().to_string(), NODE_IP);
        port_of.insert((*who, *seq), src.port());
    }
    let mut checked = 0;
    let mut lost = Vec::new();
    for ((who, seq), port) in &port_of {
        // An odd packet (after a short gap) and the even one before it.
        if seq % 2 == 1 && *seq > 1 {
            if let Some(before) = port_of.get(&(*who, seq - 1)) {
                checked += 1;
                if before != port {
                    lost.push((*who, *seq));
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} pairs arrived");
    assert!(
        lost.is_empty(),
        "{} of {checked} flows refreshed by a packet were removed and re-created with a new NAT port: {lost:?}",
        lost.len()
    );
}
