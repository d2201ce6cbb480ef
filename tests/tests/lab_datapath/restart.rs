//! Restarting the daemon: live flows, their counters and NAT ports carry on.

use std::time::Duration;

use datapath_tests::{
    lab::{NODE_IP, SERVER_IP},
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
