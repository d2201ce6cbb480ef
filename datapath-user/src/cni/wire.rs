//! The egress-v4 wiring (design brief, section 1): a veth pair, the pod end in the
//! container's netns with the pod address and routes via the gateway, the host end addressed
//! with the gateway /32 and a /32 route to the pod.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::Value;

use super::conf::{CniError, Result};

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

#[must_use]
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The pods' gateway: the first address of the range (169.254.172.1).
#[must_use]
pub fn gateway(ip: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let mask = datapath_common::ipv4::mask(prefix_len);
    Ipv4Addr::from((u32::from(ip) & mask) + 1)
}

/// The MAC of `dev` (in `netns` when given); empty when unknown.
#[must_use]
pub fn mac(netns: Option<&str>, dev: &str) -> String {
    let out = match netns {
        Some(ns) => ip_in(ns, &["-j", "link", "show", dev]),
        None => run("ip", &["-j", "link", "show", dev]),
    };
    out.ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v[0]["address"].as_str().map(String::from))
        .unwrap_or_default()
}

/// Whether `dev` in `netns` has `ip/prefix_len`.
pub fn has_address(netns: &str, dev: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<bool> {
    let addrs = ip_in(netns, &["-4", "-o", "addr", "show", "dev", dev])?;
    Ok(addrs.contains(&format!("{ip}/{prefix_len}")))
}

/// Whether `dev` exists in `netns`.
#[must_use]
pub fn link_exists_in(netns: &str, dev: &str) -> bool {
    ip_in(netns, &["link", "show", dev]).is_ok()
}

/// Creates the veth pair. Its own step, so a failed ADD knows whether the pair is its own.
pub fn create_pair(host_veth: &str, tmp: &str, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    run(
        "ip",
        &[
            "link", "add", host_veth, "mtu", &mtu, "type", "veth", "peer", "name", tmp, "mtu", &mtu,
        ],
    )
    .map(drop)
}

/// Moves the pair's peer `tmp` into `netns` as `pod_if` and addresses both ends.
pub fn configure(
    netns: &str,
    host_veth: &str,
    tmp: &str,
    pod_if: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<()> {
    let gw = gateway(ip, prefix_len).to_string();
    let network = Ipv4Addr::from(u32::from(ip) & datapath_common::ipv4::mask(prefix_len));
    run("ip", &["link", "set", tmp, "netns", netns])?;
    ip_in(netns, &["link", "set", tmp, "name", pod_if])?;
    let cidr = format!("{ip}/{prefix_len}");
    ip_in(
        netns,
        &["addr", "add", &cidr, "dev", pod_if, "noprefixroute"],
    )?;
    ip_in(netns, &["link", "set", pod_if, "up"])?;
    let gw32 = format!("{gw}/32");
    ip_in(
        netns,
        &["route", "add", &gw32, "dev", pod_if, "scope", "link"],
    )?;
    let net = format!("{network}/{prefix_len}");
    ip_in(netns, &["route", "add", &net, "via", &gw, "dev", pod_if])?;
    ip_in(
        netns,
        &["route", "add", "default", "via", &gw, "dev", pod_if],
    )?;
    run(
        "ip",
        &["addr", "add", &gw32, "dev", host_veth, "scope", "link"],
    )?;
    run("ip", &["link", "set", host_veth, "up"])?;
    let pod32 = format!("{ip}/32");
    run(
        "ip",
        &["route", "add", &pod32, "dev", host_veth, "scope", "link"],
    )?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| CniError::io(format!("enabling ip_forward: {e}")))
}

/// Deletes the host veth (and with it the pod end). Gone already counts as deleted: the
/// kernel may be removing it as the netns goes away.
pub fn delete_host_veth(host_veth: &str) -> Result<()> {
    if !link_exists(host_veth) {
        return Ok(());
    }
    match run("ip", &["link", "del", host_veth]) {
        Err(e) if link_exists(host_veth) => Err(e),
        _ => Ok(()),
    }
}
