//! `datapath-user status`: is the datapath serving?

use anyhow::bail;
use datapath_user::health;

use super::{output::print_table, Format, PinArgs};

/// Show whether the datapath serves: a live daemon on the pin path, the uplink programs and
/// every registered pod attached. Exits 0 only then; otherwise non-zero, with one line on
/// stderr naming what is missing (usable as a probe).
///
/// Also shows where each program is attached, the checksum path and attach mode in use, the
/// daemon's pid and uptime, and the flow-table fill.
///
/// Examples:
///   datapath-user status
///   datapath-user status -o json
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// table for people, json for machines (printed whether ready or not).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    format: Format,
    #[command(flatten)]
    pin: PinArgs,
}

pub fn execute(args: &StatusArgs) -> anyhow::Result<()> {
    let status = health::check(&args.pin.pin_path, None)?;
    if args.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_human(&status);
    }
    if !status.ready {
        bail!("not ready: {}", status.summary());
    }
    Ok(())
}

fn print_human(status: &health::Status) {
    println!(
        "datapath at {}: {}",
        status.pin_path.display(),
        if status.ready { "ready" } else { "NOT READY" }
    );
    match &status.daemon {
        Some(d) => println!(
            "daemon: pid {}, up {} s, last sweep {}; {} attachment, {} checksums",
            d.pid,
            d.uptime_s,
            d.heartbeat_age_s
                .map_or_else(|| "unknown".to_string(), |s| format!("{s} s ago")),
            d.attach_mode.as_deref().unwrap_or("unknown"),
            d.checksum_path.as_deref().unwrap_or("unknown"),
        ),
        None => println!("daemon: none (the attached programs keep translating without it)"),
    }
    println!(
        "flows: {} of {} ({:.1}%)",
        status.flows, status.flow_table_capacity, status.flow_table_fill_percent
    );
    let rows: Vec<Vec<String>> = status
        .attachments
        .iter()
        .map(|a| {
            vec![
                a.what.clone(),
                a.interface
                    .clone()
                    .unwrap_or_else(|| format!("ifindex {} (gone)", a.ifindex)),
                if a.attached { "attached" } else { "MISSING" }.to_string(),
            ]
        })
        .collect();
    print_table(&["PROGRAM", "INTERFACE", "STATE"], &rows);
    for problem in &status.problems {
        println!("problem: {problem}");
    }
}
