// SPDX-License-Identifier: Apache-2.0
//! Child processes started where a test needs them: in a cgroup (a pod's container,
//! the agent's DaemonSet pod, a host unit) and, optionally, a network namespace.

use std::{ffi::CString, fs::File, os::fd::AsRawFd, os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{Context, Result};

/// Makes `cmd` join `cgroup` and then, when given, the network namespace at `netns`
/// (a path like [`crate::netns::NetNs::path`] or `/proc/<pid>/ns/net`) between fork
/// and exec, so the program runs there from its first instruction.
pub fn start_in(cmd: &mut Command, cgroup: &Path, netns: Option<&Path>) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    let procs = CString::new(procs.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} is no path for open(2)", procs.display()))?;
    // Opened now, held by the closure (and so by `cmd`) until the spawn.
    let ns = netns
        .map(|p| File::open(p).with_context(|| format!("could not open network namespace {}", p.display())))
        .transpose()?;
    // SAFETY: only async-signal-safe calls (open, write, close, setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if !written {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ns) = &ns {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}
