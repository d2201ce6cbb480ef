//! `cargo xtask bench`: plain routing, the iptables egress-v4 setup and the datapath, side by
//! side on the same lab in one run, modes alternating within each repetition.
//!
//! Workloads (BENCHMARKS.md, "Machine and method"): small-packet forwarding rate with a cheap
//! sender (trafgen in the pod) and a cheap sink (nftables netdev-ingress drop on the server),
//! against a floor run (the same sender on the node's uplink), because end-to-end rates are
//! diluted by the sender and the sink; new TCP connections/s and TCP transactions/s with
//! parallel clients (one client is bound by wake-up latency, not by the node's path); TCP bulk
//! (iperf3). Plus the BPF_PROG_TEST_RUN micro-benchmarks of each path. The report puts each
//! figure beside its goal (`goals`).

mod goals;
mod report;
mod workloads;

use std::{path::Path, time::Instant};

use anyhow::{bail, Context as _, Result};
use datapath_tests::{lab::Mode, Lab, LabOptions};

use report::{serde_json_string, Report, Samples};
use workloads::{micro_benchmarks, packet_rate, run_workload, scale_test};

/// How long and how often.
struct Plan {
    reps: usize,
    seconds: f64,
    clients: usize,
}

const MODES: [Mode; 3] = [Mode::Plain, Mode::Iptables, Mode::Datapath];
/// Each workload: its name (`--only`, results.json), what the report calls its figure, and
/// the unit the report shows it in (the figure divided by the last field).
/// `tcp_crr`: 4 clients in one pod, the client closing first (the pod holds TIME_WAIT and
/// cycles through its whole port range); `tcp_crr_rst`: 4 pods, one client each, closing
/// with RST; `_1pod`: one client in one pod.
const WORKLOADS: [(&str, &str, &str, f64); 7] = [
    ("pps", "small packets forwarded", "kpps", 1e3),
    (
        "tcp_crr",
        "new TCP connections/s, 4 clients in 1 pod, client closes first",
        "k/s",
        1e3,
    ),
    (
        "tcp_crr_rst",
        "new TCP connections/s, 4 pods, closed by RST",
        "k/s",
        1e3,
    ),
    ("tcp_rr", "TCP transactions/s, 4 pods", "k/s", 1e3),
    (
        "tcp_crr_1pod",
        "new TCP connections/s, 1 client, client closes first",
        "k/s",
        1e3,
    ),
    ("tcp_rr_1pod", "TCP transactions/s, 1 pod", "k/s", 1e3),
    ("tcp_bulk", "TCP bulk (iperf3)", "Gbit/s", 1e9),
];

fn workload_names() -> impl Iterator<Item = &'static str> {
    WORKLOADS.iter().map(|&(name, ..)| name)
}

/// What the report calls `workload`'s figure.
fn title(workload: &'static str) -> &'static str {
    WORKLOADS
        .iter()
        .find(|&&(name, ..)| name == workload)
        .map_or(workload, |&(_, title, ..)| title)
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
        if !workload_names().any(|name| name == w) && w != "micro" && w != "scale" {
            bail!(
                "unknown workload {w:?}: expected one of {}, micro, scale",
                workload_names().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let selected = |w: &str| only.is_empty() || only.iter().any(|o| o == w);
    let workloads: Vec<&str> = workload_names().filter(|w| selected(w)).collect();
    if !datapath_tests::is_root() {
        bail!("the benchmark builds network namespaces and loads BPF programs: run it as root");
    }
    crate::setup::ensure()?;
    crate::build(false)?;
    // One short repetition, or three of five seconds.
    let plan = Plan {
        reps: if quick { 1 } else { 3 },
        seconds: if quick { 2.0 } else { 5.0 },
        clients: 4,
    };
    let out_dir = crate::workspace().join("results").join(format!(
        "bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    ));
    std::fs::create_dir_all(&out_dir)?;
    let mut samples = Samples::new();
    let mut floor = Vec::new();
    let mut exhausted = Vec::new();
    let with_floor = selected("pps");
    let total = plan.reps * (MODES.len() * workloads.len() + usize::from(with_floor));
    let mut step = 0;
    let started = Instant::now();
    // No lab at all when only the micro-benchmarks or the scale test were asked for.
    let lab_reps = if workloads.is_empty() { 0 } else { plan.reps };
    for rep in 0..lab_reps {
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
    let micro = part(
        selected("micro"),
        "micro-benchmarks (BPF_PROG_TEST_RUN)",
        || micro_benchmarks(&out_dir),
    )?;
    let scale = part(
        selected("scale"),
        "scale test (flows over 1M flows, the daemon at 500k; about four minutes)",
        || scale_test(&out_dir),
    )?;
    let report = Report {
        plan,
        samples,
        floor,
        micro,
        scale,
        exhausted,
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

/// The figures of a part measured outside the lab (`micro`, `scale`), null when left out.
fn part(
    selected: bool,
    what: &str,
    measure: impl FnOnce() -> Result<serde_json::Value>,
) -> Result<serde_json::Value> {
    if !selected {
        return Ok(serde_json::Value::Null);
    }
    eprintln!("{what} ...");
    measure()
}

/// Prints the report of a kept run (`results/reference`, a `results/bench-*`), figures
/// beside their goals, from its `results.json`; measures nothing and writes nothing.
pub fn show(run_dir: &Path) -> Result<()> {
    let path = run_dir.join("results.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let results = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    println!("{}", Report::from_json(&results)?.markdown());
    Ok(())
}
