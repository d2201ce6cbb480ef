//! Registering and removing pods: the `PODS` map, the pod-side attachment and the pod's flows.
//! Shared by `datapath-user pod` and the CNI plugin.

use std::{net::Ipv4Addr, path::Path};

use datapath_common::{
    config::{DEFAULT_GATEWAY, DEFAULT_POD_CIDR},
    pod::PodInfo,
};

use crate::{
    error::{Error, Result},
    loader,
    maps::Maps,
    netdev,
};

/// Registers pod `ip` on host veth `ifindex` and attaches the pod-side program there.
///
/// Refused while the datapath is not attached at `pin_path`: the pod's IPv4 would leave the
/// node untranslated. On success every packet of the pod is translated or dropped (a packet
/// that reaches the uplink through the host stack meets the egress safety net).
/// Registering the same address on the same veth again is a no-op; an address registered on
/// another veth, the pod range's network, gateway or broadcast address, the loopback
/// interface and the uplink are refused.
pub fn register(pin_path: &Path, ip: Ipv4Addr, ifindex: u32, name: &str) -> Result<()> {
    let ifname = netdev::ifname(ifindex).ok_or(Error::UnknownIfindex(ifindex))?;
    if netdev::is_loopback(&ifname)? {
        return Err(Error::NotAHostVeth {
            iface: ifname,
            reason: "it is the loopback interface".into(),
        });
    }
    if !loader::datapath_attached(pin_path) {
        return Err(Error::NotAttached(pin_path.to_path_buf()));
    }
    let mut maps = Maps::open(pin_path)?;
    let (cidr, gateway, node_ip) = match maps.config() {
        Ok(cfg) if cfg.node_ip != 0 => (cfg.pod_cidr, cfg.gateway_ip, Some(cfg.node_ip)),
        _ => (DEFAULT_POD_CIDR, DEFAULT_GATEWAY, None),
    };
    let show_cidr = format!("{}/{}", Ipv4Addr::from(cidr.network), cidr.prefix_len);
    if !cidr.contains(u32::from(ip)) {
        return Err(Error::OutsidePodRange {
            ip,
            cidr: show_cidr,
        });
    }
    if let Some(problem) = cidr.pod_address_problem(gateway, u32::from(ip)) {
        return Err(Error::NotAPodAddress {
            ip,
            problem,
            cidr: show_cidr,
        });
    }
    if let Some(node_ip) = node_ip.map(Ipv4Addr::from) {
        if netdev::ipv4_addrs(&ifname)?.contains(&node_ip) {
            return Err(Error::NotAHostVeth {
                iface: ifname,
                reason: format!("it carries the node IP {node_ip} (the uplink)"),
            });
        }
    }
    let existing = maps.pods.get(&u32::from(ip), 0).ok();
    if let Some(existing) = existing {
        if existing.host_ifindex != ifindex {
            return Err(Error::PodAddressTaken {
                ip,
                iface: netdev::ifname(existing.host_ifindex)
                    .unwrap_or_else(|| format!("ifindex {} (gone)", existing.host_ifindex)),
                name: if existing.name().is_empty() {
                    "no name".into()
                } else {
                    existing.name().to_string()
                },
            });
        }
    }
    maps.pods
        .insert(u32::from(ip), PodInfo::new(ifindex, name), 0)
        .map_err(|e| Error::map("writing PODS", e))?;
    let attached = loader::pinned_from_pod_program(pin_path)
        .ok_or_else(|| Error::NotAttached(pin_path.to_path_buf()))
        .and_then(|mut prog| loader::attach_pod(&mut prog, pin_path, ifindex));
    if let Err(e) = attached {
        // Not protected: undo what this call registered, so its failure leaves nothing.
        if existing.is_none() {
            let _ = maps.pods.remove(&u32::from(ip));
        }
        return Err(e);
    }
    Ok(())
}

/// Removes pod `ip` and its flows, detaching the pod-side program from its veth unless
/// another pod shares it. `None` when the pod was not registered.
pub fn unregister(pin_path: &Path, ip: Ipv4Addr) -> Result<Option<usize>> {
    let mut maps = Maps::open(pin_path)?;
    let key = u32::from(ip);
    let Ok(info) = maps.pods.get(&key, 0) else {
        return Ok(None);
    };
    let _ = maps.pods.remove(&key);
    let shared = maps
        .pods()?
        .iter()
        .any(|(_, p)| p.host_ifindex == info.host_ifindex);
    if !shared {
        loader::detach_pod(pin_path, info.host_ifindex)?;
    }
    maps.remove_pod_flows(key).map(Some)
}
