//! How often the sweep reads the whole flow table.
//!
//! A full scan costs in proportion to the table (about 0.3 µs a flow), whatever expires. Its
//! interval starts at [`crate::config::Timeouts::full_scan_interval_s`], which removes every
//! flow on time, and stretches, up to [`LAZY_SCAN_INTERVAL_MAX_MS`], when a scan costs more
//! than [`SCAN_BUDGET_PER_MILLE`] of a core at that pace: a large table of long-lived flows
//! then costs a few reads a minute. Late removal is harmless to packets because the programs
//! treat a flow past its removal time as gone (nf_conntrack does the same with entries its
//! garbage collector has not reached); it only holds memory. So when a scan finds many flows
//! it should have removed earlier, as churn makes them, the interval goes back to the
//! punctual one: the cost then follows what expires. Flows created since the last scan are
//! counted too ([`arrivals_call_for_a_scan`]): churn is caught at the next punctual time rather
//! than at the next lazy scan.

/// The share of one core (per mille) full scans may take before their interval stretches.
pub const SCAN_BUDGET_PER_MILLE: u64 = 3;

/// The longest interval between full scans (the longest nf_conntrack's collector waits).
pub const LAZY_SCAN_INTERVAL_MAX_MS: u64 = 60_000;

/// Overdue flows (per mille of those scanned) above which scans return to the punctual
/// interval.
pub const OVERDUE_PER_MILLE_MAX: u64 = 10;

/// Flows created since the last full scan (per mille of those it read) from which the next
/// scan comes at the punctual interval: flows that short timeouts will end before a lazy scan
/// would list them.
pub const ARRIVALS_PER_MILLE_MAX: u64 = 10;

/// Whether `arrived` flows created since a full scan that read `scanned` call for the next
/// scan at the punctual interval rather than a lazy one. Under steady arrivals the lazy
/// interval thus shrinks to the time they take to reach the threshold, which also bounds the
/// flows a late removal leaves in the table to about that share.
#[must_use]
pub const fn arrivals_call_for_a_scan(arrived: u64, scanned: u64) -> bool {
    arrived.saturating_mul(1000) > scanned.saturating_mul(ARRIVALS_PER_MILLE_MAX)
}

/// What the last full scan saw and cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    /// CPU time the scan took, in microseconds.
    pub cost_us: u64,
    /// Flows read.
    pub scanned: u64,
    /// Flows already past their removal time when read (the sweep was late for them).
    pub overdue: u64,
}

/// The interval (ms) until the next full scan after `last`, given the punctual interval
/// `punctual_s`.
#[must_use]
pub const fn next_full_scan_ms(punctual_s: u32, last: &ScanOutcome) -> u64 {
    let punctual_ms = punctual_s as u64 * 1000;
    if last.overdue.saturating_mul(1000) > last.scanned.saturating_mul(OVERDUE_PER_MILLE_MAX) {
        return punctual_ms;
    }
    // cost / interval <= budget  <=>  interval >= cost / budget.
    let affordable_ms = last.cost_us.div_ceil(SCAN_BUDGET_PER_MILLE);
    let lazy = if affordable_ms > LAZY_SCAN_INTERVAL_MAX_MS {
        LAZY_SCAN_INTERVAL_MAX_MS
    } else {
        affordable_ms
    };
    if lazy > punctual_ms {
        lazy
    } else {
        punctual_ms
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const fn outcome(cost_us: u64, scanned: u64, overdue: u64) -> ScanOutcome {
        ScanOutcome {
            cost_us,
            scanned,
            overdue,
        }
    }

    #[test]
    fn cheap_scans_stay_punctual() {
        // A thousand flows read in a third of a millisecond.
        assert_eq!(next_full_scan_ms(10, &outcome(300, 1000, 0)), 10_000);
        assert_eq!(next_full_scan_ms(1, &outcome(0, 0, 0)), 1_000);
    }

    #[test]
    fn expensive_scans_of_live_flows_stretch_to_the_budget_then_the_cap() {
        // Half a million flows in 150 ms of CPU: 0.3% of a core at one scan per 50 s.
        assert_eq!(next_full_scan_ms(10, &outcome(150_000, 500_000, 0)), 50_000);
        assert_eq!(
            next_full_scan_ms(10, &outcome(900_000, 3_000_000, 0)),
            LAZY_SCAN_INTERVAL_MAX_MS
        );
    }

    #[test]
    fn churn_brings_scans_back_to_the_punctual_interval() {
        assert_eq!(
            next_full_scan_ms(10, &outcome(150_000, 500_000, 100_000)),
            10_000
        );
        // A trickle of late flows is not churn.
        assert_eq!(
            next_full_scan_ms(10, &outcome(150_000, 500_000, 300)),
            50_000
        );
    }

    #[test]
    fn arrivals_beyond_a_percent_of_the_table_call_for_a_scan() {
        assert!(!arrivals_call_for_a_scan(5_000, 500_000));
        assert!(arrivals_call_for_a_scan(5_001, 500_000));
        assert!(
            !arrivals_call_for_a_scan(0, 0),
            "nothing arrived, nothing to scan for"
        );
        assert!(arrivals_call_for_a_scan(1, 0));
    }

    proptest! {
        #[test]
        fn the_interval_stays_within_bounds_and_the_budget(
            punctual in 1u32..=10,
            cost_us in 0u64..100_000_000,
            scanned in 0u64..10_000_000,
            overdue in 0u64..10_000_000,
        ) {
            let ms = next_full_scan_ms(punctual, &outcome(cost_us, scanned, overdue));
            let punctual_ms = u64::from(punctual) * 1000;
            prop_assert!(ms >= punctual_ms);
            prop_assert!(ms <= LAZY_SCAN_INTERVAL_MAX_MS.max(punctual_ms));
            // Below the cap, a stretched interval keeps the scans within budget.
            if ms > punctual_ms && ms < LAZY_SCAN_INTERVAL_MAX_MS {
                prop_assert!(cost_us <= ms * SCAN_BUDGET_PER_MILLE);
            }
        }
    }
}
