//! Upgrading maps pinned by the previous version in place, so an upgrade keeps every flow.
//!
//! Layout 1 differs from this build's only in `NAT_BINDINGS`' value: the owner's pod tuple
//! alone, now a [`Binding`]. The old map is unpinned (and kept open) before loading, so the
//! loader creates the new one; its entries go into the new map before the new programs are
//! attached, and once more after, since the old programs kept claiming ports until the new
//! ones replaced them. A start that fails before the first copy pins the old map back.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use datapath_common::{
    flow::{Binding, FlowKey},
    maps::{self as names, LayoutInfo},
};
use log::{info, warn};

use crate::{
    error::{Error, Result},
    maps,
};

/// Insert only where the key is absent: a binding the new programs made is never replaced.
const BPF_NOEXIST: u64 = 1;

/// Whether maps of layout `found` are upgraded in place by [`prepare`].
#[must_use]
pub fn upgradable(found: LayoutInfo) -> bool {
    found
        == LayoutInfo {
            version: 1,
            ..LayoutInfo::current()
        }
}

/// The unpinned `NAT_BINDINGS` of layout 1, open until its bindings are in the new map.
pub struct Upgrade {
    /// Two handles on the old map: batch reads, and one entry at a time where the kernel
    /// has no batch reads.
    old_raw: MapData,
    old: HashMap<MapData, FlowKey, FlowKey>,
    /// Where the loader pins the new map.
    pin: PathBuf,
    carried: usize,
}

/// Before loading the maps pinned at `pin_path`: for layout 1, unpins its `NAT_BINDINGS` so
/// the loader creates this layout's, and returns the old one to carry over. Maps of this
/// build's layout need nothing; any other layout is refused ([`maps::check_layout`]).
pub fn prepare(pin_path: &Path) -> Result<Option<Upgrade>> {
    match maps::check_layout(pin_path) {
        Err(Error::LayoutUpgradable(_)) => {}
        other => return other.map(|()| None),
    }
    let pin = pin_path.join(names::NAT_BINDINGS);
    if !pin.exists() {
        warn!(
            "maps pinned at {} are of layout 1 and have no NAT_BINDINGS (an interrupted upgrade?): a new, empty one is created",
            pin_path.display()
        );
        return Ok(None);
    }
    let open =
        || MapData::from_pin(&pin).map_err(|e| Error::map(format!("opening {}", pin.display()), e));
    let old_raw = open()?;
    if old_raw
        .info()
        .is_ok_and(|i| i.value_size() as usize == size_of::<Binding>())
    {
        // Pinned by an interrupted upgrade after the loader made it: already this layout's.
        warn!(
            "{} already holds this version's bindings (an interrupted upgrade?): kept as it is",
            pin.display()
        );
        return Ok(None);
    }
    let old = Map::from_map_data(open()?)
        .and_then(HashMap::try_from)
        .map_err(|e| Error::map(format!("{} as layout 1", pin.display()), e))?;
    std::fs::remove_file(&pin).map_err(|e| Error::io(format!("unpinning {}", pin.display()), e))?;
    Ok(Some(Upgrade {
        old_raw,
        old,
        pin,
        carried: 0,
    }))
}

impl Upgrade {
    /// Once the loader has pinned the new map, before the new programs are attached: every
    /// old binding goes in.
    pub fn carry_over(&mut self) -> Result<()> {
        self.carried += self.copy()?;
        Ok(())
    }

    /// Once the new programs are attached: the bindings the old programs made meanwhile go
    /// in too, and the old map is released.
    pub fn finish(mut self) -> Result<()> {
        self.carried += self.copy()?;
        info!(
            "upgraded pinned maps from layout 1: {} NAT bindings carried over",
            self.carried
        );
        Ok(())
    }

    /// Pins the old map back in place of the new one: a start that failed before the
    /// bindings were carried over leaves layout-1 maps as they were.
    pub fn restore(&self) {
        match std::fs::remove_file(&self.pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("removing the new {}: {e}", self.pin.display()),
        }
        match self.old_raw.pin(&self.pin) {
            Ok(()) => info!(
                "start failed: the layout-1 {} is pinned back",
                self.pin.display()
            ),
            Err(e) => warn!(
                "start failed, and pinning the layout-1 {} back failed: {e}",
                self.pin.display()
            ),
        }
    }

    /// Inserts each old binding the new map lacks; returns how many went in.
    fn copy(&self) -> Result<usize> {
        let mut new: HashMap<MapData, FlowKey, Binding> = Map::from_map_data(
            MapData::from_pin(&self.pin)
                .map_err(|e| Error::map(format!("opening {}", self.pin.display()), e))?,
        )
        .and_then(HashMap::try_from)
        .map_err(|e| Error::map(format!("{} of this layout", self.pin.display()), e))?;
        let (mut copied, mut failed) = (0, None);
        maps::for_each_entry(
            &self.old_raw,
            &self.old,
            names::NAT_BINDINGS,
            |reply, owner| match new.insert(reply, Binding::claim(*owner), BPF_NOEXIST) {
                Ok(()) => copied += 1,
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            },
        )?;
        match failed {
            Some(e) => Err(Error::map("carrying NAT bindings over", e)),
            None => Ok(copied),
        }
    }
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layout_1_of_otherwise_equal_sizes_is_upgradable() {
        let current = LayoutInfo::current();
        assert!(upgradable(LayoutInfo {
            version: 1,
            ..current
        }));
        assert!(!upgradable(current));
        assert!(!upgradable(LayoutInfo {
            version: 1,
            flow_size: current.flow_size + 8,
            ..current
        }));
        assert!(!upgradable(LayoutInfo {
            version: 99,
            ..current
        }));
    }
}
