// SPDX-License-Identifier: Apache-2.0
//! The real `metadata-guard` binary, started and stopped as a scenario needs.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How the agent is started.
#[derive(Clone)]
pub struct AgentSpec {
    pub binary: PathBuf,
    /// `--cgroup`: where the programs attach.
    pub attach_cgroup: PathBuf,
    /// The cgroup the agent process itself lives in (like a DaemonSet pod under root).
    pub own_cgroup: PathBuf,
    pub host_netns: PathBuf,
    pub bpffs: PathBuf,
    pub extra: Vec<String>,
}

pub struct Agent {
    child: Option<Child>,
    pub metrics: SocketAddr,
    audit: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<Vec<String>>>,
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Agent {
    /// Starts the agent and waits until `/readyz` answers 200.
    pub fn start(spec: &AgentSpec) -> Result<Agent> {
        let agent = Self::spawn(spec)?;
        agent.wait_ready()?;
        Ok(agent)
    }

    pub fn spawn(spec: &AgentSpec) -> Result<Agent> {
        let metrics = free_local_port()?;
        let mut cmd = Command::new(&spec.binary);
        cmd.arg("run")
            .arg("--cgroup")
            .arg(&spec.attach_cgroup)
            .arg("--host-netns")
            .arg(&spec.host_netns)
            .arg("--bpffs")
            .arg(&spec.bpffs)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(&spec.extra)
            .env("METADATA_GUARD_LOG", "info")
            .env_remove("NODE_NAME")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        crate::placed::start_in(&mut cmd, &spec.own_cgroup, None)?;
        let mut child = cmd.spawn().with_context(|| format!("could not start {}", spec.binary.display()))?;
        let audit = collect_lines(child.stdout.take().unwrap(), false);
        let log = collect_lines(child.stderr.take().unwrap(), std::env::var_os("MG_SCENARIO_VERBOSE").is_some());
        Ok(Agent { child: Some(child), metrics, audit, log })
    }

    pub fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok((200, _)) = self.http_get("/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent was not ready within {READY_TIMEOUT:?}; its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let status = body.get(9..12).and_then(|c| c.parse().ok()).context("no HTTP status")?;
        let payload = body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, payload))
    }

    /// Audit records printed so far, parsed.
    pub fn audit_records(&self) -> Vec<RecordLine> {
        self.audit.lock().unwrap().iter().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(15))?;
        if !status.success() {
            bail!("the agent exited with {status} after SIGTERM; its log:\n{}", self.log_text());
        }
        Ok(status)
    }

    pub fn kill(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits for the agent to exit on its own (e.g. refused to start).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("already reaped")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                // Let the reader threads drain what is left in the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the agent did not exit within {timeout:?}; its log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn collect_lines(pipe: impl Read + Send + 'static, echo: bool) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if echo {
                eprintln!("  agent| {line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn free_local_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("could not find a free loopback port")?;
    Ok(l.local_addr()?)
}

/// Runs a one-shot agent subcommand (`status`, `uninstall`, `check`) and returns
/// (success, stdout, stderr).
pub fn oneshot(binary: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    oneshot_with(Command::new(binary), binary, args)
}

/// The same, run from inside `cgroup`: as a node's boot unit runs inside the cgroup
/// root, which kernels before 5.14 need to learn the host namespace's cookie.
pub fn oneshot_in(binary: &Path, cgroup: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let mut cmd = Command::new(binary);
    crate::placed::start_in(&mut cmd, cgroup, None)?;
    oneshot_with(cmd, binary, args)
}

fn oneshot_with(mut cmd: Command, binary: &Path, args: &[&str]) -> Result<(bool, String, String)> {
    let out = cmd.args(args).output().with_context(|| format!("could not run {}", binary.display()))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

pub use metadata_guard::{HostStatus, RecordLine, Status};

/// `metadata-guard status --json` for the pins under `bpffs`.
/// The host-side table as `status --json` shows it (key `host_side`).
pub fn host_status(binary: &Path, bpffs: &Path) -> Result<HostStatus> {
    let bpffs = bpffs.display().to_string();
    let (ok, out, err) = oneshot(binary, &["status", "--json", "--bpffs", &bpffs])?;
    anyhow::ensure!(ok, "metadata-guard status failed: {err}");
    let value: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("status printed {out:?}"))?;
    serde_json::from_value(value["host_side"].clone()).with_context(|| format!("status printed {out:?}"))
}

pub fn status(binary: &Path, bpffs: &Path) -> Result<Status> {
    let bpffs = bpffs.display().to_string();
    let (ok, out, err) = oneshot(binary, &["status", "--json", "--bpffs", &bpffs])?;
    anyhow::ensure!(ok, "metadata-guard status failed: {err}");
    serde_json::from_str(&out).with_context(|| format!("status printed {out:?}"))
}

/// A kernel verdict counter from a status, of one hook (`None`: all hooks).
pub fn verdict_count(status: &Status, hook: Option<&str>, verdict: &str) -> u64 {
    status.counters.iter().filter(|c| c.verdict == verdict && hook.is_none_or(|h| c.hook == h)).map(|c| c.count).sum()
}
