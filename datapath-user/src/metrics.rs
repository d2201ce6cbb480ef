//! A Prometheus text endpoint (`run --metrics-addr`): counters, table fill, port usage and
//! sweep figures.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use log::warn;

use crate::{error::Result, maps::Maps, stats, sweep::Sweeper};

/// Writes one metric family: its HELP and TYPE lines, then a sample per (labels, value).
fn family(out: &mut String, name: &str, ty: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {ty}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
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
    let counters: Vec<(String, f64)> = s
        .counters
        .iter()
        .map(|c| {
            (
                format!("{{counter=\"{}\",kind=\"{}\"}}", c.name, c.kind),
                c.value as f64,
            )
        })
        .collect();
    family(
        &mut out,
        "datapath_packets_total",
        "counter",
        "Packets by verdict counter.",
        &counters,
    );
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

/// Serves `GET /metrics` on `addr` from a background thread.
pub fn serve(addr: SocketAddr, pin_path: PathBuf, sweeper: Arc<Mutex<Sweeper>>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .map_err(|e| crate::Error::io(format!("binding the metrics address {addr}"), e))?;
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap_or(0);
            let first = String::from_utf8_lossy(&request[..n]);
            let (status, body) = if first.starts_with("GET /metrics") || first.starts_with("GET / ")
            {
                let body = Maps::open(&pin_path).and_then(|maps| {
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
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(())
}
