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

pub(crate) fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = ObjGet { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr).with_context(|| format!("could not open pinned object {}", path.display()))?;
    // SAFETY: BPF_OBJ_GET returns a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The guard's allowlist (cgroup id → 1), opened from its pin.
pub(crate) struct AllowMap(OwnedFd);

impl AllowMap {
    pub(crate) fn open(bpffs: &Path) -> Result<AllowMap> {
        // The layout version directory (`v<N>`) is the agent's: take the one there is.
        let pin = std::fs::read_dir(bpffs)
            .with_context(|| format!("could not list {}", bpffs.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path().join("maps/MG_ALLOW_CG"))
            .find(|p| p.exists())
            .with_context(|| format!("no pinned allowlist under {}; is the agent installed?", bpffs.display()))?;
        Ok(AllowMap(obj_get(&pin)?))
    }

    pub(crate) fn insert(&self, cgroup_id: u64) -> Result<()> {
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

    pub(crate) fn remove(&self, cgroup_id: u64) -> Result<()> {
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
pub(crate) fn enable_stats() -> Result<OwnedFd> {
    let mut attr = BPF_STATS_RUN_TIME;
    let fd = bpf(BPF_ENABLE_STATS, &mut attr).context("BPF_ENABLE_STATS failed (needs Linux 5.8 and CAP_SYS_ADMIN)")?;
    // SAFETY: BPF_ENABLE_STATS returns a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;

/// `r0 = 1; exit`: lets everything through, does nothing else.
const RETURN_ONE: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];

/// The guard's hooks, as (program type, attach type, program name).
const HOOKS: [(u32, u32, &str); 6] = [
    (9, 2, "mg_empty_sock"),    // BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE
    (18, 10, "mg_empty_conn4"), // BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT
    (18, 11, "mg_empty_conn6"), // BPF_CGROUP_INET6_CONNECT
    (18, 14, "mg_empty_send4"), // BPF_CGROUP_UDP4_SENDMSG
    (18, 15, "mg_empty_send6"), // BPF_CGROUP_UDP6_SENDMSG
    (8, 1, "mg_empty_egress"),  // BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_EGRESS
];

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

#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

#[repr(C)]
struct InfoByFd {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Programs that only `return 1`, attached to a cgroup on the guard's six hooks: what
/// the kernel's hooks cost by themselves, measured beside the guard. They stay attached
/// until the cgroup is removed.
pub(crate) struct EmptyPrograms {
    /// (name, program id) for the run-time statistics.
    pub ids: Vec<(String, u64)>,
    _fds: Vec<OwnedFd>,
}

impl EmptyPrograms {
    pub(crate) fn attach(cgroup: &Path) -> Result<EmptyPrograms> {
        let dir = std::fs::File::open(cgroup).with_context(|| format!("could not open cgroup {}", cgroup.display()))?;
        let license = c"GPL";
        let mut ids = Vec::new();
        let mut fds = Vec::new();
        for (prog_type, attach_type, name) in HOOKS {
            let mut prog_name = [0u8; 16];
            prog_name[..name.len()].copy_from_slice(name.as_bytes());
            let mut load = ProgLoad {
                prog_type,
                insn_cnt: RETURN_ONE.len() as u32,
                insns: RETURN_ONE.as_ptr() as u64,
                license: license.as_ptr() as u64,
                prog_name,
                expected_attach_type: attach_type,
                ..Default::default()
            };
            let fd =
                bpf(BPF_PROG_LOAD, &mut load).with_context(|| format!("could not load the empty program {name}"))?;
            // SAFETY: BPF_PROG_LOAD returns a new fd we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let mut attach = ProgAttach {
                target_fd: dir.as_raw_fd() as u32,
                attach_bpf_fd: fd.as_raw_fd() as u32,
                attach_type,
                attach_flags: BPF_F_ALLOW_MULTI,
            };
            bpf(BPF_PROG_ATTACH, &mut attach)
                .with_context(|| format!("could not attach the empty program {name} to {}", cgroup.display()))?;
            ids.push((name.to_string(), prog_id(&fd)?));
            fds.push(fd);
        }
        Ok(EmptyPrograms { ids, _fds: fds })
    }
}

/// The id of a loaded program (the second field of `bpf_prog_info`).
fn prog_id(fd: &OwnedFd) -> Result<u64> {
    let mut info = [0u32; 64];
    let mut attr =
        InfoByFd { bpf_fd: fd.as_raw_fd() as u32, info_len: size_of_val(&info) as u32, info: info.as_mut_ptr() as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("could not read a program's info")?;
    Ok(u64::from(info[1]))
}
