//! The `stats` view: every counter, table fill, and NAT port usage per destination.

use std::{collections::HashMap, net::Ipv4Addr};

use datapath_common::{counters::Kind, flow::proto_name};
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
    pub ports_in_use: u32,
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
    /// The busiest destinations, most used first.
    pub busiest_destinations: Vec<PortUsage>,
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
    let counters = maps
        .counters()?
        .into_iter()
        .map(|(c, value)| CounterValue {
            name: c.name(),
            kind: kind_name(c.kind()),
            value,
            description: c.description(),
        })
        .collect();
    let flows = maps.conntrack.keys().flatten().count() as u64;
    let mut per_dst: HashMap<(u8, u32, u16), u32> = HashMap::new();
    let mut bindings = 0u64;
    for key in maps.bindings.keys().filter_map(Result::ok) {
        bindings += 1;
        *per_dst
            .entry((key.proto, key.src_ip, key.src_port))
            .or_default() += 1;
    }
    let available = config.port_count();
    let mut busiest: Vec<PortUsage> = per_dst
        .into_iter()
        .map(|((proto, ip, port), used)| PortUsage {
            proto: proto_name(proto),
            dst_ip: Ipv4Addr::from(ip),
            dst_port: port,
            ports_in_use: used,
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
        busiest_destinations: busiest,
    })
}
