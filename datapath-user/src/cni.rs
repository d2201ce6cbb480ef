//! The CNI plugin (`datapath-cni`), chained after the primary IPv6 plugin in place of the VPC
//! CNI's egress-v4 plugin: it wires the pod's node-local IPv4 exactly as egress-v4 does
//! (`v4if0`, host-local IPAM from 169.254.172.0/22, routes via 169.254.172.1, host veth
//! addressing, MTU) and registers the pod in the datapath instead of writing iptables rules.
//! CNI spec 1.0: ADD, DEL (idempotent, also when the netns is gone), CHECK, VERSION.

use std::{
    collections::HashMap,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{pods, DEFAULT_PIN_PATH};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
const POD_IFNAME: &str = "v4if0";
const DEFAULT_MTU: u32 = 9001;
const DEFAULT_STATE_DIR: &str = "/var/lib/datapath-cni";

/// A CNI error, printed as the spec's error JSON.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
    fn config(details: impl Into<String>) -> Self {
        Self::new(7, "invalid network config", details)
    }
    fn env(details: impl Into<String>) -> Self {
        Self::new(4, "invalid environment variables", details)
    }
    fn io(details: impl Into<String>) -> Self {
        Self::new(5, "I/O failure", details)
    }
    fn datapath(e: &crate::Error) -> Self {
        Self::new(100, "datapath registration failed", e.to_string())
    }

    #[must_use]
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details })
    }
}

type Result<T> = std::result::Result<T, CniError>;

/// The network configuration on stdin.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    /// MTU of v4if0 and the host veth.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// bpffs directory of the datapath's pinned maps.
    #[serde(default)]
    pub pin_path: Option<PathBuf>,
    /// Where the plugin remembers each container's address and veth (for DEL after the netns
    /// is gone).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// IPAM configuration; default host-local over 169.254.172.0/22 from .2.
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let conf: Self = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                6,
                "failed to decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                1,
                "incompatible CNI version",
                format!(
                    "{} (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if conf.mtu.is_some_and(|m| !(576..=65535).contains(&m)) {
            return Err(CniError::config(format!(
                "mtu {} is outside 576-65535",
                conf.mtu.unwrap_or(0)
            )));
        }
        Ok(conf)
    }

    fn pin_path(&self) -> PathBuf {
        self.pin_path
            .clone()
            .unwrap_or_else(|| DEFAULT_PIN_PATH.into())
    }

    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }

    fn ipam(&self) -> Value {
        self.ipam.clone().unwrap_or_else(|| {
            json!({
                "type": "host-local",
                "ranges": [[{ "subnet": "169.254.172.0/22", "rangeStart": "169.254.172.2", "rangeEnd": "169.254.175.254" }]],
                "dataDir": format!("/var/lib/cni/networks/{}-v4", self.name),
            })
        })
    }
}

/// The CNI_* environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: Option<String>,
    pub cni_path: String,
    pub args: HashMap<String, String>,
}

impl Env {
    pub fn from_process() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let command = var("CNI_COMMAND").ok_or_else(|| CniError::env("CNI_COMMAND is not set"))?;
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Self {
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS"),
            cni_path: var("CNI_PATH").unwrap_or_else(|| "/opt/cni/bin".into()),
            command,
            args,
        })
    }

    fn pod_name(&self) -> String {
        match (
            self.args.get("K8S_POD_NAMESPACE"),
            self.args.get("K8S_POD_NAME"),
        ) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => String::new(),
        }
    }

    fn require_container(&self) -> Result<()> {
        if self.container_id.is_empty() {
            return Err(CniError::env("CNI_CONTAINERID is not set"));
        }
        Ok(())
    }
}

/// What the plugin remembers per container.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    ip: Ipv4Addr,
    prefix_len: u8,
    host_veth: String,
    pin_path: PathBuf,
}

/// The host veth's name for a container: `veth` + 11 hex digits of a hash of its ID.
#[must_use]
pub fn host_veth_name(container_id: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("veth{:011x}", h & 0xfff_ffff_ffff)
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| CniError::io(format!("running {program}: {e}")))?;
    if !out.status.success() {
        return Err(CniError::io(format!(
            "`{program} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS` inside the network namespace at `netns`.
fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let net = format!("--net={netns}");
    let mut full = vec![net.as_str(), "ip"];
    full.extend_from_slice(args);
    run("nsenter", &full)
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Runs the IPAM plugin with `command`; returns its parsed output (empty for DEL).
fn ipam(conf: &NetConf, env: &Env, command: &str) -> Result<Value> {
    let ipam = conf.ipam();
    let plugin = ipam["type"]
        .as_str()
        .ok_or_else(|| CniError::config("ipam.type is missing"))?
        .to_string();
    let binary = env
        .cni_path
        .split(':')
        .map(|dir| Path::new(dir).join(&plugin))
        .find(|p| p.exists())
        .ok_or_else(|| {
            CniError::new(
                5,
                "IPAM plugin not found",
                format!("{plugin} in CNI_PATH {}", env.cni_path),
            )
        })?;
    let stdin = json!({ "cniVersion": conf.cni_version, "name": conf.name, "ipam": ipam });
    let mut child = Command::new(&binary)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", env.netns.as_deref().unwrap_or(""))
        .env("CNI_IFNAME", POD_IFNAME)
        .env("CNI_PATH", &env.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CniError::io(format!("running {}: {e}", binary.display())))?;
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.to_string().as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::io(format!("waiting for {}: {e}", binary.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let msg = serde_json::from_str::<Value>(&stdout)
            .ok()
            .and_then(|v| v["msg"].as_str().map(String::from))
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string());
        return Err(CniError::new(5, format!("IPAM {command} failed"), msg));
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout)
        .map_err(|e| CniError::new(6, "IPAM output is not JSON", e.to_string()))
}

/// The pod's IPv4 and prefix from an IPAM result.
fn ipam_address(result: &Value) -> Result<(Ipv4Addr, u8)> {
    let address = result["ips"]
        .as_array()
        .and_then(|ips| ips.iter().find_map(|ip| ip["address"].as_str()))
        .ok_or_else(|| CniError::new(5, "IPAM returned no address", result.to_string()))?;
    let (ip, len) = address
        .split_once('/')
        .ok_or_else(|| CniError::new(5, "IPAM returned a bad address", address.to_string()))?;
    match (ip.parse::<Ipv4Addr>(), len.parse::<u8>()) {
        (Ok(ip), Ok(len)) if len <= 32 => Ok((ip, len)),
        _ => Err(CniError::new(
            5,
            "IPAM returned a bad address",
            address.to_string(),
        )),
    }
}

fn record_path(conf: &NetConf, env: &Env) -> PathBuf {
    conf.state_dir()
        .join(format!("{}-{}", conf.name, env.container_id))
}

fn mac_of(netns: Option<&str>, dev: &str) -> String {
    let out = match netns {
        Some(ns) => ip_in(ns, &["-j", "link", "show", dev]),
        None => run("ip", &["-j", "link", "show", dev]),
    };
    out.ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v[0]["address"].as_str().map(String::from))
        .unwrap_or_default()
}

/// ADD: allocate, wire, register; returns the result to print.
pub fn add(conf: &NetConf, env: &Env) -> Result<Value> {
    env.require_container()?;
    let netns = env
        .netns
        .clone()
        .ok_or_else(|| CniError::env("CNI_NETNS is not set"))?;
    if !Path::new(&netns).exists() {
        return Err(CniError::new(
            3,
            "container network namespace not found",
            netns,
        ));
    }
    let result = ipam(conf, env, "ADD")?;
    let (ip, prefix_len) = ipam_address(&result)?;
    let host_veth = host_veth_name(&env.container_id);
    if let Err(e) = wire(conf, &netns, &host_veth, ip, prefix_len) {
        let _ = run("ip", &["link", "del", &host_veth]);
        let _ = ipam(conf, env, "DEL");
        return Err(e);
    }
    let pin_path = conf.pin_path();
    let ifindex = crate::netdev::ifindex(&host_veth).map_err(|e| CniError::datapath(&e))?;
    if let Err(e) = pods::register(&pin_path, ip, ifindex, &env.pod_name()) {
        let _ = run("ip", &["link", "del", &host_veth]);
        let _ = ipam(conf, env, "DEL");
        return Err(CniError::datapath(&e));
    }
    let record = Record {
        ip,
        prefix_len,
        host_veth: host_veth.clone(),
        pin_path,
    };
    std::fs::create_dir_all(conf.state_dir()).map_err(|e| CniError::io(e.to_string()))?;
    std::fs::write(
        record_path(conf, env),
        serde_json::to_vec(&record).unwrap_or_default(),
    )
    .map_err(|e| CniError::io(e.to_string()))?;

    // The previous plugin's result plus our interfaces and address.
    let mut out = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    out["cniVersion"] = json!(conf.cni_version);
    let mut interfaces = out["interfaces"].as_array().cloned().unwrap_or_default();
    interfaces.push(json!({ "name": host_veth, "mac": mac_of(None, &host_veth) }));
    interfaces.push(
        json!({ "name": POD_IFNAME, "mac": mac_of(Some(&netns), POD_IFNAME), "sandbox": netns }),
    );
    let pod_if_index = interfaces.len() - 1;
    let mut ips = out["ips"].as_array().cloned().unwrap_or_default();
    ips.push(json!({ "address": format!("{ip}/{prefix_len}"), "gateway": gateway(ip, prefix_len).to_string(), "interface": pod_if_index }));
    out["interfaces"] = json!(interfaces);
    out["ips"] = json!(ips);
    Ok(out)
}

/// The pods' gateway: the first address of the range (169.254.172.1).
fn gateway(ip: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = datapath_common::ipv4::mask(prefix_len);
    Ipv4Addr::from((u32::from(ip) & mask) + 1)
}

/// The egress-v4 wiring (design brief, section 1).
fn wire(conf: &NetConf, netns: &str, host_veth: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<()> {
    let mtu = conf.mtu.unwrap_or(DEFAULT_MTU).to_string();
    let gw = gateway(ip, prefix_len).to_string();
    let network = Ipv4Addr::from(u32::from(ip) & datapath_common::ipv4::mask(prefix_len));
    let tmp = format!("dpt{}", &host_veth[4..]);
    run(
        "ip",
        &[
            "link", "add", host_veth, "mtu", &mtu, "type", "veth", "peer", "name", &tmp, "mtu",
            &mtu,
        ],
    )?;
    run("ip", &["link", "set", &tmp, "netns", netns])?;
    ip_in(netns, &["link", "set", &tmp, "name", POD_IFNAME])?;
    ip_in(
        netns,
        &[
            "addr",
            "add",
            &format!("{ip}/{prefix_len}"),
            "dev",
            POD_IFNAME,
            "noprefixroute",
        ],
    )?;
    ip_in(netns, &["link", "set", POD_IFNAME, "up"])?;
    ip_in(
        netns,
        &[
            "route",
            "add",
            &format!("{gw}/32"),
            "dev",
            POD_IFNAME,
            "scope",
            "link",
        ],
    )?;
    ip_in(
        netns,
        &[
            "route",
            "add",
            &format!("{network}/{prefix_len}"),
            "via",
            &gw,
            "dev",
            POD_IFNAME,
        ],
    )?;
    ip_in(
        netns,
        &["route", "add", "default", "via", &gw, "dev", POD_IFNAME],
    )?;
    run(
        "ip",
        &[
            "addr",
            "add",
            &format!("{gw}/32"),
            "dev",
            host_veth,
            "scope",
            "link",
        ],
    )?;
    run("ip", &["link", "set", host_veth, "up"])?;
    run(
        "ip",
        &[
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            host_veth,
            "scope",
            "link",
        ],
    )?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| CniError::io(format!("enabling ip_forward: {e}")))?;
    Ok(())
}

/// DEL: undo everything that is still there; never fails for what is already gone.
pub fn del(conf: &NetConf, env: &Env) -> Result<()> {
    env.require_container()?;
    let path = record_path(conf, env);
    let record: Option<Record> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let host_veth = record.as_ref().map_or_else(
        || host_veth_name(&env.container_id),
        |r| r.host_veth.clone(),
    );
    if link_exists(&host_veth) {
        // Deleting the host end removes the pod end too. The kernel may be removing it
        // already (the netns was just deleted): gone is as good as deleted.
        if let Err(e) = run("ip", &["link", "del", &host_veth]) {
            if link_exists(&host_veth) {
                return Err(e);
            }
        }
    }
    if let Some(record) = &record {
        match pods::unregister(&record.pin_path, record.ip) {
            Ok(_) | Err(crate::Error::NotRunning(_)) => {}
            Err(e) => return Err(CniError::datapath(&e)),
        }
    }
    ipam(conf, env, "DEL")?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// CHECK: the wiring and the registration are as ADD left them.
pub fn check(conf: &NetConf, env: &Env) -> Result<()> {
    env.require_container()?;
    let record: Record = std::fs::read(record_path(conf, env))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| CniError::new(3, "container unknown", env.container_id.clone()))?;
    let ifindex = crate::netdev::ifindex(&record.host_veth)
        .map_err(|_| CniError::io(format!("host veth {} is missing", record.host_veth)))?;
    let maps = crate::maps::Maps::open(&record.pin_path).map_err(|e| CniError::datapath(&e))?;
    match maps.pods.get(&u32::from(record.ip), 0) {
        Ok(pod) if pod.host_ifindex == ifindex => {}
        _ => {
            return Err(CniError::new(
                100,
                "pod not registered in the datapath",
                record.ip.to_string(),
            ))
        }
    }
    if let Some(netns) = &env.netns {
        let addrs = ip_in(netns, &["-4", "-o", "addr", "show", "dev", POD_IFNAME])?;
        if !addrs.contains(&format!("{}/{}", record.ip, record.prefix_len)) {
            return Err(CniError::io(format!(
                "{POD_IFNAME} does not have {}",
                record.ip
            )));
        }
    }
    Ok(())
}

/// VERSION's answer.
#[must_use]
pub fn version() -> Value {
    json!({ "cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_are_stable_and_fit() {
        let a = host_veth_name("abc123");
        assert_eq!(a, host_veth_name("abc123"));
        assert_ne!(a, host_veth_name("abc124"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("veth"));
    }

    #[test]
    fn configs_are_validated() {
        let ok = br#"{"cniVersion":"1.0.0","name":"n","type":"datapath-cni"}"#;
        assert!(NetConf::parse(ok).is_ok());
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, 6);
        let old = br#"{"cniVersion":"0.1.0","name":"n","type":"datapath-cni"}"#;
        assert_eq!(NetConf::parse(old).unwrap_err().code, 1);
        let mtu = br#"{"cniVersion":"1.0.0","name":"n","type":"datapath-cni","mtu":10}"#;
        assert_eq!(NetConf::parse(mtu).unwrap_err().code, 7);
        let missing = br#"{"cniVersion":"1.0.0","type":"datapath-cni"}"#;
        assert_eq!(NetConf::parse(missing).unwrap_err().code, 6);
    }

    #[test]
    fn ipam_results_are_read() {
        let r = json!({"ips": [{"address": "169.254.172.9/22", "gateway": "169.254.172.1"}]});
        assert_eq!(
            ipam_address(&r).unwrap(),
            (Ipv4Addr::new(169, 254, 172, 9), 22)
        );
        assert!(ipam_address(&json!({"ips": []})).is_err());
        assert_eq!(
            gateway(Ipv4Addr::new(169, 254, 173, 9), 22),
            Ipv4Addr::new(169, 254, 172, 1)
        );
    }
}
