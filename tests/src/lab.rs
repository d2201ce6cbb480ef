//! A node wired as in production (ARCHITECTURE.md, "The node") in network namespaces:
//!
//! ```text
//!  pod i (v4if0 169.254.172.(i+2)/22) ── vethXi ─┐
//!                                               node (eth0 192.0.2.10/24, FORWARD REJECT)
//!                                                 │ eth0
//!  wire (bridge) ── server 192.0.2.20, other node 192.0.2.11, router 192.0.2.1
//!  router ── 1280-byte MTU link ── far server 198.51.100.20
//! ```
//!
//! Pods are wired by the CNI plugin's code (`datapath_user::cni::wire`), so the lab runs
//! what ships; the rest (wire, server, router, the datapath's daemon) is the lab's own.
//! Namespaces carry a per-lab suffix and are deleted when the `Lab` is dropped (also when a
//! test fails), as are the daemon and the bpffs mount.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use datapath_user::cni::wire;

use crate::netns::{exec, exec_line, run, within};

pub const NODE_IP: &str = "192.0.2.10";
pub const SERVER_IP: &str = "192.0.2.20";
pub const OTHER_NODE_IP: &str = "192.0.2.11";
pub const ROUTER_IP: &str = "192.0.2.1";
pub const FAR_SERVER_IP: &str = "198.51.100.20";
pub const FAR_LINK_MTU: u32 = 1280;
pub const GATEWAY_IP: &str = "169.254.172.1";
/// The pod end of each pod's veth pair: the plugin's default, as egress-v4 names it.
pub const POD_IFNAME: &str = datapath_user::cni::conf::DEFAULT_POD_IFNAME;
/// The pods' prefix: 169.254.172.0/22.
const POD_PREFIX_LEN: u8 = 22;
/// The lab's links are Ethernet-sized (the plugin's default, 9001 bytes, is the VPC's).
const POD_MTU: u32 = 1500;

/// How the node translates pod IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The eBPF datapath (`datapath-user run`).
    Datapath,
    /// The iptables egress-v4 setup: a SNAT chain per pod with --random-fully.
    Iptables,
    /// Plain routing, no NAT: the server routes the pod range back to the node.
    Plain,
}

#[derive(Clone, Debug)]
pub struct LabOptions {
    pub mode: Mode,
    pub pods: usize,
    /// Turn veth checksum offloads and TSO/GSO off (tests that check checksums).
    pub offloads_off: bool,
    /// Extra arguments to `datapath-user run`.
    pub run_args: Vec<String>,
    /// Start the daemon and register the pods (Datapath mode).
    pub start_daemon: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Datapath,
            pods: 2,
            offloads_off: false,
            run_args: Vec::new(),
            start_daemon: true,
        }
    }
}

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    pub ns: String,
    pub ip: String,
    pub host_veth: String,
    pub name: String,
}

pub struct Lab {
    pub id: String,
    pub opts: LabOptions,
    pub node: String,
    pub server: String,
    pub other_node: String,
    pub router: String,
    pub far_server: String,
    wire: String,
    pub pods: Vec<Pod>,
    /// bpffs mount holding the pin path (Datapath mode).
    pub bpf_mount: PathBuf,
    pub pin_path: PathBuf,
    daemon: Option<Child>,
    pub daemon_log: PathBuf,
    namespaces: Vec<String>,
}

fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{n:x}", std::process::id() & 0xfffff)
}

impl Lab {
    /// Builds the lab; on error everything created so far is removed.
    pub fn new(opts: LabOptions) -> Result<Self> {
        if !crate::is_root() {
            bail!("the lab needs root (network namespaces, bpf)");
        }
        let id = unique_id();
        let bpf_mount = PathBuf::from(format!("/tmp/dplab-{id}"));
        let mut lab = Self {
            node: format!("dp-node-{id}"),
            server: format!("dp-srv-{id}"),
            other_node: format!("dp-other-{id}"),
            router: format!("dp-rtr-{id}"),
            far_server: format!("dp-far-{id}"),
            wire: format!("dp-wire-{id}"),
            pods: Vec::new(),
            pin_path: bpf_mount.join("pin"),
            daemon_log: bpf_mount.with_extension("log"),
            bpf_mount,
            daemon: None,
            namespaces: Vec::new(),
            id,
            opts,
        };
        lab.build().context("building the lab")?;
        Ok(lab)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        exec(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair between two namespaces, both ends renamed and up.
    fn veth(&self, a_ns: &str, a: &str, b_ns: &str, b: &str) -> Result<()> {
        let (tmp_a, tmp_b) = (format!("t{}a", self.id), format!("t{}b", self.id));
        run(
            "ip",
            &[
                "link", "add", &tmp_a, "netns", a_ns, "type", "veth", "peer", "name", &tmp_b,
                "netns", b_ns,
            ],
        )?;
        for (ns, tmp, dev) in [(a_ns, &tmp_a, a), (b_ns, &tmp_b, b)] {
            exec_line(ns, &format!("ip link set {tmp} name {dev}"))?;
            self.set_offloads(ns, dev)?;
            exec_line(ns, &format!("ip link set {dev} up"))?;
        }
        Ok(())
    }

    /// Checksum offloads and TSO/GSO/GRO off on `dev` when the options ask for it.
    fn set_offloads(&self, ns: &str, dev: &str) -> Result<()> {
        if self.opts.offloads_off {
            exec_line(
                ns,
                &format!("ethtool -K {dev} tx off rx off tso off gso off gro off"),
            )?;
        }
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        let (node, server, other, router, far, wire) = (
            self.node.clone(),
            self.server.clone(),
            self.other_node.clone(),
            self.router.clone(),
            self.far_server.clone(),
            self.wire.clone(),
        );
        for ns in [&node, &server, &other, &router, &far, &wire] {
            self.add_ns(ns)?;
        }
        exec_line(&wire, "ip link add br0 type bridge")?;
        exec_line(&wire, "ip link set br0 up")?;
        for (ns, port, addr) in [
            (&node, "p-node", "192.0.2.10/24"),
            (&server, "p-srv", "192.0.2.20/24"),
            (&other, "p-other", "192.0.2.11/24"),
            (&router, "p-rtr", "192.0.2.1/24"),
        ] {
            self.veth(ns, "eth0", &wire, port)?;
            exec_line(&wire, &format!("ip link set {port} master br0"))?;
            exec_line(ns, &format!("ip addr add {addr} dev eth0"))?;
        }
        // Far side of the router: a 1280-byte link.
        self.veth(&router, "eth1", &far, "eth0")?;
        exec_line(&router, &format!("ip link set eth1 mtu {FAR_LINK_MTU}"))?;
        exec_line(&far, &format!("ip link set eth0 mtu {FAR_LINK_MTU}"))?;
        exec_line(&router, "ip addr add 198.51.100.1/24 dev eth1")?;
        exec_line(&far, "ip addr add 198.51.100.20/24 dev eth0")?;
        // The far server advertises a 1500-byte MSS, as a host behind a smaller tunnel does:
        // senders must learn the 1280-byte path MTU from the router's fragmentation-needed.
        exec_line(&far, "ip route add default via 198.51.100.1 advmss 1460")?;
        exec_line(&router, "sysctl -qw net.ipv4.ip_forward=1")?;
        exec_line(
            &server,
            &format!("ip route add 198.51.100.0/24 via {ROUTER_IP}"),
        )?;
        exec_line(&node, &format!("ip route add default via {ROUTER_IP}"))?;
        exec_line(&node, "sysctl -qw net.ipv4.ip_forward=1")?;
        // The node agent's rule: no pod IPv4 reachable from elsewhere.
        exec_line(
            &node,
            "iptables -I FORWARD 1 -d 169.254.172.0/22 -m conntrack --ctstate NEW -j REJECT",
        )?;
        if self.opts.mode == Mode::Plain {
            exec_line(
                &server,
                &format!("ip route add 169.254.172.0/22 via {NODE_IP}"),
            )?;
            exec_line(
                &router,
                &format!("ip route add 169.254.172.0/22 via {NODE_IP}"),
            )?;
        }
        for i in 0..self.opts.pods {
            self.add_pod(i)?;
        }
        if self.opts.mode == Mode::Datapath {
            std::fs::create_dir_all(&self.bpf_mount)?;
            run(
                "mount",
                &[
                    "-t",
                    "bpf",
                    "bpf",
                    self.bpf_mount.to_str().unwrap_or_default(),
                ],
            )?;
            if self.opts.start_daemon {
                self.start_daemon()?;
                for pod in self.pods.clone() {
                    self.register_pod(&pod)?;
                }
            }
        }
        Ok(())
    }

    fn add_pod(&mut self, i: usize) -> Result<()> {
        let ns = format!("dp-pod{i}-{}", self.id);
        let ip = Ipv4Addr::new(169, 254, 172, u8::try_from(i + 2)?);
        let host_veth = format!("veth{}{i}", self.id);
        self.add_ns(&ns)?;
        // The CNI plugin's own wiring (ARCHITECTURE.md, "The node"), as ADD runs it on a node:
        // from the node's namespace, the pod's given by its nsfs path.
        let (netns, veth) = (format!("/run/netns/{ns}"), host_veth.clone());
        within(&self.node, move || {
            wire::wire_pod(&netns, &veth, POD_IFNAME, POD_MTU, ip, POD_PREFIX_LEN)
        })??;
        self.set_offloads(&self.node, &host_veth)?;
        self.set_offloads(&ns, POD_IFNAME)?;
        let ip = ip.to_string();
        if self.opts.mode == Mode::Iptables {
            let chain = format!("CNI-E4-{}{i}", self.id);
            exec_line(&self.node, &format!("iptables -t nat -N {chain}"))?;
            exec_line(
                &self.node,
                &format!("iptables -t nat -A {chain} -d 224.0.0.0/4 -j ACCEPT"),
            )?;
            exec_line(
                &self.node,
                &format!("iptables -t nat -A {chain} -j SNAT --to-source {NODE_IP} --random-fully"),
            )?;
            exec_line(
                &self.node,
                &format!("iptables -t nat -A POSTROUTING -s {ip} -j {chain}"),
            )?;
        }
        self.pods.push(Pod {
            ns,
            ip,
            host_veth,
            name: format!("default/pod-{i}"),
        });
        Ok(())
    }

    /// Gives the node and the server IPv6 addresses on the shared link (2001:db8::10, ::20).
    pub fn add_ipv6(&self) -> Result<()> {
        exec_line(&self.node, "ip -6 addr add 2001:db8::10/64 dev eth0 nodad")?;
        exec_line(
            &self.server,
            "ip -6 addr add 2001:db8::20/64 dev eth0 nodad",
        )?;
        Ok(())
    }

    /// Runs `datapath-user ARGS` in the node namespace.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let bin = crate::datapath_user_bin();
        let mut full = vec![bin.to_str().unwrap_or_default()];
        full.extend_from_slice(args);
        let pin = self.pin_path.to_string_lossy().into_owned();
        full.extend_from_slice(&["--pin-path", &pin]);
        exec(&self.node, &full)
    }

    /// Runs `datapath-user ARGS` (no --pin-path added) and returns its raw output.
    pub fn cli_output(&self, args: &[&str]) -> Result<std::process::Output> {
        let bin = crate::datapath_user_bin();
        let mut full = vec![bin.to_str().unwrap_or_default()];
        full.extend_from_slice(args);
        crate::netns::exec_output(&self.node, &full)
    }

    /// `pod add` for `pod`, whatever its outcome (the raw output).
    pub fn try_register_pod(&self, pod: &Pod) -> Result<std::process::Output> {
        let pin = self.pin_path.to_string_lossy().into_owned();
        self.cli_output(&[
            "pod",
            "add",
            "--ip",
            &pod.ip,
            "--host-veth",
            &pod.host_veth,
            "--name",
            &pod.name,
            "--pin-path",
            &pin,
        ])
    }

    pub fn register_pod(&self, pod: &Pod) -> Result<String> {
        let out = self.try_register_pod(pod)?;
        if !out.status.success() {
            bail!(
                "pod add {} failed ({}): {}",
                pod.ip,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `datapath-user ARGS` in the node as the unprivileged user nobody (no --pin-path
    /// added); its raw output.
    pub fn cli_as_nobody(&self, args: &[&str]) -> Result<std::process::Output> {
        let bin = crate::datapath_user_bin();
        let mut full = vec![
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin.to_str().unwrap_or_default(),
        ];
        full.extend_from_slice(args);
        crate::netns::exec_output(&self.node, &full)
    }

    /// Starts `datapath-user run` in the node and waits for it to report ready.
    pub fn start_daemon(&mut self) -> Result<()> {
        let ready = self.spawn_daemon()?;
        self.wait_ready(&ready, Duration::from_mins(1))
    }

    /// Starts `datapath-user run` in the node without waiting; the receiver gets a message
    /// when the daemon prints `ready`.
    pub fn spawn_daemon(&mut self) -> Result<std::sync::mpsc::Receiver<()>> {
        let bin = crate::datapath_user_bin();
        if !bin.exists() {
            bail!(
                "{} does not exist: build it first (cargo build -p datapath-user)",
                bin.display()
            );
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon_log)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(&bin)
            .args(["run", "--uplink", "eth0", "--pin-path"])
            .arg(&self.pin_path)
            .args(&self.opts.run_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting datapath-user run")?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim() == "ready" {
                    let _ = tx.send(());
                }
            }
        });
        self.daemon = Some(child);
        Ok(rx)
    }

    /// Waits for the `ready` line of a daemon started with [`Lab::spawn_daemon`].
    pub fn wait_ready(
        &self,
        ready: &std::sync::mpsc::Receiver<()>,
        timeout: Duration,
    ) -> Result<()> {
        if ready.recv_timeout(timeout).is_err() {
            let log = std::fs::read_to_string(&self.daemon_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "datapath-user run did not become ready:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// The daemon's pid, while it runs.
    #[must_use]
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Child::id)
    }

    /// Sends `signal` to the daemon and waits for it to exit; returns its exit status.
    pub fn stop_daemon(&mut self, signal: i32) -> Result<Option<std::process::ExitStatus>> {
        let Some(mut child) = self.daemon.take() else {
            return Ok(None);
        };
        // `ip netns exec` execs the program, so the child's pid is the daemon's.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id().cast_signed(), signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("daemon did not exit after signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn daemon_running(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `flows -o json` as parsed JSON.
    pub fn flows(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.cli(&["flows", "-o", "json"])?;
        serde_json::from_str(&out).context("parsing flows JSON")
    }

    /// A datapath counter from `stats -o json`.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let out = self.cli(&["stats", "-o", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["counters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == name))
            .and_then(|c| c["value"].as_u64())
            .with_context(|| format!("counter {name} not found"))
    }

    /// The BPF link pinned at `<pin>/links/<name>`: (link id, program id), or `None` when
    /// nothing is pinned there.
    #[must_use]
    pub fn pinned_link(&self, name: &str) -> Option<(u64, u64)> {
        let path = self.pin_path.join("links").join(name);
        let path = path.to_str()?;
        let out = exec(
            &self.node,
            &["bpftool", "-j", "link", "show", "pinned", path],
        )
        .ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        Some((v["id"].as_u64()?, v["prog_id"].as_u64()?))
    }

    /// Whether the kernel still holds the BPF link `id` (a detached link is gone).
    #[must_use]
    pub fn link_exists(&self, id: u64) -> bool {
        exec(
            &self.node,
            &["bpftool", "link", "show", "id", &id.to_string()],
        )
        .is_ok()
    }

    /// The ifindex of `ifname` in the node namespace.
    pub fn node_ifindex(&self, ifname: &str) -> Result<u32> {
        crate::netns::ifindex_of(&self.node, ifname)
    }

    /// The pod namespace of pod `i`.
    #[must_use]
    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    #[must_use]
    pub fn pin_path(&self) -> &Path {
        &self.pin_path
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.stop_daemon(libc::SIGTERM);
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if self.bpf_mount.exists() {
            let _ = Command::new("umount").arg(&self.bpf_mount).status();
            let _ = std::fs::remove_dir(&self.bpf_mount);
        }
        if std::env::var_os("DATAPATH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_file(&self.daemon_log);
        }
    }
}
