//! BPF_PROG_TEST_RUN on the real programs: a private namespace with a pod veth and an uplink
//! (so FIB lookups and socket lookups see real devices), the object loaded with its maps
//! pinned on a private bpffs, and crafted frames run through each program.

use std::{net::Ipv4Addr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result};
use aya::{Ebpf, TestRun as _, TestRunOptions};
use datapath_common::{
    config::{Config, PortRandomisation, Timeouts, DEFAULT_GATEWAY, DEFAULT_POD_CIDR},
    counters::Counter,
    flow::{Binding, Flow, FlowKey, PROTO_TCP},
    maps as names,
    pod::PodInfo,
};
use datapath_user::{
    loader::{self, LoadOptions},
    maps::Maps,
    netdev,
};

use crate::{
    netns::{exec_line, run, within},
    packet::{self, Ipv4Packet, GW_MAC, POD_MAC},
};

pub const NODE_IP: [u8; 4] = [192, 0, 2, 10];
pub const SERVER_IP: [u8; 4] = [192, 0, 2, 20];
pub const FAR_IP: [u8; 4] = [198, 51, 100, 20];
pub const ROUTER_IP: [u8; 4] = [192, 0, 2, 1];
pub const POD_IP: [u8; 4] = [169, 254, 172, 2];
pub const OTHER_POD_IP: [u8; 4] = [169, 254, 172, 3];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x20];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x21];

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

#[derive(Clone, Debug)]
pub struct HarnessOptions {
    pub port_range: (u16, u16),
    pub randomisation: PortRandomisation,
    pub flow_table_size: u32,
    /// Load with the kernel's checksum helpers (the path of kernels before 6.2).
    pub kernel_checksum_helpers: bool,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        Self {
            port_range: (20000, 29999),
            randomisation: PortRandomisation::Prng,
            flow_table_size: 65536,
            kernel_checksum_helpers: false,
        }
    }
}

/// The loaded programs and their maps, used from a thread inside the test namespace.
pub struct Harness {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub pod_ifindex: u32,
    pub other_pod_ifindex: u32,
    pub uplink_ifindex: u32,
    pub config: Config,
    /// The TCP/UDP checksum path the programs were loaded with: `kfunc` or `helpers`.
    pub checksum_path: &'static str,
}

/// Removes the namespace and the bpffs mount.
struct Cleanup {
    ns: String,
    mount: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{:x}{:x}",
        std::process::id() & 0xfffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Builds the namespace, loads the programs, and runs `f` with them.
pub fn with_harness<T: Send + 'static>(
    opts: HarnessOptions,
    f: impl FnOnce(&mut Harness) -> T + Send + 'static,
) -> Result<T> {
    anyhow::ensure!(crate::is_root(), "BPF_PROG_TEST_RUN tests need root");
    let id = unique();
    let cleanup = Cleanup {
        ns: format!("dp-tr-{id}"),
        mount: PathBuf::from(format!("/tmp/dptr-{id}")),
    };
    let ns = cleanup.ns.clone();
    run("ip", &["netns", "add", &ns])?;
    for cmd in [
        "ip link set lo up",
        "ip link add podv type veth peer name podp",
        "ip link add podv2 type veth peer name podp2",
        "ip link add upl type veth peer name uplp",
        "ip link set podv up",
        "ip link set podp up",
        "ip link set podv2 up",
        "ip link set podp2 up",
        "ip link set upl up",
        "ip link set uplp up",
        "ip addr add 169.254.172.1/32 dev podv scope link",
        "ip addr add 169.254.172.1/32 dev podv2 scope link",
        "ip route add 169.254.172.2/32 dev podv scope link",
        "ip route add 169.254.172.3/32 dev podv2 scope link",
        "ip addr add 192.0.2.10/24 dev upl",
        "ip neigh add 192.0.2.20 lladdr 02:00:00:00:00:20 dev upl nud permanent",
        "ip neigh add 192.0.2.1 lladdr 02:00:00:00:00:21 dev upl nud permanent",
        "ip route add default via 192.0.2.1",
        "sysctl -qw net.ipv4.ip_forward=1",
    ] {
        exec_line(&ns, cmd)?;
    }
    std::fs::create_dir_all(&cleanup.mount)?;
    run(
        "mount",
        &[
            "-t",
            "bpf",
            "bpf",
            cleanup.mount.to_str().unwrap_or_default(),
        ],
    )?;
    let pin_path = cleanup.mount.join("pin");
    let result = within(&ns, move || -> Result<T> {
        let mut h = Harness::load(&pin_path, &opts)?;
        Ok(f(&mut h))
    })
    .context("test body")?;
    drop(cleanup);
    result
}

/// What [`Harness::run_cost`] measured, in ns. The kernel reports whole-call times on a
/// coarse grid (10 ns on this machine kind): the interquartile mean (the mean of the middle
/// half) averages over the grid where the median snaps to it, and ignores interrupts and
/// cold starts at either end.
#[derive(Clone, Copy, Debug)]
pub struct RunCost {
    pub median: f64,
    pub interquartile_mean: f64,
}

impl Harness {
    fn load(pin_path: &std::path::Path, opts: &HarnessOptions) -> Result<Self> {
        let mut ebpf = loader::load(&LoadOptions {
            pin_path: pin_path.to_path_buf(),
            flow_table_size: opts.flow_table_size,
            kernel_checksum_helpers: opts.kernel_checksum_helpers,
        })?
        .ebpf;
        let config = Config {
            node_ip: u32::from_be_bytes(NODE_IP),
            pod_cidr: DEFAULT_POD_CIDR,
            gateway_ip: DEFAULT_GATEWAY,
            port_min: opts.port_range.0,
            port_max: opts.port_range.1,
            randomisation: opts.randomisation as u8,
            flags: 0,
            _pad: [0; 2],
            timeouts: Timeouts::DEFAULT,
        };
        loader::write_config(&mut ebpf, &config)?;
        let mut maps = Maps::open(pin_path)?;
        let pod_ifindex = netdev::ifindex("podv")?;
        let other_pod_ifindex = netdev::ifindex("podv2")?;
        maps.pods.insert(
            u32::from_be_bytes(POD_IP),
            PodInfo::new(pod_ifindex, "test/pod"),
            0,
        )?;
        maps.pods.insert(
            u32::from_be_bytes(OTHER_POD_IP),
            PodInfo::new(other_pod_ifindex, "test/other"),
            0,
        )?;
        Ok(Self {
            ebpf,
            maps,
            pod_ifindex,
            other_pod_ifindex,
            uplink_ifindex: netdev::ifindex("upl")?,
            config,
            // What the loader decided: forced helpers, or what this kernel's BTF allows.
            checksum_path: if opts.kernel_checksum_helpers {
                "helpers"
            } else {
                loader::checksum_path()
            },
        })
    }

    /// Runs `program` once on `frame` as if received on `ifindex`; returns the verdict, the
    /// output frame and the kernel's duration.
    pub fn run_timed(
        &mut self,
        program: &str,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<(u32, Vec<u8>, Duration)> {
        self.run_skb(program, frame, ifindex, 0)
    }

    /// [`Harness::run_timed`] on an skb marked as a GSO packet of `gso_size`-byte segments
    /// (0: not GSO), as TCP hands a veth up to 64 KiB at once.
    pub fn run_skb(
        &mut self,
        program: &str,
        frame: &[u8],
        ifindex: u32,
        gso_size: u32,
    ) -> Result<(u32, Vec<u8>, Duration)> {
        let prog = loader::program(&mut self.ebpf, program)?;
        let mut out = vec![0u8; frame.len() + 256];
        // struct __sk_buff: ifindex at byte 40 selects the device the packet arrives on;
        // gso_size is at byte 176.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("test run of {program}"))?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out, result.duration))
    }

    /// The kernel-timed cost of `runs` single runs of `program` on `frame(i)`. Single runs,
    /// because a repeated run would see its own rewritten output.
    pub fn run_cost(
        &mut self,
        program: &str,
        ifindex: u32,
        runs: usize,
        mut frame: impl FnMut(usize) -> Vec<u8>,
    ) -> Result<RunCost> {
        let mut ns = (0..runs)
            .map(|i| Ok(self.run_timed(program, &frame(i), ifindex)?.2.as_nanos() as f64))
            .collect::<Result<Vec<f64>>>()?;
        ns.sort_unstable_by(f64::total_cmp);
        let middle = &ns[ns.len() / 4..ns.len() * 3 / 4];
        Ok(RunCost {
            median: ns[ns.len() / 2],
            interquartile_mean: middle.iter().sum::<f64>() / middle.len() as f64,
        })
    }

    pub fn run(&mut self, program: &str, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
        self.run_timed(program, frame, ifindex)
            .map(|(v, out, _)| (v, out))
    }

    /// Runs the pod-side program on a frame from the test pod.
    pub fn from_pod(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.pod_ifindex;
        self.run(names::PROG_FROM_POD, frame, ifindex)
            .expect("from-pod run")
    }

    /// Runs the uplink-ingress program on a frame from the wire.
    pub fn from_wire(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.uplink_ifindex;
        self.run(names::PROG_UPLINK_INGRESS, frame, ifindex)
            .expect("uplink-ingress run")
    }

    /// Runs the uplink-egress program on a frame leaving the node.
    pub fn to_wire(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.uplink_ifindex;
        self.run(names::PROG_UPLINK_EGRESS, frame, ifindex)
            .expect("uplink-egress run")
    }

    #[must_use]
    pub fn counter(&self, counter: Counter) -> u64 {
        self.maps
            .counters()
            .expect("counters")
            .into_iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, v)| v)
    }

    /// The flow for a pod tuple.
    #[must_use]
    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.maps.conntrack.get(key, 0).ok()
    }

    /// The owner of the binding under reply tuple `reply`.
    #[must_use]
    pub fn binding(&self, reply: &FlowKey) -> Option<FlowKey> {
        self.binding_entry(reply).map(|b| b.owner)
    }

    /// The whole binding under reply tuple `reply` (its reply counters among it).
    #[must_use]
    pub fn binding_entry(&self, reply: &FlowKey) -> Option<Binding> {
        self.maps.bindings.get(reply, 0).ok()
    }

    /// The flow for a pod tuple as `flows` shows it: with the replies its binding counted.
    #[must_use]
    pub fn flow_seen(&self, key: &FlowKey) -> Option<Flow> {
        let flow = self.flow(key)?;
        let reply = key.reply_tuple(flow.nat_ip, flow.nat_port);
        Some(match self.binding_entry(&reply) {
            Some(b) if b.owner == *key => flow.with_replies(&b),
            _ => flow,
        })
    }
}

/// A TCP frame from the test pod to the server's `dport`, with a 5-byte payload.
#[must_use]
pub fn pod_tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    Ipv4Packet::new(
        POD_IP,
        SERVER_IP,
        PROTO_TCP,
        packet::tcp(POD_IP, SERVER_IP, sport, dport, flags, b"hello"),
    )
    .frame(POD_MAC, GW_MAC)
}

/// Host-order address from octets.
#[must_use]
pub fn addr(octets: [u8; 4]) -> u32 {
    u32::from(Ipv4Addr::from(octets))
}
