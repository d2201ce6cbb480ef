//! The CNI plugin in a real chain: Debian's ptp plugin (IPv6, host-local) as the primary
//! plugin, then `datapath-cni`, run against real namespaces on the lab node.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use datapath_tests::{
    lab::{NODE_IP, SERVER_IP},
    netns::{exec, exec_output, run},
    traffic::{self, Server, TcpService},
    Lab, LabOptions,
};
use serde_json::{json, Value};

const CNI_PATH: &str = "/usr/lib/cni";

struct Chain<'a> {
    lab: &'a Lab,
    pod_ns: String,
    state: PathBuf,
    container: String,
}

impl Chain<'_> {
    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.pod_ns)
    }

    /// Runs `plugin` with `command` in the node namespace; returns (success, stdout JSON).
    fn plugin(&self, plugin: &str, command: &str, conf: &Value) -> (bool, Value) {
        self.plugin_in(plugin, command, conf, CNI_PATH)
    }

    /// As `plugin`, with another CNI_PATH.
    fn plugin_in(
        &self,
        plugin: &str,
        command: &str,
        conf: &Value,
        cni_path: &str,
    ) -> (bool, Value) {
        let binary = if plugin == "datapath-cni" {
            datapath_tests::datapath_user_bin().with_file_name("datapath-cni")
        } else {
            PathBuf::from(CNI_PATH).join(plugin)
        };
        // No PATH: the plugin must not run `ip` or `nsenter` (it does its own netlink).
        let mut child = Command::new("/usr/sbin/ip")
            .args(["netns", "exec", &self.lab.node])
            .arg(&binary)
            .env("PATH", "/nonexistent")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container)
            .env("CNI_NETNS", self.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_path)
            .env(
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        (out.status.success(), value)
    }

    fn primary_conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0", "name": "pods", "type": "ptp",
            "ipam": { "type": "host-local", "ranges": [[{ "subnet": "2001:db8:1::/80" }]],
                      "dataDir": self.state.join("ipam-v6") }
        })
    }

    fn our_conf(&self, prev: Option<&Value>) -> Value {
        let mut conf = json!({
            "cniVersion": "1.0.0", "name": "pods", "type": "datapath-cni", "mtu": 1500,
            "pinPath": self.lab.pin_path, "stateDir": self.state.join("datapath-cni"),
            "ipam": { "type": "host-local",
                      "ranges": [[{ "subnet": "169.254.172.0/22", "rangeStart": "169.254.172.2" }]],
                      "dataDir": self.state.join("ipam-v4") }
        });
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        conf
    }

    /// The whole chain's ADD, as a runtime runs it.
    fn add(&self) -> Value {
        let (ok, primary) = self.plugin("ptp", "ADD", &self.primary_conf());
        assert!(ok, "ptp ADD: {primary}");
        let (ok, result) = self.plugin("datapath-cni", "ADD", &self.our_conf(Some(&primary)));
        assert!(ok, "datapath-cni ADD: {result}");
        result
    }

    fn del(&self) {
        let (ok, out) = self.plugin("datapath-cni", "DEL", &self.our_conf(None));
        assert!(ok, "datapath-cni DEL: {out}");
        let (ok, out) = self.plugin("ptp", "DEL", &self.primary_conf());
        assert!(ok, "ptp DEL: {out}");
    }

    fn registered(&self) -> Vec<Value> {
        let list: Value =
            serde_json::from_str(&self.lab.cli(&["pod", "list", "-o", "json"]).unwrap()).unwrap();
        list.as_array().unwrap().clone()
    }
}

impl Drop for Chain<'_> {
    fn drop(&mut self) {
        if std::path::Path::new(&self.netns_path()).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.pod_ns])
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn chain<'a>(lab: &'a Lab, suffix: &str) -> Chain<'a> {
    let pod_ns = format!("dp-cni{suffix}-{}", lab.id);
    run("ip", &["netns", "add", &pod_ns]).unwrap();
    Chain {
        lab,
        state: PathBuf::from(format!("/tmp/dp-cni-state-{}-{suffix}", lab.id)),
        container: format!("container-{}-{suffix}", lab.id),
        pod_ns,
    }
}

#[test]
fn add_check_del_in_a_real_chain_with_traffic() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        ..LabOptions::default()
    })
    .unwrap();
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let c = chain(&lab, "a");
    let result = c.add();

    // The result carries the primary plugin's IPv6 and our IPv4 on v4if0.
    let ips = result["ips"].as_array().unwrap();
    assert!(ips
        .iter()
        .any(|ip| ip["address"].as_str().unwrap().starts_with("2001:db8:1::")));
    let v4 = ips
        .iter()
        .find(|ip| ip["address"].as_str().unwrap().starts_with("169.254.172."))
        .unwrap();
    assert_eq!(v4["address"], "169.254.172.2/22");
    assert_eq!(v4["gateway"], "169.254.172.1");
    let interfaces = result["interfaces"].as_array().unwrap();
    let pod_if = &interfaces[v4["interface"].as_u64().unwrap() as usize];
    assert_eq!(pod_if["name"], "v4if0");
    assert_eq!(pod_if["sandbox"], c.netns_path());

    // Wiring as egress-v4 does it.
    let routes = exec(&c.pod_ns, &["ip", "-4", "route"]).unwrap();
    assert!(
        routes.contains("default via 169.254.172.1 dev v4if0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.172.0/22 via 169.254.172.1 dev v4if0"),
        "{routes}"
    );
    assert!(exec(&c.pod_ns, &["ip", "link", "show", "v4if0"])
        .unwrap()
        .contains("mtu 1500"));

    // Registered with its name, attached: traffic flows and leaves as the node.
    let pods = c.registered();
    assert_eq!(pods.len(), 1);
    assert_eq!(pods[0]["ip"], "169.254.172.2");
    assert_eq!(pods[0]["name"], "default/web-0");
    let mut stream = traffic::tcp_connect(&c.pod_ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut stream, b"via the CNI plugin").unwrap();
    assert_eq!(
        echo.peer_ips(),
        vec![NODE_IP.parse::<std::net::Ipv4Addr>().unwrap()]
    );
    drop(stream);

    let (ok, out) = c.plugin("datapath-cni", "CHECK", &c.our_conf(Some(&result)));
    assert!(ok, "CHECK: {out}");

    // DEL, then DEL again: both succeed, nothing left.
    c.del();
    assert!(c.registered().is_empty());
    assert!(!exec_output(&c.pod_ns, &["ip", "link", "show", "v4if0"])
        .unwrap()
        .status
        .success());
    c.del();
    let (ok, out) = c.plugin("datapath-cni", "CHECK", &c.our_conf(Some(&result)));
    assert!(!ok && out["code"] == 3, "CHECK after DEL: {out}");
}

#[test]
fn del_after_the_netns_is_gone_leaves_nothing_behind() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        ..LabOptions::default()
    })
    .unwrap();
    let c = chain(&lab, "b");
    c.add();
    let host_veth = datapath_user_host_veth(&c.container);
    assert!(exec_output(&lab.node, &["ip", "link", "show", &host_veth])
        .unwrap()
        .status
        .success());
    run("ip", &["netns", "del", &c.pod_ns]).unwrap();
    c.del();
    assert!(c.registered().is_empty(), "pod still registered");
    assert!(!exec_output(&lab.node, &["ip", "link", "show", &host_veth])
        .unwrap()
        .status
        .success());
    // The IPv4 lease is released (host-local keeps one file per leased address).
    let lease = c.state.join("ipam-v4/pods/169.254.172.2");
    assert!(!lease.exists(), "lease {} left behind", lease.display());
    // And the plugin's own record is gone.
    assert!(std::fs::read_dir(c.state.join("datapath-cni"))
        .unwrap()
        .next()
        .is_none());
}

fn datapath_user_host_veth(container: &str) -> String {
    datapath_user::cni::host_veth_name(container)
}

#[test]
fn bad_input_gets_a_cni_error() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        start_daemon: false,
        ..LabOptions::default()
    })
    .unwrap();
    let c = chain(&lab, "c");
    let cases = [
        (json!("not an object"), 6),
        (
            json!({ "cniVersion": "0.1.0", "name": "pods", "type": "datapath-cni" }),
            1,
        ),
        (
            json!({ "cniVersion": "1.0.0", "name": "pods", "type": "datapath-cni", "mtu": 12 }),
            7,
        ),
    ];
    for (conf, code) in cases {
        let (ok, out) = c.plugin("datapath-cni", "ADD", &conf);
        assert!(!ok, "{conf} was accepted");
        assert_eq!(out["code"], code, "{conf}: {out}");
        assert!(out["msg"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (ok, out) = c.plugin("datapath-cni", "VERSION", &json!({}));
    assert!(ok);
    assert!(out["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.0.0")));
}

/// Files in a host-local data directory that are leases (named by address).
fn leases(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

fn link_exists_in(ns: &str, dev: &str) -> bool {
    exec_output(ns, &["ip", "link", "show", dev])
        .unwrap()
        .status
        .success()
}

#[test]
fn add_while_no_daemon_is_retryable_and_creates_nothing() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        start_daemon: false,
        ..LabOptions::default()
    })
    .unwrap();
    let c = chain(&lab, "d");
    let (ok, primary) = c.plugin("ptp", "ADD", &c.primary_conf());
    assert!(ok, "ptp ADD: {primary}");
    let (ok, out) = c.plugin("datapath-cni", "ADD", &c.our_conf(Some(&primary)));
    assert!(!ok, "ADD without a daemon succeeded: {out}");
    assert_eq!(out["code"], 11, "{out}");
    // Nothing made: no maps, no veth, no lease.
    assert!(
        !lab.pin_path.join("LAYOUT").exists() && !lab.pin_path.join("PODS").exists(),
        "the plugin created maps"
    );
    assert!(!link_exists_in(
        &lab.node,
        &datapath_user_host_veth(&c.container)
    ));
    assert!(!link_exists_in(&c.pod_ns, "v4if0"));
    assert!(leases(&c.state.join("ipam-v4/pods")).is_empty());
}

#[test]
fn repeated_add_answers_as_the_first_and_keeps_the_pod_working() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        ..LabOptions::default()
    })
    .unwrap();
    let echo = Server::tcp(&lab.server, 8080, TcpService::Echo).unwrap();
    let c = chain(&lab, "e");
    let (ok, primary) = c.plugin("ptp", "ADD", &c.primary_conf());
    assert!(ok, "ptp ADD: {primary}");
    let conf = c.our_conf(Some(&primary));
    let (ok, first) = c.plugin("datapath-cni", "ADD", &conf);
    assert!(ok, "first ADD: {first}");
    let (ok, second) = c.plugin("datapath-cni", "ADD", &conf);
    assert!(ok, "repeated ADD: {second}");
    assert_eq!(first["ips"], second["ips"]);
    assert_eq!(first["interfaces"], second["interfaces"]);
    // Still wired, registered, one lease, traffic flows.
    assert_eq!(c.registered().len(), 1);
    assert_eq!(leases(&c.state.join("ipam-v4/pods")).len(), 1);
    let mut stream = traffic::tcp_connect(&c.pod_ns, SERVER_IP, 8080, None).unwrap();
    traffic::echo_roundtrip(&mut stream, b"after a repeated ADD").unwrap();
    drop(stream);
    drop(echo);

    // A host veth of that name that is not ours: the ADD fails and leaves it (and takes no
    // lease).
    let other = Chain {
        lab: &lab,
        pod_ns: c.pod_ns.clone(),
        state: c.state.clone(),
        container: format!("{}-other", c.container),
    };
    let squatter = datapath_user_host_veth(&other.container);
    run(
        "ip",
        &[
            "netns", "exec", &lab.node, "ip", "link", "add", &squatter, "type", "veth", "peer",
            "name", "dpsquat0",
        ],
    )
    .unwrap();
    let (ok, out) = other.plugin("datapath-cni", "ADD", &other.our_conf(Some(&primary)));
    assert!(!ok && out["code"] == 4, "{out}");
    assert!(
        link_exists_in(&lab.node, &squatter),
        "ADD removed a veth it did not make"
    );
    assert_eq!(leases(&c.state.join("ipam-v4/pods")).len(), 1);
    assert_eq!(c.registered().len(), 1);
    std::mem::forget(other);
    c.del();
}

#[test]
fn a_failed_add_rolls_back_only_what_it_made() {
    // The daemon's pod range is a /24: an address IPAM hands out from the rest of the /22 is
    // refused at registration, after IPAM and the wiring.
    let lab = Lab::new(LabOptions {
        pods: 0,
        run_args: vec!["--pod-cidr".into(), "169.254.172.0/24".into()],
        ..LabOptions::default()
    })
    .unwrap();
    let c = chain(&lab, "f");
    let (ok, primary) = c.plugin("ptp", "ADD", &c.primary_conf());
    assert!(ok, "ptp ADD: {primary}");
    let mut conf = c.our_conf(Some(&primary));
    conf["ipam"]["ranges"] =
        json!([[{ "subnet": "169.254.172.0/22", "rangeStart": "169.254.173.2" }]]);
    let (ok, out) = c.plugin("datapath-cni", "ADD", &conf);
    assert!(!ok && out["code"] == 100, "{out}");
    assert!(!link_exists_in(
        &lab.node,
        &datapath_user_host_veth(&c.container)
    ));
    assert!(!link_exists_in(&c.pod_ns, "v4if0"));
    assert!(
        leases(&c.state.join("ipam-v4/pods")).is_empty(),
        "lease kept"
    );
    // The primary plugin's interface is untouched.
    assert!(link_exists_in(&c.pod_ns, "eth0"));
}

#[test]
fn chained_only_versions_and_disabled_entries() {
    let lab = Lab::new(LabOptions {
        pods: 0,
        ..LabOptions::default()
    })
    .unwrap();
    let c = chain(&lab, "g");
    let mut primary_conf = c.primary_conf();
    primary_conf["cniVersion"] = json!("0.3.1");
    let (ok, primary) = c.plugin("ptp", "ADD", &primary_conf);
    assert!(ok, "ptp ADD: {primary}");

    // No prevResult: refused, with a message that says why.
    let (ok, out) = c.plugin("datapath-cni", "ADD", &c.our_conf(None));
    assert!(!ok && out["code"] == 7, "{out}");
    assert!(
        out["details"].as_str().unwrap().contains("prevResult"),
        "{out}"
    );

    // enabled "false" (aws-node's ENABLE_V4_EGRESS=false): prevResult through, nothing wired.
    let mut off = c.our_conf(Some(&primary));
    off["enabled"] = json!("false");
    off["cniVersion"] = json!("0.3.1");
    let (ok, out) = c.plugin("datapath-cni", "ADD", &off);
    assert!(ok, "{out}");
    assert_eq!(out["ips"], primary["ips"]);
    assert!(!link_exists_in(&c.pod_ns, "v4if0"));
    assert!(c.registered().is_empty());

    // 0.3.1 with aws-node's string MTU: every IP says its version; CHECK does not exist.
    let mut conf = c.our_conf(Some(&primary));
    conf["cniVersion"] = json!("0.3.1");
    conf["mtu"] = json!("1400");
    conf["enabled"] = json!("true");
    conf["randomizeSNAT"] = json!("prng");
    conf["nodeIP"] = json!(NODE_IP);
    let (ok, result) = c.plugin("datapath-cni", "ADD", &conf);
    assert!(ok, "{result}");
    assert_eq!(result["cniVersion"], "0.3.1");
    for ip in result["ips"].as_array().unwrap() {
        let want = if ip["address"].as_str().unwrap().contains(':') {
            "6"
        } else {
            "4"
        };
        assert_eq!(ip["version"], want, "{result}");
    }
    assert!(exec(&c.pod_ns, &["ip", "link", "show", "v4if0"])
        .unwrap()
        .contains("mtu 1400"));
    // The lease is keyed by the runtime's CNI_IFNAME, as egress-cni's are.
    let lease = c.state.join("ipam-v4/pods/169.254.172.2");
    assert!(std::fs::read_to_string(&lease).unwrap().contains("eth0"));
    let (ok, out) = c.plugin("datapath-cni", "CHECK", &conf);
    assert!(!ok && out["code"] == 1, "CHECK on 0.3.1: {out}");

    // DEL with no IPAM binary in CNI_PATH still unwires and unregisters.
    let empty = c.state.join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, out) = c.plugin_in("datapath-cni", "DEL", &conf, empty.to_str().unwrap());
    assert!(ok, "DEL without IPAM: {out}");
    assert!(c.registered().is_empty());
    assert!(!link_exists_in(
        &lab.node,
        &datapath_user_host_veth(&c.container)
    ));
    // And a DEL that finds IPAM releases the lease.
    let (ok, out) = c.plugin("datapath-cni", "DEL", &conf);
    assert!(ok, "{out}");
    assert!(!lease.exists());
}
