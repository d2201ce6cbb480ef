//! `cargo xtask bench`: plain routing, the iptables egress-v4 setup and the datapath, side by
//! side on the same lab in one run, modes alternating within each repetition.
//!
//! Workloads (design brief, section 5): small-packet forwarding rate with a cheap sender
//! (trafgen in the pod) and a cheap sink (nftables netdev-ingress drop on the server), against
//! a floor run (the same sender on the node's uplink); new TCP connections/s and TCP
//! transactions/s with parallel clients; TCP bulk (iperf3). Plus the BPF_PROG_TEST_RUN
//! micro-benchmarks of each path.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use datapath_tests::{
    lab::{Mode, SERVER_IP},
    netns::exec,
    Lab, LabOptions,
};

/// How long and how often.
struct Plan {
    reps: usize,
    seconds: f64,
    clients: usize,
}

const MODES: [Mode; 3] = [Mode::Plain, Mode::Iptables, Mode::Datapath];
/// `tcp_crr`: 4 clients in one pod, the client closing first (the pod holds TIME_WAIT and
/// cycles through its whole port range); `tcp_crr_rst`: 4 pods, one client each, closing
/// with RST; `_1pod`: one client in one pod.
const WORKLOADS: [&str; 7] = [
    "pps",
    "tcp_crr",
    "tcp_crr_rst",
    "tcp_rr",
    "tcp_crr_1pod",
    "tcp_rr_1pod",
    "tcp_bulk",
];

/// How a TCP workload's clients loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Loop {
    /// Connect, 1-byte request, 1-byte response, close; `rst`: close with SO_LINGER 0.
    ConnectClose { rst: bool },
    /// 1-byte request/response on a persistent connection.
    Transactions,
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Plain => "plain",
        Mode::Iptables => "iptables",
        Mode::Datapath => "datapath",
    }
}

pub fn run(quick: bool, only: &[String]) -> Result<()> {
    for w in only {
        if !WORKLOADS.contains(&w.as_str()) && w != "micro" {
            bail!(
                "unknown workload {w:?}: expected one of {}, micro",
                WORKLOADS.join(", ")
            );
        }
    }
    let selected = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let workloads: Vec<&str> = WORKLOADS.into_iter().filter(|w| selected(w)).collect();
    if !datapath_tests::is_root() {
        bail!("the benchmark builds network namespaces and loads BPF programs: run it as root");
    }
    crate::setup::ensure()?;
    crate::build(false)?;
    let plan = if quick {
        Plan {
            reps: 1,
            seconds: 2.0,
            clients: 4,
        }
    } else {
        Plan {
            reps: 3,
            seconds: 5.0,
            clients: 4,
        }
    };
    let out_dir = crate::workspace().join("results").join(format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    ));
    std::fs::create_dir_all(&out_dir)?;
    // samples[workload][mode] = one value per repetition.
    let mut samples: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut floor = Vec::new();
    let mut exhausted = Vec::new();
    let with_floor = selected("pps");
    let total = plan.reps * (MODES.len() * workloads.len() + usize::from(with_floor));
    let mut step = 0;
    let started = Instant::now();
    for rep in 0..plan.reps {
        for mode in MODES {
            let lab = Lab::new(LabOptions {
                mode,
                pods: plan.clients,
                ..LabOptions::default()
            })?;
            for &workload in &workloads {
                step += 1;
                eprintln!(
                    "[{step}/{total}] rep {} {:<8} {workload:<8} ({:.0}s elapsed)",
                    rep + 1,
                    mode_name(mode),
                    started.elapsed().as_secs_f64()
                );
                let value = run_workload(&lab, &plan, workload)?;
                samples
                    .entry(workload)
                    .or_default()
                    .entry(mode_name(mode))
                    .or_default()
                    .push(value);
            }
            if mode == Mode::Datapath {
                exhausted.push(lab.counter("drop_port_exhausted")?);
            }
            if mode == Mode::Plain && with_floor {
                step += 1;
                eprintln!("[{step}/{total}] rep {} floor    pps", rep + 1);
                floor.push(packet_rate(&lab, &lab.node, plan.seconds, true)?);
            }
        }
    }
    let micro = if selected("micro") {
        eprintln!("micro-benchmarks (BPF_PROG_TEST_RUN) ...");
        micro_benchmarks(&out_dir)?
    } else {
        serde_json::Value::Null
    };
    let report = Report {
        plan: &plan,
        samples: &samples,
        floor: &floor,
        micro: &micro,
        exhausted: &exhausted,
    };
    let json = report.json();
    let md = report.markdown();
    std::fs::write(out_dir.join("results.json"), serde_json_string(&json))?;
    std::fs::write(out_dir.join("results.md"), &md)?;
    std::fs::write(out_dir.join("modes.svg"), report.svg())?;
    println!("{md}");
    println!("results in {}", out_dir.display());
    Ok(())
}

/// One workload's figure on `lab`.
fn run_workload(lab: &Lab, plan: &Plan, workload: &str) -> Result<f64> {
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

fn serde_json_string(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let out = exec(ns, &["cat", &format!("/sys/class/net/{dev}/address")]);
    // /sys inside `ip netns exec` belongs to the namespace.
    Ok(out?.trim().to_string())
}

/// Small UDP packets per second reaching the server, sent by trafgen for `seconds`.
/// `from_node`: the floor run, the same sender on the node's own uplink.
fn packet_rate(lab: &Lab, ns: &str, seconds: f64, from_node: bool) -> Result<f64> {
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
fn micro_benchmarks(out_dir: &Path) -> Result<serde_json::Value> {
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

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn spread(v: &[f64]) -> f64 {
    let m = median(v);
    if m == 0.0 || v.len() < 2 {
        return 0.0;
    }
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    (hi - lo) / m * 100.0
}

/// A figure per mode, for the plot.
type Metric<'a> = Box<dyn Fn(&str) -> f64 + 'a>;

struct Report<'a> {
    plan: &'a Plan,
    samples: &'a BTreeMap<&'a str, BTreeMap<&'a str, Vec<f64>>>,
    floor: &'a [f64],
    micro: &'a serde_json::Value,
    /// The datapath's `drop_port_exhausted` at the end of each repetition.
    exhausted: &'a [u64],
}

impl Report<'_> {
    /// The repetitions of one workload in one mode.
    fn runs(&self, workload: &str, mode: &str) -> &[f64] {
        self.samples
            .get(workload)
            .and_then(|m| m.get(mode))
            .map_or(&[], Vec::as_slice)
    }

    fn med(&self, workload: &str, mode: &str) -> f64 {
        median(self.runs(workload, mode))
    }

    /// Node cost per packet (ns): 1/rate(mode) - 1/rate(floor).
    fn node_cost_ns(&self, mode: &str) -> f64 {
        let (rate, floor) = (self.med("pps", mode), median(self.floor));
        if rate == 0.0 || floor == 0.0 {
            return 0.0;
        }
        (1.0 / rate - 1.0 / floor) * 1e9
    }

    fn json(&self) -> serde_json::Value {
        let mut modes = serde_json::Map::new();
        for mode in MODES.map(mode_name) {
            let mut m = serde_json::Map::new();
            for w in WORKLOADS {
                let v = self.runs(w, mode);
                m.insert(w.into(), serde_json::json!({ "samples": v, "median": median(v), "spread_pct": spread(v) }));
            }
            m.insert(
                "node_cost_ns".into(),
                serde_json::json!(self.node_cost_ns(mode)),
            );
            modes.insert(mode.into(), m.into());
        }
        serde_json::json!({
            "repetitions": self.plan.reps, "seconds": self.plan.seconds, "clients": self.plan.clients,
            "floor_pps": { "samples": self.floor, "median": median(self.floor) },
            "modes": modes, "micro": self.micro, "datapath_drop_port_exhausted": self.exhausted,
        })
    }

    #[allow(clippy::too_many_lines, reason = "one report, row by row")]
    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} repetition(s) of {} s, {} parallel clients; medians, spread = (max-min)/median.\n",
            self.plan.reps, self.plan.seconds, self.plan.clients
        );
        let _ = writeln!(
            s,
            "| workload | plain | iptables | datapath | datapath / iptables | datapath / plain |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- |");
        let row = |s: &mut String,
                   name: &str,
                   f: &dyn Fn(&str) -> f64,
                   unit: &str,
                   lower_is_better: bool| {
            let (p, i, d) = (f("plain"), f("iptables"), f("datapath"));
            if p == 0.0 && i == 0.0 && d == 0.0 {
                return; // not run (`--only`)
            }
            let ratio = |a: f64, b: f64| if b == 0.0 { 0.0 } else { a / b };
            let _ =
                writeln!(
                s,
                "| {name} | {p:.1} {unit} | {i:.1} {unit} | {d:.1} {unit} | {:.2}x{} | {:.2}x |",
                ratio(d, i),
                if lower_is_better { " (lower is better)" } else { "" },
                ratio(d, p)
            );
        };
        row(
            &mut s,
            "node cost per small packet",
            &|m| self.node_cost_ns(m),
            "ns",
            true,
        );
        row(
            &mut s,
            "small packets forwarded",
            &|m| self.med("pps", m) / 1e3,
            "kpps",
            false,
        );
        row(
            &mut s,
            "new TCP connections/s, 4 clients in 1 pod, client closes first",
            &|m| self.med("tcp_crr", m) / 1e3,
            "k/s",
            false,
        );
        row(
            &mut s,
            "new TCP connections/s, 4 pods, closed by RST",
            &|m| self.med("tcp_crr_rst", m) / 1e3,
            "k/s",
            false,
        );
        row(
            &mut s,
            "TCP transactions/s, 4 pods",
            &|m| self.med("tcp_rr", m) / 1e3,
            "k/s",
            false,
        );
        row(
            &mut s,
            "new TCP connections/s, 1 client, client closes first",
            &|m| self.med("tcp_crr_1pod", m) / 1e3,
            "k/s",
            false,
        );
        row(
            &mut s,
            "TCP transactions/s, 1 pod",
            &|m| self.med("tcp_rr_1pod", m) / 1e3,
            "k/s",
            false,
        );
        row(
            &mut s,
            "TCP bulk (iperf3)",
            &|m| self.med("tcp_bulk", m) / 1e9,
            "Gbit/s",
            false,
        );
        if !self.floor.is_empty() {
            let _ = writeln!(
                s,
                "\nfloor (sender on the uplink, no forwarding): {:.1} kpps",
                median(self.floor) / 1e3
            );
        }
        let _ = writeln!(
            s,
            "\ndatapath drop_port_exhausted after each repetition's workloads: {:?}",
            self.exhausted
        );
        let _ = writeln!(s, "\nspread per mode (%):\n");
        for w in WORKLOADS
            .into_iter()
            .filter(|w| self.samples.contains_key(w))
        {
            let _ = write!(s, "- {w}:");
            for mode in MODES.map(mode_name) {
                let v = self.runs(w, mode);
                let _ = write!(s, " {mode} {:.0}%", spread(v));
            }
            let _ = writeln!(s);
        }
        if self.micro.is_null() {
            return s; // not run (`--only`)
        }
        let _ = writeln!(s, "\nBPF_PROG_TEST_RUN, ns per packet (interquartile mean of 5,000 single runs, minus the same for a frame passed at the first check):\n");
        let _ = writeln!(s, "| path | ns |\n| --- | --- |");
        if let Some(paths) = self.micro["paths"].as_object() {
            for (path, ns) in paths {
                let _ = writeln!(s, "| {path} | {ns} |");
            }
        }
        if let Some(scale) = self.micro["scale"].as_object() {
            let _ = writeln!(s, "\nScale:\n");
            for (k, v) in scale {
                let _ = writeln!(s, "- {k}: {v}");
            }
        }
        s
    }

    /// Bars of each workload, normalised to iptables = 100.
    fn svg(&self) -> String {
        let metrics: [(&str, Metric); 5] = [
            (
                "node cost/packet (lower better)",
                Box::new(|m| self.node_cost_ns(m)),
            ),
            ("packets/s", Box::new(|m| self.med("pps", m))),
            ("new conns/s", Box::new(|m| self.med("tcp_crr", m))),
            ("transactions/s", Box::new(|m| self.med("tcp_rr", m))),
            ("bulk Gbit/s", Box::new(|m| self.med("tcp_bulk", m))),
        ];
        let colors = ["#9e9e9e", "#e4572e", "#2e86ab"];
        let (width, height, group) = (760, 320, 140);
        let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='11'>\n");
        let _ = writeln!(
            s,
            "<text x='10' y='16' font-size='13'>plain / iptables / datapath, iptables = 100</text>"
        );
        for (gi, (label, f)) in metrics.iter().enumerate() {
            let base = f("iptables").max(f64::MIN_POSITIVE);
            for (mi, mode) in MODES.map(mode_name).iter().enumerate() {
                let v = (f(mode) / base * 100.0).clamp(0.0, 250.0);
                let bar = v * 0.9;
                let x = 20 + gi * group + mi * 36;
                let _ = writeln!(
                    s,
                    "<rect x='{x}' y='{:.0}' width='30' height='{bar:.0}' fill='{}'/><text x='{x}' y='{:.0}'>{v:.0}</text>",
                    280.0 - bar,
                    colors[mi],
                    275.0 - bar
                );
            }
            let _ = writeln!(s, "<text x='{}' y='300'>{label}</text>", 20 + gi * group);
        }
        for (mi, mode) in MODES.map(mode_name).iter().enumerate() {
            let _ = writeln!(s, "<rect x='{}' y='24' width='10' height='10' fill='{}'/><text x='{}' y='33'>{mode}</text>", 400 + mi * 110, colors[mi], 414 + mi * 110);
        }
        s.push_str("</svg>\n");
        s
    }
}
