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
    health::{self, DaemonState},
    loader::{self, DaemonLock, LoadOptions},
    maps::Maps,
    metrics, migration, netdev, pods,
    sweep::Sweeper,
    Error,
};
use log::{error, info, warn};

use super::{parse_cidr, parse_seconds, PinArgs};

/// Load the datapath, attach it to the uplink and the registered pods, and stay in the
/// foreground: sweep expired flows, log the datapath's drops, serve metrics.
///
/// Prints `ready` once the uplink programs and every registered pod are attached. When it
/// exits (SIGTERM, SIGINT, a crash) the programs stay attached and keep translating from the
/// pinned maps; the next `run` takes them over atomically. `datapath-user detach` removes them.
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
    /// NAT source ports, inclusive. Default: 1024-65535. The range may overlap the kernel's
    /// ip_local_port_range: the node's own connections are tracked and its sockets checked,
    /// so NAT ports never collide with them.
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
    /// Flow-table size (flows, 1 to 67108864). Applies when the maps are created; pinned
    /// maps keep theirs (a warning says so when they differ).
    #[arg(long, default_value_t = DEFAULT_FLOW_TABLE_SIZE, value_parser = parse_flow_table_size, value_name = "N")]
    flow_table_size: u32,
    /// Seconds between expired-flow sweeps (more than 0, at most 86400).
    #[arg(long, default_value_t = 1.0, value_parser = parse_seconds, value_name = "SECONDS")]
    sweep_interval: f64,
    /// Accepted for compatibility: the programs always stay attached on exit now.
    #[arg(long, hide = true)]
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

/// Flow timeouts in seconds (defaults as nf_conntrack / RFC 5382), each at least 1.
#[derive(clap::Args)]
#[allow(
    clippy::struct_field_names,
    reason = "the fields are the --timeout-* flag names"
)]
struct TimeoutArgs {
    /// Idle seconds before a TCP flow that has only sent its SYN expires.
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_syn, value_parser = parse_timeout, value_name = "S")]
    timeout_tcp_syn: u32,
    /// Idle seconds before an established TCP flow expires.
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_established, value_parser = parse_timeout, value_name = "S")]
    timeout_tcp_established: u32,
    /// Idle seconds before a closing TCP flow (FIN seen, TIME_WAIT) expires.
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_closing, value_parser = parse_timeout, value_name = "S")]
    timeout_tcp_closing: u32,
    /// Idle seconds before a reset TCP flow expires.
    #[arg(long, default_value_t = Timeouts::DEFAULT.tcp_rst, value_parser = parse_timeout, value_name = "S")]
    timeout_tcp_rst: u32,
    /// Idle seconds before a UDP flow with no reply expires.
    #[arg(long, default_value_t = Timeouts::DEFAULT.udp_one_way, value_parser = parse_timeout, value_name = "S")]
    timeout_udp: u32,
    /// Idle seconds before a UDP flow that has seen a reply expires.
    #[arg(long, default_value_t = Timeouts::DEFAULT.udp_replied, value_parser = parse_timeout, value_name = "S")]
    timeout_udp_replied: u32,
    /// Idle seconds before an ICMP echo flow expires.
    #[arg(long, default_value_t = Timeouts::DEFAULT.icmp, value_parser = parse_timeout, value_name = "S")]
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

/// The lowest NAT port: below it listen the node's own services.
const MIN_NAT_PORT: u16 = 1024;
/// Fewer NAT ports than this get a warning: flows to one destination are limited to them.
const FEW_NAT_PORTS: u32 = 1024;
/// The largest flow table accepted (an LRU hash of this many entries is several GiB).
const MAX_FLOW_TABLE_SIZE: u32 = 1 << 26;

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not a port range (expected LO-HI)"))?;
    let lo: u16 = lo.parse().map_err(|_| format!("{lo:?} is not a port"))?;
    let hi: u16 = hi.parse().map_err(|_| format!("{hi:?} is not a port"))?;
    if lo > hi {
        return Err(format!(
            "port range {lo}-{hi} is empty: {lo} is above {hi} (did you mean {hi}-{lo}?)"
        ));
    }
    if lo < MIN_NAT_PORT {
        return Err(format!(
            "port range {lo}-{hi} starts below {MIN_NAT_PORT}, where the node's own services listen; NAT ports start at {MIN_NAT_PORT} or above"
        ));
    }
    Ok((lo, hi))
}

fn parse_flow_table_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of flows"))?;
    if n == 0 || n > MAX_FLOW_TABLE_SIZE {
        return Err(format!(
            "a flow table of {n} flows is out of range (1 to {MAX_FLOW_TABLE_SIZE})"
        ));
    }
    Ok(n)
}

fn parse_timeout(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("a timeout of 0 s would expire every flow at once; use 1 or more".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number of seconds")),
    }
}

pub fn execute(args: &RunArgs) -> anyhow::Result<()> {
    // Everything that can fail without the kernel is checked before anything is attached.
    let (uplink, config) = preflight(args)?;
    let pin_path = args.pin.pin_path.clone();
    let uplink_ifindex = netdev::ifindex(&uplink)?;
    let metrics_listener = args.metrics_addr.map(metrics::bind).transpose()?;
    let mut lock = DaemonLock::acquire(&pin_path)?;
    let loader::Loaded { mut ebpf, upgrade } = loader::load(&LoadOptions {
        pin_path: pin_path.clone(),
        flow_table_size: args.flow_table_size,
        kernel_checksum_helpers: false,
    })?;
    lock.hold_new_maps()?;
    // Before attaching: what the kernel still translates (iptables pods) stays the kernel's.
    let config = migration::at_start(config, Maps::open(&pin_path).ok().as_ref());
    loader::write_config(&mut ebpf, &config)?;
    let mut start = StartAttachments::new(&pin_path);
    start.attach(
        loader::program(&mut ebpf, names::PROG_UPLINK_INGRESS)?,
        &uplink,
        TcAttachType::Ingress,
        loader::UPLINK_INGRESS,
    )?;
    start.attach(
        loader::program(&mut ebpf, names::PROG_UPLINK_EGRESS)?,
        &uplink,
        TcAttachType::Egress,
        loader::UPLINK_EGRESS,
    )?;
    // The old uplink programs are replaced: what they bound meanwhile is carried over.
    if let Some(upgrade) = upgrade {
        if let Err(e) = upgrade.finish() {
            warn!("upgrading the pinned maps: {e}; bindings made during the start may be lost");
        }
    }
    loader::pin_from_pod_program(&mut ebpf, &pin_path)?;
    let maps = Maps::open(&pin_path)?;
    let from_pod = loader::program(&mut ebpf, names::PROG_FROM_POD)?;
    let missing = attach_pods(from_pod, &maps, uplink_ifindex)?;
    // Pods that `pod add` registers from now on attach themselves (the datapath is attached).
    // Past this point the attachments stay, whatever happens to this process.
    start.keep();

    let interval = Duration::from_secs_f64(args.sweep_interval);
    let sweeper = Arc::new(Mutex::new(Sweeper::new(interval)));
    let state = DaemonState {
        pid: std::process::id(),
        started_unix: health::unix_now(),
        heartbeat_unix: health::unix_now(),
        sweep_interval_s: args.sweep_interval,
        uplink: uplink.clone(),
        uplink_ifindex,
        node_ip: Ipv4Addr::from(config.node_ip),
        attach_mode: loader::attach_mode().to_string(),
        checksum_path: loader::checksum_path().to_string(),
    };
    state.publish(&pin_path)?;
    if let Some(listener) = metrics_listener {
        info!(
            "metrics on http://{}/metrics (also /healthz, /readyz)",
            listener.local_addr()?
        );
        metrics::serve(listener, pin_path.clone(), Arc::clone(&sweeper));
    }
    let mut flows = 0;
    maps.for_each_flow(|_, _| flows += 1)?;
    info!(
        "running: uplink {} node ip {} pods {}/{} ports {}-{} ({:?}); {} attachment, {} checksums; {flows} flows carried over; maps at {}",
        uplink,
        Ipv4Addr::from(config.node_ip),
        Ipv4Addr::from(config.pod_cidr.network),
        config.pod_cidr.prefix_len,
        config.port_min,
        config.port_max,
        config.randomisation(),
        state.attach_mode,
        state.checksum_path,
        pin_path.display()
    );
    let mut daemon = Daemon {
        previous: maps.counters().unwrap_or_default(),
        maps,
        sweeper,
        missing: Vec::new(),
        announced_ready: false,
        state,
        pin_path: pin_path.clone(),
        migration: migration::Migration::default(),
        chain: Chain {
            conf_dir: args.cni_conf_dir.clone(),
            bin_dir: args.cni_bin_dir.clone(),
            watcher: None,
        },
    };
    daemon.check_attachments(missing);
    let signal = wait_for_signal(interval, || daemon.tick())?;
    info!(
        "{signal}: exiting; the programs stay attached and keep translating from the maps at {} (`datapath-user detach` removes them)",
        pin_path.display()
    );
    if let Some(state) = DaemonState::file(&pin_path) {
        let _ = std::fs::remove_file(state);
    }
    Ok(())
}

/// The daemon's state between ticks.
struct Daemon {
    maps: Maps,
    sweeper: Arc<Mutex<Sweeper>>,
    previous: Vec<(Counter, u64)>,
    missing: Vec<String>,
    announced_ready: bool,
    state: DaemonState,
    pin_path: std::path::PathBuf,
    migration: migration::Migration,
    chain: Chain,
}

/// `--cni-bin-dir`, `--cni-conf-dir`: installed and kept in step from the first `ready` on.
struct Chain {
    conf_dir: Option<std::path::PathBuf>,
    bin_dir: Option<std::path::PathBuf>,
    watcher: Option<conflist::Watcher>,
}

impl Chain {
    /// The plugin installed, then the chain derived and watched; once. The watcher stops when
    /// the daemon exits and the file stays, as the programs do (`detach --cni-conf-dir`).
    fn start(&mut self, pin_path: &std::path::Path) {
        let Some(conf_dir) = self.conf_dir.take() else {
            return;
        };
        if let Some(bin_dir) = self.bin_dir.take() {
            match conflist::install_plugin(&bin_dir) {
                Ok(path) => info!("installed {}", path.display()),
                Err(e) => error!("CNI chain not installed: {e}"),
            }
        }
        let opts = conflist::DeriveOptions {
            pin_path: pin_path.to_path_buf(),
        };
        match conflist::Watcher::start(&conf_dir, opts) {
            Ok(w) => self.watcher = Some(w),
            Err(e) => error!("CNI chain not installed: {e}"),
        }
    }
}

impl Daemon {
    /// Sweeps, logs what the datapath counted since the last tick, checks the attachments
    /// and publishes the heartbeat.
    fn tick(&mut self) {
        {
            let mut sweeper = self
                .sweeper
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match sweeper.run(&mut self.maps) {
                Ok(r) if r.expired + r.orphan_bindings > 0 => info!(
                    "sweep: {} expired flows and {} stale bindings removed; {} flows due before the next full scan ({:?})",
                    r.expired,
                    r.orphan_bindings,
                    sweeper.due_flows(),
                    r.duration
                ),
                Ok(_) => {}
                Err(e) => warn!("sweep: {e}"),
            }
        }
        if let Err(e) = self.migration.update(&mut self.maps) {
            warn!("migration: {e}");
        }
        if let Ok(current) = self.maps.counters() {
            log_datapath_events(&self.previous, &current);
            self.previous = current;
        }
        // Attachments someone removed under us (`detach --force`, a veth re-created): noticed
        // and reported, not fought over.
        let missing = match health::attachments(
            &self.pin_path,
            &self.maps,
            Some(self.state.uplink_ifindex),
        ) {
            Ok((_, m)) => m,
            Err(e) => vec![e.to_string()],
        };
        self.check_attachments(missing);
        self.state.heartbeat_unix = health::unix_now();
        if let Err(e) = self.state.publish(&self.pin_path) {
            warn!("{e}");
        }
    }

    /// Logs changes in what is missing; prints `ready` the first time nothing is.
    fn check_attachments(&mut self, missing: Vec<String>) {
        if missing != self.missing {
            match (missing.is_empty(), self.announced_ready) {
                (true, true) => info!("every attachment is in place again"),
                (true, false) => {}
                (false, true) => error!("not serving fully: {}", missing.join("; ")),
                (false, false) => warn!("not ready yet: {}", missing.join("; ")),
            }
        }
        if missing.is_empty() && !self.announced_ready {
            println!("ready");
            let _ = std::io::stdout().flush();
            self.announced_ready = true;
            // The chain goes in only now that the datapath is attached.
            self.chain.start(&self.pin_path);
        }
        self.missing = missing;
    }
}

/// Attaches this daemon's pod-side program to every registered pod: swapped into the pod's
/// link when it has one, a new link otherwise (pods registered while the datapath was
/// detached). Forgets pods whose veth is gone (deleted while no CNI DEL could reach us).
/// Returns one line per attachment still missing, the uplink's included.
fn attach_pods(
    prog: &mut aya::programs::SchedClassifier,
    maps: &Maps,
    uplink_ifindex: u32,
) -> anyhow::Result<Vec<String>> {
    // After an upgrade no pod keeps running the previous build's code.
    for (ip, pod) in maps.pods()? {
        if netdev::ifname(pod.host_ifindex).is_none() {
            warn!(
                "pod {ip} ({}): its veth (ifindex {}) is gone; unregistering it",
                pod.name(),
                pod.host_ifindex
            );
            pods::unregister(&maps.path, ip)?;
            continue;
        }
        if let Err(e) = loader::attach_pod(prog, &maps.path, pod.host_ifindex) {
            warn!("pod {ip} ({}): {e}", pod.name());
        }
    }
    let (_, missing) = health::attachments(&maps.path, maps, Some(uplink_ifindex))?;
    Ok(missing)
}

/// The attachments one start created, removed again if the start fails before [`keep`]:
/// attachments a previous daemon left (and this one swapped its programs into) stay.
///
/// [`keep`]: StartAttachments::keep
struct StartAttachments {
    pin_path: std::path::PathBuf,
    created: Vec<&'static str>,
}

impl StartAttachments {
    fn new(pin_path: &std::path::Path) -> Self {
        Self {
            pin_path: pin_path.to_path_buf(),
            created: Vec::new(),
        }
    }

    fn attach(
        &mut self,
        prog: &mut aya::programs::SchedClassifier,
        ifname: &str,
        attach_type: TcAttachType,
        what: &'static str,
    ) -> anyhow::Result<()> {
        let hook = loader::Hook {
            ifname,
            attach_type,
            pin_path: &self.pin_path,
            what,
        };
        if loader::attach(prog, hook)? == loader::Attached::Created {
            self.created.push(what);
        }
        Ok(())
    }

    fn keep(mut self) {
        self.created.clear();
    }
}

impl Drop for StartAttachments {
    fn drop(&mut self) {
        for what in &self.created {
            match loader::detach(&self.pin_path, what) {
                Ok(_) => info!("start failed: removed the {what} attachment it had made"),
                Err(e) => error!("start failed, and removing its {what} attachment failed: {e}"),
            }
        }
    }
}

/// The uplink (default: the default route's interface), the configuration, and the CNI
/// directories checked.
fn preflight(args: &RunArgs) -> anyhow::Result<(String, Config)> {
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
    Ok((uplink, config))
}

/// Checks every flag against the node and the pinned maps and builds the configuration,
/// before anything is mounted, loaded or attached.
fn build_config(args: &RunArgs, uplink: &str) -> anyhow::Result<Config> {
    netdev::ifindex(uplink)?;
    if netdev::is_loopback(uplink)? {
        bail!(
            "--uplink {uplink} is a loopback interface: pods' IPv4 must leave through the node's uplink (the interface of the default IPv4 route)"
        );
    }
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
    if node_ip.is_loopback() || node_ip.is_unspecified() || node_ip.is_multicast() {
        bail!("node IP {node_ip} cannot be a source address on the network; pass --node-ip");
    }
    let cidr = args.pod_cidr;
    let show_cidr = format!("{}/{}", Ipv4Addr::from(cidr.network), cidr.prefix_len);
    if cidr.contains(u32::from(node_ip)) {
        bail!("node IP {node_ip} is inside the pod range {show_cidr}");
    }
    let gateway = args.gateway.map_or(cidr.network + 1, u32::from);
    if let Some(problem) = cidr.gateway_problem(gateway) {
        bail!(
            "gateway {} {problem} ({show_cidr})",
            Ipv4Addr::from(gateway)
        );
    }
    check_pinned_maps(args, cidr, gateway)?;
    let (port_min, port_max) = match args.port_range {
        Some(range) => range,
        None => netdev::DEFAULT_NAT_RANGE,
    };
    let ports = u32::from(port_max - port_min) + 1;
    if ports < FEW_NAT_PORTS {
        warn!(
            "only {ports} NAT ports ({port_min}-{port_max}): at most {ports} flows at a time to one destination"
        );
    }
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

/// What maps pinned by an earlier run say about these flags: registered pods must fit the
/// pod range and not be the gateway; a different flow-table size does not apply.
fn check_pinned_maps(args: &RunArgs, cidr: Cidr, gateway: u32) -> anyhow::Result<()> {
    let pin = &args.pin.pin_path;
    if let Some(capacity) = datapath_user::maps::pinned_flow_capacity(pin) {
        if capacity != args.flow_table_size {
            warn!(
                "the flow table pinned at {} holds {capacity} flows; --flow-table-size {} applies only to new maps (detach and remove the pinned maps to resize; their flows are lost)",
                pin.display(),
                args.flow_table_size
            );
        }
    }
    let pods = match Maps::open(pin) {
        Ok(maps) => maps.pods().unwrap_or_default(),
        Err(Error::LayoutUpgradable(_)) => {
            datapath_user::maps::pods_before_upgrade(pin).unwrap_or_default()
        }
        Err(_) => return Ok(()),
    };
    for (ip, pod) in pods {
        if let Some(problem) = cidr.pod_address_problem(gateway, u32::from(ip)) {
            bail!(
                "registered pod {ip} ({}) does not fit these flags: it {problem} (pod range {}/{}, gateway {}); `datapath-user pod del --ip {ip}` first or choose a --pod-cidr/--gateway that fits",
                if pod.name().is_empty() { "no name" } else { pod.name() },
                Ipv4Addr::from(cidr.network),
                cidr.prefix_len,
                Ipv4Addr::from(gateway)
            );
        }
    }
    Ok(())
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
        assert_eq!(parse_port_range("7000-7000"), Ok((7000, 7000)));
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("1-10").unwrap_err().contains("below 1024"));
        let reversed = parse_port_range("2000-1000").unwrap_err();
        assert!(reversed.contains("did you mean 1000-2000"), "{reversed}");
        assert!(parse_port_range("10").is_err());
        assert!(parse_port_range("10-70000").is_err());
    }

    #[test]
    fn sizes_and_timeouts_refuse_zero() {
        assert!(parse_flow_table_size("0").is_err());
        assert!(parse_flow_table_size("4294967295").is_err());
        assert_eq!(parse_flow_table_size("128"), Ok(128));
        assert!(parse_timeout("0").is_err());
        assert_eq!(parse_timeout("1"), Ok(1));
    }
}
