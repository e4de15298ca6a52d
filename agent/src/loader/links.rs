// SPDX-License-Identifier: Apache-2.0
//! The guard's pinned links and the programs pinned beside them: attach, swap
//! (`BPF_LINK_UPDATE`, no gap), move to another cgroup, detach, and read back.

use std::{
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::programs::ProgramInfo;

use super::{bpf_sys, pins::PinLayout, programs, Guard, LinkAction};

impl Guard {
    /// Loads the program and makes the pinned link of its attachment on `cgroup` run it.
    pub(super) fn link_program(
        &mut self,
        a: &programs::Attachment,
        cgroup: &File,
        cgroup_id: u64,
    ) -> Result<LinkAction> {
        let plan = self.plan;
        let new_fd = programs::load(&mut self.ebpf, a, plan)?;
        let new_tag = programs::info(&self.ebpf, a, plan)?.tag();
        let pin = self.pins.link(a.pin);

        let Some(link) = open_link(&pin)? else {
            let fresh = programs::attach(&mut self.ebpf, a, plan, cgroup)?;
            fresh.pin(&pin).with_context(|| format!("could not pin link at {}", pin.display()))?;
            self.pin_program(a)?;
            return Ok(LinkAction::Attached);
        };
        let info = bpf_sys::cgroup_link_info(link.as_fd())
            .with_context(|| format!("could not inspect link {}", pin.display()))?;
        if info.cgroup_id != cgroup_id {
            // Attached elsewhere (the --cgroup changed): ours first, then theirs goes.
            let fresh = programs::attach(&mut self.ebpf, a, plan, cgroup)?;
            let tmp = staging(&pin);
            let _ = fs::remove_file(&tmp);
            fresh.pin(&tmp).with_context(|| format!("could not pin link at {}", tmp.display()))?;
            fs::rename(&tmp, &pin).with_context(|| format!("could not replace link pin {}", pin.display()))?;
            self.pin_program(a)?;
            return Ok(LinkAction::Moved);
        }
        // The program pinned beside the link, if it is the one the link runs. It is
        // not when an older agent pinned no programs, or died between swapping a link
        // and re-pinning: then the link's program is unknown and gets replaced.
        let running = pinned_program(&self.pins.program(a.pin))?.filter(|p| p.id == info.prog_id);
        if running.as_ref().is_some_and(|p| p.tag == new_tag) {
            return Ok(LinkAction::Kept);
        }
        let expected = running.as_ref().map(|p| p.fd.as_fd());
        bpf_sys::link_update(link.as_fd(), new_fd.as_fd(), expected)
            .with_context(|| format!("could not swap the program of link {}", pin.display()))?;
        self.pin_program(a)?;
        Ok(LinkAction::Replaced)
    }

    /// Pins our loaded program of `a` as the one its link runs, replacing the pin in
    /// one rename.
    fn pin_program(&mut self, a: &programs::Attachment) -> Result<()> {
        let path = self.pins.program(a.pin);
        let tmp = staging(&path);
        let _ = fs::remove_file(&tmp);
        programs::pin(&mut self.ebpf, a, self.plan, &tmp)?;
        fs::rename(&tmp, &path).with_context(|| format!("could not replace program pin {}", path.display()))
    }

    /// Detaches and unpins the pinned link of `a` (and its program's pin); whether a
    /// link was pinned.
    pub(super) fn unlink(&mut self, a: &programs::Attachment) -> Result<bool> {
        let pin = self.pins.link(a.pin);
        let program_pin = self.pins.program(a.pin);
        let link = open_link(&pin)?;
        if let Some(link) = &link {
            // Detached before unpinned, as in `remove_pins`: the unpin alone lets the
            // hook run on until bpffs frees the inode. Should the detach fail, the unpin
            // still ends the link once no fd holds it.
            if let Err(e) = bpf_sys::link_detach(link.as_fd()) {
                tracing::debug!("could not detach {} before unpinning it: {e}", pin.display());
            }
            fs::remove_file(&pin).with_context(|| format!("could not remove link pin {}", pin.display()))?;
        }
        match fs::remove_file(&program_pin) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("could not remove program pin {}", program_pin.display())),
        }
        Ok(link.is_some())
    }
}

/// Where a pin is staged before a rename puts it in place: beside it, without a dot
/// (bpffs refuses names with dots, EPERM).
pub(super) fn staging(pin: &Path) -> PathBuf {
    let mut name = pin.file_name().unwrap_or_default().to_os_string();
    name.push("_new");
    pin.with_file_name(name)
}

/// The pinned link at `pin`, or None when nothing is pinned there.
pub(super) fn open_link(pin: &Path) -> Result<Option<std::os::fd::OwnedFd>> {
    match bpf_sys::obj_get(pin) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!("could not open the pinned link {}; the agent needs read-write access to its bpffs", pin.display())
        }),
    }
}

/// A program opened from its pin: BPF_OBJ_GET needs only access to the file.
struct PinnedProgram {
    fd: std::os::fd::OwnedFd,
    id: u32,
    tag: u64,
    name: String,
}

/// The id and tag of the program pinned at `pin`, if any.
pub(super) fn pinned_program_id_tag(pin: &Path) -> Result<Option<(u32, u64)>> {
    Ok(pinned_program(pin)?.map(|p| (p.id, p.tag)))
}

/// The id and name of the program pinned at `pin`, if any.
pub(super) fn pinned_program_info(pin: &Path) -> Result<Option<(u32, String)>> {
    Ok(pinned_program(pin)?.map(|p| (p.id, p.name)))
}

fn pinned_program(pin: &Path) -> Result<Option<PinnedProgram>> {
    let fd = match bpf_sys::obj_get(pin) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("could not open the pinned program {}", pin.display())),
    };
    let info = ProgramInfo::from_pin(pin).with_context(|| format!("could not inspect program {}", pin.display()))?;
    let name = info.name_as_str().unwrap_or_default().to_string();
    Ok(Some(PinnedProgram { fd, id: info.id(), tag: info.tag(), name }))
}

/// One hook's link as pinned: what `status` and `check` show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PinnedHook {
    pub link_id: u32,
    pub program_id: u32,
    pub cgroup_id: u64,
    /// Name and tag (hex) of the program the link runs, when the program pinned beside
    /// it is that program; None for pins of an agent that pinned no programs (the
    /// next agent to start re-pins them).
    pub program: Option<(String, String)>,
}

/// Reads the pins of `hook` without touching them; None when no link is pinned.
pub(crate) fn pinned_hook(layout: &PinLayout, hook: &str) -> Result<Option<PinnedHook>> {
    let pin = layout.link(hook);
    let Some(link) = open_link(&pin)? else { return Ok(None) };
    let info =
        bpf_sys::cgroup_link_info(link.as_fd()).with_context(|| format!("could not inspect link {}", pin.display()))?;
    let program = pinned_program(&layout.program(hook))?
        .filter(|p| p.id == info.prog_id)
        .map(|p| (p.name, format!("{:016x}", p.tag)));
    Ok(Some(PinnedHook { link_id: info.id, program_id: info.prog_id, cgroup_id: info.cgroup_id, program }))
}
