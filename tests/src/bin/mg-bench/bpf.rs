// SPDX-License-Identifier: Apache-2.0
//! What the bench does with bpf(2) (through the tests' own calls, `metadata_guard_tests::bpf`):
//! add and remove allowlist entries and switch on the kernel's run-time statistics
//! (the empty programs are in `floor`).

use std::{
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use metadata_guard_tests::bpf;

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
