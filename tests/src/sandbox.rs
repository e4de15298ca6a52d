// SPDX-License-Identifier: Apache-2.0
//! A pod's sandbox process (what the `pause` container is on a real node): it holds
//! the pod's network namespace and sits in the pod's cgroup, so that the host side
//! can tell which pod is behind a host interface (namespace → process → cgroup).
//!
//! The test program re-executes itself as `<exe> sandbox <netns> <cgroup dir>`; the
//! child joins both, says so on stdout, and waits to be killed.

use std::{
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context, Result};

/// The first argument that makes the test program a sandbox.
pub const SANDBOX_ARG: &str = "sandbox";
const READY: &str = "ready";

pub struct PodSandbox {
    child: Child,
}

impl PodSandbox {
    pub fn start(netns: &Path, cgroup: &Path) -> Result<PodSandbox> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(SANDBOX_ARG)
            .arg(netns)
            .arg(cgroup)
            .stdout(Stdio::piped())
            .spawn()
            .context("could not start a pod sandbox process")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("no sandbox stdout")?).read_line(&mut line)?;
        if line.trim() != READY {
            let _ = child.kill();
            bail!("the pod sandbox did not start: {line:?}");
        }
        Ok(PodSandbox { child })
    }
}

impl Drop for PodSandbox {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's main: join the cgroup and the namespace, report, wait forever.
pub fn child_main(args: &[String]) -> Result<()> {
    let (Some(netns), Some(cgroup)) = (args.first(), args.get(1)) else {
        bail!("usage: sandbox NETNS CGROUP");
    };
    std::fs::write(Path::new(cgroup).join("cgroup.procs"), std::process::id().to_string())
        .with_context(|| format!("could not join cgroup {cgroup}"))?;
    let ns = std::fs::File::open(netns).with_context(|| format!("could not open {netns}"))?;
    // SAFETY: setns on an fd we own; this process is single-threaded here.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(std::io::Error::last_os_error()).context("could not join the pod's network namespace");
    }
    println!("{READY}");
    loop {
        // SAFETY: pause(2) has no preconditions.
        unsafe { libc::pause() };
    }
}
