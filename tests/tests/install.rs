//! Installing on a node: the daemon owns the CNI chain (`--cni-conf-dir`), finds the uplink
//! by itself, and a node switched from iptables keeps the connections the kernel translates.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use datapath_tests::{
    lab::{Mode, NODE_IP, SERVER_IP},
    netns::{exec_line, run},
    traffic::{self, Server, TcpService},
    Lab, LabOptions,
};
use serde_json::Value;

/// The VPC CNI's template rendered as aws-node does (commit and settings in
/// datapath-user/testdata/README.md).
const AWS_CONFLIST: &str = include_str!("../../datapath-user/testdata/10-aws.conflist");

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// aws-node's way of writing its conflist: a temporary file renamed over it.
fn aws_node_writes(dir: &Path, text: &str) {
    let tmp = dir.join("10-aws.conflist.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("10-aws.conflist")).unwrap();
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn derived(dir: &Path) -> Option<Value> {
    std::fs::read(dir.join("05-datapath.conflist"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

#[test]
fn the_daemon_owns_the_chain_and_keeps_it_in_step() {
    let conf = TempDir::new("cni-conf");
    let bin = TempDir::new("cni-bin");
    aws_node_writes(&conf.0, AWS_CONFLIST);
    let dir = conf.0.to_str().unwrap().to_string();

    // A start that fails installs no chain.
    let mut lab = Lab::new(LabOptions {
        pods: 0,
        start_daemon: false,
        run_args: vec![
            "--cni-conf-dir".into(),
            dir.clone(),
            "--cni-bin-dir".into(),
            bin.0.to_str().unwrap().into(),
        ],
        ..LabOptions::default()
    })
    .unwrap();
    let pin = lab.pin_path.to_str().unwrap().to_string();
    let out = lab
        .cli_output(&[
            "run",
            "--uplink",
            "eth0",
            "--node-ip",
            "203.0.113.9",
            "--pin-path",
            &pin,
            "--cni-conf-dir",
            &dir,
        ])
        .unwrap();
    assert!(!out.status.success());
    assert!(derived(&conf.0).is_none(), "a failed start wrote the chain");

    lab.start_daemon().unwrap();
    wait_for("derived conflist", Duration::from_secs(2), || {
        derived(&conf.0).is_some()
    });
    let chain = derived(&conf.0).unwrap();
    let types: Vec<&str> = chain["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["aws-cni", "datapath-cni", "portmap"]);
    assert_eq!(chain["plugins"][1]["pinPath"], pin);
    assert_eq!(
        chain["plugins"][1]["ipam"]["dataDir"],
        "/run/cni/v6pd/egress-v4-ipam"
    );
    assert_eq!(chain["name"], "aws-cni");
    // The plugin the chain names is installed.
    let plugin = bin.0.join("datapath-cni");
    let version = Command::new(&plugin).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("datapath-cni "));

    // aws-node restarts with POD_MTU=1500: the chain follows within 2 s.
    aws_node_writes(&conf.0, &AWS_CONFLIST.replace("\"9001\"", "\"1500\""));
    let took = wait_for(
        "rewrite after aws-node's rename",
        Duration::from_secs(2),
        || derived(&conf.0).is_some_and(|c| c["plugins"][1]["mtu"] == "1500"),
    );
    eprintln!("derived conflist followed aws-node's rewrite in {took:?}");

    // The daemon's exit leaves the chain, as it leaves the programs; detach removes both.
    lab.stop_daemon(libc::SIGTERM).unwrap();
    assert!(
        derived(&conf.0).is_some(),
        "the daemon's exit removed the chain"
    );
    let out = lab
        .cli_output(&["detach", "--pin-path", &pin, "--cni-conf-dir", &dir])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(derived(&conf.0).is_none(), "detach left the chain");
    assert!(
        conf.0.join("10-aws.conflist").exists(),
        "detach touched aws-node's file"
    );
}

/// Starts `datapath-user run ARGS` in the node; returns the child once it printed `ready`,
/// or its stderr when it exited first.
fn run_daemon(lab: &Lab, args: &[&str]) -> Result<std::process::Child, String> {
    let log = lab.daemon_log.with_extension("extra.log");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.node])
        .arg(datapath_tests::datapath_user_bin())
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.trim() == "ready");
    if ready {
        return Ok(child);
    }
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    Err(text)
}

fn stop(mut child: std::process::Child) {
    // SAFETY: signalling our own child (`ip netns exec` execs the daemon).
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let _ = child.wait();
}

#[test]
fn the_uplink_defaults_to_the_default_route_interface() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        start_daemon: false,
        ..LabOptions::default()
    })
    .unwrap();
    let pin = lab.pin_path.to_str().unwrap().to_string();
    // Name the uplink as Amazon Linux 2023 does.
    exec_line(&lab.node, "ip link set eth0 down").unwrap();
    exec_line(&lab.node, "ip link set eth0 name ens5").unwrap();
    exec_line(&lab.node, "ip link set ens5 up").unwrap();
    exec_line(&lab.node, "ip route replace default via 192.0.2.1 dev ens5").unwrap();
    let daemon = run_daemon(&lab, &["--pin-path", &pin]).expect("run without --uplink");
    let status = lab.cli_output(&["status", "--pin-path", &pin]);
    stop(daemon);
    let log = std::fs::read_to_string(lab.daemon_log.with_extension("extra.log")).unwrap();
    assert!(log.contains("uplink ens5"), "{log}");
    assert!(log.contains(&format!("node ip {NODE_IP}")), "{log}");
    drop(status);

    // No default route: one clear line, nothing attached (the programs the first run left
    // are taken off first).
    lab.cli(&["detach"]).unwrap();
    exec_line(&lab.node, "ip route del default").unwrap();
    let err = run_daemon(&lab, &["--pin-path", &pin]).expect_err("started without a route");
    assert!(err.contains("no default IPv4 route"), "{err}");
    assert!(!lab.pin_path.join("links/uplink_ingress").exists());
}

/// A node running the iptables egress-v4 setup, switched to the datapath with connections
/// open: they survive (the kernel keeps translating them), and new pods go through the
/// datapath.
#[test]
fn switching_from_iptables_keeps_the_kernels_connections() {
    let mut lab = Lab::new(LabOptions {
        mode: Mode::Iptables,
        pods: 2,
        // Every port the kernel's --random-fully may pick is a NAT port of the datapath, so
        // each reply below would be dropped as untracked without the migration rule.
        run_args: vec!["--port-range".into(), "1024-65535".into()],
        ..LabOptions::default()
    })
    .unwrap();
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let old = lab.pod(0).clone();
    let new = lab.pod(1).clone();
    let mut streams: Vec<_> = (0..4)
        .map(|_| traffic::tcp_connect(&old.ns, SERVER_IP, 8080, None).unwrap())
        .collect();
    for s in &mut streams {
        traffic::echo_roundtrip(s, b"before the switch").unwrap();
    }

    // The switch: bpffs, the daemon; the new pod is registered as datapath-cni would.
    std::fs::create_dir_all(&lab.bpf_mount).unwrap();
    run(
        "mount",
        &["-t", "bpf", "bpf", lab.bpf_mount.to_str().unwrap()],
    )
    .unwrap();
    lab.start_daemon().unwrap();
    lab.register_pod(&new).unwrap();

    // The kernel's connections carry on, both ways.
    for s in &mut streams {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        traffic::echo_roundtrip(s, b"after the switch").unwrap();
    }
    // The old pod's new connections are the kernel's too.
    let mut late = traffic::tcp_connect(&old.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut late, b"old pod, new connection").unwrap();
    assert_eq!(lab.counter("drop_untracked_inbound").unwrap(), 0);

    // The new pod's go through the datapath.
    let mut fresh = traffic::tcp_connect(&new.ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut fresh, b"through the datapath").unwrap();
    let flows = lab.flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f["pod_ip"] == new.ip.as_str() && f["dst_port"] == 8080),
        "no datapath flow for the new pod: {flows:?}"
    );
    assert!(
        !flows.iter().any(|f| f["pod_ip"] == old.ip.as_str()),
        "the old pod's flows were taken over: {flows:?}"
    );
    assert!(echo.peer_ips().iter().all(|ip| ip.to_string() == NODE_IP));
    let log = std::fs::read_to_string(&lab.daemon_log).unwrap();
    assert!(log.contains("migration:"), "{log}");
}
