//! Real traffic from the pods: ping, TCP and UDP reach the servers from the node IP only,
//! two pods share a source port, PMTU discovery over the 1280-byte link, IPv6 and other
//! nodes untouched, packets from packet sockets, partial checksums.

use datapath_tests::{
    lab::{FAR_SERVER_IP, NODE_IP, OTHER_NODE_IP, SERVER_IP},
    netns::{exec, exec_output, mac_of, traceroute},
    traffic::{self, Server, TcpService},
    LabOptions,
};

use crate::lab;

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

/// Packet sockets (trafgen here) build skbs from page fragments with only part of the headers
/// in the linear area: they must be translated like any other packet, not dropped as malformed.
#[test]
fn packets_with_headers_in_page_fragments_are_translated() {
    let lab = lab(LabOptions::default());
    let pod = lab.pod(0).clone();
    let conf = std::env::temp_dir().join(format!("dp-trafgen-{}.cfg", lab.id));
    std::fs::write(
        &conf,
        format!(
            "{{ eth(da={}, sa={}), ipv4(saddr={}, daddr={SERVER_IP}, ttl=64), udp(sp=4000, dp=9), fill(0x00, 18) }}\n",
            mac_of(&lab.node, &pod.host_veth).unwrap(),
            mac_of(&pod.ns, "v4if0").unwrap(),
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
