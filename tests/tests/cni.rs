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
        let binary = if plugin == "datapath-cni" {
            datapath_tests::datapath_user_bin().with_file_name("datapath-cni")
        } else {
            PathBuf::from(CNI_PATH).join(plugin)
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.lab.node])
            .arg(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container)
            .env("CNI_NETNS", self.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", CNI_PATH)
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
