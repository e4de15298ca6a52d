// SPDX-License-Identifier: Apache-2.0
//! The uplinks as the kernel has them — which devices run our program, by which
//! way, first or not — read without touching anything (`status`), and removed
//! (`uninstall`); and the `--uplinks` choice recorded beside the pins.

use std::{fs, io, os::fd::AsFd, path::Path};

use anyhow::{bail, Context, Result};
use metadata_guard_netfilter::{devices, NlSocket};
use serde::{Deserialize, Serialize};

use super::{
    bpf_sys,
    links::open_link,
    pins::PinLayout,
    uplink::{link_pin, TcAttach, FILTER_HANDLE, FILTER_PRIORITY, LINK_PIN_PREFIX, PROGRAM_PIN},
};

/// Our cls_bpf filter on device `ifindex`'s egress hook, if any.
pub(super) fn our_filter(ifindex: u32) -> Result<Option<devices::TcFilter>> {
    let mut sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
    let filters = devices::egress_filters(&mut sock, ifindex)
        .with_context(|| format!("could not list the tc filters of interface {ifindex}"))?;
    Ok(filters.into_iter().find(|f| f.priority == FILTER_PRIORITY && f.handle == FILTER_HANDLE && f.kind == "bpf"))
}

pub(super) fn remove_link_pin(pin: &Path) -> Result<()> {
    if let Ok(link) = bpf_sys::obj_get(pin) {
        if let Err(e) = bpf_sys::link_detach(link.as_fd()) {
            tracing::debug!("could not detach {} before unpinning it: {e}", pin.display());
        }
    }
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("could not remove link pin {}", pin.display())),
    }
}

/// Removes our program from device `ifindex`: its tcx link pin and our cls_bpf filter
/// (only ours: priority, handle and a program named `mg_uplink*`).
pub(crate) fn remove_uplink(layout: &PinLayout, ifindex: u32) -> Result<bool> {
    let pin = link_pin(layout, ifindex);
    let had_link = pin.exists();
    remove_link_pin(&pin)?;
    Ok(remove_uplink_filter(ifindex)? || had_link)
}

/// Removes our cls_bpf filter from device `ifindex`; whether it was there. A filter
/// at our priority and handle that runs another program is left in place (an error).
pub(super) fn remove_uplink_filter(ifindex: u32) -> Result<bool> {
    let Some(filter) = our_filter(ifindex)? else { return Ok(false) };
    if !filter.bpf_name.as_deref().is_some_and(|n| n.starts_with(metadata_guard_common::program_names::UPLINK)) {
        bail!(
            "the tc filter at priority {FILTER_PRIORITY}, handle {FILTER_HANDLE:#x} on interface {ifindex} runs {:?}, \
             not metadata-guard's program: left in place",
            filter.bpf_name
        );
    }
    let mut sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
    devices::delete_egress_filter(&mut sock, ifindex, FILTER_PRIORITY, FILTER_HANDLE)
        .with_context(|| format!("could not remove the uplink filter from interface {ifindex}"))?;
    Ok(true)
}

/// The devices with a pinned tcx link of ours, as (ifindex, Tcx).
pub(super) fn pinned_links(layout: &PinLayout) -> Vec<(u32, TcAttach)> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(layout.links_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(index) = name.to_str().and_then(|n| n.strip_prefix(LINK_PIN_PREFIX)) else { continue };
            if let Ok(index) = index.parse() {
                out.push((index, TcAttach::Tcx));
            }
        }
    }
    out
}

/// Every device with our program (by either way), as (ifindex, how).
pub(crate) fn guarded(layout: &PinLayout) -> Result<Vec<(u32, TcAttach)>> {
    let mut out = pinned_links(layout);
    let mut sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
    for dev in devices::devices(&mut sock).context("could not list the network devices")? {
        if our_filter(dev.index)?.is_some() {
            out.push((dev.index, TcAttach::Clsact));
        }
    }
    Ok(out)
}

/// One uplink as the kernel has it: what `status` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UplinkHook {
    /// "tcx" or "clsact"; None: our program is not on the device.
    pub attach: Option<String>,
    /// The id of the program on the hook (ours), 0 when none.
    pub program_id: u32,
    /// Its name, when the program pinned at `programs/uplink` is that program.
    pub program_name: Option<String>,
    /// tcx: ours runs before every other program on the hook; clsact: ours is the
    /// first filter (lowest priority) of the hook.
    pub first: bool,
}

/// Reads whether device `ifindex` runs our program, without touching anything.
pub(crate) fn uplink_hook(layout: &PinLayout, ifindex: u32) -> Result<UplinkHook> {
    let pinned = super::links::pinned_program_info(&layout.program(PROGRAM_PIN))?;
    let name_of = |id: u32| pinned.as_ref().filter(|(pid, _)| *pid == id).map(|(_, name)| name.clone());
    if let Some(link) = open_link(&link_pin(layout, ifindex))? {
        if let Ok(info) = bpf_sys::tcx_link_info(link.as_fd()) {
            if info.ifindex == ifindex {
                let order = bpf_sys::tcx_egress_programs(ifindex).unwrap_or_default();
                return Ok(UplinkHook {
                    attach: Some(TcAttach::Tcx.name().into()),
                    program_id: info.prog_id,
                    program_name: name_of(info.prog_id),
                    first: order.first() == Some(&info.prog_id),
                });
            }
        }
    }
    let mut sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
    let filters = devices::egress_filters(&mut sock, ifindex)
        .with_context(|| format!("could not list the tc filters of interface {ifindex}"))?;
    let Some(ours) = filters.iter().find(|f| f.priority == FILTER_PRIORITY && f.handle == FILTER_HANDLE) else {
        return Ok(UplinkHook::default());
    };
    let id = ours.bpf_id.unwrap_or(0);
    // Filters run by priority; within one, the newest first (cls_bpf adds at the head).
    let first = filters.first().is_some_and(|f| f.handle == FILTER_HANDLE && f.priority == FILTER_PRIORITY);
    Ok(UplinkHook {
        attach: Some(TcAttach::Clsact.name().into()),
        program_id: id,
        program_name: name_of(id).or_else(|| ours.bpf_name.clone()),
        first,
    })
}

/// One device in `status`: an uplink the node has now, or a device that runs our
/// program without being one (any more).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub name: String,
    pub ifindex: u32,
    /// Why it is an uplink; None: it runs our program but is not one now (kept: a
    /// device never loses the program while the agent runs).
    pub reason: Option<String>,
    /// "tcx" or "clsact" when it runs our program; None when it does not.
    pub attach: Option<String>,
    pub program_id: u32,
    pub program_name: Option<String>,
    /// Ours runs before every other program (tcx) or filter (clsact) on the hook.
    pub first: bool,
}

impl UplinkStatus {
    pub fn guarded(&self) -> bool {
        self.attach.is_some()
    }
}

/// The `--uplinks` choice in force, recorded beside the pins so that `status` (which
/// reads the kernel's state, not the agent's flags) judges the same devices. bpffs
/// holds only directories and pins and refuses names with a dot: the record is a
/// directory name, `<version dir>/uplinks/<choice>`, dots as `~`.
const SPEC_DIR: &str = "uplinks";

pub(crate) fn record_spec(layout: &PinLayout, spec: &str) -> Result<()> {
    let dir = layout.dir.join(SPEC_DIR);
    clear_spec(&layout.dir).with_context(|| format!("could not clear {}", dir.display()))?;
    let path = dir.join(spec.replace('.', "~"));
    fs::create_dir_all(&path).with_context(|| format!("could not record the uplink choice at {}", path.display()))
}

/// The recorded choice, if any.
pub(crate) fn recorded_spec(layout: &PinLayout) -> Option<String> {
    let mut entries = fs::read_dir(layout.dir.join(SPEC_DIR)).ok()?;
    entries.find_map(|e| e.ok()?.file_name().to_str().map(|n| n.replace('~', ".")))
}

/// Removes the record under version directory `dir` (`remove_pins`).
pub(crate) fn clear_spec(dir: &Path) -> io::Result<()> {
    let dir = dir.join(SPEC_DIR);
    let Ok(entries) = fs::read_dir(&dir) else { return Ok(()) };
    for entry in entries {
        fs::remove_dir(entry?.path())?;
    }
    match fs::remove_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_choice_reads_back_with_its_dots() {
        let root = tempfile::tempdir().unwrap();
        let layout = PinLayout::new(root.path());
        assert_eq!(recorded_spec(&layout), None);
        record_spec(&layout, "bond0.100,eth1").unwrap();
        assert_eq!(recorded_spec(&layout).as_deref(), Some("bond0.100,eth1"));
        record_spec(&layout, "none").unwrap();
        assert_eq!(recorded_spec(&layout).as_deref(), Some("none"));
        clear_spec(&layout.dir).unwrap();
        assert_eq!(recorded_spec(&layout), None);
    }
}
