//! The CNI plugin (`datapath-cni`), chained after the primary IPv6 plugin in place of the VPC
//! CNI's egress-v4 plugin: it wires the pod's node-local IPv4 exactly as egress-v4 does
//! (`v4if0`, host-local IPAM from 169.254.172.0/22, routes via 169.254.172.1, host veth
//! addressing, MTU) and registers the pod in the datapath instead of writing iptables rules.
//! CNI spec 0.3.0 to 1.0: ADD, DEL (idempotent, also when the netns is gone), CHECK (from
//! 0.4.0), VERSION.
//!
//! The plugin never creates the datapath's maps: ADD fails with a retryable error ("try again
//! later") until a daemon has the datapath attached, so a chain installed early cannot wire
//! pods the datapath would not translate.

pub mod conf;
pub mod ipam;
pub mod netlink;
pub mod wire;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use conf::Result;
pub use conf::{convert_result, CniError, Env, ErrorCode, NetConf, SUPPORTED_VERSIONS};

use crate::pods;

/// What the plugin remembers per container: enough for DEL after the netns is gone, and for
/// a repeated ADD to answer with what the first one did.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    ip: Ipv4Addr,
    prefix_len: u8,
    host_veth: String,
    pin_path: PathBuf,
    #[serde(default)]
    pod_ifname: Option<String>,
    #[serde(default)]
    netns: Option<String>,
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

/// Whether the datapath is attached at `pin_path`: both uplink links attached and the
/// pod-side program pinned (what `run` leaves once ready).
#[must_use]
pub fn datapath_attached(pin_path: &Path) -> bool {
    crate::loader::datapath_attached(pin_path)
}

fn record_path(conf: &NetConf, env: &Env) -> PathBuf {
    conf.state_dir()
        .join(format!("{}-{}", conf.name, env.container_id))
}

fn read_record(conf: &NetConf, env: &Env) -> Option<Record> {
    std::fs::read(record_path(conf, env))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Writes the record through a temporary file, so a crash never leaves half a record.
fn write_record(conf: &NetConf, env: &Env, record: &Record) -> Result<()> {
    let dir = conf.state_dir();
    std::fs::create_dir_all(&dir)
        .map_err(|e| CniError::io(format!("creating {}: {e}", dir.display())))?;
    let path = record_path(conf, env);
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(record).map_err(|e| CniError::io(e.to_string()))?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| CniError::io(format!("writing {}: {e}", path.display())))
}

/// The previous plugin's result plus our interfaces and address, in `conf`'s CNI version.
fn result(conf: &NetConf, netns: &str, record: &Record) -> Value {
    let mut out = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    let pod_if = record.pod_ifname.as_deref().unwrap_or(conf.pod_ifname());
    let mut interfaces = out["interfaces"].as_array().cloned().unwrap_or_default();
    interfaces.push(json!({ "name": record.host_veth, "mac": wire::mac(None, &record.host_veth) }));
    interfaces
        .push(json!({ "name": pod_if, "mac": wire::mac(Some(netns), pod_if), "sandbox": netns }));
    let pod_if_index = interfaces.len() - 1;
    let mut ips = out["ips"].as_array().cloned().unwrap_or_default();
    ips.push(json!({
        "address": format!("{}/{}", record.ip, record.prefix_len),
        "gateway": wire::gateway(record.ip, record.prefix_len).to_string(),
        "interface": pod_if_index,
    }));
    out["interfaces"] = json!(interfaces);
    out["ips"] = json!(ips);
    convert_result(&mut out, &conf.cni_version);
    out
}

/// Whether the container's wiring and registration, as `record` says, are all in place.
fn still_wired(record: &Record, netns: &str, pod_if: &str) -> bool {
    let Ok(ifindex) = crate::netdev::ifindex(&record.host_veth) else {
        return false;
    };
    let registered = crate::maps::Maps::open(&record.pin_path)
        .ok()
        .and_then(|maps| maps.pods.get(&u32::from(record.ip), 0).ok())
        .is_some_and(|pod| pod.host_ifindex == ifindex);
    registered && wire::has_address(netns, pod_if, record.ip, record.prefix_len).unwrap_or(false)
}

/// What a failed ADD created and must undo: only that.
#[derive(Default)]
struct Created {
    address: bool,
    veth: Option<String>,
    registered: Option<(PathBuf, Ipv4Addr)>,
}

impl Created {
    fn roll_back(&self, conf: &NetConf, env: &Env) {
        if let Some((pin, ip)) = &self.registered {
            let _ = pods::unregister(pin, *ip);
        }
        if let Some(veth) = &self.veth {
            let _ = wire::delete_host_veth(veth);
        }
        if self.address {
            let _ = ipam::exec(conf, env, "DEL");
        }
    }
}

/// ADD: allocate, wire, register; returns the result to print.
pub fn add(conf: &NetConf, env: &Env) -> Result<Value> {
    env.require_container()?;
    env.require_ifname()?;
    let netns = env
        .netns
        .clone()
        .ok_or_else(|| CniError::env("CNI_NETNS is not set"))?;
    let Some(prev) = &conf.prev_result else {
        return Err(CniError::config(
            "no prevResult: datapath-cni is a chained plugin and runs after the primary plugin (aws-cni)",
        ));
    };
    if !conf.enabled {
        let mut out = prev.clone();
        convert_result(&mut out, &conf.cni_version);
        return Ok(out);
    }
    if !Path::new(&netns).exists() {
        return Err(CniError::new(
            ErrorCode::UnknownContainer,
            "container network namespace not found",
            netns,
        ));
    }
    let pin_path = conf.pin_path();
    if !datapath_attached(&pin_path) {
        return Err(CniError::try_again(format!(
            "no datapath attached at {} (is `datapath-user run` up?)",
            pin_path.display()
        )));
    }
    let pod_if = conf.pod_ifname().to_string();
    // A repeated ADD: answer as the first one did if it is all still there; otherwise leave
    // everything as it is and say so.
    if let Some(record) = read_record(conf, env) {
        if still_wired(&record, &netns, &pod_if) {
            return Ok(result(conf, &netns, &record));
        }
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "container already added",
            format!(
                "{} has {} on {} from an earlier ADD that is no longer complete; DEL it first",
                env.container_id, record.ip, record.host_veth
            ),
        ));
    }
    let host_veth = host_veth_name(&env.container_id);
    if wire::link_exists(&host_veth) {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "container already has a host veth",
            format!("{host_veth} exists; DEL the container first"),
        ));
    }
    if wire::link_exists_in(&netns, &pod_if) {
        return Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            "interface exists in the container",
            format!("{pod_if} in {netns}"),
        ));
    }
    let mut created = Created::default();
    let outcome = add_steps(conf, env, &netns, &host_veth, &pod_if, &mut created);
    if outcome.is_err() {
        created.roll_back(conf, env);
    }
    outcome
}

fn add_steps(
    conf: &NetConf,
    env: &Env,
    netns: &str,
    host_veth: &str,
    pod_if: &str,
    created: &mut Created,
) -> Result<Value> {
    let allocated = ipam::exec(conf, env, "ADD")?;
    created.address = true;
    let (ip, prefix_len) = ipam::address(&allocated)?;
    wire::wire_pod(netns, host_veth, pod_if, conf.mtu(), ip, prefix_len)?;
    created.veth = Some(host_veth.to_string());
    let pin_path = conf.pin_path();
    let ifindex = crate::netdev::ifindex(host_veth).map_err(|e| CniError::datapath(&e))?;
    pods::register(&pin_path, ip, ifindex, &env.pod_name()).map_err(|e| match e {
        // Detached between our check and now: retry later.
        crate::Error::NotAttached(_) => CniError::try_again(e.to_string()),
        e => CniError::datapath(&e),
    })?;
    created.registered = Some((pin_path.clone(), ip));
    let record = Record {
        ip,
        prefix_len,
        host_veth: host_veth.to_string(),
        pin_path,
        pod_ifname: Some(pod_if.to_string()),
        netns: Some(netns.to_string()),
    };
    write_record(conf, env, &record)?;
    Ok(result(conf, netns, &record))
}

/// DEL: undo everything that is still there; never fails for what is already gone. A missing
/// IPAM binary does not stop the rest (it is reported on stderr).
pub fn del(conf: &NetConf, env: &Env) -> Result<()> {
    env.require_container()?;
    let path = record_path(conf, env);
    let record = read_record(conf, env);
    // Disabled and never wired: nothing of ours to undo (a pod wired before the entry was
    // disabled still is, below).
    if !conf.enabled && record.is_none() {
        return Ok(());
    }
    let host_veth = record.as_ref().map_or_else(
        || host_veth_name(&env.container_id),
        |r| r.host_veth.clone(),
    );
    wire::delete_host_veth(&host_veth)?;
    if let Some(record) = &record {
        match pods::unregister(&record.pin_path, record.ip) {
            Ok(_) | Err(crate::Error::NotRunning(_)) => {}
            Err(e) => return Err(CniError::datapath(&e)),
        }
    }
    if ipam::binary(conf, env)?.is_some() {
        ipam::exec(conf, env, "DEL")?;
    } else {
        eprintln!(
            "datapath-cni: DEL {}: IPAM plugin {} not in CNI_PATH {}; its lease is left in place",
            env.container_id,
            conf.ipam()["type"].as_str().unwrap_or(""),
            env.cni_path
        );
    }
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// CHECK: the wiring and the registration are as ADD left them.
pub fn check(conf: &NetConf, env: &Env) -> Result<()> {
    if !conf.supports_check() {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            "incompatible CNI version",
            format!(
                "CHECK exists from CNI 0.4.0; the config says {}",
                conf.cni_version
            ),
        ));
    }
    env.require_container()?;
    if !conf.enabled {
        return Ok(());
    }
    let record = read_record(conf, env).ok_or_else(|| {
        CniError::new(
            ErrorCode::UnknownContainer,
            "container unknown",
            env.container_id.clone(),
        )
    })?;
    let ifindex = crate::netdev::ifindex(&record.host_veth)
        .map_err(|_| CniError::io(format!("host veth {} is missing", record.host_veth)))?;
    let maps = crate::maps::Maps::open(&record.pin_path).map_err(|e| CniError::datapath(&e))?;
    match maps.pods.get(&u32::from(record.ip), 0) {
        Ok(pod) if pod.host_ifindex == ifindex => {}
        _ => {
            return Err(CniError::new(
                ErrorCode::Datapath,
                "pod not registered in the datapath",
                record.ip.to_string(),
            ))
        }
    }
    if let Some(netns) = &env.netns {
        let pod_if = record.pod_ifname.as_deref().unwrap_or(conf.pod_ifname());
        if !wire::has_address(netns, pod_if, record.ip, record.prefix_len)? {
            return Err(CniError::io(format!(
                "{pod_if} does not have {}",
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
    fn gateway_is_the_first_address() {
        assert_eq!(
            wire::gateway(Ipv4Addr::new(169, 254, 173, 9), 22),
            Ipv4Addr::new(169, 254, 172, 1)
        );
    }
}
