// SPDX-License-Identifier: Apache-2.0
//! Another cgroup program on the guard's cgroup, as Cilium's socket load balancer
//! would attach: a connect4 program that allows everything. Loaded with the tests' own
//! bpf(2) calls so the scenarios need no second BPF toolchain; its run count (kernel
//! stats) shows it still runs beside the guard.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use metadata_guard_tests::bpf::{self, bpf_attach_type, bpf_prog_type};

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
        let connect4 = bpf_attach_type::BPF_CGROUP_INET4_CONNECT;
        let prog =
            bpf::prog_load(bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, connect4, &bpf::RETURN_ONE, "neighbour")?;
        let dir = File::open(cgroup)?;
        let link = bpf::link_create(prog.as_fd(), dir.as_fd(), connect4)?;
        let stats = bpf::enable_stats()?;
        Ok(Neighbour { prog, _link: link, _stats: stats })
    }

    /// How many times the kernel ran it.
    pub(crate) fn run_count(&self) -> io::Result<u64> {
        Ok(bpf::prog_info(self.prog.as_fd())?.run_cnt)
    }
}
