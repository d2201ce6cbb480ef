//! The expired-flow sweep: userspace reclaims flows whose state timed out (the LRU only
//! evicts under pressure), and NAT bindings whose flow is gone.
//!
//! Its cost follows what expires, not what exists. The whole table is read only once per
//! full-scan interval (the shortest timeout, at most ten seconds: no flow's expiry is closer
//! than that to the packet that set it), and each full scan lists the flows that become
//! removable before the next one. Every tick then looks at those alone. Where a full scan
//! would cost more than 0.3% of a core at that pace (a table of a few hundred thousand
//! long-lived flows), scans come less often, at most a minute apart, unless they find flows
//! they were late for in numbers, or the programs created more than a percent of the table
//! since the last one ([`datapath_common::scan`]); the programs treat a flow past its removal
//! time as gone, so lateness costs memory, not correctness.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use datapath_common::{
    config::{Config, Timeouts},
    counters::Counter,
    flow::{Flow, FlowKey},
    port::{self, PortHint},
    scan::{self, ScanOutcome},
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

/// How long past its removal time a flow counts as overdue for a full scan (ticks run every
/// second, so listed flows are never this late).
const OVERDUE_AFTER_NS: u64 = 2_000_000_000;

/// CPU time (user and system) of the calling thread: what a full scan costs, whatever else
/// the machine does.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which outlives the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Full scans between two searches for orphan bindings (bindings whose flow the LRU evicted).
const ORPHAN_SCAN_EVERY: u64 = 6;

/// What one tick did.
#[derive(Clone, Copy, Debug, Default)]
pub struct SweepReport {
    /// Flows read by a full scan this tick (0 when the tick only checked due flows).
    pub scanned: usize,
    /// Flows that full scan found already past their removal time.
    pub overdue: usize,
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
    /// When the last full scan started, and the programs' count of flows created then.
    last_full_scan: Option<(Instant, u64)>,
    full_scans: u64,
    /// The last full scan's cost and findings, which pace the next ones.
    last_scan: ScanOutcome,
    /// The interval between the last full scan and the next one.
    pub full_scan_interval: Duration,
    /// Flows removed later than their time (found overdue by a full scan).
    pub total_overdue: u64,
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
            last_full_scan: None,
            full_scans: 0,
            last_scan: ScanOutcome::default(),
            full_scan_interval: Duration::ZERO,
            total_overdue: 0,
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
        let config = maps.config()?;
        let timeouts = config.timeouts;
        let orphans = self.release_bindings(maps, &config);
        let (mut scanned, mut overdue, mut orphan_count) = (0, 0, orphans);
        let created = maps.counter(Counter::FlowCreated).unwrap_or(0);
        self.bring_forward_for_arrivals(created, timeouts.full_scan_interval_s());
        if self.next_full_scan.is_none_or(|at| start >= at) {
            let punctual_s = timeouts.full_scan_interval_s();
            // Flows are listed for as far ahead as the last scan paces the next one; a
            // costlier scan now brings the next one no later than that.
            let window =
                Duration::from_millis(scan::next_full_scan_ms(punctual_s, &self.last_scan));
            let search_orphans = self.full_scans.is_multiple_of(ORPHAN_SCAN_EVERY);
            let cpu_before = thread_cpu_time();
            let (n, late, live) = self.full_scan(maps, &config, window, search_orphans)?;
            self.last_scan = ScanOutcome {
                cost_us: thread_cpu_time().saturating_sub(cpu_before).as_micros() as u64,
                scanned: n as u64,
                overdue: late as u64,
            };
            (scanned, overdue) = (n, late);
            if let Some(live) = live {
                orphan_count += self.remove_orphans(maps, &live)?;
            }
            self.full_scans += 1;
            self.last_full_scan = Some((start, created));
            self.full_scan_interval = window.min(Duration::from_millis(scan::next_full_scan_ms(
                punctual_s,
                &self.last_scan,
            )));
            self.next_full_scan = Some(start + self.full_scan_interval);
        }
        let expired = self.remove_due(maps, &timeouts)?;

        let report = SweepReport {
            scanned,
            overdue,
            expired,
            orphan_bindings: orphan_count,
            duration: start.elapsed(),
        };
        self.total_expired += report.expired as u64;
        self.total_orphans += report.orphan_bindings as u64;
        self.total_overdue += report.overdue as u64;
        self.passes += 1;
        self.last = report;
        self.last_pass_at = Some(Instant::now());
        Ok(report)
    }

    /// Brings a lazy full scan forward to the punctual time after the last one when the
    /// programs have created more flows since it than [`scan::arrivals_call_for_a_scan`]
    /// allows (`created`: their running count): short timeouts may end those before a lazy
    /// scan would list them.
    fn bring_forward_for_arrivals(&mut self, created: u64, punctual_s: u32) {
        let (Some((scanned_at, created_then)), Some(next)) =
            (self.last_full_scan, self.next_full_scan)
        else {
            return;
        };
        let punctual = scanned_at + Duration::from_secs(u64::from(punctual_s));
        if next > punctual
            && scan::arrivals_call_for_a_scan(
                created.saturating_sub(created_then),
                self.last_scan.scanned,
            )
        {
            self.next_full_scan = Some(punctual);
            self.full_scan_interval = Duration::from_secs(u64::from(punctual_s));
        }
    }

    /// Reads the whole table (thousands of entries per syscall) and lists the flows that
    /// become removable within `window`. Returns how many flows it read, how many of them
    /// were already past their removal time, and with `search_orphans` every live key.
    ///
    /// It also rebuilds the port hints of the destinations that have one from the flows'
    /// NAT ports (a hint is only ever behind: ports freed since look taken until the next).
    fn full_scan(
        &mut self,
        maps: &mut Maps,
        config: &Config,
        window: Duration,
        search_orphans: bool,
    ) -> Result<(usize, usize, Option<HashSet<FlowKey>>)> {
        let timeouts = &config.timeouts;
        let now = monotonic_coarse_ns();
        let horizon = now.saturating_add(window.as_nanos() as u64);
        let (mut scanned, mut overdue) = (0, 0);
        let mut live = search_orphans.then(HashSet::new);
        let mut due = Vec::new();
        let mut hints: HashMap<FlowKey, Box<PortHint>> = maps
            .hints
            .keys()
            .filter_map(std::result::Result::ok)
            .map(|k| (k, Box::new(PortHint::EMPTY)))
            .collect();
        maps.for_each_flow(|key, flow| {
            scanned += 1;
            if let Some(hint) = hints.get_mut(&port::hint_key(key)) {
                if config.port_in_range(flow.nat_port) {
                    hint.set(u32::from(flow.nat_port - config.port_min));
                }
            }
            let at_ns = flow.sweepable_at_ns(key.proto, timeouts);
            // A tick removes listed flows within a second of their time: anything older
            // was not listed (born or closed since the last scan).
            if at_ns.saturating_add(OVERDUE_AFTER_NS) <= now {
                overdue += 1;
            }
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
        for (dest, mut hint) in hints {
            hint.close_tail(config.port_count());
            let _ = maps.hints.insert(dest, *hint, 0);
        }
        Ok((scanned, overdue, live))
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
                    let at_ns = flow.sweepable_at_ns(entry.key.proto, timeouts);
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
            || current.sweepable_at_ns(key.proto, timeouts) > monotonic_coarse_ns()
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
    /// The hint bits of their ports are cleared.
    fn release_bindings(&mut self, maps: &mut Maps, config: &Config) -> usize {
        let mut removed = 0;
        let mut freed: HashMap<FlowKey, Vec<u16>> = HashMap::new();
        for r in std::mem::take(&mut self.released) {
            let stale = match maps.conntrack.get(&r.owner, 0) {
                Err(_) => true,
                Ok(flow) => flow.nat_port != r.nat_port,
            };
            if !stale {
                continue;
            }
            // Taken in one call and put back in the rare case another flow claimed the
            // tuple meanwhile (a look first would cost every release a second call).
            match maps.take_binding(&r.binding) {
                Ok(Some(taken)) if taken.owner != r.owner => {
                    let _ = maps.bindings.insert(r.binding, taken, BPF_NOEXIST);
                }
                Ok(Some(_)) => {
                    removed += 1;
                    freed
                        .entry(port::hint_key(&r.owner))
                        .or_default()
                        .push(r.nat_port);
                }
                Ok(None) | Err(_) => {}
            }
        }
        for (dest, ports) in freed {
            if let Ok(mut hint) = maps.hints.get(&dest, 0) {
                for p in ports.into_iter().filter(|p| config.port_in_range(*p)) {
                    hint.clear(u32::from(p - config.port_min));
                }
                let _ = maps.hints.insert(dest, hint, 0);
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
        maps.for_each_binding(|binding, taken| {
            if !live.contains(&taken.owner) {
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
