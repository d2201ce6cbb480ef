//! The goals the datapath's figures are held to (issue 17 and BENCHMARKS.md) and the
//! comparison of a run's figures with them.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::{report::Report, title};

/// The side of a bound a figure has to be on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Bound {
    AtMost(f64),
    Below(f64),
    AtLeast(f64),
}

impl Bound {
    fn holds(self, value: f64) -> bool {
        match self {
            Self::AtMost(bound) => value <= bound,
            Self::Below(bound) => value < bound,
            Self::AtLeast(bound) => value >= bound,
        }
    }

    fn describe(self, unit: Unit) -> String {
        let (sign, bound) = match self {
            Self::AtMost(bound) => ("≤", bound),
            Self::Below(bound) => ("<", bound),
            Self::AtLeast(bound) => ("≥", bound),
        };
        format!("{sign} {}", unit.format(bound))
    }

    fn json(self) -> Value {
        match self {
            Self::AtMost(bound) => json!({ "at_most": bound }),
            Self::Below(bound) => json!({ "below": bound }),
            Self::AtLeast(bound) => json!({ "at_least": bound }),
        }
    }
}

/// What a figure counts, and so how it is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unit {
    /// The datapath's figure over another mode's (or over itself at another scale).
    Ratio,
    Nanoseconds,
    Seconds,
    PercentOfCore,
    Drops,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Self::Ratio => format!("{value:.2}x"),
            Self::Nanoseconds => format!("{value:.0} ns"),
            Self::Seconds => format!("{value:.2} s"),
            Self::PercentOfCore => format!("{value:.2}% of a core"),
            Self::Drops => format!("{value:.0}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Ratio => "ratio",
            Self::Nanoseconds => "ns",
            Self::Seconds => "s",
            Self::PercentOfCore => "% of a core",
            Self::Drops => "drops",
        }
    }
}

/// Where a goal's figure comes from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Figure {
    /// Measured by this run; `None` when its workload was left out (`--only`).
    ThisRun(Option<f64>),
    /// Not a bench workload: the command that measures it.
    MeasuredBy(&'static str),
}

/// A figure against its goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Met,
    Missed,
    NotRun,
    MeasuredElsewhere,
}

/// One figure and the bound it has to meet.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Goal {
    pub(super) name: String,
    pub(super) unit: Unit,
    pub(super) bound: Bound,
    pub(super) figure: Figure,
}

impl Goal {
    pub(super) fn verdict(&self) -> Verdict {
        match self.figure {
            Figure::ThisRun(Some(value)) if self.bound.holds(value) => Verdict::Met,
            Figure::ThisRun(Some(_)) => Verdict::Missed,
            Figure::ThisRun(None) => Verdict::NotRun,
            Figure::MeasuredBy(_) => Verdict::MeasuredElsewhere,
        }
    }

    fn json(&self) -> Value {
        let (value, measured_by) = match self.figure {
            Figure::ThisRun(value) => (value, None),
            Figure::MeasuredBy(command) => (None, Some(command)),
        };
        let met = match self.verdict() {
            Verdict::Met => Some(true),
            Verdict::Missed => Some(false),
            Verdict::NotRun | Verdict::MeasuredElsewhere => None,
        };
        json!({
            "figure": self.name, "value": value, "unit": self.unit.name(),
            "goal": self.bound.describe(self.unit), "bound": self.bound.json(), "met": met,
            "measured_by": measured_by,
        })
    }
}

/// The scale test: `flows` over 1M flows and the daemon's CPU at 500k (BENCHMARKS.md,
/// "Scale" and "Control plane at scale"). Not a bench workload: it needs a release build and
/// about two minutes.
const SCALE_TEST: &str = "cargo build --release -p datapath-user && sudo \
    DATAPATH_USER_BIN=$PWD/target/release/datapath-user cargo test -p datapath-tests \
    --test scale -- --nocapture";

/// Every goal, with this run's figure where the run measures it.
pub(super) fn goals(report: &Report) -> Vec<Goal> {
    let mut goals = workload_goals(report);
    goals.extend(micro_goals(&report.micro));
    goals.extend(scale_test_goals(&report.scale));
    goals
}

/// The goals of the lab workloads, relative to the other modes of the same run.
fn workload_goals(report: &Report) -> Vec<Goal> {
    // The datapath's figure over `mode`'s.
    let versus = |workload: &'static str, mode: &str, bound| Goal {
        name: format!("{}, datapath / {mode}", title(workload)),
        unit: Unit::Ratio,
        bound,
        figure: Figure::ThisRun(
            report
                .ran(workload)
                .then(|| ratio(report.med(workload, "datapath"), report.med(workload, mode)))
                .flatten(),
        ),
    };
    let node_cost = (report.ran("pps") && !report.floor.is_empty())
        .then(|| {
            ratio(
                report.node_cost_ns("datapath"),
                report.node_cost_ns("iptables"),
            )
        })
        .flatten();
    vec![
        Goal {
            name: "node cost per small packet, datapath / iptables".into(),
            unit: Unit::Ratio,
            bound: Bound::AtMost(0.4),
            figure: Figure::ThisRun(node_cost),
        },
        versus("tcp_crr", "iptables", Bound::AtLeast(1.05)),
        versus("tcp_crr", "plain", Bound::AtLeast(1.0)),
        Goal {
            name: "drop_port_exhausted in the datapath runs".into(),
            unit: Unit::Drops,
            bound: Bound::AtMost(0.0),
            figure: Figure::ThisRun(
                report
                    .ran("tcp_crr")
                    .then(|| report.exhausted.iter().sum::<u64>() as f64),
            ),
        },
        versus("tcp_rr", "iptables", Bound::AtLeast(1.10)),
        versus("tcp_bulk", "iptables", Bound::AtLeast(1.0)),
    ]
}

/// The goals of the BPF_PROG_TEST_RUN figures (`micro` as `bench_micro` writes it).
fn micro_goals(micro: &Value) -> Vec<Goal> {
    let path = |key: &str, path: &str, most| Goal {
        name: format!("BPF_PROG_TEST_RUN: {path}"),
        unit: Unit::Nanoseconds,
        bound: Bound::AtMost(most),
        figure: Figure::ThisRun(micro["paths"][key].as_f64()),
    };
    let scale = &micro["scale"];
    // The figure `what` at 1M flows over the same at 1k.
    let growth = |what: &str, path: &str| {
        let at = |n: u32| scale[what.replace("{n}", &n.to_string())].as_f64();
        Goal {
            name: format!("BPF_PROG_TEST_RUN: {path} at 1M flows / at 1k flows"),
            unit: Unit::Ratio,
            bound: Bound::AtMost(1.5),
            figure: Figure::ThisRun(
                at(1_000_000)
                    .zip(at(1_000))
                    .and_then(|(large, small)| ratio(large, small)),
            ),
        }
    };
    let drops_at_99_percent = scale.as_object().and_then(|scale| {
        scale
            .iter()
            .find(|(key, _)| key.starts_with("new flow to one destination by fill"))
            .and_then(|(_, by_fill)| by_fill["99%"]["exhaustion_drops"].as_f64())
    });
    vec![
        path("established out", "established flow, pod → wire", 60.0),
        path("reply in", "reply, wire → pod", 70.0),
        growth("established out at {n} flows (ns)", "established flow"),
        growth("reply in at {n} flows (ns)", "reply"),
        growth(
            "established out at {n} flows, 512 in turn (ns)",
            "established flows, 512 in turn, 1Mi table (buckets 95% full at 1M)",
        ),
        growth(
            "reply in at {n} flows, 512 in turn (ns)",
            "replies, 512 flows in turn, 1Mi table (buckets 95% full at 1M)",
        ),
        growth(
            "established out at {n} flows in a 2Mi table, 512 in turn (ns)",
            "established flows, 512 in turn, 2Mi table (buckets 48% full at 1M)",
        ),
        growth(
            "reply in at {n} flows in a 2Mi table, 512 in turn (ns)",
            "replies, 512 flows in turn, 2Mi table (buckets 48% full at 1M)",
        ),
        Goal {
            name: "new flows refused with 99% of one destination's NAT ports held (of 200)".into(),
            unit: Unit::Drops,
            bound: Bound::AtMost(0.0),
            figure: Figure::ThisRun(drops_at_99_percent),
        },
    ]
}

/// The goals the scale test measures (`scale` as it writes them; null when the bench left
/// it out, and then the command that measures them is named).
fn scale_test_goals(scale: &Value) -> [Goal; 3] {
    let goal = |name: &str, key: &str, unit, bound| Goal {
        name: name.into(),
        unit,
        bound,
        figure: if scale.is_null() {
            Figure::MeasuredBy(SCALE_TEST)
        } else {
            Figure::ThisRun(scale[key].as_f64())
        },
    };
    [
        goal(
            "`datapath-user flows -o json > FILE` with 1M flows",
            "flows_json_1m_s",
            Unit::Seconds,
            Bound::AtMost(1.0),
        ),
        goal(
            "daemon CPU with 500k live flows",
            "daemon_cpu_500k_live_pct",
            Unit::PercentOfCore,
            Bound::Below(1.0),
        ),
        goal(
            "daemon CPU while 10k flows/s arrive and expire",
            "daemon_cpu_10k_expiring_per_s_pct",
            Unit::PercentOfCore,
            Bound::Below(5.0),
        ),
    ]
}

/// `a / b`, if `b` is a figure to divide by.
fn ratio(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

pub(super) fn json(goals: &[Goal]) -> Value {
    goals.iter().map(Goal::json).collect()
}

/// Each goal beside this run's figure, or beside the command that measures it.
pub(super) fn markdown(goals: &[Goal]) -> String {
    let mut s = String::from("| figure | measured | goal | |\n| --- | --- | --- | --- |\n");
    for goal in goals {
        let measured = match goal.figure {
            Figure::ThisRun(Some(value)) => goal.unit.format(value),
            Figure::ThisRun(None) => continue, // not run (`--only`)
            Figure::MeasuredBy(_) => "by the scale test (below)".into(),
        };
        let verdict = match goal.verdict() {
            Verdict::Met => "met",
            Verdict::Missed => "**missed**",
            Verdict::NotRun | Verdict::MeasuredElsewhere => "",
        };
        let _ = writeln!(
            s,
            "| {} | {measured} | {} | {verdict} |",
            goal.name,
            goal.bound.describe(goal.unit)
        );
    }
    let _ = writeln!(s, "\nThe scale test: `{SCALE_TEST}`");
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{super::report::Samples, super::Plan, *};

    #[test]
    fn bounds_are_inclusive_except_below() {
        assert!(Bound::AtMost(60.0).holds(60.0));
        assert!(!Bound::AtMost(60.0).holds(60.5));
        assert!(Bound::AtLeast(1.05).holds(1.05));
        assert!(!Bound::AtLeast(1.05).holds(1.04));
        assert!(Bound::Below(1.0).holds(0.99));
        assert!(!Bound::Below(1.0).holds(1.0));
    }

    #[test]
    fn a_goal_without_a_figure_is_neither_met_nor_missed() {
        let goal = |figure| Goal {
            name: "x".into(),
            unit: Unit::Nanoseconds,
            bound: Bound::AtMost(60.0),
            figure,
        };
        assert_eq!(goal(Figure::ThisRun(Some(52.0))).verdict(), Verdict::Met);
        assert_eq!(goal(Figure::ThisRun(Some(61.0))).verdict(), Verdict::Missed);
        assert_eq!(goal(Figure::ThisRun(None)).verdict(), Verdict::NotRun);
        assert_eq!(
            goal(Figure::MeasuredBy("cmd")).verdict(),
            Verdict::MeasuredElsewhere
        );
        let json = goal(Figure::ThisRun(None)).json();
        assert!(json["met"].is_null() && json["value"].is_null());
        let json = goal(Figure::ThisRun(Some(61.0))).json();
        assert_eq!(json["met"], false);
        assert_eq!(json["bound"]["at_most"], 60.0);
        assert_eq!(json["goal"], "≤ 60 ns");
    }

    #[test]
    fn ratios_need_a_divisor() {
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
        assert_eq!(ratio(3.0, 0.0), None);
    }

    fn verdicts(goals: &[Goal]) -> Vec<(&str, Verdict)> {
        goals
            .iter()
            .map(|g| (g.name.as_str(), g.verdict()))
            .collect()
    }

    /// A run of `--only tcp_crr,tcp_bulk`: the other goals are not run, not missed.
    fn partial_run() -> Report {
        let mut samples = Samples::new();
        let modes = |plain, iptables, datapath| {
            BTreeMap::from([
                ("plain", plain),
                ("iptables", iptables),
                ("datapath", datapath),
            ])
        };
        samples.insert(
            "tcp_crr",
            modes(
                vec![20.0, 21.0, 22.0],
                vec![19.0, 20.0],
                vec![21.0, 22.0, 21.5],
            ),
        );
        samples.insert("tcp_bulk", modes(vec![15.0], vec![14.0], vec![13.9]));
        Report {
            plan: Plan {
                reps: 3,
                seconds: 5.0,
                clients: 4,
            },
            samples,
            floor: Vec::new(),
            micro: Value::Null,
            scale: Value::Null,
            exhausted: vec![0, 2, 0],
        }
    }

    #[test]
    fn each_workload_is_compared_with_its_goal() {
        let goals = goals(&partial_run());
        let by_name = |name: &str| goals.iter().find(|g| g.name == name).unwrap().clone();
        let crr = by_name(
            "new TCP connections/s, 4 clients in 1 pod, client closes first, datapath / iptables",
        );
        // Medians: datapath 21.5, iptables 20 (the upper middle of two).
        assert_eq!(crr.figure, Figure::ThisRun(Some(21.5 / 20.0)));
        assert_eq!(crr.verdict(), Verdict::Met);
        let bulk = by_name("TCP bulk (iperf3), datapath / iptables");
        assert_eq!(bulk.verdict(), Verdict::Missed);
        let drops = by_name("drop_port_exhausted in the datapath runs");
        assert_eq!(drops.figure, Figure::ThisRun(Some(2.0)));
        assert_eq!(drops.verdict(), Verdict::Missed);
        for not_run in [
            "node cost per small packet, datapath / iptables",
            "TCP transactions/s, 4 pods, datapath / iptables",
            "BPF_PROG_TEST_RUN: established flow, pod → wire",
            "BPF_PROG_TEST_RUN: established flow at 1M flows / at 1k flows",
        ] {
            assert_eq!(by_name(not_run).verdict(), Verdict::NotRun, "{not_run}");
        }
    }

    #[test]
    fn the_written_results_carry_each_goal_and_read_back_the_same() {
        let report = partial_run();
        let json = report.json();
        let written = json["goals"].as_array().unwrap();
        assert_eq!(written.len(), goals(&report).len());
        let bulk = written
            .iter()
            .find(|g| g["figure"] == "TCP bulk (iperf3), datapath / iptables")
            .unwrap();
        assert_eq!(bulk["met"], false);
        assert_eq!(bulk["goal"], "≥ 1.00x");
        let read_back = Report::from_json(&json).unwrap();
        assert_eq!(verdicts(&goals(&read_back)), verdicts(&goals(&report)));
    }

    /// The kept reference runs stay readable: every goal their workloads cover has a figure.
    #[test]
    fn the_reference_runs_are_read_back() {
        for (run, measured) in [("results/reference", 18), ("results/reference/churn", 7)] {
            let path = crate::workspace().join(run).join("results.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let report = Report::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
            let goals = goals(&report);
            let with_figure = goals
                .iter()
                .filter(|g| matches!(g.verdict(), Verdict::Met | Verdict::Missed))
                .count();
            assert_eq!(with_figure, measured, "{run}: {:?}", verdicts(&goals));
        }
    }

    #[test]
    fn figures_print_in_their_unit() {
        assert_eq!(Bound::AtLeast(1.05).describe(Unit::Ratio), "≥ 1.05x");
        assert_eq!(
            Bound::Below(1.0).describe(Unit::PercentOfCore),
            "< 1.00% of a core"
        );
        assert_eq!(Unit::Drops.format(0.0), "0");
    }
}
