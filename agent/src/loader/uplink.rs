//! The uplink program (`mg_uplink`, tc egress) on the node's uplinks: attached, swapped
//! in place on upgrade, read back for `status`, and removed by `uninstall`.
//!
//! Two ways to sit on a device's egress hook, chosen per kernel:
//! - **tcx** (6.6+): a bpf_link per device, created first in the hook's order
//!   (`BPF_F_BEFORE` with no anchor) and pinned at `links/uplink_<ifindex>`, so it stays
//!   while no agent runs; a new program replaces the old on the same link
//!   (`BPF_LINK_UPDATE`), without a gap. A program attached later with the same "first"
//!   request goes in front of ours: `status` says whether ours still runs first.
//! - **clsact** (older kernels): a `clsact` qdisc and a direct-action `cls_bpf` filter
//!   at priority [`FILTER_PRIORITY`] (the first a filter can take), handle
//!   [`FILTER_HANDLE`]. The filter holds the program in the kernel without any pin; a
//!   new program replaces it at the same priority and handle, in one netlink request.
//!
//! Either way the program the uplinks run is pinned at `programs/uplink`, so a
//! restarted agent compares it with its own (by id, then tag) without opening
//! programs by id.

use std::{fs, os::fd::AsFd};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, LinkOrder},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
};
use metadata_guard_common::{map_names, UplinkAllowKey, AF_INET, AF_INET6, UPLINK_ALLOW_MAX_ENTRIES};
use metadata_guard_netfilter::{devices, NlSocket};

use super::{bpf_sys, links::open_link, pins::PinLayout, Backstop, Guard};

/// The program pin of the uplinks (`programs/uplink`).
pub const PROGRAM_PIN: &str = "uplink";
/// Prefix of the tcx link pins (`links/uplink_<ifindex>`).
const LINK_PIN_PREFIX: &str = "uplink_";
/// cls_bpf priority: the first a filter can take (0 asks the kernel to choose).
pub const FILTER_PRIORITY: u16 = 1;
/// cls_bpf handle of our filter ("MG").
pub const FILTER_HANDLE: u32 = 0x4d47;

/// How the uplink program sits on a device's egress hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// A pinned bpf_link (kernels 6.6+).
    Tcx,
    /// A clsact qdisc with a direct-action cls_bpf filter (every kernel).
    Clsact,
}

impl TcAttach {
    /// The best this kernel has.
    pub fn detect() -> TcAttach {
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            TcAttach::Tcx
        } else {
            TcAttach::Clsact
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TcAttach::Tcx => "tcx",
            TcAttach::Clsact => "clsact",
        }
    }
}

/// A device the program goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkDevice {
    pub index: u32,
    pub name: String,
}

/// What happened on one uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UplinkAction {
    Attached,
    Kept,
    Replaced,
}

/// The program the uplinks run under this backstop (the same way of knowing a host
/// socket: the kernel's netns cookie, or the marks `sock_create` writes).
pub fn program_name(backstop: Backstop) -> &'static str {
    match backstop {
        Backstop::NetnsHelper => metadata_guard_common::program_names::UPLINK,
        Backstop::SocketMarks => metadata_guard_common::program_names::UPLINK_MARKS,
    }
}

pub fn link_pin(layout: &PinLayout, ifindex: u32) -> std::path::PathBuf {
    layout.link(&format!("{LINK_PIN_PREFIX}{ifindex}"))
}

impl Guard {
    /// Loads (verifies) the uplink program of this guard's backstop, once.
    fn uplink_program(&mut self) -> Result<&mut SchedClassifier> {
        let name = program_name(self.plan.backstop);
        let program =
            self.ebpf.program_mut(name).with_context(|| format!("the kernel object has no program {name}"))?;
        let program: &mut SchedClassifier = program.try_into()?;
        if program.fd().is_err() {
            program.load().with_context(|| format!("the kernel's verifier refused program {name}"))?;
        }
        Ok(program)
    }

    /// Makes `dev`'s egress hook run our uplink program, by `how`.
    pub fn guard_uplink(&mut self, dev: &UplinkDevice, how: TcAttach) -> Result<UplinkAction> {
        fs::create_dir_all(self.pins.links_dir()).context("could not create the link pin directory")?;
        fs::create_dir_all(self.pins.programs_dir()).context("could not create the program pin directory")?;
        let pins = self.pins.clone();
        let program_pin = pins.program(PROGRAM_PIN);
        let program = self.uplink_program()?;
        let new_tag = program.info()?.tag();
        let new_fd = program.fd()?.as_fd().try_clone_to_owned()?;
        let running = super::links::pinned_program_id_tag(&program_pin)?;
        let action = match how {
            TcAttach::Tcx => {
                let pin = link_pin(&pins, dev.index);
                let existing = match open_link(&pin)? {
                    Some(link) => match bpf_sys::tcx_link_info(link.as_fd()) {
                        Ok(info) if info.ifindex == dev.index => Some((link, info)),
                        // A stale pin: the device it was on is gone (or another took its index).
                        _ => {
                            remove_link_pin(&pin)?;
                            None
                        }
                    },
                    None => None,
                };
                match existing {
                    Some((_, info)) if running.is_some_and(|(id, tag)| id == info.prog_id && tag == new_tag) => {
                        UplinkAction::Kept
                    }
                    Some((link, _)) => {
                        bpf_sys::link_update(link.as_fd(), new_fd.as_fd(), None)
                            .with_context(|| format!("could not swap the program of link {}", pin.display()))?;
                        UplinkAction::Replaced
                    }
                    None => {
                        let id = program
                            .attach_with_options(
                                &dev.name,
                                TcAttachType::Egress,
                                TcAttachOptions::TcxOrder(LinkOrder::first()),
                            )
                            .with_context(|| format!("could not attach the uplink program to {} (tcx)", dev.name))?;
                        let link = FdLink::try_from(program.take_link(id)?)
                            .context("a tcx attachment came back without a bpf_link")?;
                        link.pin(&pin).with_context(|| format!("could not pin link at {}", pin.display()))?;
                        UplinkAction::Attached
                    }
                }
            }
            TcAttach::Clsact => {
                let ours = our_filter(dev.index)?;
                match ours {
                    Some(f)
                        if f.bpf_id.is_some()
                            && running.is_some_and(|(id, tag)| Some(id) == f.bpf_id && tag == new_tag) =>
                    {
                        UplinkAction::Kept
                    }
                    Some(_) => {
                        let link = SchedClassifierLink::attached(
                            &dev.name,
                            TcAttachType::Egress,
                            FILTER_PRIORITY,
                            TcHandle::from(FILTER_HANDLE),
                            None,
                        )
                        .with_context(|| format!("no device {}", dev.name))?;
                        let id = program
                            .attach_to_link(link)
                            .with_context(|| format!("could not replace the uplink filter on {}", dev.name))?;
                        // The filter stays in the kernel: dropping the link would remove it.
                        std::mem::forget(program.take_link(id)?);
                        UplinkAction::Replaced
                    }
                    None => {
                        match tc::qdisc_add_clsact(&dev.name) {
                            Ok(()) => {}
                            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                            Err(e) => {
                                return Err(e).with_context(|| format!("could not add a clsact qdisc to {}", dev.name));
                            }
                        }
                        let options = NlOptions {
                            priority: FILTER_PRIORITY,
                            handle: TcHandle::from(FILTER_HANDLE),
                            classid: None,
                        };
                        let id = program
                            .attach_with_options(&dev.name, TcAttachType::Egress, TcAttachOptions::Netlink(options))
                            .with_context(|| {
                                format!("could not attach the uplink program to {} (clsact, cls_bpf)", dev.name)
                            })?;
                        std::mem::forget(program.take_link(id)?);
                        UplinkAction::Attached
                    }
                }
            }
        };
        if action != UplinkAction::Kept {
            self.pin_uplink_program()?;
        }
        Ok(action)
    }

    fn pin_uplink_program(&mut self) -> Result<()> {
        let path = self.pins.program(PROGRAM_PIN);
        let tmp = super::links::staging(&path);
        let _ = fs::remove_file(&tmp);
        self.uplink_program()?
            .pin(&tmp)
            .with_context(|| format!("could not pin the uplink program at {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("could not replace program pin {}", path.display()))
    }

    /// Removes the tcx link pins of devices that no longer exist (`live`: the
    /// indexes that do); their links detached with the device.
    pub fn forget_vanished_uplinks(&self, live: &[u32]) -> Result<()> {
        for (index, how) in pinned_links(&self.pins) {
            if how == TcAttach::Tcx && !live.contains(&index) {
                remove_link_pin(&link_pin(&self.pins, index))?;
            }
        }
        Ok(())
    }

    /// Takes our program off `dev`'s egress hook (both ways); whether it was there.
    pub fn unguard_uplink(&self, dev: &UplinkDevice) -> Result<bool> {
        remove_uplink(&self.pins, dev.index)
    }
}

/// Our cls_bpf filter on device `ifindex`'s egress hook, if any.
fn our_filter(ifindex: u32) -> Result<Option<devices::TcFilter>> {
    let mut sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
    let filters = devices::egress_filters(&mut sock, ifindex)
        .with_context(|| format!("could not list the tc filters of interface {ifindex}"))?;
    Ok(filters.into_iter().find(|f| f.priority == FILTER_PRIORITY && f.handle == FILTER_HANDLE && f.kind == "bpf"))
}

fn remove_link_pin(pin: &std::path::Path) -> Result<()> {
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
pub fn remove_uplink(layout: &PinLayout, ifindex: u32) -> Result<bool> {
    let pin = link_pin(layout, ifindex);
    let had_link = pin.exists();
    remove_link_pin(&pin)?;
    let Some(filter) = our_filter(ifindex)? else { return Ok(had_link) };
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
fn pinned_links(layout: &PinLayout) -> Vec<(u32, TcAttach)> {
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
pub fn guarded(layout: &PinLayout) -> Result<Vec<(u32, TcAttach)>> {
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
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UplinkHook {
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
pub fn uplink_hook(layout: &PinLayout, ifindex: u32) -> Result<UplinkHook> {
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

/// The keys of `MG_UPLINK_ALLOW` for the allowlisted pods' entries into the node.
pub fn allow_keys(allowed: &crate::hostside::Allowed) -> std::collections::BTreeSet<UplinkAllowKey> {
    let mut keys = std::collections::BTreeSet::new();
    for ifindex in &allowed.interfaces {
        keys.insert(UplinkAllowKey { ifindex: *ifindex, ..UplinkAllowKey::default() });
    }
    for (ifindex, addr) in &allowed.v4 {
        let mut key = UplinkAllowKey { ifindex: *ifindex, family: AF_INET, ..UplinkAllowKey::default() };
        key.addr[..4].copy_from_slice(&addr.octets());
        keys.insert(key);
    }
    for (ifindex, addr) in &allowed.v6 {
        keys.insert(UplinkAllowKey { ifindex: *ifindex, family: AF_INET6, _pad: [0; 3], addr: addr.octets() });
    }
    keys
}

impl Guard {
    /// Makes the uplink's allowlist exactly the entries of `allowed` (the host side's
    /// view of the allowlisted pods); returns (added, removed).
    pub fn sync_uplink_allowed(&mut self, allowed: &crate::hostside::Allowed) -> Result<(usize, usize)> {
        let wanted = allow_keys(allowed);
        let map = self.ebpf.map_mut(map_names::UPLINK_ALLOW).context("no uplink allowlist map")?;
        let mut map: aya::maps::HashMap<&mut aya::maps::MapData, UplinkAllowKey, u8> =
            aya::maps::HashMap::try_from(map)?;
        let present: std::collections::BTreeSet<UplinkAllowKey> = map.keys().collect::<Result<_, _>>()?;
        let mut removed = 0;
        for stale in present.difference(&wanted) {
            map.remove(stale).context("could not remove an entry from the uplink allowlist")?;
            removed += 1;
        }
        let mut added = 0;
        for new in wanted.difference(&present) {
            map.insert(new, 1, 0).with_context(|| {
                format!("could not add to the uplink allowlist; it holds at most {UPLINK_ALLOW_MAX_ENTRIES} entries")
            })?;
            added += 1;
        }
        Ok((added, removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlisted_entries_become_whole_interface_and_address_keys() {
        let allowed = crate::hostside::Allowed {
            interfaces: vec![7],
            v4: vec![(3, "10.244.0.9".parse().unwrap())],
            v6: vec![(3, "fd00:10:244::9".parse().unwrap())],
        };
        let keys: Vec<UplinkAllowKey> = allow_keys(&allowed).into_iter().collect();
        assert_eq!(keys.len(), 3);
        assert!(keys.contains(&UplinkAllowKey { ifindex: 7, ..UplinkAllowKey::default() }));
        let v4 = keys.iter().find(|k| k.family == AF_INET).unwrap();
        assert_eq!((v4.ifindex, &v4.addr[..4], &v4.addr[4..]), (3, &[10, 244, 0, 9][..], &[0u8; 12][..]));
        let v6 = keys.iter().find(|k| k.family == AF_INET6).unwrap();
        assert_eq!(std::net::Ipv6Addr::from(v6.addr), "fd00:10:244::9".parse::<std::net::Ipv6Addr>().unwrap());
    }
}
