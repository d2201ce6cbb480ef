//! datapath-cni driven by a real container runtime: podman (Debian's, CNI network backend)
//! runs a container on a network whose conflist chains the ptp plugin (IPv6) with
//! datapath-cni, on the lab node. The container's IPv4 egress leaves as the node IP;
//! `podman rm` takes everything away again.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use datapath_tests::{
    lab::{NODE_IP, SERVER_IP},
    traffic::{Server, TcpService},
    Lab, LabOptions,
};
use serde_json::json;

struct Podman<'a> {
    lab: &'a Lab,
    dir: PathBuf,
}

impl Podman<'_> {
    /// Runs `script` (podman commands as `$P ...`) in the node namespace with podman's own
    /// storage, state and network config. One `ip netns exec` for a whole container life:
    /// the netns podman bind-mounts stays visible only inside that mount namespace. There
    /// cgroup2 is mounted for crun (the private /sys has none).
    fn spawn(&self, script: &str) -> std::process::Child {
        let d = self.dir.display();
        let full = format!(
            "mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup; \
             P='podman --root {d}/root --runroot {d}/run --cgroup-manager cgroupfs \
             --events-backend none'; {script}"
        );
        Command::new("ip")
            .args(["netns", "exec", &self.lab.node, "sh", "-ec", &full])
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman")
    }

    fn run(&self, script: &str) -> Output {
        self.spawn(script).wait_with_output().expect("podman")
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self.run("$P rm -f -t 0 -a");
        let _ = Command::new("umount")
            .arg(self.dir.join("root/overlay"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn leases(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .parse::<std::net::IpAddr>()
                    .is_ok()
            })
            .count()
    })
}

/// podman's configuration for the lab: CNI backend, its own network config directory with
/// a `dpnet` chain (ptp for IPv6, then datapath-cni), datapath-cni and a static busybox as
/// the container's whole root filesystem (no image, no registry).
fn podman_for(lab: &Lab) -> Podman<'_> {
    let dir = PathBuf::from(format!("/tmp/dp-podman-{}", lab.id));
    for sub in ["bin", "net", "rootfs/bin"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    std::fs::copy(
        datapath_tests::datapath_user_bin().with_file_name("datapath-cni"),
        dir.join("bin/datapath-cni"),
    )
    .unwrap();
    // The container: a static busybox, nothing else (no image, no registry).
    std::fs::copy("/bin/busybox", dir.join("rootfs/bin/busybox")).unwrap();
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n\
             network_config_dir = \"{}\"\n",
            dir.join("bin").display(),
            dir.join("net").display()
        ),
    )
    .unwrap();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "dpnet",
        "plugins": [
            { "type": "ptp",
              "ipam": { "type": "host-local", "ranges": [[{ "subnet": "2001:db8:1::/80" }]],
                        "dataDir": dir.join("ipam-v6") } },
            { "type": "datapath-cni", "mtu": "1500", "enabled": "true",
              "pinPath": lab.pin_path, "stateDir": dir.join("state"),
              "ipam": { "type": "host-local", "ranges": [[{ "subnet": "169.254.172.0/22" }]],
                        "routes": [{ "dst": "0.0.0.0/0" }], "dataDir": dir.join("ipam-v4") } }
        ]
    });
    std::fs::write(dir.join("net/dpnet.conflist"), conflist.to_string()).unwrap();

    Podman { lab, dir }
}

#[test]
fn podman_runs_a_container_through_the_chain() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        ..LabOptions::default()
    })
    .unwrap();
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let podman = podman_for(&lab);
    let dir = podman.dir.clone();
    let rootfs = dir.join("rootfs");
    let go = dir.join("remove-now");
    // Start the container, wait for the test's go, then `podman rm` it.
    let mut life = podman.spawn(&format!(
        "$P run -d --name dp-egress --network dpnet --cgroups disabled \
         --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --rootfs {rootfs} \
         /bin/busybox sh -c 'echo podman-egress | /bin/busybox nc -w 2 {SERVER_IP} 8080; \
         /bin/busybox sleep 60'; \
         while [ ! -e {go} ]; do sleep 0.1; done; $P logs dp-egress; $P rm -f -t 0 dp-egress",
        rootfs = rootfs.display(),
        go = go.display(),
    ));
    // The container's IPv4 egress left as the node.
    let start = std::time::Instant::now();
    while echo.peer_ips().is_empty() && start.elapsed() < Duration::from_secs(20) {
        if let Ok(Some(status)) = life.try_wait() {
            let out = life.wait_with_output().unwrap();
            panic!(
                "podman exited early ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        echo.peer_ips(),
        [NODE_IP.parse::<std::net::Ipv4Addr>().unwrap()]
    );
    let pods: serde_json::Value =
        serde_json::from_str(&lab.cli(&["pod", "list", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(pods.as_array().unwrap().len(), 1, "{pods}");
    assert_eq!(leases(&dir.join("ipam-v4/dpnet")), 1);

    // podman rm: DEL through the chain; nothing of the container left in the datapath.
    std::fs::write(&go, "").unwrap();
    let out = life.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "podman: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("podman-egress"),
        "container output: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let pods: serde_json::Value =
        serde_json::from_str(&lab.cli(&["pod", "list", "-o", "json"]).unwrap()).unwrap();
    assert!(
        pods.as_array().unwrap().is_empty(),
        "{pods}; podman said: {stderr}"
    );
    assert_eq!(leases(&dir.join("ipam-v4/dpnet")), 0, "IPv4 lease left");
    let veths = Command::new("ip")
        .args([
            "netns", "exec", &lab.node, "ip", "-o", "link", "show", "type", "veth",
        ])
        .output()
        .unwrap();
    let veths = String::from_utf8_lossy(&veths.stdout);
    assert!(
        !veths
            .lines()
            .any(|l| l.contains(": veth") && !l.contains("eth0")),
        "host veth left: {veths}"
    );
}
