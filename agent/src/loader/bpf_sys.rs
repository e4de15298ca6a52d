// SPDX-License-Identifier: Apache-2.0
//! The bpf(2) commands aya 0.14 does not expose, on aya-obj's generated kernel
//! types: an fd for a pinned link (aya keeps a link's fd private), the cgroup a link
//! is attached to (aya's `LinkInfo` has no cgroup member), swapping the program of a
//! link in place (`BPF_LINK_UPDATE`, in aya only after 0.16), and detaching a link at
//! once (`BPF_LINK_DETACH`).
//!
//! None of them needs more than CAP_BPF and access to the pin's file: unlike
//! `BPF_PROG_GET_FD_BY_ID`, which the kernel allows to CAP_SYS_ADMIN only.

use std::{
    ffi::CString,
    io,
    mem::{self, size_of},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type, BPF_F_REPLACE};

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a whole, zero-initialised bpf_attr whose members for `cmd` are
    // set; the kernel reads (and for info, writes) within its size.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd as u32, attr as *mut bpf_attr, size_of::<bpf_attr>() as u32) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is plain old data; all zeroes is its documented empty value.
    unsafe { mem::zeroed() }
}

/// Opens a pinned BPF object (link, program or map): `BPF_OBJ_GET`, which needs only
/// read and write access to the pin's file.
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    let fd = sys_bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// What a cgroup link holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CgroupLink {
    pub id: u32,
    /// The program the link runs now.
    pub prog_id: u32,
    pub cgroup_id: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link, which must be of type `kind` (named `what` in the
/// error otherwise).
fn link_info(link: BorrowedFd<'_>, kind: bpf_link_type, what: &str) -> io::Result<bpf_link_info> {
    // SAFETY: plain old data, all zeroes is valid.
    let mut info: bpf_link_info = unsafe { mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = link.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_link_info>() as u32;
    attr.info.info = &mut info as *mut bpf_link_info as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != kind as u32 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("link type {} is not a {what} link", info.type_),
        ));
    }
    Ok(info)
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link; fails with `EINVAL` when it is not a cgroup link.
pub(super) fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLink> {
    let info = link_info(link, bpf_link_type::BPF_LINK_TYPE_CGROUP, "cgroup")?;
    // SAFETY: the kernel filled the cgroup member, as the link type says.
    let cgroup_id = unsafe { info.__bindgen_anon_1.cgroup.cgroup_id };
    Ok(CgroupLink { id: info.id, prog_id: info.prog_id, cgroup_id })
}

/// Makes the link run `new_prog`, in one step: every hook invocation sees either the
/// old or the new program, never none. With `expected_old`, only if the link still
/// runs that program (`BPF_F_REPLACE`); otherwise `EPERM`.
pub(super) fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    expected_old: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    if let Some(old) = expected_old {
        attr.link_update.flags = BPF_F_REPLACE;
        attr.link_update.__bindgen_anon_2.old_prog_fd = old.as_raw_fd() as u32;
    }
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link now (`BPF_LINK_DETACH`, 5.9+). Unlinking a link's last pin detaches
/// it too, but only once bpffs frees the inode after an RCU grace period: a caller that
/// must know the hook is empty when it returns (uninstall) detaches first.
pub(super) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

/// What a tcx link holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TcxLink {
    pub id: u32,
    pub prog_id: u32,
    /// 0 once the device is gone (the link stays, detached).
    pub ifindex: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link; fails with `EINVAL` when it is not a tcx link.
pub(super) fn tcx_link_info(link: BorrowedFd<'_>) -> io::Result<TcxLink> {
    let info = link_info(link, bpf_link_type::BPF_LINK_TYPE_TCX, "tcx")?;
    // SAFETY: the kernel filled the tcx member, as the link type says.
    let ifindex = unsafe { info.__bindgen_anon_1.tcx.ifindex };
    Ok(TcxLink { id: info.id, prog_id: info.prog_id, ifindex })
}

/// The programs on a device's tcx egress hook, in the order they run
/// (`BPF_PROG_QUERY`, 6.6+; needs no more than CAP_NET_ADMIN/CAP_BPF).
pub(super) fn tcx_egress_programs(ifindex: u32) -> io::Result<Vec<u32>> {
    const MAX_PROGRAMS: usize = 64;
    let mut ids = [0u32; MAX_PROGRAMS];
    let mut attr = zeroed_attr();
    attr.query.__bindgen_anon_1.target_ifindex = ifindex;
    attr.query.attach_type = aya_obj::generated::bpf_attach_type::BPF_TCX_EGRESS as u32;
    attr.query.prog_ids = ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.count = MAX_PROGRAMS as u32;
    sys_bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr)?;
    // SAFETY: the kernel wrote the count back.
    let count = unsafe { attr.query.__bindgen_anon_2.count } as usize;
    Ok(ids[..count.min(MAX_PROGRAMS)].to_vec())
}
