//! The plugin's network configuration and CNI errors. The configuration accepts every key of
//! the VPC CNI's `egress-cni` entry as aws-node renders it (strings for `mtu`, `enabled`,
//! `randomizeSNAT`, `nodeIP`), so a chain derived from `10-aws.conflist` works unchanged.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::DEFAULT_PIN_PATH;

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The pod-side interface egress-v4 creates.
pub const DEFAULT_POD_IFNAME: &str = "v4if0";
const DEFAULT_MTU: u32 = 9001;
const DEFAULT_STATE_DIR: &str = "/var/lib/datapath-cni";

/// The error codes the plugin returns: those of the CNI spec's well-known codes it uses (the
/// spec reserves 1-99; 2, "unsupported field", is never ours: unknown keys are ignored) and
/// ours from 100.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    /// The runtime retries the ADD later.
    TryAgainLater = 11,
    /// The datapath refused or could not take the pod.
    Datapath = 100,
}

/// A CNI error, printed as the spec's error JSON.
#[derive(Debug, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    #[must_use]
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
    #[must_use]
    pub fn config(details: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidConfig, "invalid network config", details)
    }
    #[must_use]
    pub fn env(details: impl Into<String>) -> Self {
        Self::new(
            ErrorCode::InvalidEnvironment,
            "invalid environment variables",
            details,
        )
    }
    #[must_use]
    pub fn io(details: impl Into<String>) -> Self {
        Self::new(ErrorCode::Io, "I/O failure", details)
    }
    #[must_use]
    pub fn try_again(details: impl Into<String>) -> Self {
        Self::new(
            ErrorCode::TryAgainLater,
            "datapath not running on this node",
            details,
        )
    }
    #[must_use]
    pub fn datapath(e: &crate::Error) -> Self {
        Self::new(
            ErrorCode::Datapath,
            "datapath registration failed",
            e.to_string(),
        )
    }

    #[must_use]
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({ "cniVersion": cni_version, "code": self.code as u32, "msg": self.msg, "details": self.details })
    }
}

pub type Result<T> = std::result::Result<T, CniError>;

/// The network configuration on stdin. Unknown keys (`capabilities`, `runtimeConfig`,
/// `args`, ...) are ignored, as the spec asks.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    /// MTU of the pod interface and the host veth; a number or a string as aws-node writes it.
    #[serde(default, deserialize_with = "string_or_number")]
    pub mtu: Option<u32>,
    /// `"false"` (aws-node's `ENABLE_V4_EGRESS=false`): wire nothing, pass prevResult on.
    #[serde(default = "yes", deserialize_with = "string_or_bool")]
    pub enabled: bool,
    /// egress-cni's SNAT port choice (`prng`, `hashrandom`, `none`); the daemon's
    /// `--randomisation` decides for the datapath, so it is only validated here.
    #[serde(default, rename = "randomizeSNAT")]
    pub randomize_snat: Option<String>,
    /// The node's primary IPv4 as aws-node renders it; empty when it has none.
    #[serde(default, rename = "nodeIP")]
    pub node_ip: Option<String>,
    /// The pod-side interface name (egress-cni's `ifName`); default `v4if0`.
    #[serde(default)]
    pub if_name: Option<String>,
    /// egress-cni's log settings: accepted, unused (errors go to the runtime).
    #[serde(default)]
    pub plugin_log_file: Option<String>,
    #[serde(default)]
    pub plugin_log_level: Option<String>,
    /// bpffs directory of the datapath's pinned maps.
    #[serde(default)]
    pub pin_path: Option<PathBuf>,
    /// Where the plugin remembers each container's address and veth (for DEL after the netns
    /// is gone, and for a repeated ADD).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// IPAM configuration; default host-local over 169.254.172.0/22 from .2.
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn yes() -> bool {
    true
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<u32>, D::Error> {
    use serde::de::Error as _;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| D::Error::custom(format!("mtu {n} is not a whole number"))),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("mtu {s:?} is not a number"))),
        Some(other) => Err(D::Error::custom(format!("mtu {other} is not a number"))),
    }
}

fn string_or_bool<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    use serde::de::Error as _;
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        other => Err(D::Error::custom(format!(
            "enabled {other} is neither \"true\" nor \"false\""
        ))),
    }
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self> {
        let conf: Self = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "failed to decode the network configuration",
                e.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                "incompatible CNI version",
                format!(
                    "{} (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        if let Some(m) = conf.mtu.filter(|m| !(576..=65535).contains(m)) {
            return Err(CniError::config(format!("mtu {m} is outside 576-65535")));
        }
        if let Some(r) = conf.randomize_snat.as_deref() {
            if !["prng", "hashrandom", "none"].contains(&r) {
                return Err(CniError::config(format!(
                    "randomizeSNAT {r:?} is not prng, hashrandom or none"
                )));
            }
        }
        if conf.enabled {
            conf.checked_node_ip()?;
        }
        if let Some(name) = &conf.if_name {
            if name.is_empty() || name.len() >= libc::IF_NAMESIZE || name.contains('/') {
                return Err(CniError::config(format!(
                    "ifName {name:?} is not an interface name"
                )));
            }
        }
        Ok(conf)
    }

    /// `nodeIP` when set: it must be IPv4 (an IPv6 node IP is egress-v6, not ours).
    pub fn checked_node_ip(&self) -> Result<Option<Ipv4Addr>> {
        match self.node_ip.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(s) => match s.parse::<IpAddr>() {
                Ok(IpAddr::V4(ip)) => Ok(Some(ip)),
                Ok(IpAddr::V6(_)) => Err(CniError::config(format!(
                    "nodeIP {s} is IPv6: datapath-cni gives pods IPv4 egress only"
                ))),
                Err(_) => Err(CniError::config(format!("nodeIP {s:?} is not an address"))),
            },
        }
    }

    #[must_use]
    pub fn mtu(&self) -> u32 {
        self.mtu.unwrap_or(DEFAULT_MTU)
    }

    #[must_use]
    pub fn pod_ifname(&self) -> &str {
        self.if_name.as_deref().unwrap_or(DEFAULT_POD_IFNAME)
    }

    #[must_use]
    pub fn pin_path(&self) -> PathBuf {
        self.pin_path
            .clone()
            .unwrap_or_else(|| DEFAULT_PIN_PATH.into())
    }

    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into())
    }

    /// The IPAM section; the default matches aws-node's rendering on IPv6 clusters.
    #[must_use]
    pub fn ipam(&self) -> Value {
        self.ipam.clone().unwrap_or_else(|| {
            json!({
                "type": "host-local",
                "ranges": [[{ "subnet": "169.254.172.0/22" }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": "/run/cni/v6pd/egress-v4-ipam",
            })
        })
    }

    /// CHECK exists from CNI 0.4.0.
    #[must_use]
    pub fn supports_check(&self) -> bool {
        !self.cni_version.starts_with("0.3.")
    }
}

/// The CNI_* environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: Option<String>,
    /// The runtime's interface name (the primary plugin's `eth0`). The IPAM plugin gets it, so
    /// host-local's leases match the ones egress-cni made (it keys them by container and it).
    pub ifname: Option<String>,
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
            ifname: var("CNI_IFNAME"),
            cni_path: var("CNI_PATH").unwrap_or_else(|| "/opt/cni/bin".into()),
            command,
            args,
        })
    }

    #[must_use]
    pub fn pod_name(&self) -> String {
        match (
            self.args.get("K8S_POD_NAMESPACE"),
            self.args.get("K8S_POD_NAME"),
        ) {
            (Some(ns), Some(name)) => format!("{ns}/{name}"),
            _ => String::new(),
        }
    }

    pub fn require_container(&self) -> Result<()> {
        if self.container_id.is_empty() {
            return Err(CniError::env("CNI_CONTAINERID is not set"));
        }
        Ok(())
    }

    pub fn require_ifname(&self) -> Result<&str> {
        self.ifname
            .as_deref()
            .ok_or_else(|| CniError::env("CNI_IFNAME is not set"))
    }
}

/// Writes `result` in the shape of CNI `version`: before 1.0.0 every IP carries `"version"`
/// ("4"/"6"), from 1.0.0 none does.
pub fn convert_result(result: &mut Value, version: &str) {
    if !result.is_object() {
        *result = json!({});
    }
    result["cniVersion"] = json!(version);
    let legacy = version.starts_with("0.");
    if let Some(ips) = result.get_mut("ips").and_then(Value::as_array_mut) {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            let family = ip.get("address").and_then(Value::as_str).map(|a| {
                if a.contains(':') {
                    "6"
                } else {
                    "4"
                }
            });
            match (legacy, family) {
                (true, Some(f)) => {
                    ip.insert("version".into(), json!(f));
                }
                _ => {
                    ip.remove("version");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf> {
        NetConf::parse(
            format!(r#"{{"cniVersion":"0.4.0","name":"aws-cni","type":"datapath-cni"{extra}}}"#)
                .as_bytes(),
        )
    }

    #[test]
    fn errors_carry_the_spec_s_numeric_codes() {
        let json = CniError::try_again("no daemon").to_json("1.0.0");
        assert_eq!(json["code"], 11);
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(CniError::config("x").to_json("1.0.0")["code"], 7);
    }

    #[test]
    fn configs_are_validated() {
        assert!(conf("").is_ok());
        assert_eq!(
            NetConf::parse(b"{not json").unwrap_err().code,
            ErrorCode::Decode
        );
        let old = br#"{"cniVersion":"0.1.0","name":"n","type":"datapath-cni"}"#;
        assert_eq!(
            NetConf::parse(old).unwrap_err().code,
            ErrorCode::IncompatibleVersion
        );
        assert_eq!(
            conf(r#","mtu":10"#).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            conf(r#","mtu":"10""#).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            conf(r#","mtu":"lots""#).unwrap_err().code,
            ErrorCode::Decode
        );
        let missing = br#"{"cniVersion":"1.0.0","type":"datapath-cni"}"#;
        assert_eq!(NetConf::parse(missing).unwrap_err().code, ErrorCode::Decode);
        assert_eq!(
            conf(r#","randomizeSNAT":"fully""#).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            conf(r#","nodeIP":"2001:db8::1""#).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            conf(r#","enabled":"maybe""#).unwrap_err().code,
            ErrorCode::Decode
        );
        // Disabled, an IPv6 node IP is not ours to judge.
        assert!(conf(r#","enabled":"false","nodeIP":"2001:db8::1""#).is_ok());
    }

    #[test]
    fn the_egress_cni_entry_as_aws_node_renders_it_is_accepted() {
        let c = conf(
            r#","mtu":"9001","enabled":"true","randomizeSNAT":"prng",
               "nodeIP":"192.0.2.10","ipam":{"type":"host-local","ranges":[[{"subnet":"169.254.172.0/22"}]],
               "routes":[{"dst":"0.0.0.0/0"}],"dataDir":"/run/cni/v6pd/egress-v4-ipam"},
               "pluginLogFile":"/var/log/aws-routed-eni/egress-v4-plugin.log","pluginLogLevel":"Debug",
               "capabilities":{"io.kubernetes.cri.pod-annotations":true}"#,
        )
        .unwrap();
        assert_eq!(c.mtu(), 9001);
        assert!(c.enabled);
        assert_eq!(
            c.checked_node_ip().unwrap(),
            Some(Ipv4Addr::new(192, 0, 2, 10))
        );
        assert_eq!(conf(r#","mtu":1500"#).unwrap().mtu(), 1500);
        assert!(!conf(r#","enabled":"false""#).unwrap().enabled);
        assert!(!conf(r#","enabled":false"#).unwrap().enabled);
        assert_eq!(conf(r#","ifName":"v4if1""#).unwrap().pod_ifname(), "v4if1");
        assert_eq!(conf("").unwrap().pod_ifname(), "v4if0");
    }

    #[test]
    fn results_carry_the_ip_version_before_1_0() {
        let mut r = json!({"ips": [{"address": "169.254.172.9/22"}, {"address": "2001:db8::9/80", "version": "6"}]});
        convert_result(&mut r, "0.3.1");
        assert_eq!(r["cniVersion"], "0.3.1");
        assert_eq!(r["ips"][0]["version"], "4");
        assert_eq!(r["ips"][1]["version"], "6");
        convert_result(&mut r, "1.0.0");
        assert!(r["ips"][0].get("version").is_none());
        assert!(r["ips"][1].get("version").is_none());
        assert!(conf("").unwrap().supports_check());
        let old = NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n","type":"datapath-cni"}"#);
        assert!(!old.unwrap().supports_check());
    }
}
