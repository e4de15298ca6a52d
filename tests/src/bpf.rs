// SPDX-License-Identifier: Apache-2.0
//! The bpf(2) calls the tests make themselves, on aya-obj's generated kernel types (as
//! the agent's `loader/bpf_sys.rs` does): loading and attaching tiny programs beside
//! the guard, opening pins, reading what the kernel says of a program or link, map
//! elements, and the run-time statistics switch.
//!
//! Not the agent's code on purpose: a test must not share the code it checks.

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

pub use aya_obj::generated::{
    bpf_attach_type, bpf_link_info, bpf_prog_info, bpf_prog_type, BPF_F_ALLOW_MULTI, BPF_F_BEFORE,
};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_stats_type};

/// `r0 = 1; exit`: a program that lets everything through and does nothing else.
pub const RETURN_ONE: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];

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

/// For the commands that return a new fd.
fn sys_bpf_fd(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let fd = sys_bpf(cmd, attr)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn zeroed<T>() -> T {
    // SAFETY: only used for the kernel's plain-old-data types (bpf_attr, bpf_*_info),
    // for which all zeroes is the documented empty value.
    unsafe { mem::zeroed() }
}

/// Loads `insns` as a program of `prog_type` for `attach_type`, named `name` (at most
/// 15 bytes), GPL-licensed.
pub fn prog_load(
    prog_type: bpf_prog_type,
    attach_type: bpf_attach_type,
    insns: &[u64],
    name: &str,
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0 as libc::c_char; 16];
    for (dst, src) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_3.prog_type = prog_type as u32;
    attr.__bindgen_anon_3.insn_cnt = insns.len() as u32;
    attr.__bindgen_anon_3.insns = insns.as_ptr() as u64;
    attr.__bindgen_anon_3.license = license.as_ptr() as u64;
    attr.__bindgen_anon_3.expected_attach_type = attach_type as u32;
    attr.__bindgen_anon_3.prog_name = prog_name;
    sys_bpf_fd(bpf_cmd::BPF_PROG_LOAD, &mut attr)
}

/// `r0 = bpf_get_netns_cookie(ctx); r0 = 1; exit`: whether a program type may ask a
/// socket's namespace cookie (cgroup_skb programs may from 2025 kernels on).
pub const CALL_NETNS_COOKIE: [u64; 3] = [0x0000_007a_0000_0085, 0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];

/// Whether this kernel's cgroup_skb programs have `bpf_get_netns_cookie`, asked
/// independently of the agent's own probe.
pub fn cgroup_skb_has_netns_cookie() -> bool {
    prog_load(
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SKB,
        bpf_attach_type::BPF_CGROUP_INET_EGRESS,
        &CALL_NETNS_COOKIE,
        "mg_probe_netns",
    )
    .is_ok()
}

/// The hooks an agent in enforce or audit mode keeps attached on this kernel:
/// `sock_create` only where the packet backstop reads socket marks (its cgroup_skb
/// programs lack `bpf_get_netns_cookie`).
pub fn enforcement_hooks() -> Vec<&'static str> {
    let mut hooks = vec!["connect4", "connect6", "sendmsg4", "sendmsg6"];
    if !cgroup_skb_has_netns_cookie() {
        hooks.push("sock_create");
    }
    hooks.push("egress");
    hooks.push("options");
    hooks
}

/// Opens a pinned object (link, program or map): `BPF_OBJ_GET`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_4.pathname = c.as_ptr() as u64;
    sys_bpf_fd(bpf_cmd::BPF_OBJ_GET, &mut attr)
}

/// Attaches `prog` to the cgroup open at `cgroup` with a new bpf_link.
pub fn link_create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: bpf_attach_type) -> io::Result<OwnedFd> {
    let mut attr: bpf_attr = zeroed();
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.__bindgen_anon_2.target_fd = cgroup.as_raw_fd() as u32;
    attr.link_create.attach_type = attach_type as u32;
    sys_bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// Attaches `prog` to device `ifindex` of the calling thread's namespace with a tcx
/// link (6.6+); `flags` place it among the device's others (`BPF_F_BEFORE`: first).
pub fn tcx_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    attach_type: bpf_attach_type,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr: bpf_attr = zeroed();
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.__bindgen_anon_2.target_ifindex = ifindex;
    attr.link_create.attach_type = attach_type as u32;
    attr.link_create.flags = flags;
    sys_bpf_fd(bpf_cmd::BPF_LINK_CREATE, &mut attr)
}

/// Attaches `prog` to the cgroup open at `cgroup` the pre-link way (`BPF_PROG_ATTACH`):
/// it stays attached until detached or the cgroup goes.
pub fn prog_attach(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: bpf_attach_type,
    flags: u32,
) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_5.__bindgen_anon_1.target_fd = cgroup.as_raw_fd() as u32;
    attr.__bindgen_anon_5.attach_bpf_fd = prog.as_raw_fd() as u32;
    attr.__bindgen_anon_5.attach_type = attach_type as u32;
    attr.__bindgen_anon_5.attach_flags = flags;
    sys_bpf(bpf_cmd::BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// Makes `link` run `new_prog` (`BPF_LINK_UPDATE`, unconditionally).
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.link_update.link_fd = link.as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_raw_fd() as u32;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`, a kernel info struct.
fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<T>() as u32;
    attr.info.info = info as *mut T as u64;
    sys_bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// What the kernel says of a program: its id, tag, run count (with statistics on), ...
pub fn prog_info(prog: BorrowedFd<'_>) -> io::Result<bpf_prog_info> {
    let mut info: bpf_prog_info = zeroed();
    info_by_fd(prog, &mut info)?;
    Ok(info)
}

/// What the kernel says of a link: its id, the program it runs, ...
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<bpf_link_info> {
    let mut info: bpf_link_info = zeroed();
    info_by_fd(link, &mut info)?;
    Ok(info)
}

/// Sets `key` to `value` in the map open at `map` (`BPF_ANY`).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_2.map_fd = map.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = key.as_ptr() as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Removes `key` from the map open at `map`.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<()> {
    let mut attr: bpf_attr = zeroed();
    attr.__bindgen_anon_2.map_fd = map.as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = key.as_ptr() as u64;
    sys_bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// Switches on the kernel's run-time statistics (programs' `run_cnt`, `run_time_ns`)
/// for as long as the returned fd is open (`BPF_ENABLE_STATS`: 5.8+, CAP_SYS_ADMIN).
pub fn enable_stats() -> io::Result<OwnedFd> {
    let mut attr: bpf_attr = zeroed();
    attr.enable_stats.type_ = bpf_stats_type::BPF_STATS_RUN_TIME as u32;
    sys_bpf_fd(bpf_cmd::BPF_ENABLE_STATS, &mut attr)
}

/// How many programs are attached to the cgroup open at `cgroup` itself (not inherited)
/// for `attach_type`, links included (`BPF_PROG_QUERY`).
pub fn prog_count(cgroup: BorrowedFd<'_>, attach_type: bpf_attach_type) -> io::Result<u32> {
    let mut attr: bpf_attr = zeroed();
    attr.query.__bindgen_anon_1.target_fd = cgroup.as_raw_fd() as u32;
    attr.query.attach_type = attach_type as u32;
    sys_bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr)?;
    // SAFETY: BPF_PROG_QUERY wrote the count into the query member the call used.
    Ok(unsafe { attr.query.__bindgen_anon_2.prog_cnt })
}

/// The ids of the programs on device `ifindex`'s tcx hook of the calling thread's
/// namespace, in the order they run (`BPF_PROG_QUERY`; kernels before 6.6 refuse).
pub fn tcx_prog_ids(ifindex: u32, attach_type: bpf_attach_type) -> io::Result<Vec<u32>> {
    const MAX: usize = 64;
    let mut ids = [0u32; MAX];
    let mut attr: bpf_attr = zeroed();
    attr.query.__bindgen_anon_1.target_ifindex = ifindex;
    attr.query.attach_type = attach_type as u32;
    attr.query.prog_ids = ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.prog_cnt = MAX as u32;
    sys_bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr)?;
    // SAFETY: BPF_PROG_QUERY wrote the count into the query member the call used.
    let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
    Ok(ids[..count.min(MAX)].to_vec())
}

/// The id of the program open at `prog`.
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(prog_info(prog)?.id)
}
