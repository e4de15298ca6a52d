// SPDX-License-Identifier: Apache-2.0
//! Finding the cgroup v2 hierarchy the guard attaches to.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

/// The two places a cgroup2 hierarchy sits on a node: the unified layout, and the
/// hybrid one (v1 controllers with cgroup2 at `unified`).
pub(crate) const CANDIDATES: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

pub(crate) fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The cgroup to attach to: `--cgroup` when given (it must be a cgroup2 directory),
/// else the first cgroup2 mount of [`CANDIDATES`].
pub(crate) fn resolve(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if !is_cgroup2(path) {
            bail!(
                "--cgroup {} is not a cgroup v2 directory; pass the host's cgroup2 mount (see `mount -t cgroup2`) \
                 or a directory below it",
                path.display()
            );
        }
        return Ok(path.to_path_buf());
    }
    CANDIDATES.iter().map(PathBuf::from).find(|p| is_cgroup2(p)).with_context(|| {
        format!(
            "found no cgroup v2 hierarchy at {}; the guard needs cgroup v2 (mount it with \
             `mount -t cgroup2 none /sys/fs/cgroup/unified`) or pass --cgroup",
            CANDIDATES.join(" or ")
        )
    })
}

/// On cgroup v2 a cgroup's id is its directory's inode number.
pub(crate) fn id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path).with_context(|| format!("could not stat cgroup {}", path.display()))?.ino())
}
