//! Registering and removing pods: the `PODS` map, the pod-side attachment and the pod's flows.
//! Shared by `datapath-user pod` and the CNI plugin.

use std::{net::Ipv4Addr, path::Path};

use datapath_common::{config::DEFAULT_POD_CIDR, maps::DEFAULT_FLOW_TABLE_SIZE, pod::PodInfo};

use crate::{
    error::{Error, Result},
    loader::{self, LoadOptions},
    maps::Maps,
};

/// Opens the maps at `pin_path`, creating them (by loading the object) when no daemon has run
/// yet: a pod registered then is attached when `datapath-user run` starts.
pub fn open_or_create(pin_path: &Path) -> Result<Maps> {
    match Maps::open(pin_path) {
        Err(Error::NotRunning(_)) => {
            drop(loader::load(&LoadOptions {
                pin_path: pin_path.to_path_buf(),
                flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
                kernel_checksum_helpers: false,
            })?);
            Maps::open(pin_path)
        }
        other => other,
    }
}

/// Registers pod `ip` on host veth `ifindex`. Returns whether the pod-side program was
/// attached now (a daemon runs) or will be when one starts.
pub fn register(pin_path: &Path, ip: Ipv4Addr, ifindex: u32, name: &str) -> Result<bool> {
    register_in(open_or_create(pin_path)?, pin_path, ip, ifindex, name)
}

/// As [`register`], for callers that need a datapath already there (the CNI plugin): never
/// creates maps, so the daemon's `--flow-table-size` is what applies.
pub fn register_running(pin_path: &Path, ip: Ipv4Addr, ifindex: u32, name: &str) -> Result<bool> {
    register_in(Maps::open(pin_path)?, pin_path, ip, ifindex, name)
}

fn register_in(
    mut maps: Maps,
    pin_path: &Path,
    ip: Ipv4Addr,
    ifindex: u32,
    name: &str,
) -> Result<bool> {
    let cidr = match maps.config() {
        Ok(cfg) if cfg.node_ip != 0 => cfg.pod_cidr,
        _ => DEFAULT_POD_CIDR,
    };
    if !cidr.contains(u32::from(ip)) {
        return Err(Error::OutsidePodRange {
            ip,
            cidr: format!("{}/{}", Ipv4Addr::from(cidr.network), cidr.prefix_len),
        });
    }
    maps.pods
        .insert(u32::from(ip), PodInfo::new(ifindex, name), 0)
        .map_err(|e| Error::map("writing PODS", e))?;
    match loader::pinned_from_pod_program(pin_path) {
        Some(mut prog) => {
            loader::attach_pod(&mut prog, pin_path, ifindex)?;
            Ok(true)
        }
        None => Ok(false),
    }
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
