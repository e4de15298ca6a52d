// SPDX-License-Identifier: Apache-2.0
//! Network namespaces owned by a file descriptor.
//!
//! Nothing is bind-mounted under `/run/netns`: a namespace made here lives exactly
//! as long as its [`NetNs`] and the sockets created inside it, so a crashed test
//! leaves nothing behind.

use std::{
    fmt,
    fs::File,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
    thread,
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, unshare, CloneFlags};

/// An owned network namespace.
pub struct NetNs {
    name: String,
    file: File,
}

impl NetNs {
    /// Creates an empty namespace (only a down `lo` in it).
    pub fn new(name: &str) -> Result<NetNs> {
        // unshare() moves only the calling thread, so a throwaway thread does it and
        // the caller stays where it was.
        let file = thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(|| -> Result<File> {
                unshare(CloneFlags::CLONE_NEWNET).context(
                    "unshare(CLONE_NEWNET) failed; creating a network namespace needs CAP_SYS_ADMIN (run as root)",
                )?;
                File::open("/proc/thread-self/ns/net")
                    .context("could not open /proc/thread-self/ns/net; is /proc mounted?")
            })
            .context("could not spawn a thread to create a network namespace")?
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .with_context(|| format!("could not create network namespace {name:?}"))?;
        Ok(NetNs { name: name.to_string(), file })
    }

    /// Opens an existing namespace, e.g. one another process passed by [`NetNs::path`].
    pub fn from_path(path: &Path) -> Result<NetNs> {
        let file = File::open(path).with_context(|| format!("could not open network namespace {}", path.display()))?;
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd's namespace.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
        if nstype < 0 {
            bail!(
                "{} is not a namespace file ({}); pass /proc/<pid>/ns/net or a path NetNs::path printed",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        if nstype != libc::CLONE_NEWNET {
            bail!("{} is a namespace, but not a network namespace", path.display());
        }
        Ok(NetNs { name: path.display().to_string(), file })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A path other processes can open (`setns`, `nsenter --net=`) while we live.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()))
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result.
    /// Sockets `f` creates belong to the namespace for their whole life, whichever
    /// thread uses them later.
    ///
    /// Panics if the thread cannot join the namespace; that takes CAP_SYS_ADMIN,
    /// which creating or opening the namespace already proved. A panic in `f` is
    /// passed on to the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(scope, || {
                    if let Err(e) = self.enter_current_thread() {
                        panic!("{e:#}");
                    }
                    f()
                })
                .expect("could not spawn a thread to run in a network namespace")
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into the namespace, for good. For a re-executed
    /// child process's main thread; elsewhere prefer [`NetNs::run`].
    pub fn enter_current_thread(&self) -> Result<()> {
        setns(&self.file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("could not join network namespace {} ({})", self.name, self.path().display()))
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs").field("name", &self.name).field("path", &self.path()).finish()
    }
}
