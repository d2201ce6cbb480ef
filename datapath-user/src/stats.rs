//! The `stats` view: every counter, table fill, and NAT port usage per destination.

use std::{collections::HashMap, net::Ipv4Addr};

use datapath_common::{
    counters::{alloc_probe_upper, Kind, ALLOC_PROBE_BUCKETS, ALLOC_PROBE_FIRST},
    flow::{proto_name, FlowKey, FlowState, FLAG_NODE},
};
use serde::Serialize;

use crate::{error::Result, maps::Maps};

#[derive(Debug, Serialize)]
pub struct CounterValue {
    pub name: &'static str,
    pub kind: &'static str,
    pub value: u64,
    pub description: &'static str,
}

/// NAT ports in use towards one (destination, port, protocol).
#[derive(Debug, Serialize)]
pub struct PortUsage {
    pub proto: &'static str,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
    /// Bindings towards the destination: pod flows and the node's own connections.
    pub ports_in_use: u32,
    /// Of those, TCP connections that are closing or reset (their ports become reusable once
    /// the connection is over and idle: a second, or a minute when the remote closed first).
    pub ports_closing: u32,
    /// Of those, the node's own connections.
    pub ports_node: u32,
    pub ports_available: u32,
    pub fill_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub counters: Vec<CounterValue>,
    pub flows: u64,
    pub flow_table_capacity: u32,
    pub flow_table_fill_percent: f64,
    pub nat_bindings: u64,
    pub pods: usize,
    pub port_range: (u16, u16),
    /// The node's own connections tracked so NAT ports avoid them.
    pub node_flows: u64,
    /// The busiest destinations, most used first.
    pub busiest_destinations: Vec<PortUsage>,
    /// Candidates tried per NAT port allocation (all destinations, since the maps were
    /// created): a growing share in the upper buckets means a destination's range is filling.
    pub port_allocation_probes: Vec<ProbeBucket>,
}

/// One bucket of the probe-count histogram.
#[derive(Debug, Serialize)]
pub struct ProbeBucket {
    /// Fewest and most candidates an allocation in this bucket took (`max` null: no bound).
    pub min_probes: u32,
    pub max_probes: Option<u32>,
    pub allocations: u64,
}

/// `flows` as a percentage of the table's `capacity`.
#[must_use]
pub fn fill_percent(flows: u64, capacity: u32) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        flows as f64 * 100.0 / f64::from(capacity)
    }
}

const fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Translated => "translated",
        Kind::Passed => "passed",
        Kind::Dropped => "dropped",
        Kind::Event => "event",
    }
}

pub fn collect(maps: &Maps, top: usize) -> Result<Stats> {
    let config = maps.config()?;
    let values = maps.counters()?;
    let mut port_allocation_probes = Vec::new();
    let mut lower = 1;
    for bucket in 0..ALLOC_PROBE_BUCKETS {
        let upper = alloc_probe_upper(bucket);
        let index = (ALLOC_PROBE_FIRST as u32 + bucket) as usize;
        port_allocation_probes.push(ProbeBucket {
            min_probes: lower,
            max_probes: (upper != u32::MAX).then_some(upper),
            allocations: values.get(index).map_or(0, |(_, v)| *v),
        });
        lower = upper.saturating_add(1);
    }
    let counters = values
        .into_iter()
        .map(|(c, value)| CounterValue {
            name: c.name(),
            kind: kind_name(c.kind()),
            value,
            description: c.description(),
        })
        .collect();
    // Which flows are closing, and which are the node's, to break the bindings down.
    let mut flows = 0u64;
    let mut node_flows = 0u64;
    let mut closing: std::collections::HashSet<FlowKey> = std::collections::HashSet::new();
    maps.for_each_flow(|key, flow| {
        flows += 1;
        if flow.flags & FLAG_NODE != 0 {
            node_flows += 1;
        }
        if matches!(flow.state(), Some(FlowState::Closing | FlowState::Reset)) {
            closing.insert(*key);
        }
    })?;
    // (in use, closing, node) per destination.
    let mut per_dst: HashMap<(u8, u32, u16), (u32, u32, u32)> = HashMap::new();
    let mut bindings = 0u64;
    maps.for_each_binding(|key, binding| {
        let owner = &binding.owner;
        bindings += 1;
        let e = per_dst
            .entry((key.proto, key.src_ip, key.src_port))
            .or_default();
        e.0 += 1;
        e.1 += u32::from(closing.contains(owner));
        e.2 += u32::from(owner.src_ip == key.dst_ip);
    })?;
    let available = config.port_count();
    let mut busiest: Vec<PortUsage> = per_dst
        .into_iter()
        .map(|((proto, ip, port), (used, closing, node))| PortUsage {
            proto: proto_name(proto),
            dst_ip: Ipv4Addr::from(ip),
            dst_port: port,
            ports_in_use: used,
            ports_closing: closing,
            ports_node: node,
            ports_available: available,
            fill_percent: if available == 0 {
                100.0
            } else {
                f64::from(used) * 100.0 / f64::from(available)
            },
        })
        .collect();
    busiest.sort_by(|a, b| {
        b.ports_in_use
            .cmp(&a.ports_in_use)
            .then(a.dst_ip.cmp(&b.dst_ip))
    });
    busiest.truncate(top);
    let capacity = maps.conntrack_capacity;
    Ok(Stats {
        counters,
        flows,
        flow_table_capacity: capacity,
        flow_table_fill_percent: fill_percent(flows, capacity),
        nat_bindings: bindings,
        pods: maps.pods()?.len(),
        port_range: (config.port_min, config.port_max),
        node_flows,
        busiest_destinations: busiest,
        port_allocation_probes,
    })
}
