//! The pinned maps as typed tables, opened by any process (daemon or CLI) from the pin path.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    Pod,
};
use datapath_common::{
    config::Config,
    counters::Counter,
    flow::{Binding, Flow, FlowKey},
    maps::{self as names, LayoutInfo},
    pod::PodInfo,
    port::PortHint,
};

use crate::error::{Error, Result};

/// All datapath maps.
pub struct Maps {
    pub path: PathBuf,
    pub conntrack: HashMap<MapData, FlowKey, Flow>,
    pub bindings: HashMap<MapData, FlowKey, Binding>,
    pub pods: HashMap<MapData, u32, PodInfo>,
    pub config: Array<MapData, Config>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Per-destination hints of taken NAT ports, rebuilt by the sweep.
    pub hints: HashMap<MapData, FlowKey, PortHint>,
    pub conntrack_capacity: u32,
    /// Second handles on CONNTRACK and NAT_BINDINGS for batch reads.
    conntrack_raw: MapData,
    bindings_raw: MapData,
}

fn open_map(path: &Path, name: &str) -> Result<Map> {
    let file = path.join(name);
    if !file.exists() {
        return Err(Error::NotRunning(path.to_path_buf()));
    }
    let data = MapData::from_pin(&file)
        .map_err(|e| Error::map(format!("opening {}", file.display()), e))?;
    Map::from_map_data(data).map_err(|e| Error::map(format!("opening {}", file.display()), e))
}

fn typed<T>(path: &Path, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    T::try_from(open_map(path, name)?).map_err(|e| Error::map(format!("map {name}"), e))
}

/// Id and capacity of the map pinned at `path/name`, if one is.
fn pinned_map_info(path: &Path, name: &str) -> Option<aya::maps::MapInfo> {
    let file = path.join(name);
    if !file.exists() {
        return None;
    }
    MapData::from_pin(&file).ok()?.info().ok()
}

/// The kernel's id of the map pinned at `path/name`: the same maps have the same id
/// whatever path they are reached by.
#[must_use]
pub fn pinned_map_id(path: &Path, name: &str) -> Option<u32> {
    pinned_map_info(path, name).map(|info| info.id())
}

/// How many flows the flow table pinned at `path` holds, if one is pinned.
#[must_use]
pub fn pinned_flow_capacity(path: &Path) -> Option<u32> {
    pinned_map_info(path, names::CONNTRACK).map(|info| info.max_entries())
}

/// Reads the layout pinned at `path`, if any.
pub fn pinned_layout(path: &Path) -> Result<Option<LayoutInfo>> {
    if !path.join(names::LAYOUT).exists() {
        return Ok(None);
    }
    let layout: Array<MapData, LayoutInfo> = typed(path, names::LAYOUT)?;
    let info = layout
        .get(&0, 0)
        .map_err(|e| Error::map("reading LAYOUT", e))?;
    Ok((info != LayoutInfo::default()).then_some(info))
}

/// Fails unless maps pinned at `path` (if any) have this build's layout. Maps of the layout
/// `run` upgrades ([`crate::upgrade`]) get an error saying so.
pub fn check_layout(path: &Path) -> Result<()> {
    match pinned_layout(path)? {
        Some(found) if crate::upgrade::upgradable(found) => {
            Err(Error::LayoutUpgradable(path.to_path_buf()))
        }
        Some(found) if found != LayoutInfo::current() => Err(Error::IncompatibleLayout {
            path: path.to_path_buf(),
            found,
            expected: LayoutInfo::current(),
        }),
        _ => Ok(()),
    }
}

impl Maps {
    /// Opens the maps pinned at `path`, refusing an incompatible layout.
    pub fn open(path: &Path) -> Result<Self> {
        if !crate::bpffs::is_bpffs(path) || !path.join(names::CONNTRACK).exists() {
            return Err(Error::NotRunning(path.to_path_buf()));
        }
        check_layout(path)?;
        let conntrack_map = open_map(path, names::CONNTRACK)?;
        let conntrack_capacity = match &conntrack_map {
            Map::LruHashMap(data) | Map::HashMap(data) => data
                .info()
                .map_err(|e| Error::map("CONNTRACK info", e))?
                .max_entries(),
            _ => 0,
        };
        Ok(Self {
            path: path.to_path_buf(),
            conntrack: HashMap::try_from(conntrack_map).map_err(|e| Error::map("CONNTRACK", e))?,
            bindings: typed(path, names::NAT_BINDINGS)?,
            pods: typed(path, names::PODS)?,
            config: typed(path, names::CONFIG)?,
            counters: typed(path, names::COUNTERS)?,
            hints: typed(path, names::PORT_HINTS)?,
            conntrack_capacity,
            conntrack_raw: MapData::from_pin(path.join(names::CONNTRACK))
                .map_err(|e| Error::map("opening CONNTRACK", e))?,
            bindings_raw: MapData::from_pin(path.join(names::NAT_BINDINGS))
                .map_err(|e| Error::map("opening NAT_BINDINGS", e))?,
        })
    }

    /// Calls `f` for every flow, thousands per syscall.
    pub fn for_each_flow(&self, f: impl FnMut(&FlowKey, &Flow)) -> Result<()> {
        for_each_entry(&self.conntrack_raw, &self.conntrack, names::CONNTRACK, f)
    }

    /// Calls `f` for every NAT binding (reply tuple, binding), thousands per syscall.
    pub fn for_each_binding(&self, f: impl FnMut(&FlowKey, &Binding)) -> Result<()> {
        for_each_entry(&self.bindings_raw, &self.bindings, names::NAT_BINDINGS, f)
    }

    /// Removes the flow `key`, returning the value it held when it was unlinked.
    pub fn take_flow(&mut self, key: &FlowKey) -> Result<Option<Flow>> {
        take(
            &self.conntrack_raw,
            &mut self.conntrack,
            key,
            "removing a flow",
        )
    }

    /// Removes the binding under reply tuple `tuple`, returning the value it held when it was
    /// unlinked.
    pub fn take_binding(&mut self, tuple: &FlowKey) -> Result<Option<Binding>> {
        take(
            &self.bindings_raw,
            &mut self.bindings,
            tuple,
            "removing a binding",
        )
    }

    pub fn config(&self) -> Result<Config> {
        self.config
            .get(&0, 0)
            .map_err(|e| Error::map("reading CONFIG", e))
    }

    /// Registered pods, by address.
    pub fn pods(&self) -> Result<Vec<(Ipv4Addr, PodInfo)>> {
        sorted_pods(&self.pods)
    }

    /// Each counter summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        Counter::ALL
            .iter()
            .map(|c| Ok((*c, self.counter(*c)?)))
            .collect()
    }

    /// One counter, summed over the CPUs.
    pub fn counter(&self, counter: Counter) -> Result<u64> {
        let values = self
            .counters
            .get(&(counter as u32), 0)
            .map_err(|e| Error::map("reading COUNTERS", e))?;
        Ok(values.iter().sum())
    }

    /// Removes every flow (and its NAT binding) whose pod address is `pod_ip`.
    pub fn remove_pod_flows(&mut self, pod_ip: u32) -> Result<usize> {
        let doomed: Vec<(FlowKey, Flow)> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.src_ip == pod_ip)
            .collect();
        for (key, flow) in &doomed {
            let _ = self
                .bindings
                .remove(&key.reply_tuple(flow.nat_ip, flow.nat_port));
            let _ = self.conntrack.remove(key);
        }
        let orphans: Vec<FlowKey> = self
            .bindings
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, taken)| taken.owner.src_ip == pod_ip)
            .map(|(binding, _)| binding)
            .collect();
        for binding in &orphans {
            let _ = self.bindings.remove(binding);
        }
        Ok(doomed.len())
    }
}

/// The pods registered in maps pinned at `path` that [`Maps::open`] refuses only because
/// `run` upgrades them first (`PODS` is the same in every upgradable layout).
pub fn pods_before_upgrade(path: &Path) -> Result<Vec<(Ipv4Addr, PodInfo)>> {
    sorted_pods(&typed(path, names::PODS)?)
}

fn sorted_pods(map: &HashMap<MapData, u32, PodInfo>) -> Result<Vec<(Ipv4Addr, PodInfo)>> {
    let mut pods = map
        .iter()
        .map(|r| r.map(|(ip, pod)| (Ipv4Addr::from(ip), pod)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::map("reading PODS", e))?;
    pods.sort_by_key(|(ip, _)| *ip);
    Ok(pods)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock the programs stamp flows with.
#[must_use]
pub fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Removes `key` from a hash map (through `raw`), returning the value it held when it was
/// unlinked; on kernels without lookup-and-delete for its type, reads then deletes through
/// `map`.
fn take<K: Pod, V: Pod + Default>(
    raw: &MapData,
    map: &mut HashMap<MapData, K, V>,
    key: &K,
    what: &str,
) -> Result<Option<V>> {
    match crate::batch::take(raw, key) {
        Ok(value) => Ok(value),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) => {
            let value = map.get(key, 0).ok();
            let _ = map.remove(key);
            Ok(value)
        }
        Err(e) => Err(Error::io(what, e)),
    }
}

/// Calls `f` for every entry of a hash map, read through `raw` in batches, or one entry at a
/// time through `map` on kernels without batch lookups for its type.
pub(crate) fn for_each_entry<K: Pod + Default, V: Pod + Default>(
    raw: &MapData,
    map: &HashMap<MapData, K, V>,
    name: &str,
    mut f: impl FnMut(&K, &V),
) -> Result<()> {
    match crate::batch::for_each(raw, &mut f) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            for (key, value) in map.iter().filter_map(std::result::Result::ok) {
                f(&key, &value);
            }
            Ok(())
        }
        Err(e) => Err(Error::io(format!("reading {name}"), e)),
    }
}
