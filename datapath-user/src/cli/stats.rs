//! `datapath-user stats`: counters by verdict, table fill, NAT port usage.

use datapath_user::{maps::Maps, stats};

use super::{output::print_table, Format, PinArgs};

/// Show packet, translation and drop counters (by reason), flow-table fill and the
/// destinations using the most NAT ports.
///
/// Examples:
///   datapath-user stats
///   datapath-user stats -o json
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct StatsArgs {
    /// Output format (wide adds each counter's meaning).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    format: Format,
    /// How many of the busiest destinations (by NAT ports in use) to show.
    #[arg(long, default_value_t = 5, value_name = "N")]
    top: usize,
    #[command(flatten)]
    pin: PinArgs,
}

pub fn execute(args: &StatsArgs) -> anyhow::Result<()> {
    let maps = Maps::open(&args.pin.pin_path)?;
    super::warn_if_no_daemon(&args.pin.pin_path);
    let s = stats::collect(&maps, args.top)?;
    if args.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = s
        .counters
        .iter()
        .map(|c| {
            let mut row = vec![c.name.to_string(), c.kind.to_string(), c.value.to_string()];
            if args.format == Format::Wide {
                row.push(c.description.to_string());
            }
            row
        })
        .collect();
    // Packets for most counters; flows or ports for the events.
    let mut header = vec!["COUNTER", "KIND", "COUNT"];
    if args.format == Format::Wide {
        header.push("MEANING");
    }
    print_table(&header, &rows);
    println!();
    println!(
        "flows: {} of {} ({:.2}%), NAT bindings: {}, pods: {}, NAT ports {}-{}",
        s.flows,
        s.flow_table_capacity,
        s.flow_table_fill_percent,
        s.nat_bindings,
        s.pods,
        s.port_range.0,
        s.port_range.1
    );
    if !s.busiest_destinations.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .busiest_destinations
            .iter()
            .map(|p| {
                vec![
                    p.proto.to_string(),
                    format!("{}:{}", p.dst_ip, p.dst_port),
                    format!("{}/{}", p.ports_in_use, p.ports_available),
                    format!("{:.2}%", p.fill_percent),
                ]
            })
            .collect();
        print_table(&["PROTO", "DESTINATION", "NAT PORTS", "FILL"], &rows);
    }
    Ok(())
}
