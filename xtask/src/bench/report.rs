//! The report of one run: medians and spreads, each figure beside its goal, as JSON, a
//! Markdown table and an SVG plot.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Context as _, Result};
use serde_json::Value;

use super::{goals, mode_name, workload_names, Plan, MODES, WORKLOADS};

/// `samples[workload][mode]`: one figure per repetition.
pub(super) type Samples = BTreeMap<&'static str, BTreeMap<&'static str, Vec<f64>>>;

pub(super) fn serde_json_string(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

fn spread(v: &[f64]) -> f64 {
    let m = median(v);
    if m == 0.0 || v.len() < 2 {
        return 0.0;
    }
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    (hi - lo) / m * 100.0
}

/// A figure per mode, for the plot.
type Metric<'a> = Box<dyn Fn(&str) -> f64 + 'a>;

pub(super) struct Report {
    pub(super) plan: Plan,
    pub(super) samples: Samples,
    /// The floor run's packet rate, one per repetition (with the `pps` workload).
    pub(super) floor: Vec<f64>,
    /// The BPF_PROG_TEST_RUN figures as `bench_micro` writes them; null when not run.
    pub(super) micro: Value,
    /// The scale test's figures (`tests/tests/scale.rs`); null when not run.
    pub(super) scale: Value,
    /// The datapath's `drop_port_exhausted` at the end of each repetition.
    pub(super) exhausted: Vec<u64>,
}

impl Report {
    /// A kept run read back from the `results.json` that [`Report::json`] wrote.
    pub(super) fn from_json(results: &Value) -> Result<Self> {
        let count = |key: &str| {
            results[key]
                .as_u64()
                .with_context(|| format!("no {key:?} in the results"))
        };
        let plan = Plan {
            reps: count("repetitions")? as usize,
            seconds: results["seconds"]
                .as_f64()
                .context("no \"seconds\" in the results")?,
            clients: count("clients")? as usize,
        };
        let figures = |v: &Value| -> Vec<f64> {
            v.as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        let mut samples = Samples::new();
        for workload in workload_names() {
            for mode in MODES.map(mode_name) {
                let runs = figures(&results["modes"][mode][workload]["samples"]);
                if !runs.is_empty() {
                    samples.entry(workload).or_default().insert(mode, runs);
                }
            }
        }
        let exhausted = results["datapath_drop_port_exhausted"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        Ok(Self {
            plan,
            samples,
            floor: figures(&results["floor_pps"]["samples"]),
            micro: results["micro"].clone(),
            scale: results["scale"].clone(),
            exhausted,
        })
    }

    /// Whether this run measured `workload` (not left out by `--only`).
    pub(super) fn ran(&self, workload: &str) -> bool {
        self.samples.contains_key(workload)
    }

    /// The repetitions of one workload in one mode.
    fn runs(&self, workload: &str, mode: &str) -> &[f64] {
        self.samples
            .get(workload)
            .and_then(|m| m.get(mode))
            .map_or(&[], Vec::as_slice)
    }

    pub(super) fn med(&self, workload: &str, mode: &str) -> f64 {
        median(self.runs(workload, mode))
    }

    /// Node cost per packet (ns): 1/rate(mode) - 1/rate(floor).
    pub(super) fn node_cost_ns(&self, mode: &str) -> f64 {
        let (rate, floor) = (self.med("pps", mode), median(&self.floor));
        if rate == 0.0 || floor == 0.0 {
            return 0.0;
        }
        (1.0 / rate - 1.0 / floor) * 1e9
    }

    pub(super) fn json(&self) -> Value {
        let mut modes = serde_json::Map::new();
        for mode in MODES.map(mode_name) {
            let mut m = serde_json::Map::new();
            for w in workload_names() {
                let v = self.runs(w, mode);
                m.insert(w.into(), serde_json::json!({ "samples": v, "median": median(v), "spread_pct": spread(v) }));
            }
            m.insert(
                "node_cost_ns".into(),
                serde_json::json!(self.node_cost_ns(mode)),
            );
            modes.insert(mode.into(), m.into());
        }
        serde_json::json!({
            "repetitions": self.plan.reps, "seconds": self.plan.seconds, "clients": self.plan.clients,
            "floor_pps": { "samples": self.floor, "median": median(&self.floor) },
            "modes": modes, "micro": self.micro, "scale": self.scale, "datapath_drop_port_exhausted": self.exhausted,
            "goals": goals::json(&goals::goals(self)),
        })
    }

    #[allow(clippy::too_many_lines, reason = "one report, row by row")]
    pub(super) fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} repetition(s) of {} s, {} parallel clients; medians, spread = (max-min)/median.\n",
            self.plan.reps, self.plan.seconds, self.plan.clients
        );
        let _ = writeln!(
            s,
            "Goals (issue 17, BENCHMARKS.md):\n\n{}",
            goals::markdown(&goals::goals(self))
        );
        let _ = writeln!(
            s,
            "| workload | plain | iptables | datapath | datapath / iptables | datapath / plain |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- |");
        let row = |s: &mut String,
                   name: &str,
                   f: &dyn Fn(&str) -> f64,
                   unit: &str,
                   lower_is_better: bool| {
            let (p, i, d) = (f("plain"), f("iptables"), f("datapath"));
            if p == 0.0 && i == 0.0 && d == 0.0 {
                return; // not run (`--only`)
            }
            let ratio = |a: f64, b: f64| if b == 0.0 { 0.0 } else { a / b };
            let _ =
                writeln!(
                s,
                "| {name} | {p:.1} {unit} | {i:.1} {unit} | {d:.1} {unit} | {:.2}x{} | {:.2}x |",
                ratio(d, i),
                if lower_is_better { " (lower is better)" } else { "" },
                ratio(d, p)
            );
        };
        row(
            &mut s,
            "node cost per small packet",
            &|m| self.node_cost_ns(m),
            "ns",
            true,
        );
        for (workload, title, unit, divisor) in WORKLOADS {
            row(
                &mut s,
                title,
                &|m| self.med(workload, m) / divisor,
                unit,
                false,
            );
        }
        if !self.floor.is_empty() {
            let _ = writeln!(
                s,
                "\nfloor (sender on the uplink, no forwarding): {:.1} kpps",
                median(&self.floor) / 1e3
            );
        }
        let _ = writeln!(
            s,
            "\ndatapath drop_port_exhausted after each repetition's workloads: {:?}",
            self.exhausted
        );
        let _ = writeln!(s, "\nspread per mode (%):\n");
        for w in workload_names().filter(|w| self.ran(w)) {
            let _ = write!(s, "- {w}:");
            for mode in MODES.map(mode_name) {
                let v = self.runs(w, mode);
                let _ = write!(s, " {mode} {:.0}%", spread(v));
            }
            let _ = writeln!(s);
        }
        if let Some(scale) = self.scale.as_object() {
            let _ = writeln!(
                s,
                "\nScale test (`tests/tests/scale.rs`, release daemon):\n"
            );
            for (k, v) in scale {
                let _ = writeln!(s, "- {k}: {v}");
            }
        }
        if self.micro.is_null() {
            return s; // not run (`--only`)
        }
        let _ = writeln!(s, "\nBPF_PROG_TEST_RUN, ns per packet (interquartile mean of 5,000 single runs, minus the same for a frame passed at the first check):\n");
        let _ = writeln!(s, "| path | ns |\n| --- | --- |");
        if let Some(paths) = self.micro["paths"].as_object() {
            for (path, ns) in paths {
                let _ = writeln!(s, "| {path} | {ns} |");
            }
        }
        if let Some(scale) = self.micro["scale"].as_object() {
            let _ = writeln!(s, "\nScale:\n");
            for (k, v) in scale {
                let _ = writeln!(s, "- {k}: {v}");
            }
        }
        s
    }

    /// Bars of each workload, normalised to iptables = 100.
    pub(super) fn svg(&self) -> String {
        let metrics: [(&str, Metric); 5] = [
            (
                "node cost/packet (lower better)",
                Box::new(|m| self.node_cost_ns(m)),
            ),
            ("packets/s", Box::new(|m| self.med("pps", m))),
            ("new conns/s", Box::new(|m| self.med("tcp_crr", m))),
            ("transactions/s", Box::new(|m| self.med("tcp_rr", m))),
            ("bulk Gbit/s", Box::new(|m| self.med("tcp_bulk", m))),
        ];
        let colors = ["#9e9e9e", "#e4572e", "#2e86ab"];
        let (width, height, group) = (760, 320, 140);
        let mut s = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='11'>\n");
        let _ = writeln!(
            s,
            "<text x='10' y='16' font-size='13'>plain / iptables / datapath, iptables = 100</text>"
        );
        for (gi, (label, f)) in metrics.iter().enumerate() {
            let base = f("iptables").max(f64::MIN_POSITIVE);
            for (mi, mode) in MODES.map(mode_name).iter().enumerate() {
                let v = (f(mode) / base * 100.0).clamp(0.0, 250.0);
                let bar = v * 0.9;
                let x = 20 + gi * group + mi * 36;
                let _ = writeln!(
                    s,
                    "<rect x='{x}' y='{:.0}' width='30' height='{bar:.0}' fill='{}'/><text x='{x}' y='{:.0}'>{v:.0}</text>",
                    280.0 - bar,
                    colors[mi],
                    275.0 - bar
                );
            }
            let _ = writeln!(s, "<text x='{}' y='300'>{label}</text>", 20 + gi * group);
        }
        for (mi, mode) in MODES.map(mode_name).iter().enumerate() {
            let _ = writeln!(s, "<rect x='{}' y='24' width='10' height='10' fill='{}'/><text x='{}' y='33'>{mode}</text>", 400 + mi * 110, colors[mi], 414 + mi * 110);
        }
        s.push_str("</svg>\n");
        s
    }
}
