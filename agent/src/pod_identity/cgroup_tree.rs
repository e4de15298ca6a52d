// SPDX-License-Identifier: Apache-2.0
//! The cgroup v2 hierarchy as a plain directory tree, where a cgroup's id is the
//! inode number of its directory.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The directories under `root`, `root` included, by cgroup id. Fails only when
/// `root` itself cannot be read.
pub(super) fn index(root: &Path) -> io::Result<HashMap<u64, PathBuf>> {
    let mut index = HashMap::new();
    index.insert(fs::metadata(root)?.ino(), root.to_path_buf());
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        // Cgroups come and go during the walk: whatever vanished has nothing to index.
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if dir == root => return Err(e),
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            // `file_type` comes from readdir itself and does not follow symlinks; it
            // spares a stat of each of the dozens of control files per cgroup.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if let Ok(meta) = entry.metadata() {
                index.insert(meta.ino(), entry.path());
                pending.push(entry.path());
            }
        }
    }
    Ok(index)
}

/// Whether `dir` is still the cgroup with id `id`, and not gone or replaced.
pub(super) fn has_id(dir: &Path, id: u64) -> bool {
    fs::metadata(dir).is_ok_and(|meta| meta.is_dir() && meta.ino() == id)
}

/// `dir` as a cgroup path relative to `root`, as systemd and the kubelet write them:
/// `/system.slice/kubelet.service`, or `/` for the root itself.
pub(super) fn relative(root: &Path, dir: &Path) -> String {
    let below = dir.strip_prefix(root).unwrap_or(dir);
    format!("/{}", below.to_string_lossy().trim_start_matches('/'))
}
