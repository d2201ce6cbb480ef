//! Is the datapath serving? The daemon's state file, and the status that `status`, `/readyz`
//! and `/healthz` report: a live daemon, the uplink programs and every registered pod attached.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    loader,
    maps::Maps,
    netdev,
};

/// What the daemon publishes about itself, next to its lock file; rewritten every tick (the
/// heartbeat tells a hung daemon from a sweeping one).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonState {
    pub pid: u32,
    pub started_unix: u64,
    pub heartbeat_unix: u64,
    pub sweep_interval_s: f64,
    pub uplink: String,
    pub uplink_ifindex: u32,
    pub node_ip: Ipv4Addr,
    /// `tcx` or `clsact`.
    pub attach_mode: String,
    /// `kfunc` (checksums fixed by the programs) or `helpers` (the kernel's checksum helpers).
    pub checksum_path: String,
}

impl DaemonState {
    /// Where the daemon serving `pin_path` publishes it (beside its lock file).
    #[must_use]
    pub fn file(pin_path: &Path) -> Option<PathBuf> {
        loader::state_file(pin_path)
    }

    /// Writes the state file atomically (temporary file and rename).
    pub fn publish(&self, pin_path: &Path) -> Result<()> {
        let path = Self::file(pin_path).ok_or_else(|| Error::NotRunning(pin_path.to_path_buf()))?;
        let staged = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io("encoding the daemon state", std::io::Error::other(e)))?;
        std::fs::write(&staged, body)
            .and_then(|()| std::fs::rename(&staged, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    #[must_use]
    pub fn read(pin_path: &Path) -> Option<Self> {
        let body = std::fs::read(Self::file(pin_path)?).ok()?;
        serde_json::from_slice(&body).ok()
    }

    /// Seconds since the last heartbeat.
    #[must_use]
    pub fn heartbeat_age_s(&self) -> u64 {
        unix_now().saturating_sub(self.heartbeat_unix)
    }

    /// A heartbeat older than this means the daemon stopped sweeping.
    #[must_use]
    pub fn heartbeat_limit_s(&self) -> u64 {
        (self.sweep_interval_s * 3.0).ceil() as u64 + 5
    }
}

#[must_use]
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// One attachment the datapath needs.
#[derive(Clone, Debug, Serialize)]
pub struct Attachment {
    /// `uplink ingress`, `uplink egress` or `pod 169.254.172.N`.
    pub what: String,
    pub interface: Option<String>,
    pub ifindex: u32,
    pub attached: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub uptime_s: u64,
    pub heartbeat_age_s: Option<u64>,
    pub attach_mode: Option<String>,
    pub checksum_path: Option<String>,
}

/// Everything `status` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub pin_path: PathBuf,
    /// True when a live daemon serves the pin path and everything below is attached.
    pub ready: bool,
    /// One line per thing that is missing; empty when ready.
    pub problems: Vec<String>,
    pub daemon: Option<DaemonInfo>,
    pub attachments: Vec<Attachment>,
    pub flows: usize,
    pub flow_table_capacity: u32,
    pub flow_table_fill_percent: f64,
}

impl Status {
    /// The first problem, as the one line a probe or an operator reads.
    #[must_use]
    pub fn summary(&self) -> String {
        match self.problems.first() {
            None => "ready".to_string(),
            Some(first) if self.problems.len() == 1 => first.clone(),
            Some(first) => format!("{first} (and {} more)", self.problems.len() - 1),
        }
    }
}

/// The attachments the datapath needs (both uplink hooks, each registered pod's veth) and one
/// line for each that is missing. `uplink_ifindex`, when known, is where the uplink programs
/// must be.
pub fn attachments(
    pin_path: &Path,
    maps: &Maps,
    uplink_ifindex: Option<u32>,
) -> Result<(Vec<Attachment>, Vec<String>)> {
    let mut attachments = Vec::new();
    let mut missing = Vec::new();
    for (what, link) in [
        ("uplink ingress", loader::UPLINK_INGRESS),
        ("uplink egress", loader::UPLINK_EGRESS),
    ] {
        let found = loader::link_ifindex(pin_path, link)?;
        let attached = match (found, uplink_ifindex) {
            (Some(at), Some(want)) => at != 0 && at == want,
            (Some(at), None) => at != 0,
            (None, _) => false,
        };
        let ifindex = found.unwrap_or(0);
        if !attached {
            missing.push(format!("{what} program not attached"));
        }
        attachments.push(Attachment {
            what: what.to_string(),
            interface: netdev::ifname(ifindex),
            ifindex,
            attached,
        });
    }
    for (ip, pod) in maps.pods()? {
        let attached = matches!(
            loader::pod_link_ifindex(pin_path, pod.host_ifindex)?,
            Some(at) if at == pod.host_ifindex
        );
        let interface = netdev::ifname(pod.host_ifindex);
        if !attached {
            missing.push(format!(
                "pod {ip} ({}) not attached on {}",
                if pod.name().is_empty() {
                    "-"
                } else {
                    pod.name()
                },
                interface
                    .clone()
                    .unwrap_or_else(|| format!("ifindex {} (gone)", pod.host_ifindex))
            ));
        }
        attachments.push(Attachment {
            what: format!("pod {ip}"),
            interface,
            ifindex: pod.host_ifindex,
            attached,
        });
    }
    Ok((attachments, missing))
}

/// Checks the datapath at `pin_path`. `daemon_pid` is the pid known to serve it (the daemon
/// asking about itself), or `None` to find the lock holder.
pub fn check(pin_path: &Path, daemon_pid: Option<u32>) -> Result<Status> {
    let maps = Maps::open(pin_path)?;
    let mut problems = Vec::new();
    let pid = daemon_pid.or_else(|| loader::daemon_pid(pin_path));
    let state = DaemonState::read(pin_path).filter(|s| Some(s.pid) == pid);
    let daemon = pid.map(|pid| DaemonInfo {
        pid,
        uptime_s: state
            .as_ref()
            .map_or(0, |s| unix_now().saturating_sub(s.started_unix)),
        heartbeat_age_s: state.as_ref().map(DaemonState::heartbeat_age_s),
        attach_mode: state.as_ref().map(|s| s.attach_mode.clone()),
        checksum_path: state.as_ref().map(|s| s.checksum_path.clone()),
    });
    match (&pid, &state) {
        (None, _) => problems.push(format!(
            "no daemon serves {} (start `datapath-user run`)",
            pin_path.display()
        )),
        (Some(pid), None) => problems.push(format!("daemon {pid} has not published its state yet")),
        (Some(pid), Some(s)) if s.heartbeat_age_s() > s.heartbeat_limit_s() => problems.push(
            format!("daemon {pid} has not swept for {} s", s.heartbeat_age_s()),
        ),
        _ => {}
    }

    let uplink_ifindex = state.as_ref().map(|s| s.uplink_ifindex);
    let (attachments, missing) = attachments(pin_path, &maps, uplink_ifindex)?;
    problems.extend(missing);
    let mut flows = 0;
    maps.for_each_flow(|_, _| flows += 1)?;
    let capacity = maps.conntrack_capacity;
    Ok(Status {
        pin_path: pin_path.to_path_buf(),
        ready: problems.is_empty(),
        problems,
        daemon,
        attachments,
        flows,
        flow_table_capacity: capacity,
        flow_table_fill_percent: crate::stats::fill_percent(flows as u64, capacity),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_first_problem_and_counts_the_rest() {
        let mut s = Status {
            pin_path: PathBuf::from("/p"),
            ready: true,
            problems: vec![],
            daemon: None,
            attachments: vec![],
            flows: 0,
            flow_table_capacity: 0,
            flow_table_fill_percent: 0.0,
        };
        assert_eq!(s.summary(), "ready");
        s.problems = vec!["a".into()];
        assert_eq!(s.summary(), "a");
        s.problems.push("b".into());
        assert_eq!(s.summary(), "a (and 1 more)");
    }

    #[test]
    fn heartbeat_limit_scales_with_the_sweep_interval() {
        let mut st = DaemonState {
            pid: 1,
            started_unix: 0,
            heartbeat_unix: 0,
            sweep_interval_s: 1.0,
            uplink: "eth0".into(),
            uplink_ifindex: 2,
            node_ip: Ipv4Addr::new(192, 0, 2, 10),
            attach_mode: "tcx".into(),
            checksum_path: "kfunc".into(),
        };
        assert_eq!(st.heartbeat_limit_s(), 8);
        st.sweep_interval_s = 10.0;
        assert_eq!(st.heartbeat_limit_s(), 35);
    }
}
