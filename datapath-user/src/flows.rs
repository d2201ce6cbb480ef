//! The flow view: flow-table entries joined with pod names, filtered and sorted.

use std::net::Ipv4Addr;

use datapath_common::{
    flow::{proto_name, Flow, FlowKey},
    ipv4::Cidr,
};
use serde::Serialize;

use crate::{
    error::Result,
    maps::{monotonic_coarse_ns, Maps},
};

/// One flow as `flows` prints it (the JSON field names are part of the CLI contract).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRecord {
    pub proto: &'static str,
    pub pod: Option<String>,
    pub pod_ip: Ipv4Addr,
    pub pod_port: u16,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    pub nat_ip: Ipv4Addr,
    pub nat_port: u16,
    pub state: &'static str,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub age_s: u64,
    pub expires_s: u64,
    /// Host veth the pod's packets arrive on.
    pub ifindex: u32,
}

/// Which flows to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Pod name (`namespace/pod`, or just the pod part) or pod IPv4.
    pub pod: Option<String>,
    pub proto: Option<u8>,
    pub dst: Option<Cidr>,
    pub state: Option<String>,
    /// Matches the pod, destination or NAT port.
    pub port: Option<u16>,
}

impl Filter {
    fn matches(&self, r: &FlowRecord) -> bool {
        if let Some(pod) = &self.pod {
            let by_ip = pod.parse::<Ipv4Addr>().is_ok_and(|ip| ip == r.pod_ip);
            let by_name = r.pod.as_deref().is_some_and(|name| {
                name == pod || name.rsplit_once('/').is_some_and(|(_, short)| short == pod)
            });
            if !by_ip && !by_name {
                return false;
            }
        }
        if self.proto.is_some_and(|p| proto_name(p) != r.proto) {
            return false;
        }
        if self.dst.is_some_and(|c| !c.contains(u32::from(r.dst_ip))) {
            return false;
        }
        if self.state.as_deref().is_some_and(|s| s != r.state) {
            return false;
        }
        if self
            .port
            .is_some_and(|p| p != r.pod_port && p != r.dst_port && p != r.nat_port)
        {
            return false;
        }
        true
    }
}

/// Builds the record for one entry at monotonic time `now`.
#[must_use]
pub fn record(
    key: &FlowKey,
    flow: &Flow,
    pod: Option<String>,
    now: u64,
    timeouts: &datapath_common::config::Timeouts,
) -> FlowRecord {
    let expires_at = flow.expires_at_ns(key.proto, timeouts);
    FlowRecord {
        proto: proto_name(key.proto),
        pod,
        pod_ip: Ipv4Addr::from(key.src_ip),
        pod_port: key.src_port,
        dst_ip: Ipv4Addr::from(key.dst_ip),
        dst_port: key.dst_port,
        nat_ip: Ipv4Addr::from(flow.nat_ip),
        nat_port: flow.nat_port,
        state: flow.state().map_or("unknown", |s| s.name()),
        packets_out: flow.packets_out,
        bytes_out: flow.bytes_out,
        packets_in: flow.packets_in,
        bytes_in: flow.bytes_in,
        age_s: now.saturating_sub(flow.created_ns) / 1_000_000_000,
        expires_s: expires_at.saturating_sub(now).div_ceil(1_000_000_000),
        ifindex: flow.pod_ifindex,
    }
}

/// Every flow matching `filter`, sorted by pod, protocol, destination and port.
pub fn collect(maps: &Maps, filter: &Filter) -> Result<Vec<FlowRecord>> {
    let timeouts = maps.config()?.timeouts;
    let names: std::collections::HashMap<u32, String> = maps
        .pods()?
        .into_iter()
        .filter(|(_, pod)| !pod.name().is_empty())
        .map(|(ip, pod)| (u32::from(ip), pod.name().to_string()))
        .collect();
    let now = monotonic_coarse_ns();
    let mut records = Vec::new();
    maps.for_each_flow(|key, flow| {
        let r = record(key, flow, names.get(&key.src_ip).cloned(), now, &timeouts);
        if filter.matches(&r) {
            records.push(r);
        }
    })?;
    records.sort_by(|a, b| {
        (a.pod_ip, a.proto, a.dst_ip, a.dst_port, a.pod_port)
            .cmp(&(b.pod_ip, b.proto, b.dst_ip, b.dst_port, b.pod_port))
    });
    Ok(records)
}
