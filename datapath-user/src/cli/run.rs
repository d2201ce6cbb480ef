//! `datapath-user run`: load, configure, attach, pin; sweep expired flows until signalled.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _};
use aya::programs::TcAttachType;
use clap::ValueEnum;
use datapath_common::{
    config::{Config, PortRandomisation, Timeouts},
    counters::{Counter, Kind},
    ipv4::Cidr,
    maps::{self as names, DEFAULT_FLOW_TABLE_SIZE},
};
use datapath_user::{
    conflist,
    loader::{self, DaemonLock, LoadOptions},
    maps::Maps,
    metrics, migration, netdev,
    sweep::Sweeper,
    Error,
};
use log::{info, warn};

use super::{parse_cidr, PinArgs};

/// Load the datapath, attach it to the uplink and the registered pods, and stay in the
/// foreground. SIGTERM/SIGINT detach the programs and keep the pinned maps, so the next
/// `run` continues with every flow.
///
/// Examples:
///   datapath-user run --uplink eth0
///   datapath-user run --uplink eth0 --node-ip 192.0.2.10 --port-range 20000-29999 \
///       --metrics-addr 127.0.0.1:9465
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct RunArgs {
    /// The node's uplink (primary ENI) interface. Default: the interface of the default
    /// IPv4 route.
    #[arg(long, value_name = "IFACE")]
    uplink: Option<String>,
    /// Address pods are translated to. Default: the uplink's primary IPv4.
    #[arg(long, value_name = "A.B.C.D")]
    node_ip: Option<Ipv4Addr>,
    /// The pods' node-local IPv4 range.
    #[arg(long, default_value = "169.254.172.0/22", value_parser = parse_cidr, value_name = "CIDR")]
    pod_cidr: Cidr,
    /// The pods' gateway in the pod range. Default: the range's first host address.
    #[arg(long, value_name = "A.B.C.D")]
    gateway: Option<Ipv4Addr>,
    /// NAT source ports, inclusive. Default: the larger part of 1024-65535 outside the
    /// kernel's ip_local_port_range, so the node's own sockets never collide with NAT ports.
    #[arg(long, value_parser = parse_port_range, value_name = "LO-HI")]
    port_range: Option<(u16, u16)>,
    /// How the first NAT port of a flow is chosen.
    #[arg(long, value_enum, default_value = "prng")]
    randomisation: Randomisation,
    #[command(flatten)]
    pin: PinArgs,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics.
    #[arg(long, value_name = "HOST:PORT")]
    metrics_addr: Option<SocketAddr>,
    /// Flow-table size (flows). Applies when the maps are created; pinned maps keep theirs.
    #[arg(long, default_value_t = DEFAULT_FLOW_TABLE_SIZE, value_name = "N")]
    flow_table_size: u32,
    /// Seconds between expired-flow sweeps.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    sweep_interval: f64,
    /// Leave the programs attached on exit (zero-gap restarts and upgrades: the next `run`
    /// swaps its programs into the pinned links).
    #[arg(long)]
    keep_attached: bool,
    /// Once ready, derive DIR/05-datapath.conflist from the VPC CNI's conflist in DIR (its
    /// egress-cni entry replaced by datapath-cni) and keep it in step with it.
    #[arg(long, value_name = "DIR")]
    cni_conf_dir: Option<std::path::PathBuf>,
    /// With --cni-conf-dir: first install the datapath-cni binary (beside this one) into DIR.
    #[arg(long, value_name = "DIR", requires = "cni_conf_dir")]
    cni_bin_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    timeouts: TimeoutArgs,
}

/// Flow timeouts in seconds (defaults as nf_conntrack / RFC 5382).
#[derive(clap::Args)]
#[allow(
    clippy::struct_field_names,
    reason = "the fields are the --timeout-* flag names"
)]
struct TimeoutArgs {
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_syn, value_name = "S")]
    timeout_tcp_syn: u32,
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_established, value_name = "S")]
    timeout_tcp_established: u32,
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_closing, value_name = "S")]
    timeout_tcp_closing: u32,
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_rst, value_name = "S")]
    timeout_tcp_rst: u32,
    #[arg(long, default_value_t = Timeouts::DEFAULT.udp_one_way, value_name = "S")]
    timeout_udp: u32,
    #[arg(long, default_value_t = Timeouts::DEFAULT.udp_replied, value_name = "S")]
    timeout_udp_replied: u32,
    #[arg(long, default_value_t = Timeouts::DEFAULT.icmp, value_name = "S")]
    timeout_icmp: u32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Randomisation {
    /// A random start per flow (iptables --random-fully).
    Prng,
    /// A start hashed from the flow tuple (iptables --random).
    Hashrandom,
    /// Keep the pod's port when in range and free.
    None,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a port range (expected LO-HI)"))?;
    let lo: u16 = lo.parse().map_err(|_| format!("{lo:?} is not a port"))?;
    let hi: u16 = hi.parse().map_err(|_| format!("{hi:?} is not a port"))?;
    if lo == 0 || lo > hi {
        return Err(format!("port range {lo}-{hi} is empty or starts at 0"));
    }
    Ok((lo, hi))
}

pub fn execute(args: &RunArgs) -> anyhow::Result<()> {
    let uplink = match &args.uplink {
        Some(name) => name.clone(),
        None => netdev::default_route_interface()?,
    };
    let config = build_config(args, &uplink)?;
    for dir in [&args.cni_conf_dir, &args.cni_bin_dir]
        .into_iter()
        .flatten()
    {
        conflist::check_dir(dir)?;
    }
    let pin_path = args.pin.pin_path.clone();
    let _lock = DaemonLock::acquire(&pin_path)?;
    let mut ebpf = loader::load(&LoadOptions {
        pin_path: pin_path.clone(),
        flow_table_size: args.flow_table_size,
        kernel_checksum_helpers: false,
    })?;
    // Before attaching: what the kernel still translates (iptables pods) stays the kernel's.
    let config = migration::at_start(config, Maps::open(&pin_path).ok().as_ref());
    loader::write_config(&mut ebpf, &config)?;
    loader::pin_from_pod_program(&mut ebpf, &pin_path)?;
    loader::attach(
        loader::program(&mut ebpf, names::PROG_UPLINK_INGRESS)?,
        &uplink,
        TcAttachType::Ingress,
        &pin_path,
        "uplink_ingress",
    )?;
    loader::attach(
        loader::program(&mut ebpf, names::PROG_UPLINK_EGRESS)?,
        &uplink,
        TcAttachType::Egress,
        &pin_path,
        "uplink_egress",
    )?;
    let mut maps = Maps::open(&pin_path)?;
    let pods =
        loader::attach_registered_pods(loader::program(&mut ebpf, names::PROG_FROM_POD)?, &maps)?;
    let flows = maps.conntrack.keys().flatten().count();
    let sweeper = Arc::new(Mutex::new(Sweeper::default()));
    if let Some(addr) = args.metrics_addr {
        metrics::serve(addr, pin_path.clone(), Arc::clone(&sweeper))?;
        info!("metrics on http://{addr}/metrics");
    }
    info!(
        "running: uplink {} node ip {} pods {}/{} ports {}-{} ({:?}); {pods} pods attached, {flows} flows carried over; maps at {}",
        uplink,
        Ipv4Addr::from(config.node_ip),
        Ipv4Addr::from(config.pod_cidr.network),
        config.pod_cidr.prefix_len,
        config.port_min,
        config.port_max,
        config.randomisation(),
        pin_path.display()
    );
    println!("ready");
    let _ = std::io::stdout().flush();
    // The chain goes in only now that the datapath is attached.
    let chain = start_chain(args, &pin_path)?;

    let interval = Duration::from_secs_f64(args.sweep_interval.max(0.05));
    let mut previous = maps.counters().unwrap_or_default();
    let mut migration = migration::Migration::default();
    let signal = wait_for_signal(interval, || {
        let mut sweeper = sweeper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match sweeper.run(&mut maps) {
            Ok(r) if r.expired + r.orphan_bindings > 0 => info!(
                "sweep: {} expired flows and {} orphan bindings removed of {} ({:?})",
                r.expired, r.orphan_bindings, r.scanned, r.duration
            ),
            Ok(_) => {}
            Err(e) => warn!("sweep: {e}"),
        }
        if let Err(e) = migration.update(&mut maps) {
            warn!("migration: {e}");
        }
        if let Ok(current) = maps.counters() {
            log_datapath_events(&previous, &current);
            previous = current;
        }
    })?;
    if let Some(chain) = chain {
        chain.stop();
        // The programs are about to go: hand new pods back to the VPC CNI's chain first.
        if let (false, Some(dir)) = (args.keep_attached, &args.cni_conf_dir) {
            conflist::remove(dir)?;
        }
    }
    if args.keep_attached {
        info!("{signal}: exiting with the programs left attached (--keep-attached)");
    } else {
        let detached = loader::detach_all(&pin_path)?;
        info!(
            "{signal}: detached {detached} programs; pinned maps kept at {}",
            pin_path.display()
        );
    }
    Ok(())
}

/// `--cni-bin-dir`, `--cni-conf-dir`: the plugin installed, then the chain kept in step.
fn start_chain(
    args: &RunArgs,
    pin_path: &std::path::Path,
) -> anyhow::Result<Option<conflist::Watcher>> {
    if let Some(dir) = &args.cni_bin_dir {
        info!("installed {}", conflist::install_plugin(dir)?.display());
    }
    let Some(dir) = &args.cni_conf_dir else {
        return Ok(None);
    };
    let opts = conflist::DeriveOptions {
        pin_path: pin_path.to_path_buf(),
    };
    Ok(Some(conflist::Watcher::start(dir, opts)?))
}

fn build_config(args: &RunArgs, uplink: &str) -> anyhow::Result<Config> {
    netdev::ifindex(uplink)?;
    let addrs = netdev::ipv4_addrs(uplink)?;
    let node_ip = match args.node_ip {
        Some(ip) if addrs.contains(&ip) => ip,
        Some(ip) => {
            return Err(Error::NodeIpNotOnUplink {
                ip,
                iface: uplink.to_string(),
                have: if addrs.is_empty() {
                    "no IPv4".into()
                } else {
                    addrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }
            .into())
        }
        None => *addrs
            .first()
            .ok_or_else(|| Error::NoIpv4(uplink.to_string()))?,
    };
    let cidr = args.pod_cidr;
    if cidr.contains(u32::from(node_ip)) {
        bail!("node IP {node_ip} is inside the pod range");
    }
    let gateway = args.gateway.map_or(cidr.network + 1, u32::from);
    if !cidr.contains(gateway) {
        bail!(
            "gateway {} is outside the pod range",
            Ipv4Addr::from(gateway)
        );
    }
    let (port_min, port_max) = match args.port_range {
        Some(range) => range,
        None => netdev::default_nat_range(netdev::local_port_range()?),
    };
    let t = &args.timeouts;
    Ok(Config {
        node_ip: u32::from(node_ip),
        pod_cidr: cidr,
        gateway_ip: gateway,
        port_min,
        port_max,
        randomisation: match args.randomisation {
            Randomisation::Prng => PortRandomisation::Prng,
            Randomisation::Hashrandom => PortRandomisation::HashRandom,
            Randomisation::None => PortRandomisation::None,
        } as u8,
        flags: 0,
        _pad: [0; 2],
        timeouts: Timeouts {
            tcp_syn: t.timeout_tcp_syn,
            tcp_established: t.timeout_tcp_established,
            tcp_closing: t.timeout_tcp_closing,
            tcp_rst: t.timeout_tcp_rst,
            udp_one_way: t.timeout_udp,
            udp_replied: t.timeout_udp_replied,
            icmp: t.timeout_icmp,
            _pad: 0,
        },
    })
}

/// The datapath's log: what its drop and repair counters did since the last tick (the
/// programs count rather than log per packet, which the fast path could not afford).
fn log_datapath_events(previous: &[(Counter, u64)], current: &[(Counter, u64)]) {
    for ((counter, before), (_, now)) in previous.iter().zip(current) {
        let delta = now.saturating_sub(*before);
        if delta == 0 {
            continue;
        }
        match counter.kind() {
            Kind::Dropped => warn!(
                "datapath: {} +{delta}: {}",
                counter.name(),
                counter.description()
            ),
            Kind::Event if *counter != Counter::FlowCreated => {
                info!(
                    "datapath: {} +{delta}: {}",
                    counter.name(),
                    counter.description()
                );
            }
            _ => {}
        }
    }
}

/// Calls `tick` every `interval` until SIGTERM or SIGINT; returns the signal's name.
fn wait_for_signal(interval: Duration, mut tick: impl FnMut()) -> anyhow::Result<&'static str> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = term.recv() => return Ok("SIGTERM"),
                _ = int.recv() => return Ok("SIGINT"),
                _ = ticker.tick() => tick(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_strictly() {
        assert_eq!(parse_port_range("1024-65535"), Ok((1024, 65535)));
        assert_eq!(parse_port_range("7-7"), Ok((7, 7)));
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("10-9").is_err());
        assert!(parse_port_range("10").is_err());
        assert!(parse_port_range("10-70000").is_err());
    }
}
