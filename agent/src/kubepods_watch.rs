// SPDX-License-Identifier: Apache-2.0
//! Notices containers starting and stopping: inotify on the kubelet's cgroup trees,
//! so the pod allowlist follows within milliseconds instead of a resync period.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

/// Top-level names of the kubelet's cgroup trees (systemd and cgroupfs drivers).
const KUBEPODS_ROOTS: [&str; 2] = ["kubepods.slice", "kubepods"];
/// Watches beyond this are not added: the periodic resync still covers the rest.
const MAX_WATCHES: usize = 16_384;

/// Raw fd wrapper so the inotify instance can live in an AsyncFd.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub(crate) struct KubepodsWatch {
    fd: AsyncFd<InotifyFd>,
    root: PathBuf,
    watches: HashMap<WatchDescriptor, PathBuf>,
}

fn flags() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE | AddWatchFlags::IN_DELETE | AddWatchFlags::IN_ONLYDIR
}

impl KubepodsWatch {
    pub(crate) fn new(cgroup_root: &Path) -> Result<KubepodsWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).context("inotify_init failed")?;
        // SAFETY: the Inotify owns its fd, which stays open and unchanged while the
        // AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(InotifyFd(inotify)) }
            .map_err(|e| anyhow::anyhow!("could not watch inotify events: {e}"))?;
        let mut watch = KubepodsWatch { fd, root: cgroup_root.to_path_buf(), watches: HashMap::new() };
        // The root itself, to see a kubepods tree appear after the agent started.
        watch.add(cgroup_root.to_path_buf());
        for name in KUBEPODS_ROOTS {
            watch.add_tree(&cgroup_root.join(name));
        }
        Ok(watch)
    }

    fn add(&mut self, dir: PathBuf) {
        if self.watches.len() >= MAX_WATCHES {
            return;
        }
        if let Ok(wd) = self.fd.get_ref().0.add_watch(&dir, flags()) {
            self.watches.insert(wd, dir);
        }
    }

    fn add_tree(&mut self, dir: &Path) {
        if !dir.is_dir() {
            return;
        }
        self.add(dir.to_path_buf());
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.add_tree(&entry.path());
            }
        }
    }

    /// Waits for cgroups to be created or removed under a kubepods tree; new ones
    /// are watched too. Returns once something changed.
    pub(crate) async fn changed(&mut self) -> Result<()> {
        loop {
            let mut guard = self.fd.readable().await.context("waiting on inotify failed")?;
            let events = match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(events)) => events,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Ok(Err(e)) => return Err(e).context("reading inotify events failed"),
                Err(_would_block) => continue,
            };
            let mut relevant = false;
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The kernel dropped the watch of a removed directory.
                    self.watches.remove(&event.wd);
                    continue;
                }
                let Some(dir) = self.watches.get(&event.wd).cloned() else { continue };
                let Some(name) = event.name else { continue };
                let path = dir.join(&name);
                if dir == self.root && !KUBEPODS_ROOTS.iter().any(|r| name == *r) {
                    continue;
                }
                relevant = true;
                if event.mask.contains(AddWatchFlags::IN_CREATE) {
                    self.add_tree(&path);
                }
            }
            if relevant {
                return Ok(());
            }
        }
    }
}
