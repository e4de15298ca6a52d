// SPDX-License-Identifier: Apache-2.0
//! A manifest's container run with podman the way a kubelet would run it, on the
//! simulated node: the node's namespace as the host network, the simulated node's
//! directories in place of the host paths.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

use crate::manifest::{Container, Source};

/// Where the simulated node keeps what a real node has at each host path.
pub(crate) struct Host {
    pub paths: BTreeMap<&'static str, PathBuf>,
    /// The simulated node's network namespace (`hostNetwork: true`).
    pub netns: PathBuf,
    /// Where ConfigMap volumes are written.
    pub work: PathBuf,
}

/// A container podman runs; removed (killed if need be) on drop.
pub(crate) struct Running {
    pub name: String,
}

/// Options for the capability experiments: replace the manifest's `add` list.
pub(crate) struct Overrides {
    pub caps_add: Option<Vec<String>>,
}

/// `podman run` for container `c`; `host_network` as in the pod spec.
pub(crate) fn command(
    image: &str,
    name: &str,
    c: &Container,
    host: &Host,
    over: &Overrides,
    host_network: bool,
    detach: bool,
) -> Result<Command> {
    let mut cmd = Command::new("podman");
    cmd.args(["run", "--name", name, "--pull=never", "--runtime", "runc"]);
    cmd.args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]);
    if host_network {
        cmd.arg("--network").arg(format!("ns:{}", host.netns.display()));
    } else {
        cmd.args(["--network", "none"]);
    }
    // As under the kubelet: a cgroup namespace of the container's own, so only the
    // host path mounts can show it the node's cgroup root.
    cmd.args(["--cgroupns", "private"]);
    if detach {
        cmd.arg("--detach");
    }
    ensure!(!c.privileged, "container {} is privileged; the smoke test proves an unprivileged one", c.name);
    if c.read_only_root {
        // podman adds writable tmpfs on /tmp, /run and /var/tmp; a kubelet does not.
        cmd.args(["--read-only", "--read-only-tmpfs=false"]);
    }
    if let Some(uid) = c.run_as_user {
        cmd.arg("--user").arg(uid.to_string());
    }
    for cap in &c.caps_drop {
        cmd.arg("--cap-drop").arg(cap);
    }
    for cap in over.caps_add.as_ref().unwrap_or(&c.caps_add) {
        cmd.arg("--cap-add").arg(cap);
    }
    if !c.allow_privilege_escalation {
        cmd.args(["--security-opt", "no-new-privileges"]);
    }
    match c.seccomp.as_str() {
        // podman's own default, with bpf(2) and perf_event_open(2) as containerd's and
        // CRI-O's current defaults have them (see seccomp.rs).
        "RuntimeDefault" => {
            let profile = crate::seccomp::runtime_default(&host.work)?;
            cmd.arg("--security-opt").arg(format!("seccomp={}", profile.display()));
        }
        "Unconfined" => drop(cmd.args(["--security-opt", "seccomp=unconfined"])),
        other => bail!("container {}: seccomp profile {other} is not one the smoke test knows", c.name),
    }
    if let Some(bytes) = c.memory_limit {
        cmd.arg("--memory").arg(bytes.to_string());
    }
    for (key, value) in &c.env {
        cmd.arg("--env").arg(format!("{key}={value}"));
    }
    for (i, m) in c.mounts.iter().enumerate() {
        let source = match &m.source {
            Source::HostPath(path) => host.paths.get(path.as_str()).cloned().with_context(|| {
                format!("container {} mounts host path {path}, which the simulated node does not provide", c.name)
            })?,
            Source::Files(files) => {
                let dir = host.work.join(format!("{name}-volume-{i}"));
                fs::create_dir_all(&dir)?;
                for (file, content) in files {
                    fs::write(dir.join(file), content)?;
                }
                dir
            }
        };
        let propagation = match m.propagation.as_str() {
            "None" => "rprivate",
            "HostToContainer" => "rslave",
            "Bidirectional" => "rshared",
            other => bail!("container {}: mountPropagation {other} is not a Kubernetes value", c.name),
        };
        let mode = if m.read_only { "ro" } else { "rw" };
        cmd.arg("--volume").arg(format!("{}:{}:{mode},{propagation}", source.display(), m.path));
    }
    cmd.arg(image).args(&c.args);
    Ok(cmd)
}

/// Starts a long-running container.
pub(crate) fn start(mut cmd: Command, name: &str) -> Result<Running> {
    let out = run(&mut cmd)?;
    ensure!(out.status.success(), "podman could not start {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(Running { name: name.to_string() })
}

/// Runs a container to completion; returns its output, whatever its exit code.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().context("could not run podman")
}

impl Running {
    /// The container's main process, as the host sees it.
    pub(crate) fn pid(&self) -> Result<u32> {
        let pid = inspect(&self.name, "{{.State.Pid}}")?;
        pid.parse().ok().filter(|&p| p != 0).with_context(|| format!("{} is not running (pid {pid:?})", self.name))
    }

    pub(crate) fn is_running(&self) -> bool {
        inspect(&self.name, "{{.State.Running}}").is_ok_and(|r| r == "true")
    }

    /// stdout and stderr so far: the audit records and the agent's log.
    pub(crate) fn logs(&self) -> String {
        match Command::new("podman").args(["logs", &self.name]).output() {
            Ok(out) => format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            Err(e) => format!("(could not read the logs of {}: {e})", self.name),
        }
    }

    /// SIGTERM, as a pod deletion does; returns the exit code.
    pub(crate) fn stop(&self, grace: Duration) -> Result<i64> {
        let out = Command::new("podman")
            .args(["stop", "--time", &grace.as_secs().to_string(), &self.name])
            .output()
            .context("could not run podman stop")?;
        ensure!(out.status.success(), "podman stop {}: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        inspect(&self.name, "{{.State.ExitCode}}")?.parse().context("podman printed an odd exit code")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", "--time", "0", &self.name]).output();
    }
}

fn inspect(name: &str, format: &str) -> Result<String> {
    let out = Command::new("podman")
        .args(["inspect", "--type", "container", "--format", format, name])
        .output()
        .context("could not run podman inspect")?;
    ensure!(out.status.success(), "podman inspect {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Resident and peak resident memory of a process, in KiB.
pub(crate) fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("could not read /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The memory the container's memory cgroup is charged (current, peak), in KiB:
/// what the memory limit is held against, BPF maps the agent created included.
pub(crate) fn cgroup_memory_kib(pid: u32) -> Result<(u64, u64)> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("could not read /proc/{pid}/cgroup"))?;
    let read = |path: PathBuf| -> Result<u64> {
        let text = fs::read_to_string(&path).with_context(|| format!("could not read {}", path.display()))?;
        Ok(text.trim().parse::<u64>().with_context(|| format!("{} is not a number", path.display()))? / 1024)
    };
    // cgroup v1 (a hybrid host) has a memory line; v2 only "0::".
    if let Some(path) = cgroups.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p)) {
        let dir = PathBuf::from("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
        return Ok((read(dir.join("memory.usage_in_bytes"))?, read(dir.join("memory.max_usage_in_bytes"))?));
    }
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::")).context("the container has no cgroup")?;
    let dir = metadata_guard_tests::cgroups::find_cgroup2_mount()?.join(path.trim_start_matches('/'));
    Ok((read(dir.join("memory.current"))?, read(dir.join("memory.peak"))?))
}
