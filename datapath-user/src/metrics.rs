//! A Prometheus text endpoint (`run --metrics-addr`): counters, table fill, port usage and
//! sweep figures.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use log::warn;

use crate::{error::Result, health, maps::Maps, stats, sweep::Sweeper};

/// Writes one metric family: its HELP and TYPE lines, then a sample per (labels, value).
fn family(out: &mut String, name: &str, ty: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// Packets by verdict; events (flows created, ports reclaimed, repairs) are not packets.
fn counter_families(out: &mut String, counters: &[stats::CounterValue]) {
    let (events, packets): (Vec<_>, Vec<_>) = counters.iter().partition(|c| c.kind == "event");
    let packets: Vec<(String, f64)> = packets
        .iter()
        .map(|c| {
            (
                format!("{{counter=\"{}\",kind=\"{}\"}}", c.name, c.kind),
                c.value as f64,
            )
        })
        .collect();
    family(
        out,
        "datapath_packets_total",
        "counter",
        "Packets by verdict counter.",
        &packets,
    );
    let events: Vec<(String, f64)> = events
        .iter()
        .map(|c| (format!("{{event=\"{}\"}}", c.name), c.value as f64))
        .collect();
    family(
        out,
        "datapath_events_total",
        "counter",
        "Datapath events: flows created, NAT ports reclaimed, entries repaired or restored.",
        &events,
    );
}

/// One labelled sample per busiest destination.
fn per_destination(
    s: &stats::Stats,
    value: impl Fn(&stats::PortUsage) -> f64,
) -> Vec<(String, f64)> {
    s.busiest_destinations
        .iter()
        .map(|p| {
            let labels = format!(
                "{{proto=\"{}\",dst_ip=\"{}\",dst_port=\"{}\"}}",
                p.proto, p.dst_ip, p.dst_port
            );
            (labels, value(p))
        })
        .collect()
}

/// Renders the metrics for the maps at `maps` plus the sweeper's figures.
pub fn render(maps: &Maps, sweeper: &Sweeper) -> Result<String> {
    let s = stats::collect(maps, 10)?;
    let mut out = String::new();
    counter_families(&mut out, &s.counters);
    let usage = per_destination(&s, |p| p.fill_percent / 100.0);
    family(
        &mut out,
        "datapath_nat_port_usage_ratio",
        "gauge",
        "NAT ports in use / range size, busiest destinations.",
        &usage,
    );
    let closing = per_destination(&s, |p| f64::from(p.ports_closing));
    family(
        &mut out,
        "datapath_nat_ports_closing",
        "gauge",
        "NAT ports held by closing or reset TCP connections, busiest destinations.",
        &closing,
    );
    let unlabelled = [
        (
            "datapath_flows",
            "gauge",
            "Flows in the flow table.",
            s.flows as f64,
        ),
        (
            "datapath_flow_table_capacity",
            "gauge",
            "Flow table size.",
            f64::from(s.flow_table_capacity),
        ),
        (
            "datapath_flow_table_fill_ratio",
            "gauge",
            "Flows / capacity.",
            s.flow_table_fill_percent / 100.0,
        ),
        (
            "datapath_nat_bindings",
            "gauge",
            "NAT bindings in use.",
            s.nat_bindings as f64,
        ),
        ("datapath_pods", "gauge", "Registered pods.", s.pods as f64),
        (
            "datapath_sweep_passes_total",
            "counter",
            "Expired-flow sweep passes.",
            sweeper.passes as f64,
        ),
        (
            "datapath_sweep_expired_flows_total",
            "counter",
            "Flows reclaimed by the sweep.",
            sweeper.total_expired as f64,
        ),
        (
            "datapath_sweep_orphan_bindings_total",
            "counter",
            "NAT bindings without a flow removed.",
            sweeper.total_orphans as f64,
        ),
        (
            "datapath_sweep_restored_flows_total",
            "counter",
            "Flows a packet refreshed while the sweep was removing them, put back.",
            sweeper.restored as f64,
        ),
        (
            "datapath_sweep_overdue_flows_total",
            "counter",
            "Flows a full scan found past their removal time (removed late; the programs already treated them as gone).",
            sweeper.total_overdue as f64,
        ),
        (
            "datapath_sweep_full_scan_interval_seconds",
            "gauge",
            "Interval between full scans of the flow table (longer for large tables of long-lived flows).",
            sweeper.full_scan_interval.as_secs_f64(),
        ),
        (
            "datapath_sweep_last_duration_seconds",
            "gauge",
            "Duration of the last sweep.",
            sweeper.last.duration.as_secs_f64(),
        ),
    ];
    for (name, ty, help, value) in unlabelled {
        family(&mut out, name, ty, help, &[(String::new(), value)]);
    }
    Ok(out)
}

/// Binds the metrics address (before anything is attached, so a busy port fails the start
/// cleanly).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| crate::Error::io(format!("binding the metrics address {addr}"), e))
}

/// Requests served at once; more wait in the listen backlog.
const MAX_CONCURRENT: usize = 8;
/// A client that sends no request line (or reads no answer) within this is dropped.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` from background threads: one per
/// connection (at most [`MAX_CONCURRENT`]), each with read and write timeouts, so an idle
/// client cannot hold a scrape up.
pub fn serve(listener: TcpListener, pin_path: PathBuf, sweeper: Arc<Mutex<Sweeper>>) {
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONCURRENT {
                busy.fetch_sub(1, Ordering::SeqCst);
                let _ = respond(stream, "503 Service Unavailable", "busy\n");
                continue;
            }
            let (busy, pin_path, sweeper) =
                (Arc::clone(&busy), pin_path.clone(), Arc::clone(&sweeper));
            std::thread::spawn(move || {
                handle(stream, &pin_path, &sweeper);
                busy.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
}

fn handle(mut stream: TcpStream, pin_path: &Path, sweeper: &Mutex<Sweeper>) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    // The request line may arrive in pieces: read until its end (or 1 KiB, or the timeout).
    let mut request = [0u8; 1024];
    let mut n = 0;
    while n < request.len() && !request[..n].contains(&b'\n') {
        match stream.read(&mut request[n..]) {
            Ok(0) | Err(_) => break,
            Ok(more) => n += more,
        }
    }
    let first = String::from_utf8_lossy(&request[..n]);
    let path = first
        .strip_prefix("GET ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("");
    let (status, body) = match path {
        "/metrics" | "/" => {
            let body = Maps::open(pin_path).and_then(|maps| {
                let sweeper = sweeper
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                render(&maps, &sweeper)
            });
            match body {
                Ok(body) => ("200 OK", body),
                Err(e) => {
                    warn!("metrics: {e}");
                    ("500 Internal Server Error", format!("{e}\n"))
                }
            }
        }
        "/healthz" => {
            let sweeper = sweeper
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match sweeper.last_pass_age() {
                Some(age) if age <= sweeper.stall_limit() => ("200 OK", "ok\n".to_string()),
                Some(age) => (
                    "503 Service Unavailable",
                    format!("no sweep for {} s\n", age.as_secs()),
                ),
                None => ("503 Service Unavailable", "not swept yet\n".to_string()),
            }
        }
        "/readyz" => match health::check(pin_path, Some(std::process::id())) {
            Ok(status) if status.ready => ("200 OK", "ready\n".to_string()),
            Ok(status) => ("503 Service Unavailable", format!("{}\n", status.summary())),
            Err(e) => ("503 Service Unavailable", format!("{e}\n")),
        },
        _ => (
            "404 Not Found",
            "not found: try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    let _ = respond(stream, status, &body);
}

fn respond(mut stream: TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
