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

/// Renders the metrics for the maps at `maps` plus the sweeper's figures.
pub fn render(maps: &Maps, sweeper: &Sweeper) -> Result<String> {
    let s = stats::collect(maps, 10)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP datapath_packets_total Packets by verdict counter."
    );
    let _ = writeln!(out, "# TYPE datapath_packets_total counter");
    for c in &s.counters {
        let _ = writeln!(
            out,
            "datapath_packets_total{{counter=\"{}\",kind=\"{}\"}} {}",
            c.name, c.kind, c.value
        );
    }
    let gauges = [
        ("datapath_flows", "Flows in the flow table.", s.flows as f64),
        (
            "datapath_flow_table_capacity",
            "Flow table size.",
            f64::from(s.flow_table_capacity),
        ),
        (
            "datapath_flow_table_fill_ratio",
            "Flows / capacity.",
            s.flow_table_fill_percent / 100.0,
        ),
        (
            "datapath_nat_bindings",
            "NAT bindings in use.",
            s.nat_bindings as f64,
        ),
        ("datapath_pods", "Registered pods.", s.pods as f64),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP datapath_nat_port_usage_ratio NAT ports in use / range size, busiest destinations."
    );
    let _ = writeln!(out, "# TYPE datapath_nat_port_usage_ratio gauge");
    for p in &s.busiest_destinations {
        let _ = writeln!(
            out,
            "datapath_nat_port_usage_ratio{{proto=\"{}\",dst_ip=\"{}\",dst_port=\"{}\"}} {}",
            p.proto,
            p.dst_ip,
            p.dst_port,
            p.fill_percent / 100.0
        );
    }
    let sweep = [
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
    for (name, ty, help, value) in sweep {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {value}"
        );
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
