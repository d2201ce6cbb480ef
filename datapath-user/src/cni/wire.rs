//! The egress-v4 plugin's wiring (ARCHITECTURE.md, "The node"): a veth pair, the pod end in the
//! container's netns with the pod address and routes via the gateway, the host end addressed
//! with the gateway /32 and a /32 route to the pod. All over rtnetlink ([`super::netlink`]).

use std::{net::Ipv4Addr, path::Path};

use super::{
    conf::{CniError, Result},
    netlink::{Rtnl, RT_SCOPE_LINK, RT_SCOPE_UNIVERSE},
};

fn io(what: &str) -> impl FnOnce(std::io::Error) -> CniError + '_ {
    move |e| CniError::io(format!("{what}: {e}"))
}

fn host() -> Result<Rtnl> {
    Rtnl::open().map_err(io("netlink socket"))
}

fn in_netns(netns: &str) -> Result<Rtnl> {
    Rtnl::open_in(Path::new(netns)).map_err(|e| CniError::io(format!("entering {netns}: {e}")))
}

/// Whether link `name` exists in this (the host's) namespace.
#[must_use]
pub fn link_exists(name: &str) -> bool {
    host().is_ok_and(|mut nl| nl.link(name).is_ok_and(|l| l.is_some()))
}

/// Whether `dev` exists in `netns`.
#[must_use]
pub fn link_exists_in(netns: &str, dev: &str) -> bool {
    in_netns(netns).is_ok_and(|mut nl| nl.link(dev).is_ok_and(|l| l.is_some()))
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
    let nl = match netns {
        Some(ns) => in_netns(ns),
        None => host(),
    };
    nl.ok()
        .and_then(|mut nl| nl.link(dev).ok().flatten())
        .map(|(_, mac)| mac)
        .unwrap_or_default()
}

/// Whether `dev` in `netns` has `ip/prefix_len`.
pub fn has_address(netns: &str, dev: &str, ip: Ipv4Addr, prefix_len: u8) -> Result<bool> {
    let mut nl = in_netns(netns)?;
    let Some((index, _)) = nl.link(dev).map_err(io("looking up the pod interface"))? else {
        return Ok(false);
    };
    nl.has_address(index, ip, prefix_len)
        .map_err(io("reading the pod's addresses"))
}

/// The whole wiring of one pod, as ADD does it between IPAM and registration: the veth pair
/// (`host_veth` here, `pod_if` in the network namespace whose nsfs file is `netns`, e.g.
/// `/run/netns/NAME`), both ends with `mtu`, addressed and routed ([`configure`]). "Here" is
/// the calling thread's network namespace. On failure the pair is deleted again, so an
/// error leaves nothing behind.
pub fn wire_pod(
    netns: &str,
    host_veth: &str,
    pod_if: &str,
    mtu: u32,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<()> {
    create_pair(netns, host_veth, pod_if, mtu)?;
    configure(netns, host_veth, pod_if, ip, prefix_len).inspect_err(|_| {
        let _ = delete_host_veth(host_veth);
    })
}

/// Creates the veth pair, the pod end `pod_if` directly in `netns`.
fn create_pair(netns: &str, host_veth: &str, pod_if: &str, mtu: u32) -> Result<()> {
    let ns = std::fs::File::open(netns).map_err(|e| CniError::io(format!("{netns}: {e}")))?;
    host()?
        .create_veth(host_veth, pod_if, mtu, &ns)
        .map_err(|e| CniError::io(format!("creating veth {host_veth}/{pod_if}: {e}")))
}

/// Addresses both ends and adds the routes.
fn configure(
    netns: &str,
    host_veth: &str,
    pod_if: &str,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<()> {
    let gw = gateway(ip, prefix_len);
    let network = Ipv4Addr::from(u32::from(ip) & datapath_common::ipv4::mask(prefix_len));
    let mut pod = in_netns(netns)?;
    let (pod_index, _) = pod
        .link(pod_if)
        .map_err(io("looking up the pod interface"))?
        .ok_or_else(|| CniError::io(format!("{pod_if} vanished from {netns}")))?;
    pod.add_address(pod_index, ip, prefix_len, RT_SCOPE_UNIVERSE, true)
        .map_err(io("addressing the pod interface"))?;
    pod.set_up(pod_index)
        .map_err(io("setting the pod interface up"))?;
    pod.add_route(gw, 32, None, pod_index, RT_SCOPE_LINK)
        .map_err(io("pod route to the gateway"))?;
    pod.add_route(network, prefix_len, Some(gw), pod_index, RT_SCOPE_UNIVERSE)
        .map_err(io("pod route to the pod range"))?;
    pod.add_route(
        Ipv4Addr::UNSPECIFIED,
        0,
        Some(gw),
        pod_index,
        RT_SCOPE_UNIVERSE,
    )
    .map_err(io("pod default route"))?;

    let mut node = host()?;
    let (host_index, _) = node
        .link(host_veth)
        .map_err(io("looking up the host veth"))?
        .ok_or_else(|| CniError::io(format!("{host_veth} vanished")))?;
    node.add_address(host_index, gw, 32, RT_SCOPE_LINK, false)
        .map_err(io("addressing the host veth"))?;
    node.set_up(host_index)
        .map_err(io("setting the host veth up"))?;
    node.add_route(ip, 32, None, host_index, RT_SCOPE_LINK)
        .map_err(io("host route to the pod"))?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
        .map_err(|e| CniError::io(format!("enabling ip_forward: {e}")))
}

/// Deletes the host veth (and with it the pod end). Gone already counts as deleted: the
/// kernel may be removing it as the netns goes away.
pub fn delete_host_veth(host_veth: &str) -> Result<()> {
    let mut nl = host()?;
    let Some((index, _)) = nl.link(host_veth).map_err(io("looking up the host veth"))? else {
        return Ok(());
    };
    match nl.delete_link(index) {
        Err(e) if e.raw_os_error() != Some(libc::ENODEV) && link_exists(host_veth) => {
            Err(CniError::io(format!("deleting {host_veth}: {e}")))
        }
        _ => Ok(()),
    }
}
