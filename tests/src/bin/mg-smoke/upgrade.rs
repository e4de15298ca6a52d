// SPDX-License-Identifier: Apache-2.0
//! An upgrade under the manifest's capabilities: the pinned `connect4` link is made to
//! run another program (as an agent of another version would have left it), so the
//! next agent container, holding exactly the manifest's capabilities, must recognise
//! the difference and swap its own program in with BPF_LINK_UPDATE.
//!
//! The tests' own bpf(2) calls on purpose: the test must not share the agent's code
//! for what it checks.

use std::{os::fd::AsFd, path::Path};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::bpf::{self, bpf_attach_type, bpf_prog_type};

fn open(pin: &Path) -> Result<std::os::fd::OwnedFd> {
    bpf::obj_get(pin).with_context(|| format!("could not open the pin {}", pin.display()))
}

/// The program the link pinned at `link` runs now.
pub(crate) fn linked_program(link: &Path) -> Result<u32> {
    let info = bpf::link_info(open(link)?.as_fd()).context("BPF_OBJ_GET_INFO_BY_FD failed")?;
    Ok(info.prog_id)
}

/// The id of the program pinned at `pin`.
pub(crate) fn pinned_program(pin: &Path) -> Result<u32> {
    Ok(bpf::prog_info(open(pin)?.as_fd()).context("BPF_OBJ_GET_INFO_BY_FD failed")?.id)
}

/// Makes the link pinned at `link` run an allow-everything connect4 program; returns
/// that program's id.
pub(crate) fn plant_other_program(link: &Path) -> Result<u32> {
    let prog = bpf::prog_load(
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        &bpf::RETURN_ONE,
        "",
    )
    .context("could not load the stand-in older program")?;
    bpf::link_update(open(link)?.as_fd(), prog.as_fd())
        .with_context(|| format!("BPF_LINK_UPDATE of {} failed", link.display()))?;
    let planted = bpf::prog_info(prog.as_fd()).context("BPF_OBJ_GET_INFO_BY_FD failed")?.id;
    ensure!(linked_program(link)? == planted, "the link does not run the planted program");
    Ok(planted)
}
