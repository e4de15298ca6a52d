//! The few raw bpf(2) calls the bench needs: open a pinned map, add and remove
//! allowlist entries, and switch on the kernel's run-time statistics.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr prefix laid out for `cmd`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("could not open pinned object {}", path.display()))?;
    // SAFETY: BPF_OBJ_GET returns a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The guard's allowlist (cgroup id → 1), opened from its pin.
pub struct AllowMap(OwnedFd);

impl AllowMap {
    pub fn open(bpffs: &Path) -> Result<AllowMap> {
        Ok(AllowMap(obj_get(&bpffs.join("v1/maps/MG_ALLOW_CG"))?))
    }

    pub fn insert(&self, cgroup_id: u64) -> Result<()> {
        let value = 1u8;
        let mut attr = MapElem {
            map_fd: self.0.as_raw_fd() as u32,
            _pad: 0,
            key: &cgroup_id as *const u64 as u64,
            value: &value as *const u8 as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
            .with_context(|| format!("could not add cgroup {cgroup_id} to the allowlist"))?;
        Ok(())
    }

    pub fn remove(&self, cgroup_id: u64) -> Result<()> {
        let mut attr = MapElem {
            map_fd: self.0.as_raw_fd() as u32,
            _pad: 0,
            key: &cgroup_id as *const u64 as u64,
            value: 0,
            flags: 0,
        };
        bpf(BPF_MAP_DELETE_ELEM, &mut attr)
            .with_context(|| format!("could not remove cgroup {cgroup_id} from the allowlist"))?;
        Ok(())
    }
}

/// Run-time statistics stay on while the returned fd is open.
pub fn enable_stats() -> Result<OwnedFd> {
    let mut attr = BPF_STATS_RUN_TIME;
    let fd = bpf(BPF_ENABLE_STATS, &mut attr).context("BPF_ENABLE_STATS failed (needs Linux 5.8 and CAP_SYS_ADMIN)")?;
    // SAFETY: BPF_ENABLE_STATS returns a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
