// SPDX-License-Identifier: Apache-2.0
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

use std::{collections::BTreeSet, fs, os::fd::AsFd};

use anyhow::{Context, Result};
use aya::{
    programs::{
        links::{FdLink, LinkOrder},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
};
use metadata_guard_common::{map_names, UplinkAllowKey, UPLINK_ALLOW_MAX_ENTRIES};

use super::{
    bpf_sys,
    links::open_link,
    pins::PinLayout,
    uplink_state::{our_filter, pinned_links, remove_link_pin, remove_uplink_filter},
    Backstop, Guard,
};

/// The program pin of the uplinks (`programs/uplink`).
pub(crate) const PROGRAM_PIN: &str = "uplink";
/// Prefix of the tcx link pins (`links/uplink_<ifindex>`).
pub(super) const LINK_PIN_PREFIX: &str = "uplink_";
/// cls_bpf priority: the first a filter can take (0 asks the kernel to choose).
pub(crate) const FILTER_PRIORITY: u16 = 1;
/// cls_bpf handle of our filter ("MG").
pub(crate) const FILTER_HANDLE: u32 = 0x4d47;

/// How the uplink program sits on a device's egress hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TcAttach {
    /// A pinned bpf_link (kernels 6.6+).
    Tcx,
    /// A clsact qdisc with a direct-action cls_bpf filter (every kernel).
    Clsact,
}

impl TcAttach {
    /// The best this kernel has.
    pub(crate) fn detect() -> TcAttach {
        if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
            TcAttach::Tcx
        } else {
            TcAttach::Clsact
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            TcAttach::Tcx => "tcx",
            TcAttach::Clsact => "clsact",
        }
    }
}

/// A device the program goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UplinkDevice {
    pub index: u32,
    pub name: String,
}

/// What happened on one uplink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UplinkAction {
    Attached,
    Kept,
    Replaced,
}

/// The program the uplinks run under this backstop (the same way of knowing a host
/// socket: the kernel's netns cookie, or the marks `sock_create` writes).
pub(crate) fn program_name(backstop: Backstop) -> &'static str {
    match backstop {
        Backstop::NetnsHelper => metadata_guard_common::program_names::UPLINK,
        Backstop::SocketMarks => metadata_guard_common::program_names::UPLINK_MARKS,
    }
}

pub(crate) fn link_pin(layout: &PinLayout, ifindex: u32) -> std::path::PathBuf {
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
    pub(crate) fn guard_uplink(&mut self, dev: &UplinkDevice, how: TcAttach) -> Result<UplinkAction> {
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
        // Ours by the other way goes only now that this one is in place (an agent of
        // another `--uplink-attach`, or one that chose otherwise): no gap, and never
        // two of ours on one hook.
        match how {
            TcAttach::Tcx => {
                if our_filter(dev.index)?.is_some() {
                    remove_uplink_filter(dev.index)?;
                }
            }
            TcAttach::Clsact => remove_link_pin(&link_pin(&pins, dev.index))?,
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
    pub(crate) fn forget_vanished_uplinks(&self, live: &[u32]) -> Result<()> {
        for (index, how) in pinned_links(&self.pins) {
            if how == TcAttach::Tcx && !live.contains(&index) {
                remove_link_pin(&link_pin(&self.pins, index))?;
            }
        }
        Ok(())
    }
}

impl Guard {
    /// Makes the uplink's allowlist exactly `wanted` (see `uplink::allow_keys`);
    /// returns (added, removed).
    pub(crate) fn sync_uplink_allowed(&mut self, wanted: &BTreeSet<UplinkAllowKey>) -> Result<(usize, usize)> {
        let map = self.ebpf.map_mut(map_names::UPLINK_ALLOW).context("no uplink allowlist map")?;
        let mut map: aya::maps::HashMap<&mut aya::maps::MapData, UplinkAllowKey, u8> =
            aya::maps::HashMap::try_from(map)?;
        let present: BTreeSet<UplinkAllowKey> = map.keys().collect::<Result<_, _>>()?;
        let mut removed = 0;
        for stale in present.difference(wanted) {
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
