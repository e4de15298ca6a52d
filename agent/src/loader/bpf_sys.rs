//! The few bpf(2) commands aya 0.14 does not expose: reopening a pinned link, reading
//! which program and cgroup a link holds, and swapping a link's program atomically.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `BPF_F_REPLACE`: only replace if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a properly sized, initialised bpf_attr prefix for `cmd`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Opens a pinned BPF object (link, map or program).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..Default::default() };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn get_info<T: Default>(fd: BorrowedFd<'_>) -> io::Result<T> {
    let mut info = T::default();
    let mut attr =
        InfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of::<T>() as u32, info: &mut info as *mut T as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// `struct bpf_link_info` up to its cgroup member.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let raw: RawLinkInfo = get_info(fd)?;
    Ok(LinkInfo { id: raw.id, prog_id: raw.prog_id, cgroup_id: raw.cgroup_id, attach_type: raw.attach_type })
}

/// `struct bpf_prog_info` up to `run_cnt`; the kernel fills what it knows.
#[repr(C)]
#[derive(Default)]
struct RawProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    _lens_and_ptrs: [u64; 6],
    name: [u8; 16],
    _rest: [u64; 14],
    run_time_ns: u64,
    run_cnt: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    /// Hash of the program's instructions (map references zeroed): equal tags mean
    /// equal code, whichever load it came from.
    pub tag: [u8; 8],
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

pub fn prog_info(fd: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    let raw: RawProgInfo = get_info(fd)?;
    let name_len = raw.name.iter().position(|&b| b == 0).unwrap_or(raw.name.len());
    Ok(ProgInfo {
        id: raw.id,
        tag: raw.tag,
        name: String::from_utf8_lossy(&raw.name[..name_len]).into_owned(),
        run_time_ns: raw.run_time_ns,
        run_count: raw.run_cnt,
    })
}

#[repr(C)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr { id, next_id: 0, open_flags: 0 };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes the link run `new_prog` instead of `old_prog`, in one step: every hook
/// invocation sees either the old or the new program, never none.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>, old_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old_prog.as_fd().as_raw_fd() as u32,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}
