//! Another cgroup program on the guard's cgroup, as Cilium's socket load balancer
//! would attach: a connect4 program that allows everything. Loaded with raw bpf(2)
//! calls so the scenarios need no second BPF toolchain; its run count (kernel stats)
//! shows it still runs beside the guard.

use std::{
    fs::File,
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_STATS_RUN_TIME: u32 = 0;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr prefix for `cmd`.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: these commands return a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
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

#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// A loaded, attached neighbour program and the stats switch that counts its runs.
pub(crate) struct Neighbour {
    prog: OwnedFd,
    _link: OwnedFd,
    _stats: OwnedFd,
}

impl Neighbour {
    pub(crate) fn attach(cgroup: &Path) -> anyhow::Result<Neighbour> {
        // Kernels before 5.11 charge BPF programs to RLIMIT_MEMLOCK, whose default is tiny.
        let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: plain setrlimit with a valid struct; failure just leaves the limit.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
        // r0 = 1 (allow); exit
        let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..9].copy_from_slice(b"neighbour");
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_CGROUP_INET4_CONNECT,
            ..Default::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &mut load)?;
        let dir = File::open(cgroup)?;
        let mut link = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: dir.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET4_CONNECT,
            flags: 0,
        };
        let link = bpf(BPF_LINK_CREATE, &mut link)?;
        let mut stats = BPF_STATS_RUN_TIME;
        let stats = bpf(BPF_ENABLE_STATS, &mut stats)?;
        Ok(Neighbour { prog, _link: link, _stats: stats })
    }

    /// How many times the kernel ran it.
    pub(crate) fn run_count(&self) -> io::Result<u64> {
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        // bpf_prog_info up to run_cnt (offset 200).
        let mut info = [0u64; 26];
        let mut attr = InfoAttr {
            bpf_fd: self.prog.as_raw_fd() as u32,
            info_len: size_of::<[u64; 26]>() as u32,
            info: info.as_mut_ptr() as u64,
        };
        // SAFETY: a valid attr pointing at a buffer of the stated length.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &mut attr as *mut InfoAttr,
                size_of::<InfoAttr>() as u32,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info[25])
    }
}
