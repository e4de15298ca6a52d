// SPDX-License-Identifier: Apache-2.0
//! Whether the pinned enforcement is still whole (pins removed by hand, the attached
//! cgroup gone), and restoring what can be restored from what the agent holds.

use std::{fs, os::fd::AsFd, path::Path};

use anyhow::{Context, Result};
use aya::maps::MapData;

use super::{bpf_sys, Guard, PINNED_MAPS};

/// One thing missing from the enforcement in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// The cgroup directory enforcement attaches to does not exist (any more).
    CgroupGone(String),
    /// A map's pin was removed: the next agent would start with empty maps.
    MapUnpinned(&'static str),
    /// A hook's link pin was removed: the program is detached.
    LinkUnpinned(&'static str),
    /// The hook's link runs on no cgroup or another one: not enforcing here.
    LinkElsewhere { hook: &'static str, cgroup_id: u64 },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::CgroupGone(path) => write!(f, "cgroup {path} no longer exists"),
            Fault::MapUnpinned(name) => write!(f, "map {name} is no longer pinned"),
            Fault::LinkUnpinned(hook) => write!(f, "link {hook} is no longer pinned (detached)"),
            Fault::LinkElsewhere { hook, cgroup_id: 0 } => write!(f, "link {hook} is detached: its cgroup is gone"),
            Fault::LinkElsewhere { hook, cgroup_id } => write!(f, "link {hook} is on another cgroup ({cgroup_id})"),
        }
    }
}

impl Guard {
    /// What is missing from the enforcement on `cgroup`, for the plan in force; empty when whole.
    pub(crate) fn faults(&self, cgroup: &Path) -> Vec<Fault> {
        let mut faults = Vec::new();
        let cgroup_id = crate::cgroup::id(cgroup).ok();
        if cgroup_id.is_none() {
            faults.push(Fault::CgroupGone(cgroup.display().to_string()));
        }
        for name in PINNED_MAPS {
            if !self.pins.map(name).exists() {
                faults.push(Fault::MapUnpinned(name));
            }
        }
        for a in self.plan.attachments() {
            let Ok(link) = bpf_sys::obj_get(&self.pins.link(a.pin)) else {
                faults.push(Fault::LinkUnpinned(a.pin));
                continue;
            };
            match bpf_sys::cgroup_link_info(link.as_fd()) {
                Ok(info) if Some(info.cgroup_id) == cgroup_id => {}
                Ok(info) => faults.push(Fault::LinkElsewhere { hook: a.pin, cgroup_id: info.cgroup_id }),
                Err(_) => faults.push(Fault::LinkUnpinned(a.pin)),
            }
        }
        faults
    }

    /// Re-pins the maps the agent still holds and re-attaches (and re-pins) every
    /// hook that is not enforcing on `cgroup`: as much as it can, so that one pin
    /// that cannot be made does not keep the other hooks detached. Fails (naming
    /// what is left) while anything could not be restored, e.g. the cgroup is gone.
    pub(crate) fn repair(&mut self, cgroup: &Path) -> Result<()> {
        for dir in [self.pins.maps_dir(), self.pins.links_dir(), self.pins.programs_dir()] {
            fs::create_dir_all(&dir).with_context(|| format!("could not create pin directory {}", dir.display()))?;
        }
        let mut failed = Vec::new();
        for name in PINNED_MAPS {
            let pin = self.pins.map(name);
            if pin.exists() {
                continue;
            }
            let pinned = match (self.ebpf.map(name), &self.events) {
                (Some(map), _) => map.pin(&pin).map_err(anyhow::Error::from),
                (None, Some(events)) if name == metadata_guard_common::map_names::EVENTS => {
                    events.pin(&pin).map_err(anyhow::Error::from)
                }
                (None, _) => Err(anyhow::anyhow!("the agent no longer holds it")),
            };
            if let Err(e) = pinned {
                failed.push(format!("{:#}", e.context(format!("could not pin map {name} again at {}", pin.display()))));
            }
        }
        let cgroup_id = crate::cgroup::id(cgroup)?;
        let cgroup_dir =
            fs::File::open(cgroup).with_context(|| format!("could not open cgroup {}", cgroup.display()))?;
        for a in self.plan.attachments() {
            if let Err(e) = self.link_program(a, &cgroup_dir, cgroup_id) {
                failed.push(format!("{e:#}"));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!(failed.join("; ")))
        }
    }
}

/// A second handle on the event ring buffer, kept to pin it again after its pin was
/// removed while the event reader owns the first.
pub(super) fn second_handle(map: &aya::maps::Map) -> Result<MapData> {
    let aya::maps::Map::RingBuf(data) = map else { anyhow::bail!("the events map is not a ring buffer") };
    let fd = data.fd().as_fd().try_clone_to_owned().context("could not duplicate the ring buffer's fd")?;
    Ok(MapData::from_fd(fd)?)
}
