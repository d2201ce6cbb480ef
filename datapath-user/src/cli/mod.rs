//! Command-line interface: one module per subcommand.

mod detach;
mod flows;
mod output;
mod pod;
mod run;
mod stats;
mod status;

use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use datapath_common::ipv4::Cidr;
use datapath_user::DEFAULT_PIN_PATH;

/// eBPF IPv4 egress NAT for pods on IPv6 Kubernetes nodes.
///
/// `run` loads the TC programs and stays in the foreground; `pod`, `flows` and `stats` work
/// from another process while it runs, through the maps pinned under --pin-path.
#[derive(Parser)]
#[command(name = "datapath-user", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(run::RunArgs),
    #[command(subcommand)]
    Pod(pod::PodCommand),
    Flows(flows::FlowsArgs),
    Stats(stats::StatsArgs),
    Detach(detach::DetachArgs),
    Status(status::StatusArgs),
}

pub fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::execute(&args),
        Command::Pod(cmd) => pod::execute(cmd),
        Command::Flows(args) => flows::execute(&args),
        Command::Stats(args) => stats::execute(&args),
        Command::Detach(args) => detach::execute(&args),
        Command::Status(args) => status::execute(&args),
    }
}

/// Where the pinned maps live (shared by every subcommand).
#[derive(clap::Args, Clone)]
struct PinArgs {
    /// bpffs directory holding the pinned maps, programs and links.
    #[arg(long, default_value = DEFAULT_PIN_PATH, value_name = "DIR")]
    pin_path: PathBuf,
}

/// Says on stderr when no daemon serves `pin_path`: nothing sweeps expired flows then, and
/// the counters stand still.
fn warn_if_no_daemon(pin_path: &std::path::Path) {
    if datapath_user::loader::daemon_pid(pin_path).is_none() {
        eprintln!(
            "warning: no `datapath-user run` serves {}: expired flows are not removed (they show 0s to expiry) until one starts",
            pin_path.display()
        );
    }
}

/// A duration in seconds: finite, positive, at most a day.
fn parse_seconds(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !value.is_finite() || value <= 0.0 || value > 86_400.0 {
        return Err(format!(
            "{s} seconds is out of range (more than 0, at most 86400)"
        ));
    }
    Ok(value)
}

/// A destination range: A.B.C.D/LEN, or a bare address meaning just that host.
fn parse_dst(s: &str) -> Result<Cidr, String> {
    match s.parse::<Ipv4Addr>() {
        Ok(addr) => Cidr::new(u32::from(addr), 32).ok_or_else(|| format!("{s:?}: bad address")),
        Err(_) => parse_cidr(s),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON for machines.
    Json,
    /// A table with every column.
    Wide,
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a CIDR (expected A.B.C.D/LEN)"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("prefix length {len:?} is not a number"))?;
    let cidr =
        Cidr::new(u32::from(addr), len).ok_or_else(|| format!("prefix length {len} is over 32"))?;
    if cidr.network != u32::from(addr) {
        return Err(format!(
            "{s} has host bits set (did you mean {}/{len}?)",
            Ipv4Addr::from(cidr.network)
        ));
    }
    Ok(cidr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_strictly() {
        let c = parse_cidr("169.254.172.0/22").unwrap();
        assert_eq!((c.network, c.prefix_len), (0xa9fe_ac00, 22));
        assert!(parse_cidr("169.254.172.1/22")
            .unwrap_err()
            .contains("host bits"));
        assert!(parse_cidr("169.254.172.0").is_err());
        assert!(parse_cidr("169.254.172.0/33").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }

    #[test]
    fn bare_destination_is_one_host() {
        let c = parse_dst("192.0.2.20").unwrap();
        assert_eq!((c.network, c.prefix_len), (0xc000_0214, 32));
        assert_eq!(parse_dst("192.0.2.0/24").unwrap().prefix_len, 24);
        assert!(parse_dst("192.0.2.20/24").is_err());
    }

    #[test]
    fn seconds_are_finite_and_positive() {
        assert_eq!(parse_seconds("0.5"), Ok(0.5));
        for bad in ["inf", "-inf", "NaN", "nan", "-1", "0", "1e9", "x"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
