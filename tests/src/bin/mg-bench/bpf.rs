//! What the bench does with bpf(2) (through the tests' own calls, `metadata_guard_tests::bpf`):
//! add and remove allowlist entries, switch on the kernel's run-time statistics, and
//! attach empty programs on the guard's hooks.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use metadata_guard_tests::bpf::{self, bpf_attach_type, bpf_prog_type, BPF_F_ALLOW_MULTI};

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
        let map = bpf::obj_get(&pin).with_context(|| format!("could not open pinned object {}", pin.display()))?;
        Ok(AllowMap(map))
    }

    pub(crate) fn insert(&self, cgroup_id: u64) -> Result<()> {
        bpf::map_update(self.0.as_fd(), &cgroup_id.to_ne_bytes(), &[1u8])
            .with_context(|| format!("could not add cgroup {cgroup_id} to the allowlist"))
    }

    pub(crate) fn remove(&self, cgroup_id: u64) -> Result<()> {
        bpf::map_delete(self.0.as_fd(), &cgroup_id.to_ne_bytes())
            .with_context(|| format!("could not remove cgroup {cgroup_id} from the allowlist"))
    }
}

/// Run-time statistics stay on while the returned fd is open.
pub(crate) fn enable_stats() -> Result<OwnedFd> {
    bpf::enable_stats().context("BPF_ENABLE_STATS failed (needs Linux 5.8 and CAP_SYS_ADMIN)")
}

/// The guard's hooks, as (program type, attach type, program name).
const HOOKS: [(bpf_prog_type, bpf_attach_type, &str); 6] = [
    (bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK, bpf_attach_type::BPF_CGROUP_INET_SOCK_CREATE, "mg_empty_sock"),
    (bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpf_attach_type::BPF_CGROUP_INET4_CONNECT, "mg_empty_conn4"),
    (bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpf_attach_type::BPF_CGROUP_INET6_CONNECT, "mg_empty_conn6"),
    (bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG, "mg_empty_send4"),
    (bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG, "mg_empty_send6"),
    (bpf_prog_type::BPF_PROG_TYPE_CGROUP_SKB, bpf_attach_type::BPF_CGROUP_INET_EGRESS, "mg_empty_egress"),
];

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
        let mut ids = Vec::new();
        let mut fds = Vec::new();
        for (prog_type, attach_type, name) in HOOKS {
            let fd = bpf::prog_load(prog_type, attach_type, &bpf::RETURN_ONE, name)
                .with_context(|| format!("could not load the empty program {name}"))?;
            bpf::prog_attach(fd.as_fd(), dir.as_fd(), attach_type, BPF_F_ALLOW_MULTI)
                .with_context(|| format!("could not attach the empty program {name} to {}", cgroup.display()))?;
            let id = bpf::prog_info(fd.as_fd()).context("could not read a program's info")?.id;
            ids.push((name.to_string(), u64::from(id)));
            fds.push(fd);
        }
        Ok(EmptyPrograms { ids, _fds: fds })
    }
}
