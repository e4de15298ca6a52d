// SPDX-License-Identifier: Apache-2.0
//! Honest health: /readyz says what is missing when enforcement or the audit trail
//! breaks under the running agent, the agent restores what it can, liveness cannot
//! be starved, and logs are fit for machines.

use std::{
    fs,
    net::TcpStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{
    agent::{self, Agent},
    attempt::Kind,
    harness::{budget, Ctx, Who, METADATA_V4},
};

pub(crate) const SCENARIOS: [crate::Scenario; 5] = [
    ("health: a link pin removed by hand turns /readyz 503 until the agent restores it", pins_removed),
    (
        "health: the attached cgroup removed turns /readyz 503 and status says so; re-created, it is re-attached",
        cgroup_gone,
    ),
    ("health: an audit log on a full file system turns /readyz 503 until records can be written again", audit_fs_full),
    ("health: 64 idle connections held open, /healthz still answers within 1 s", idle_connections),
    ("health: logs through a pipe carry no escape codes; in JSON mode every line is JSON, the fatal one too", logs),
];

/// How long the agent may take to notice a fault or its repair (it checks every second).
pub(crate) const NOTICE: Duration = Duration::from_secs(3);

/// Polls /readyz until `want` answers, returning the body.
pub(crate) fn wait_readyz(agent: &Agent, want: u16, within: Duration) -> Result<String> {
    let deadline = Instant::now() + budget(within);
    loop {
        let answer = agent.http_get("/readyz");
        if let Ok((code, body)) = &answer {
            if *code == want {
                return Ok(body.clone());
            }
        }
        if Instant::now() > deadline {
            bail!("/readyz did not answer {want} within {within:?} (last: {answer:?}); log:\n{}", agent.log_text());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn metric(agent: &Agent, name: &str) -> Result<f64> {
    let text = agent.http_get("/metrics")?.1;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .with_context(|| format!("no {name} in /metrics"))
}

/// How often removing the pins may lose the race with the agent restoring them.
const RACE_TRIES: u32 = 20;

fn pins_removed(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    let version_dir = metadata_guard::PinLayout::new(&ctx.node.bpffs).dir;
    // Everything pinned goes, as `rm -r` by hand would do; then a directory where
    // the connect4 link's pin belongs keeps the agent from pinning it again.
    let blocker = version_dir.join("links/connect4");
    let mut tries = 0;
    loop {
        match fs::remove_dir_all(&version_dir) {
            Ok(()) => {}
            // The agent pinned again while the tree was being removed: start over.
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty && tries < RACE_TRIES => {
                tries += 1;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("could not remove {}", version_dir.display())),
        }
        match fs::create_dir_all(&blocker) {
            Ok(()) => break,
            // The agent restored everything in between: start over.
            Err(_) if tries < RACE_TRIES => tries += 1,
            Err(e) => return Err(e).context("could not block the connect4 pin"),
        }
    }
    let agent = ctx.agent()?;
    let body = wait_readyz(agent, 503, NOTICE)?;
    ensure!(body.contains("connect4"), "/readyz does not say what is missing: {body}");
    let status = ctx.status()?;
    ensure!(!status.enforcing, "status claims enforcement while connect4 is unpinned: {status:?}");
    ensure!(status.problems.iter().any(|p| p.contains("connect4")), "status names no problem: {status:?}");

    fs::remove_dir(&blocker)?;
    wait_readyz(agent, 200, NOTICE)?;
    ensure!(metric(agent, "metadata_guard_enforcement_restores_total")? >= 1.0, "no restore counted");
    let status = ctx.status()?;
    // The enforcement programs; conceal mode's sockops recorder only in conceal mode.
    let hooks: Vec<&str> = status.programs.iter().map(|p| p.hook.as_str()).collect();
    let expected = metadata_guard_tests::bpf::enforcement_hooks();
    ensure!(status.enforcing && hooks == expected, "not whole after the restore (expected {expected:?}): {status:?}");
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    ctx.expect_refused(Who::Pod(0), Kind::UdpSendto, METADATA_V4, 80, false)
}

fn cgroup_gone(ctx: &mut Ctx) -> Result<()> {
    ctx.stop_agent()?;
    // An empty cgroup of its own and a pin directory of its own, so the node's
    // enforcement stays where it is.
    let attach = ctx.node.root.path().join("mg-attach-gone");
    let bpffs = ctx.node.bpffs.with_file_name("cgroup-gone");
    let _ = fs::remove_dir(&attach);
    fs::create_dir(&attach)?;
    let outcome = cgroup_gone_on(ctx, &attach, &bpffs);
    let bpffs_arg = bpffs.display().to_string();
    let cleanup = agent::oneshot(&ctx.agent_bin, &["uninstall", "--bpffs", &bpffs_arg]);
    let _ = fs::remove_dir(&attach);
    outcome?;
    ensure!(cleanup?.0, "uninstall of the scenario's pins failed");
    Ok(())
}

fn cgroup_gone_on(ctx: &Ctx, attach: &Path, bpffs: &Path) -> Result<()> {
    let mut spec = ctx.spec(&ctx.agent_bin, &[]);
    spec.attach_cgroup = attach.to_path_buf();
    spec.bpffs = bpffs.to_path_buf();
    let agent = Agent::start(&spec)?;
    fs::remove_dir(attach).context("could not remove the attached cgroup")?;
    let body = wait_readyz(&agent, 503, NOTICE)?;
    ensure!(body.contains("no longer exists"), "/readyz does not say the cgroup is gone: {body}");
    // The kernel detaches the links once the cgroup is released.
    let deadline = Instant::now() + budget(NOTICE);
    loop {
        let status = agent::status(&ctx.agent_bin, bpffs)?;
        if status.programs.iter().all(|p| p.cgroup_id == 0) {
            ensure!(!status.enforcing, "status claims enforcement on a removed cgroup: {status:?}");
            ensure!(status.problems.iter().any(|p| p.contains("no longer exists")), "{status:?}");
            break;
        }
        ensure!(Instant::now() < deadline, "the links never showed as detached: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let bpffs_arg = bpffs.display().to_string();
    let (ok, text, err) = agent::oneshot(&ctx.agent_bin, &["status", "--bpffs", &bpffs_arg])?;
    ensure!(ok, "status failed: {err}");
    ensure!(!text.contains("on cgroup 0"), "status still says \"on cgroup 0\":\n{text}");
    ensure!(text.contains("NOT enforcing"), "status does not say enforcement is incomplete:\n{text}");

    fs::create_dir(attach)?;
    let new_id = std::os::unix::fs::MetadataExt::ino(&fs::metadata(attach)?);
    wait_readyz(&agent, 200, NOTICE)?;
    let status = agent::status(&ctx.agent_bin, bpffs)?;
    ensure!(status.enforcing, "not enforcing after the cgroup came back: {status:?}");
    ensure!(status.programs.iter().all(|p| p.cgroup_id == new_id), "links not on the new cgroup: {status:?}");
    agent.stop()?;
    Ok(())
}

/// A small tmpfs of the scenario's own, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(path: PathBuf) -> Result<SmallFs> {
        fs::create_dir_all(&path)?;
        nix::mount::mount(Some("tmpfs"), &path, Some("tmpfs"), nix::mount::MsFlags::empty(), Some("size=1m"))
            .with_context(|| format!("could not mount a tmpfs on {}", path.display()))?;
        Ok(SmallFs(path))
    }

    /// Fills it up; returns the filler file.
    fn fill(&self) -> Result<PathBuf> {
        use std::io::Write;
        let filler = self.0.join("filler");
        let mut f = fs::File::create(&filler)?;
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let mut byte_left = true;
        while byte_left {
            byte_left = f.write_all(&[0]).is_ok();
        }
        Ok(filler)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.0);
    }
}

fn audit_fs_full(ctx: &mut Ctx) -> Result<()> {
    ctx.stop_agent()?;
    let small = SmallFs::mount(ctx.node.work.join("audit-fs"))?;
    let log = small.0.join("audit.log").display().to_string();
    let spec = ctx.spec(&ctx.agent_bin, &["--audit-log", &log]);
    let agent = Agent::start(&spec)?;
    let filler = small.fill()?;
    // Each port is a new destination, so each attempt wants a record of its own.
    let mut port = 8000;
    let deadline = Instant::now() + budget(NOTICE);
    let body = loop {
        ctx.expect_refused(Who::Pod(0), Kind::UdpSendto, METADATA_V4, port, false)?;
        port += 1;
        match agent.http_get("/readyz")? {
            (503, body) => break body,
            _ if Instant::now() > deadline => bail!("/readyz stayed 200 with the audit log's disk full"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    ensure!(body.contains("audit trail"), "/readyz does not name the audit trail: {body}");
    fs::remove_file(&filler)?;
    let deadline = Instant::now() + budget(NOTICE);
    loop {
        ctx.expect_refused(Who::Pod(0), Kind::UdpSendto, METADATA_V4, port, false)?;
        port += 1;
        if agent.http_get("/readyz")?.0 == 200 {
            break;
        }
        ensure!(Instant::now() < deadline, "/readyz stayed 503 after space was freed; log:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let written = fs::read_to_string(small.0.join("audit.log"))?;
    ensure!(written.contains("\"suppressed_since_last\":"), "no record was written after recovery: {written}");
    agent.stop()?;
    Ok(())
}

fn idle_connections(ctx: &mut Ctx) -> Result<()> {
    let agent = ctx.default_agent()?;
    let idle: Vec<TcpStream> =
        (0..64).map(|_| TcpStream::connect(agent.metrics)).collect::<Result<_, _>>().context("connect failed")?;
    for round in 0..5 {
        let started = Instant::now();
        let (code, body) = agent.http_get("/healthz")?;
        let took = started.elapsed();
        ensure!(code == 200 && body == "ok\n", "round {round}: /healthz answered {code} {body:?}");
        ensure!(
            took < budget(Duration::from_secs(1)),
            "round {round}: /healthz took {took:?} with 64 idle connections"
        );
    }
    drop(idle);
    Ok(())
}

fn logs(ctx: &mut Ctx) -> Result<()> {
    let text_log = ctx.default_agent()?.log_text();
    ensure!(!text_log.is_empty(), "the agent logged nothing");
    ensure!(!text_log.contains('\x1b'), "escape codes in a log written to a pipe:\n{text_log:?}");

    ctx.ensure_agent(&["--log-format", "json"])?;
    let spec = ctx.spec(&ctx.agent_bin, &["--log-format", "json"]);
    let mut refused = Agent::spawn(&spec)?;
    let status = refused.wait_exit(Duration::from_secs(20))?;
    ensure!(!status.success(), "a second agent on the same bpffs started");
    for log in [ctx.agent()?.log_text(), refused.log_text()] {
        ensure!(!log.contains('\x1b'), "escape codes in the JSON log:\n{log:?}");
        for line in log.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("a log line is not JSON: {line:?}"))?;
            ensure!(v.get("level").is_some() && v.get("fields").is_some(), "not a log record: {line}");
        }
    }
    let fatal = refused.log_text();
    let last: serde_json::Value = serde_json::from_str(fatal.lines().last().context("no log")?)?;
    ensure!(
        last["level"] == "ERROR" && last["fields"]["message"].as_str().is_some_and(|m| m.contains("another")),
        "the fatal error is not the last JSON line: {fatal}"
    );
    Ok(())
}
