//! The workloads: each drives traffic through one lab and returns one figure.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use datapath_tests::{
    lab::SERVER_IP,
    netns::{exec, mac_of},
    Lab,
};

use super::Plan;

/// How a TCP workload's clients loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loop {
    /// Connect, 1-byte request, 1-byte response, close; `rst`: close with SO_LINGER 0.
    ConnectClose { rst: bool },
    /// 1-byte request/response on a persistent connection.
    Transactions,
}

/// One workload's figure on `lab`.
pub(super) fn run_workload(lab: &Lab, plan: &Plan, workload: &str) -> Result<f64> {
    Ok(match workload {
        "pps" => packet_rate(lab, &lab.pod(0).ns, plan.seconds, false)?,
        "tcp_crr" => tcp_loop(
            lab,
            plan,
            (1, plan.clients),
            Loop::ConnectClose { rst: false },
            7000,
        )?,
        "tcp_crr_rst" => tcp_loop(
            lab,
            plan,
            (plan.clients, 1),
            Loop::ConnectClose { rst: true },
            7001,
        )?,
        "tcp_rr" => tcp_loop(lab, plan, (plan.clients, 1), Loop::Transactions, 7002)?,
        "tcp_crr_1pod" => tcp_loop(lab, plan, (1, 1), Loop::ConnectClose { rst: false }, 7003)?,
        "tcp_rr_1pod" => tcp_loop(lab, plan, (1, 1), Loop::Transactions, 7004)?,
        _ => iperf3(lab, plan.seconds)?,
    })
}

/// Small UDP packets per second reaching the server, sent by trafgen for `seconds`.
/// `from_node`: the floor run, the same sender on the node's own uplink.
pub(super) fn packet_rate(lab: &Lab, ns: &str, seconds: f64, from_node: bool) -> Result<f64> {
    let server_mac = mac_of(&lab.server, "eth0")?;
    let (dev, src, src_mac, dst_mac) = if from_node {
        ("eth0", "192.0.2.10", mac_of(&lab.node, "eth0")?, server_mac)
    } else {
        let pod = lab.pod(0);
        (
            "v4if0",
            pod.ip.as_str(),
            mac_of(&pod.ns, "v4if0")?,
            mac_of(&lab.node, &pod.host_veth)?,
        )
    };
    let conf = std::env::temp_dir().join(format!("dp-bench-{}.cfg", lab.id));
    std::fs::write(
        &conf,
        format!(
            "{{ eth(da={dst_mac}, sa={src_mac}), ipv4(saddr={src}, daddr={SERVER_IP}, ttl=64), udp(sp=4000, dp=9), fill(0x00, 18) }}\n"
        ),
    )?;
    exec(&lab.server, &["nft", "add", "table", "netdev", "sink"])?;
    exec(
        &lab.server,
        &[
            "nft",
            "add",
            "chain",
            "netdev",
            "sink",
            "in",
            "{ type filter hook ingress device eth0 priority 0 ; }",
        ],
    )?;
    exec(
        &lab.server,
        &[
            "nft", "add", "rule", "netdev", "sink", "in", "ip", "protocol", "udp", "counter",
            "drop",
        ],
    )?;
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "timeout",
            "-s",
            "INT",
            &format!("{seconds}"),
            "trafgen",
            "--dev",
            dev,
            "--conf",
        ])
        .arg(&conf)
        .args(["--cpus", "1", "--qdisc-path"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let _ = status;
    let listing = exec(
        &lab.server,
        &["nft", "-j", "list", "table", "netdev", "sink"],
    )?;
    exec(&lab.server, &["nft", "delete", "table", "netdev", "sink"])?;
    let _ = std::fs::remove_file(conf);
    let v: serde_json::Value = serde_json::from_str(&listing)?;
    let packets = v["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["rule"]["expr"].as_array()))
        .and_then(|exprs| exprs.iter().find_map(|e| e["counter"]["packets"].as_u64()))
        .context("reading the sink counter")?;
    Ok(packets as f64 / seconds)
}

/// `clients` parallel clients, `per_pod` of them in each of the first `pods` pods: new
/// connections per second or request/response transactions per second on persistent
/// connections. The client closes first (it keeps TIME_WAIT) unless `rst`.
fn tcp_loop(
    lab: &Lab,
    plan: &Plan,
    (pods, per_pod): (usize, usize),
    kind: Loop,
    port: u16,
) -> Result<f64> {
    let clients = pods * per_pod;
    echo_server(&lab.server, port, clients)?;
    if kind == (Loop::ConnectClose { rst: false }) {
        for i in 0..pods {
            datapath_tests::churn::churn_sysctls(&lab.pod(i).ns)?;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let addr = SocketAddrV4::new(SERVER_IP.parse::<Ipv4Addr>()?, port);
    let mut handles = Vec::new();
    for i in 0..clients {
        let (stop, count) = (Arc::clone(&stop), Arc::clone(&count));
        handles.push(datapath_tests::netns::spawn_within(
            &lab.pod(i / per_pod).ns,
            move || -> Result<()> {
                let mut buf = [0u8; 1];
                let mut persistent: Option<TcpStream> = None;
                let connect_close = kind != Loop::Transactions;
                while !stop.load(Ordering::Relaxed) {
                    if connect_close || persistent.is_none() {
                        let s = TcpStream::connect(addr)?;
                        s.set_nodelay(true)?;
                        if kind == (Loop::ConnectClose { rst: true }) {
                            abort_on_close(&s);
                        }
                        persistent = Some(s);
                    }
                    let Some(stream) = persistent.as_mut() else {
                        continue;
                    };
                    stream.write_all(b"x")?;
                    stream.read_exact(&mut buf)?;
                    if connect_close {
                        persistent = None;
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            },
        )?);
    }
    std::thread::sleep(Duration::from_secs_f64(plan.seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / plan.seconds)
}

/// SO_LINGER 0: close sends RST and leaves no TIME_WAIT socket (the `tcp_crr_rst` variant).
fn abort_on_close(stream: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and option buffer.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        );
    }
}

/// An echo server with a few blocking acceptor threads, each serving its connections inline:
/// neither accept latency nor thread creation is what the TCP workloads measure. It lives
/// until the process ends (the lab's namespaces go with it).
fn echo_server(ns: &str, port: u16, acceptors: usize) -> Result<()> {
    let listener =
        datapath_tests::netns::within(ns, move || std::net::TcpListener::bind(("0.0.0.0", port)))??;
    for _ in 0..acceptors {
        let listener = listener.try_clone()?;
        std::thread::spawn(move || {
            for mut stream in listener.incoming().map_while(Result::ok) {
                let _ = stream.set_nodelay(true);
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
    }
    Ok(())
}

/// iperf3 from pod 0 to the server; bits per second received.
fn iperf3(lab: &Lab, seconds: f64) -> Result<f64> {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.server,
            "iperf3",
            "-s",
            "-1",
            "-B",
            SERVER_IP,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = exec(
        &lab.pod(0).ns,
        &[
            "iperf3",
            "-c",
            SERVER_IP,
            "-t",
            &format!("{}", seconds.max(1.0)),
            "-J",
        ],
    );
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&out?)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 result")
}

/// Runs the ignored `bench_micro` test, which writes its figures as JSON.
/// The scale test (`tests/tests/scale.rs`: `flows` over 1M flows, the daemon's CPU at 500k
/// and under churn, its memory at 1M) with the release daemon, about four minutes.
pub(super) fn scale_test(out_dir: &Path) -> Result<serde_json::Value> {
    let path = out_dir.join("scale.json");
    let build = crate::cargo()
        .args(["build", "--release", "-p", "datapath-user"])
        .status()?;
    if !build.success() {
        bail!("building the release datapath-user failed");
    }
    let status = crate::cargo()
        .args(["test", "-p", "datapath-tests", "--test", "scale", "--"])
        .args(["--nocapture", "--test-threads=1"])
        .env(
            "DATAPATH_USER_BIN",
            crate::workspace().join("target/release/datapath-user"),
        )
        .env("DATAPATH_BENCH_SCALE_OUT", &path)
        .status()?;
    if !status.success() {
        bail!("the scale test failed");
    }
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

pub(super) fn micro_benchmarks(out_dir: &Path) -> Result<serde_json::Value> {
    let path = out_dir.join("micro.json");
    let status = crate::cargo()
        .args([
            "test",
            "-p",
            "datapath-tests",
            "--test",
            "bench_micro",
            "--",
            "--ignored",
            "--nocapture",
        ])
        .env("DATAPATH_BENCH_OUT", &path)
        .status()?;
    if !status.success() {
        bail!("micro-benchmarks failed");
    }
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}
