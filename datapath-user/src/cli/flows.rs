//! `datapath-user flows`: the flow table, per pod.

use std::{
    fmt::Write as _,
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use datapath_common::{
    flow::{PROTO_ICMP, PROTO_TCP, PROTO_UDP},
    ipv4::Cidr,
};
use datapath_user::{
    flows::{self, Filter, FlowRecord, Follower},
    maps::Maps,
};

use super::{
    output::{human_bytes, print_table_with},
    parse_dst, parse_seconds, warn_if_no_daemon, Format, PinArgs,
};

/// List tracked flows: pod, destination, NAT address, state, counters each way.
///
/// Examples:
///   datapath-user flows
///   datapath-user flows --pod default/web-0 --proto tcp
///   datapath-user flows --dst 192.0.2.0/24 -o json
///   datapath-user flows --watch 2
///   datapath-user flows --follow -o json     # open/state/close events, one JSON object a line
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct FlowsArgs {
    /// Output format (json: one array per refresh, or one event object per line with
    /// --follow).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    format: Format,
    /// Only this pod (NAMESPACE/POD, POD or its IPv4).
    #[arg(long, value_name = "NAME|IP")]
    pod: Option<String>,
    /// Only this protocol.
    #[arg(long, ignore_case = true, value_parser = ["tcp", "udp", "icmp"])]
    proto: Option<String>,
    /// Only destinations in this range (a bare address is that one host).
    #[arg(long, value_parser = parse_dst, value_name = "CIDR|IP")]
    dst: Option<Cidr>,
    /// Only flows in this state.
    #[arg(long, ignore_case = true, value_parser = ["syn_sent", "established", "closing", "reset", "unreplied", "replied"])]
    state: Option<String>,
    /// Only flows with this pod, destination or NAT port.
    #[arg(long)]
    port: Option<u16>,
    /// Refresh every SECONDS (2 when given without a value) until interrupted.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2", value_parser = parse_seconds)]
    watch: Option<f64>,
    /// Print flow events (open, state change, close with final counters and duration), each
    /// with its time, as they happen, until interrupted. Events come from comparing
    /// successive reads of the flow table every --interval seconds.
    #[arg(long, conflicts_with = "watch")]
    follow: bool,
    /// Seconds between reads for --follow [default: 0.2].
    #[arg(long, value_name = "SECONDS", requires = "follow", value_parser = parse_seconds)]
    interval: Option<f64>,
    #[command(flatten)]
    pin: PinArgs,
}

const DEFAULT_FOLLOW_INTERVAL: f64 = 0.2;

pub fn execute(args: &FlowsArgs) -> anyhow::Result<()> {
    let filter = Filter {
        pod: args.pod.clone(),
        proto: args
            .proto
            .as_deref()
            .map(|p| match p.to_ascii_lowercase().as_str() {
                "tcp" => PROTO_TCP,
                "udp" => PROTO_UDP,
                _ => PROTO_ICMP,
            }),
        dst: args.dst,
        state: args.state.as_deref().map(str::to_ascii_lowercase),
        port: args.port,
    };
    let maps = Maps::open(&args.pin.pin_path)?;
    warn_if_no_daemon(&args.pin.pin_path);
    if let Some(pod) = &args.pod {
        if !flows::pod_is_registered(&maps, pod)? {
            eprintln!(
                "note: no registered pod is named {pod:?} or has that address (`datapath-user pod list` shows them); flows left by a removed pod still match its address"
            );
        }
    }
    if args.follow {
        return follow(&maps, &filter, args);
    }
    // Clearing the screen is for people: never in JSON nor into a pipe.
    let clear = args.format != Format::Json && std::io::stdout().is_terminal();
    loop {
        let records = flows::collect(&maps, &filter)?;
        if args.watch.is_some() && clear {
            print!("\x1b[2J\x1b[H");
        }
        print_records(&records, args.format)?;
        let n = records.len();
        eprintln!("{n} {}", if n == 1 { "flow" } else { "flows" });
        let Some(seconds) = args.watch else { break };
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs_f64(seconds));
    }
    Ok(())
}

fn follow(maps: &Maps, filter: &Filter, args: &FlowsArgs) -> anyhow::Result<()> {
    let interval = args.interval.unwrap_or(DEFAULT_FOLLOW_INTERVAL);
    let mut follower = Follower::new(flows::collect(maps, filter)?);
    eprintln!("following flow events every {interval}s (Ctrl-C to stop)");
    let stdout = std::io::stdout();
    loop {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let events = follower.step(flows::collect(maps, filter)?);
        let mut out = stdout.lock();
        for e in &events {
            if args.format == Format::Json {
                serde_json::to_writer(&mut out, e)?;
                writeln!(out)?;
            } else {
                let f = &e.flow;
                write!(
                    out,
                    "{} {:<6} {} {} {}:{} -> {}:{} via {}:{} {}",
                    e.time,
                    e.event.to_uppercase(),
                    f.proto,
                    f.pod.as_deref().unwrap_or("-"),
                    f.pod_ip,
                    f.pod_port,
                    f.dst_ip,
                    f.dst_port,
                    f.nat_ip,
                    f.nat_port,
                    f.state
                )?;
                match e.duration_s {
                    Some(d) => writeln!(
                        out,
                        " out {}p/{} in {}p/{} after {d}s",
                        f.packets_out,
                        human_bytes(f.bytes_out),
                        f.packets_in,
                        human_bytes(f.bytes_in)
                    )?,
                    None => writeln!(out)?,
                }
            }
        }
        out.flush()?;
    }
}

fn print_records(records: &[FlowRecord], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Json => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            flows::write_json(records, &mut out)?;
            writeln!(out)?;
        }
        Format::Table | Format::Wide => {
            let wide = format == Format::Wide;
            let mut header = vec![
                "PROTO",
                "POD",
                "POD ADDRESS",
                "DESTINATION",
                "NAT ADDRESS",
                "STATE",
            ];
            header.extend(if wide {
                [
                    "PKTS OUT",
                    "BYTES OUT",
                    "PKTS IN",
                    "BYTES IN",
                    "AGE",
                    "EXPIRES",
                    "IFINDEX",
                ]
                .as_slice()
            } else {
                ["OUT", "IN", "AGE", "EXPIRES"].as_slice()
            });
            print_table_with(&header, records.len(), |i, cells| {
                let r = &records[i];
                let _ = write!(cells[0], "{}", r.proto);
                let _ = write!(cells[1], "{}", r.pod.as_deref().unwrap_or("-"));
                let _ = write!(cells[2], "{}:{}", r.pod_ip, r.pod_port);
                let _ = write!(cells[3], "{}:{}", r.dst_ip, r.dst_port);
                let _ = write!(cells[4], "{}:{}", r.nat_ip, r.nat_port);
                let _ = write!(cells[5], "{}", r.state);
                let _ = if wide {
                    write!(cells[6], "{}", r.packets_out)
                        .and_then(|()| write!(cells[7], "{}", r.bytes_out))
                        .and_then(|()| write!(cells[8], "{}", r.packets_in))
                        .and_then(|()| write!(cells[9], "{}", r.bytes_in))
                        .and_then(|()| write!(cells[10], "{}s", r.age_s))
                        .and_then(|()| write!(cells[11], "{}s", r.expires_s))
                        .and_then(|()| write!(cells[12], "{}", r.ifindex))
                } else {
                    write!(cells[6], "{}p/{}", r.packets_out, human_bytes(r.bytes_out))
                        .and_then(|()| {
                            write!(cells[7], "{}p/{}", r.packets_in, human_bytes(r.bytes_in))
                        })
                        .and_then(|()| write!(cells[8], "{}s", r.age_s))
                        .and_then(|()| write!(cells[9], "{}s", r.expires_s))
                };
            });
        }
    }
    Ok(())
}
