// SPDX-License-Identifier: Apache-2.0
//! Throwaway cgroup v2 trees.
//!
//! A [`TestCgroup`] keeps its parent alive, so a chain like
//! `root.child("a")?.child("b")?` is fine: each directory is removed once the last
//! handle to it or to anything below it is dropped, after every process left in
//! it has been killed.

use std::{
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

/// How long a drop waits for killed processes to leave and directories to go.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on most systems,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn find_cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("could not read /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ..."
            let (left, right) = line.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2").then(|| unescape(left.split(' ').nth(4)?))?
        })
        .context("no cgroup2 file system is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup)")
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
pub(crate) fn unescape(field: &str) -> Option<PathBuf> {
    let mut out = Vec::with_capacity(field.len());
    let mut bytes = field.bytes();
    while let Some(b) = bytes.next() {
        if b == b'\\' {
            let digits = [bytes.next()?, bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&digits).ok()?, 8).ok()?);
        } else {
            out.push(b);
        }
    }
    Some(PathBuf::from(std::ffi::OsString::from(String::from_utf8(out).ok()?)))
}

/// A cgroup this process made; cloning shares it.
#[derive(Clone, Debug)]
pub struct TestCgroup {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    id: u64,
    /// Holds the parent directory until this one is gone.
    _parent: Option<Arc<Inner>>,
}

impl TestCgroup {
    /// Makes `parent/name`, which must not exist yet.
    pub fn create(parent: &Path, name: &str) -> Result<TestCgroup> {
        Ok(TestCgroup { inner: Arc::new(Inner::mkdir(parent, name, None)?) })
    }

    /// Makes a child cgroup under this one.
    pub fn child(&self, name: &str) -> Result<TestCgroup> {
        let inner = Inner::mkdir(&self.inner.path, name, Some(self.inner.clone()))?;
        Ok(TestCgroup { inner: Arc::new(inner) })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The cgroup id, as BPF helpers and the agent see it: the directory's inode.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Moves a process (all its threads) here.
    pub fn add_process(&self, pid: u32) -> Result<()> {
        let procs = self.inner.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EBUSY) => "; cgroup v2 keeps processes in leaves only, so use a child cgroup",
                Some(libc::ESRCH) => "; the process has exited",
                _ => "",
            };
            anyhow::anyhow!("could not move process {pid} into {}: {e}{hint}", self.inner.path.display())
        })
    }

    /// The processes directly in this cgroup (not in its children).
    pub fn procs(&self) -> Result<Vec<u32>> {
        read_procs(&self.inner.path)
    }
}

impl Inner {
    fn mkdir(parent: &Path, name: &str, parent_handle: Option<Arc<Inner>>) -> Result<Inner> {
        ensure!(
            !name.is_empty() && name != "." && name != ".." && !name.contains('/'),
            "{name:?} is not a valid cgroup name"
        );
        let path = parent.join(name);
        fs::create_dir(&path).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::AlreadyExists {
                "; a leftover from an earlier run? remove it with rmdir, or keep the handle that made it"
            } else {
                ""
            };
            anyhow::anyhow!("could not create cgroup {}: {e}{hint}", path.display())
        })?;
        let id = fs::metadata(&path).with_context(|| format!("could not stat cgroup {}", path.display()))?.ino();
        Ok(Inner { path, id, _parent: parent_handle })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            eprintln!("warning: could not remove test cgroup {}: {e:#}", self.path.display());
        }
    }
}

/// Kills everything in the subtree, then removes its directories deepest first.
fn remove_tree(root: &Path) -> Result<()> {
    let deadline = Instant::now() + REMOVE_TIMEOUT;
    let me = std::process::id();
    loop {
        let dirs = subtree(root)?;
        let mut left = Vec::new();
        for dir in &dirs {
            left.extend(read_procs(dir)?);
        }
        if left.is_empty() {
            break;
        }
        ensure!(!left.contains(&me), "this very process is in {}; move it out before dropping", root.display());
        for &pid in &left {
            // SAFETY: kill(2) on a pid the cgroup listed. ESRCH (it just exited) is fine.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        if Instant::now() > deadline {
            bail!("processes {left:?} were still there {REMOVE_TIMEOUT:?} after SIGKILL");
        }
        thread::sleep(Duration::from_millis(10));
    }
    // subtree() lists parents before children.
    for dir in subtree(root)?.iter().rev() {
        loop {
            match fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // Killed tasks can keep a cgroup busy for a moment after leaving cgroup.procs.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).with_context(|| format!("could not rmdir {}", dir.display())),
            }
        }
    }
    Ok(())
}

/// `root` and every cgroup below it, parents first.
fn subtree(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs = vec![root.to_path_buf()];
    let mut i = 0;
    while let Some(dir) = dirs.get(i).cloned() {
        i += 1;
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("could not list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("could not list {}", dir.display()))?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            }
        }
    }
    Ok(dirs)
}

fn read_procs(dir: &Path) -> Result<Vec<u32>> {
    let text = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("could not read {}/cgroup.procs", dir.display())),
    };
    text.lines()
        .map(|l| l.trim().parse().with_context(|| format!("odd line {l:?} in {}/cgroup.procs", dir.display())))
        .collect()
}
