//! The expired-flow sweep: userspace reclaims flows whose state timed out (the LRU only
//! evicts under pressure), and NAT bindings whose flow is gone.
//!
//! Its cost follows what expires, not what exists. The whole table is read only once per
//! full-scan interval (the shortest timeout, at most ten seconds: no flow's expiry is closer
//! than that to the packet that set it), and each full scan lists the flows that become
//! removable before the next one. Every tick then looks at those alone. A table of a million
//! long-lived flows costs one batched read every ten seconds.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use datapath_common::{
    config::Timeouts,
    flow::{Flow, FlowKey},
};

use crate::{
    error::Result,
    maps::{monotonic_coarse_ns, Maps},
};

/// What happened to one expired candidate.
enum Expiry {
    Removed,
    /// Refreshed by a packet since it was read: still live, as now read.
    Kept(Flow),
    /// Already removed (a `pod del`, the LRU).
    Gone,
}

const BPF_NOEXIST: u64 = 1;

/// Full scans between two searches for orphan bindings (bindings whose flow the LRU evicted).
const ORPHAN_SCAN_EVERY: u64 = 6;

/// What one tick did.
#[derive(Clone, Copy, Debug, Default)]
pub struct SweepReport {
    /// Flows read by a full scan this tick (0 when the tick only checked due flows).
    pub scanned: usize,
    pub expired: usize,
    pub orphan_bindings: usize,
    pub duration: Duration,
}

/// A flow that becomes removable before the next full scan, as last read.
struct Due {
    key: FlowKey,
    seen: Flow,
    at_ns: u64,
}

/// The binding of a removed flow: removed once its flow has stayed gone for a tick (a
/// packet racing the removal puts the flow back meanwhile).
struct Released {
    binding: FlowKey,
    owner: FlowKey,
    nat_port: u16,
}

pub struct Sweeper {
    due: Vec<Due>,
    released: Vec<Released>,
    next_full_scan: Option<Instant>,
    full_scans: u64,
    /// Bindings found flow-less by the previous orphan search: removed if still so.
    suspects: HashSet<FlowKey>,
    pub total_expired: u64,
    pub total_orphans: u64,
    /// Flows put back because a packet refreshed them while they were being removed.
    pub restored: u64,
    pub passes: u64,
    pub last: SweepReport,
    /// When the last tick ended, and how often ticks are due (for `/healthz`).
    pub last_pass_at: Option<Instant>,
    pub interval: Duration,
}

impl Sweeper {
    #[must_use]
    pub fn new(interval: Duration) -> Self {
        Self {
            due: Vec::new(),
            released: Vec::new(),
            next_full_scan: None,
            full_scans: 0,
            suspects: HashSet::new(),
            total_expired: 0,
            total_orphans: 0,
            restored: 0,
            passes: 0,
            last: SweepReport::default(),
            last_pass_at: None,
            interval,
        }
    }

    /// Time since the last tick ended.
    #[must_use]
    pub fn last_pass_age(&self) -> Option<Duration> {
        self.last_pass_at.map(|at| at.elapsed())
    }

    /// A tick older than this means the daemon stopped sweeping (three missed ticks, and a
    /// few seconds for a full scan of a large table).
    #[must_use]
    pub fn stall_limit(&self) -> Duration {
        self.interval * 3 + Duration::from_secs(5)
    }

    /// Flows waiting for their removal time.
    #[must_use]
    pub fn due_flows(&self) -> usize {
        self.due.len()
    }

    /// One tick: a full scan when one is due, then the removal of every listed flow whose
    /// time has come, then the bindings of flows removed a tick ago.
    pub fn run(&mut self, maps: &mut Maps) -> Result<SweepReport> {
        let start = Instant::now();
        let timeouts = maps.config()?.timeouts;
        let orphans = self.release_bindings(maps);
        let (mut scanned, mut orphan_count) = (0, orphans);
        if self.next_full_scan.is_none_or(|at| start >= at) {
            let window = Duration::from_secs(u64::from(timeouts.full_scan_interval_s()));
            let search_orphans = self.full_scans.is_multiple_of(ORPHAN_SCAN_EVERY);
            let (n, live) = self.full_scan(maps, &timeouts, window, search_orphans)?;
            scanned = n;
            if let Some(live) = live {
                orphan_count += self.remove_orphans(maps, &live)?;
            }
            self.full_scans += 1;
            self.next_full_scan = Some(start + window);
        }
        let expired = self.remove_due(maps, &timeouts)?;

        let report = SweepReport {
            scanned,
            expired,
            orphan_bindings: orphan_count,
            duration: start.elapsed(),
        };
        self.total_expired += report.expired as u64;
        self.total_orphans += report.orphan_bindings as u64;
        self.passes += 1;
        self.last = report;
        self.last_pass_at = Some(Instant::now());
        Ok(report)
    }

    /// Reads the whole table (thousands of entries per syscall) and lists the flows that
    /// become removable within `window`; with `search_orphans`, also returns every live key.
    fn full_scan(
        &mut self,
        maps: &Maps,
        timeouts: &Timeouts,
        window: Duration,
        search_orphans: bool,
    ) -> Result<(usize, Option<HashSet<FlowKey>>)> {
        let horizon = monotonic_coarse_ns().saturating_add(window.as_nanos() as u64);
        let mut scanned = 0;
        let mut live = search_orphans.then(HashSet::new);
        let mut due = Vec::new();
        maps.for_each_flow(|key, flow| {
            scanned += 1;
            let at_ns = flow.removable_at_ns(key.proto, timeouts);
            if at_ns <= horizon {
                due.push(Due {
                    key: *key,
                    seen: *flow,
                    at_ns,
                });
            }
            if let Some(live) = live.as_mut() {
                live.insert(*key);
            }
        })?;
        self.due = due;
        Ok((scanned, live))
    }

    /// Removes the listed flows whose time has come; refreshed ones get their new time.
    fn remove_due(&mut self, maps: &mut Maps, timeouts: &Timeouts) -> Result<usize> {
        let now = monotonic_coarse_ns();
        let horizon = self.next_full_scan.map_or(now, |at| {
            now + at.saturating_duration_since(Instant::now()).as_nanos() as u64
        });
        let mut expired = 0;
        let mut waiting = Vec::with_capacity(self.due.len());
        for entry in std::mem::take(&mut self.due) {
            if entry.at_ns > now {
                waiting.push(entry);
                continue;
            }
            match self.expire(maps, &entry.key, &entry.seen, timeouts)? {
                Expiry::Removed => {
                    expired += 1;
                    self.released.push(Released {
                        binding: entry
                            .key
                            .reply_tuple(entry.seen.nat_ip, entry.seen.nat_port),
                        owner: entry.key,
                        nat_port: entry.seen.nat_port,
                    });
                }
                // Still listed if its new time comes before the next full scan, which
                // lists it otherwise.
                Expiry::Kept(flow) => {
                    let at_ns = flow.removable_at_ns(entry.key.proto, timeouts);
                    if at_ns <= horizon {
                        waiting.push(Due {
                            key: entry.key,
                            seen: flow,
                            at_ns,
                        });
                    }
                }
                Expiry::Gone => {}
            }
        }
        self.due = waiting;
        Ok(expired)
    }

    /// Removes one flow whose time has come, unless a packet refreshed it since it was read.
    ///
    /// The flow is read again with a fresh clock and removed only if unchanged; the removal
    /// returns what was unlinked, and a flow refreshed in between is put back (with its NAT
    /// port). Its binding goes a tick later, so a packet that raced the removal (and put the
    /// flow back from the full path) finds its port still bound to it.
    fn expire(
        &mut self,
        maps: &mut Maps,
        key: &FlowKey,
        seen: &Flow,
        timeouts: &Timeouts,
    ) -> Result<Expiry> {
        let Ok(current) = maps.conntrack.get(key, 0) else {
            return Ok(Expiry::Gone);
        };
        if current.last_seen_ns != seen.last_seen_ns
            || current.state != seen.state
            || !current.is_expired(key.proto, timeouts, monotonic_coarse_ns())
        {
            return Ok(Expiry::Kept(current));
        }
        match maps.take_flow(key)? {
            None => Ok(Expiry::Gone),
            Some(removed) if removed.last_seen_ns == seen.last_seen_ns => Ok(Expiry::Removed),
            Some(refreshed) => {
                // A packet came in between the check and the removal: put the flow back,
                // unless that packet's successor already re-created it.
                let _ = maps.conntrack.insert(key, refreshed, BPF_NOEXIST);
                self.restored += 1;
                Ok(Expiry::Kept(refreshed))
            }
        }
    }

    /// Removes the bindings of flows removed a tick ago that are still gone (or came back
    /// with another NAT port). Returns how many.
    fn release_bindings(&mut self, maps: &mut Maps) -> usize {
        let mut removed = 0;
        for r in std::mem::take(&mut self.released) {
            let stale = match maps.conntrack.get(&r.owner, 0) {
                Err(_) => true,
                Ok(flow) => flow.nat_port != r.nat_port,
            };
            if stale
                && maps
                    .bindings
                    .get(&r.binding, 0)
                    .is_ok_and(|owner| owner == r.owner)
                && maps.bindings.remove(&r.binding).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Bindings whose flow is not live, found flow-less by two searches in a row (the
    /// programs insert the binding just before the flow, so one search could catch a flow
    /// being born): what LRU pressure leaves behind.
    fn remove_orphans(&mut self, maps: &mut Maps, live: &HashSet<FlowKey>) -> Result<usize> {
        let mut suspects = HashSet::new();
        let mut orphans = Vec::new();
        maps.for_each_binding(|binding, owner| {
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
        self.suspects = suspects;
        Ok(orphans.len())
    }
}
