//! At scale: `flows` lists a million flows quickly, and the daemon costs little with half a
//! million. With `$DATAPATH_BENCH_SCALE_OUT` set (by `cargo xtask bench`), each test also
//! merges its figures into that JSON file.

use std::time::Instant;

use datapath_common::flow::{Binding, Flow, FlowKey, FlowState, PROTO_TCP};
use datapath_tests::testrun::{with_harness, HarnessOptions};

const FLOWS: u32 = 1_000_000;

/// Adds `figures` to the JSON object in `$DATAPATH_BENCH_SCALE_OUT`, when set.
fn record_figures(figures: &[(&str, f64)]) {
    let Ok(path) = std::env::var("DATAPATH_BENCH_SCALE_OUT") else {
        return;
    };
    let mut all: serde_json::Map<String, serde_json::Value> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    for (name, value) in figures {
        all.insert((*name).to_string(), serde_json::json!(value));
    }
    std::fs::write(&path, serde_json::to_string_pretty(&all).unwrap()).unwrap();
}

#[test]
fn a_million_flows_list_quickly() {
    let opts = HarnessOptions {
        flow_table_size: 1 << 20,
        ..HarnessOptions::default()
    };
    with_harness(opts, |h| {
        let start = Instant::now();
        let now = datapath_user::maps::monotonic_coarse_ns();
        for i in 0..FLOWS {
            // 1,024 pods x ~977 destinations each.
            let key = FlowKey::new(PROTO_TCP, 0xa9fe_ac00 | (i % 1024), 10_000 + (i / 1024) as u16, 0xcb00_7100 | (i % 251), 443);
            let flow = Flow {
                created_ns: now,
                last_seen_ns: now,
                nat_ip: 0xc000_020a,
                nat_port: (1024 + i % 30_000) as u16,
                state: FlowState::Established as u8,
                packets_out: u64::from(i),
                ..Flow::default()
            };
            h.maps.conntrack.insert(key, flow, 0).unwrap();
            // Every flow answered: the listing joins each with its binding's reply counters.
            let binding = Binding {
                last_seen_ns: now,
                packets: u64::from(i) + 1,
                bytes: 100,
                ..Binding::claim(key)
            };
            h.maps.bindings.insert(key.reply_tuple(flow.nat_ip, flow.nat_port), binding, 0).unwrap();
        }
        let fill = start.elapsed();

        let pin = h.maps.path.clone();
        let start = Instant::now();
        // Into a file, as `flows -o json > flows.json`: a pipe would time its reader too.
        let listing = std::env::temp_dir().join(format!("dp-flows-{}.json", std::process::id()));
        let out = std::process::Command::new(datapath_tests::datapath_user_bin())
            .args(["flows", "-o", "json", "--pin-path"])
            .arg(&pin)
            .stdout(std::fs::File::create(&listing).unwrap())
            .output()
            .unwrap();
        let list = start.elapsed();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json = std::fs::read(&listing).unwrap();
        let _ = std::fs::remove_file(&listing);
        let flows: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
        assert_eq!(flows.len(), FLOWS as usize);
        // Each record carries its own binding's replies (packets_out + 1, as filled).
        for flow in flows.iter().step_by(997) {
            assert_eq!(flow["packets_in"].as_u64().unwrap(), flow["packets_out"].as_u64().unwrap() + 1, "{flow}");
        }
        let start = Instant::now();
        let table = std::process::Command::new(datapath_tests::datapath_user_bin())
            .args(["flows", "--pin-path"])
            .arg(&pin)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        let list_table = start.elapsed();
        assert!(table.success());
        eprintln!(
            "1M flows: filled in {fill:.2?}; `flows -o json` {list:.2?} ({} MB), table {list_table:.2?}",
            json.len() >> 20
        );
        record_figures(&[
            ("flows_json_1m_s", list.as_secs_f64()),
            ("flows_table_1m_s", list_table.as_secs_f64()),
        ]);
        // The goal is 1 s (`cargo xtask bench` reports it); the bound allows a busy machine.
        assert!(list.as_secs_f64() < 5.0, "flows -o json took {list:.2?}");
        assert!(list_table.as_secs_f64() < 5.0, "flows took {list_table:.2?}");
    })
    .unwrap();
}

/// User + system CPU seconds a process has used (from /proc), and its peak resident memory.
fn cpu_and_peak_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: plain libc query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks as f64 / hz, hwm_kb)
}

fn fill(
    maps: &mut datapath_user::maps::Maps,
    n: u32,
    first: u32,
    state: FlowState,
    proto: u8,
    last_seen: impl Fn(u32) -> u64,
) {
    for i in first..first + n {
        let key = FlowKey::new(
            proto,
            0xa9fe_ac00 | (i % 1024),
            10_000 + (i / 1024) as u16,
            0xcb00_7100 | (i % 251),
            443,
        );
        let flow = Flow {
            created_ns: last_seen(i),
            last_seen_ns: last_seen(i),
            nat_ip: 0xc000_020a,
            nat_port: (1024 + i % 30_000) as u16,
            state: state as u8,
            ..Flow::default()
        };
        maps.conntrack.insert(key, flow, 0).unwrap();
        // Its binding too: the sweep's searches for orphan bindings read them all.
        maps.bindings
            .insert(
                key.reply_tuple(flow.nat_ip, flow.nat_port),
                Binding::claim(key),
                0,
            )
            .unwrap();
    }
}

/// Adds `n` to the programs' count of flows they created (`flow_created`), as they would
/// have for the flows `fill` writes: the sweep paces its full scans by it.
fn count_created(maps: &mut datapath_user::maps::Maps, n: u32) {
    let index = datapath_common::counters::Counter::FlowCreated as u32;
    let mut values: Vec<u64> = maps.counters.get(&index, 0).unwrap().to_vec();
    values[0] += u64::from(n);
    let values = aya::maps::PerCpuValues::try_from(values).unwrap();
    maps.counters.set(index, values, 0).unwrap();
}

/// Seconds of churn, and flows arriving (and expiring) each second of it.
const CHURN_S: u32 = 30;
const PER_S: u32 = 10_000;

/// The daemon's cost at a large table. Goals (issue 17): under 1% of a core with 500k live
/// flows, under 5% while 10k flows/s expire; its memory at 1M flows stated. The flows are
/// written into the pinned table as the programs would (packets for half a million flows are
/// beyond this machine); the bounds asserted are generous (the machine is shared), the
/// figures are printed.
#[test]
fn the_daemon_costs_little_at_half_a_million_flows() {
    use std::time::{Duration, Instant};

    use datapath_common::flow::PROTO_UDP;
    use datapath_tests::{Lab, LabOptions};
    let lab = Lab::new(LabOptions {
        pods: 1,
        run_args: ["--flow-table-size", "1048576"].map(String::from).to_vec(),
        ..LabOptions::default()
    })
    .unwrap();
    let pid = lab.daemon_pid().unwrap();
    let mut maps = datapath_user::maps::Maps::open(&lab.pin_path).unwrap();
    let now = datapath_user::maps::monotonic_coarse_ns();
    fill(
        &mut maps,
        500_000,
        0,
        FlowState::Established,
        PROTO_TCP,
        |_| now,
    );
    // Let a full scan see the table, then measure a minute: the scans' pace follows their
    // cost, so a shorter window would measure where they fall in it.
    std::thread::sleep(Duration::from_secs(11));
    let (cpu0, _) = cpu_and_peak_rss(pid);
    std::thread::sleep(Duration::from_mins(1));
    let (cpu1, _) = cpu_and_peak_rss(pid);
    let idle = (cpu1 - cpu0) / 60.0 * 100.0;

    // Churn: for 30 s, 10k UDP flows a second arrive, each two seconds from its 30 s
    // timeout (so 10k a second expire), among the 500k live ones.
    let (cpu2, _) = cpu_and_peak_rss(pid);
    let start = Instant::now();
    for second in 0..CHURN_S {
        let base = datapath_user::maps::monotonic_coarse_ns().saturating_sub(28_000_000_000);
        fill(
            &mut maps,
            PER_S,
            500_000 + second * PER_S,
            FlowState::Unreplied,
            PROTO_UDP,
            |_| base,
        );
        count_created(&mut maps, PER_S);
        let next = start + Duration::from_secs(u64::from(second) + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (cpu3, _) = cpu_and_peak_rss(pid);
    let churn = (cpu3 - cpu2) / start.elapsed().as_secs_f64() * 100.0;
    // Churn brings the scans back to the punctual pace (ten seconds): the last arrivals are
    // gone a scan and a tick later.
    let deadline = Instant::now() + Duration::from_secs(25);
    let mut left = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        left = 0;
        maps.for_each_flow(|_, _| left += 1).unwrap();
        if left == 500_000 {
            break;
        }
    }

    // Memory at a million flows: after a full scan of them.
    fill(
        &mut maps,
        500_000,
        1_000_000,
        FlowState::Established,
        PROTO_TCP,
        |_| datapath_user::maps::monotonic_coarse_ns(),
    );
    std::thread::sleep(Duration::from_secs(65));
    let (_, rss_kb) = cpu_and_peak_rss(pid);
    eprintln!(
        "daemon CPU: {idle:.2}% of a core with 500k live flows; {churn:.2}% while 10k flows/s arrive and expire; peak RSS {} MB after a full scan of 1M flows",
        rss_kb / 1024
    );
    record_figures(&[
        ("daemon_cpu_500k_live_pct", idle),
        ("daemon_cpu_10k_expiring_per_s_pct", churn),
        ("daemon_peak_rss_1m_mb", (rss_kb / 1024) as f64),
    ]);
    assert_eq!(
        left, 500_000,
        "the churned flows were not all removed within 25 s of the last one's expiry"
    );
    assert!(idle < 3.0, "{idle:.2}% of a core with 500k live flows");
    assert!(
        churn < 15.0,
        "{churn:.2}% of a core while 10k flows/s expire"
    );
    assert!(rss_kb < 256 * 1024, "peak RSS {} MB", rss_kb / 1024);
}
