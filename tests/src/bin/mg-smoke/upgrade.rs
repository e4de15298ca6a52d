//! An upgrade under the manifest's capabilities: the pinned `connect4` link is made to
//! run another program (as an agent of another version would have left it), so the
//! next agent container, holding exactly the manifest's capabilities, must recognise
//! the difference and swap its own program in with BPF_LINK_UPDATE.
//!
//! Raw bpf(2) on purpose: the test must not share the agent's code for what it checks.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{ensure, Context, Result};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
/// `r0 = 1; exit`: a connect4 program that allows every connect.
const ALLOW_ALL: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is the leading part of bpf_attr that `cmd` reads, zero elsewhere.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: these commands return a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

fn obj_get(path: &Path) -> Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("could not open the pin {}", path.display()))
}

/// (own id, program id) of a link, or (own id, 0) of a program: the first three words
/// of bpf_link_info and bpf_prog_info are (type, id, prog_id) and (type, id, tag).
fn ids(fd: &OwnedFd) -> Result<(u32, u32)> {
    #[repr(C)]
    struct Info {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut words = [0u32; 64];
    let mut attr =
        Info { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of_val(&words) as u32, info: words.as_mut_ptr() as u64 };
    // SAFETY: as in `bpf`; this command returns 0, not an fd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut Info, 16u32) };
    ensure!(rc == 0, "BPF_OBJ_GET_INFO_BY_FD failed: {}", io::Error::last_os_error());
    Ok((words[1], words[2]))
}

/// The program the link pinned at `link` runs now.
pub(crate) fn linked_program(link: &Path) -> Result<u32> {
    Ok(ids(&obj_get(link)?)?.1)
}

/// The id of the program pinned at `pin`.
pub(crate) fn pinned_program(pin: &Path) -> Result<u32> {
    Ok(ids(&obj_get(pin)?)?.0)
}

/// Makes the link pinned at `link` run an allow-everything connect4 program; returns
/// that program's id.
pub(crate) fn plant_other_program(link: &Path) -> Result<u32> {
    let license = c"GPL";
    let mut load = ProgLoad {
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: ALLOW_ALL.len() as u32,
        insns: ALLOW_ALL.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type: BPF_CGROUP_INET4_CONNECT,
        ..ProgLoad::default()
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load).context("could not load the stand-in older program")?;
    let link_fd = obj_get(link)?;
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut update = LinkUpdate {
        link_fd: link_fd.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: as in `bpf`; this command returns 0.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &mut update as *mut LinkUpdate, 16u32) };
    ensure!(rc == 0, "BPF_LINK_UPDATE of {} failed: {}", link.display(), io::Error::last_os_error());
    let planted = ids(&prog)?.0;
    ensure!(linked_program(link)? == planted, "the link does not run the planted program");
    Ok(planted)
}
