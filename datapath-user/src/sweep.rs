//! The expired-flow sweep: userspace reclaims flows whose state timed out (the LRU only
//! evicts under pressure), and NAT bindings whose flow is gone.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use datapath_common::{
    flow::{Flow, FlowKey},
    port::PortHint,
};

use crate::{
    error::Result,
    maps::{monotonic_coarse_ns, Maps},
};

/// What one pass did.
#[derive(Clone, Copy, Debug, Default)]
pub struct SweepReport {
    pub scanned: usize,
    pub expired: usize,
    pub orphan_bindings: usize,
    pub duration: std::time::Duration,
}

/// Keeps the state that spans passes: a binding is only removed as an orphan when it was
/// already flow-less in the previous pass (the programs insert the binding just before the
/// flow, so one pass could catch a flow being born).
#[derive(Default)]
pub struct Sweeper {
    suspects: HashSet<FlowKey>,
    pub total_expired: u64,
    pub total_orphans: u64,
    pub passes: u64,
    pub last: SweepReport,
}

impl Sweeper {
    pub fn run(&mut self, maps: &mut Maps) -> Result<SweepReport> {
        let start = Instant::now();
        let timeouts = maps.config()?.timeouts;
        let now = monotonic_coarse_ns();
        // Batch reads: a pass over a million flows costs hundreds of syscalls, not millions.
        let mut scanned = 0;
        let mut live: HashSet<FlowKey> = HashSet::new();
        let mut expired: Vec<(FlowKey, Flow)> = Vec::new();
        maps.for_each_flow(|key, flow| {
            scanned += 1;
            if now >= flow.expires_at_ns(key.proto, &timeouts) {
                expired.push((*key, *flow));
            } else {
                live.insert(*key);
            }
        })?;
        for (key, flow) in &expired {
            let binding = key.reply_tuple(flow.nat_ip, flow.nat_port);
            if maps
                .bindings
                .get(&binding, 0)
                .is_ok_and(|owner| owner == *key)
            {
                let _ = maps.bindings.remove(&binding);
            }
            let _ = maps.conntrack.remove(key);
        }

        // Port hints are rebuilt from the bindings: ports freed since the last pass (flows
        // expired, evicted, their pod removed) become clear again.
        let config = maps.config()?;
        let mut hints: HashMap<FlowKey, Box<PortHint>> = maps
            .hints
            .keys()
            .filter_map(std::result::Result::ok)
            .map(|k| (k, Box::new(PortHint::EMPTY)))
            .collect();
        let mut suspects = HashSet::new();
        let mut orphans = Vec::new();
        maps.for_each_binding(|binding, owner| {
            let dest = FlowKey::new(binding.proto, 0, 0, binding.src_ip, binding.src_port);
            if let Some(hint) = hints.get_mut(&dest) {
                if config.port_in_range(binding.dst_port) {
                    hint.set(u32::from(binding.dst_port - config.port_min));
                }
            }
            if !live.contains(owner) {
                if self.suspects.contains(binding) {
                    orphans.push(*binding);
                } else {
                    suspects.insert(*binding);
                }
            }
        })?;
        for binding in &orphans {
            let _ = maps.bindings.remove(binding);
        }
        for (dest, mut hint) in hints {
            hint.close_tail(config.port_count());
            let _ = maps.hints.insert(dest, *hint, 0);
        }
        self.suspects = suspects;

        let report = SweepReport {
            scanned,
            expired: expired.len(),
            orphan_bindings: orphans.len(),
            duration: start.elapsed(),
        };
        self.total_expired += report.expired as u64;
        self.total_orphans += report.orphan_bindings as u64;
        self.passes += 1;
        self.last = report;
        Ok(report)
    }
}
