// SPDX-License-Identifier: Apache-2.0
//! Where the guard's kernel state lives on bpffs, and who may touch it.
//!
//! `<bpffs dir>/v<ABI_VERSION>/maps/<map>`, `.../links/<hook>` and `.../programs/<hook>`
//! (the program each link runs, pinned so that a restarted agent can compare it with
//! its own without opening programs by id, which needs CAP_SYS_ADMIN). The version in
//! the path means an agent of another map layout never reuses these maps; it attaches its
//! own links first and only then removes the old version's pins (see `install`).

use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use metadata_guard_common::ABI_VERSION;

#[derive(Clone, Debug)]
pub struct PinLayout {
    /// The `--bpffs` directory (e.g. /sys/fs/bpf/metadata-guard).
    pub root: PathBuf,
    /// `root/v<ABI_VERSION>`.
    pub dir: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> PinLayout {
        PinLayout { root: root.to_path_buf(), dir: root.join(format!("v{ABI_VERSION}")) }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.dir.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn link(&self, hook: &str) -> PathBuf {
        self.links_dir().join(hook)
    }

    pub fn programs_dir(&self) -> PathBuf {
        self.dir.join("programs")
    }

    /// The program the link of `hook` runs (pinned by the agent that put it there).
    pub fn program(&self, hook: &str) -> PathBuf {
        self.programs_dir().join(hook)
    }

    /// Version directories other than ours, left by agents of another layout.
    pub fn other_versions(&self) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .filter_map(std::result::Result::ok)
            .map(|e| e.path())
            .filter(|p| p != &self.dir && p.file_name().and_then(|n| n.to_str()).is_some_and(is_version_dir))
            .collect()
    }
}

fn is_version_dir(name: &str) -> bool {
    name.strip_prefix('v').is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

pub(crate) fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Makes sure `root` exists on a bpffs, mounting bpffs on its parent when the parent
/// is an empty, unmounted `/sys/fs/bpf`-like directory (as on hosts without systemd).
pub(crate) fn ensure_on_bpffs(root: &Path, may_mount: bool) -> Result<()> {
    let parent = root.parent().unwrap_or(Path::new("/"));
    if !is_bpffs(parent) && !is_bpffs(root) {
        if !may_mount {
            bail!(
                "{} is not on a BPF filesystem, so the guard cannot pin its programs there; \
                 mount one (`mount -t bpf bpf {}`) or pass --bpffs with a directory on bpffs",
                root.display(),
                parent.display()
            );
        }
        fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
        nix::mount::mount(Some("bpf"), parent, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).with_context(
            || {
                format!(
                    "{} is not on a BPF filesystem and mounting one there failed; \
                     mount it yourself (`mount -t bpf bpf {}`) or pass --bpffs",
                    parent.display(),
                    parent.display()
                )
            },
        )?;
        tracing::info!(path = %parent.display(), "mounted bpffs");
    }
    fs::create_dir_all(root).with_context(|| format!("could not create {}", root.display()))?;
    Ok(())
}

/// Removes the pin root once nothing is pinned under it: the agent created it, and
/// an empty directory left in `/sys/fs/bpf` after `uninstall` reads as something
/// still installed. A root that still holds anything (another version's pins, files
/// of someone else's), or is a mount point, stays.
pub(crate) fn remove_root_if_empty(root: &Path) -> Result<()> {
    match fs::remove_dir(root) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::ResourceBusy
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("could not remove the empty pin root {}", root.display())),
    }
}

/// The one-agent-per-node lock: an exclusive flock on the pin root directory. Held
/// for the agent's life; the kernel drops it when the process dies, however it dies.
pub(crate) struct AgentLock {
    _dir: File,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "another metadata-guard agent already manages {0} (it holds the lock on that directory); \
     stop it first, or give this one another --bpffs directory"
)]
pub(crate) struct AlreadyRunning(pub PathBuf);

impl AgentLock {
    /// The lock, or (inner `Err`) the agent that holds it.
    pub(crate) fn acquire(root: &Path) -> Result<Result<AgentLock, AlreadyRunning>> {
        let dir = File::open(root).with_context(|| format!("could not open {}", root.display()))?;
        match flock(&dir, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Ok(AgentLock { _dir: dir })),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(Err(AlreadyRunning(root.to_path_buf()))),
            Err(e) => Err(e).with_context(|| format!("could not lock {}", root.display())),
        }
    }

    /// Whether some agent holds the lock right now (for `status`).
    pub(crate) fn is_held(root: &Path) -> bool {
        let Ok(dir) = File::open(root) else { return false };
        match flock(&dir, libc::LOCK_SH | libc::LOCK_NB) {
            Ok(()) => false,
            Err(e) => e.raw_os_error() == Some(libc::EWOULDBLOCK),
        }
    }
}

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid fd and a plain flag argument.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pin_root_goes_once_empty_and_stays_while_anything_is_in_it() {
        let parent = tempfile::tempdir().unwrap();
        let root = parent.path().join("metadata-guard");
        fs::create_dir_all(root.join("v1/maps")).unwrap();
        remove_root_if_empty(&root).unwrap();
        assert!(root.join("v1/maps").exists(), "another version's pins stay, and the root with them");
        fs::remove_dir_all(root.join("v1")).unwrap();
        remove_root_if_empty(&root).unwrap();
        assert!(!root.exists(), "an empty root is removed");
        remove_root_if_empty(&root).unwrap();
    }
}
