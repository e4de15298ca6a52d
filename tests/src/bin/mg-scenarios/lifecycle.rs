//! Fail-closed lifecycle: the block outlives the agent through kills, restarts,
//! upgrades and reconfiguration; operators can see and remove what is in the kernel.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use crate::{
    agent::Agent,
    attempt::{self, Kind},
    harness::{budget, Ctx, Who, METADATA_V4},
};

pub const SCENARIOS: [crate::Scenario; 6] = [
    ("lifecycle: no attempt gets through while the agent is killed, restarted, upgraded and reconfigured", never_opens),
    ("lifecycle: status after SIGKILL shows the programs attached and no agent running", status_after_kill),
    ("lifecycle: uninstall after SIGKILL lets the pod through, and running it twice succeeds", uninstall_after_kill),
    ("lifecycle: an invalid config keeps the old policy, a valid one applies within 2 s", config_reload),
    ("lifecycle: a second agent on the same bpffs is refused", second_agent_refused),
    ("lifecycle: check names a missing bpffs and a path that is not cgroup2", check_reports_precisely),
];

const ECS_ENDPOINT: &str = "169.254.170.2";

fn write_config(ctx: &Ctx, extra_block: Option<&str>) -> Result<String> {
    let mut yaml = String::from("mode: enforce\ndestinations:\n  presets: [default]\n");
    if let Some(cidr) = extra_block {
        yaml.push_str(&format!("  block:\n    - cidr: {cidr}\n"));
    }
    let path = ctx.node.config_path();
    // Replace atomically, as a ConfigMap update does.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, yaml)?;
    fs::rename(&tmp, &path)?;
    Ok(path.display().to_string())
}

fn block_in_force(ctx: &Ctx, step: &str) -> Result<()> {
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false).with_context(|| format!("after {step}"))
}

fn never_opens(ctx: &mut Ctx) -> Result<()> {
    let config = write_config(ctx, None)?;
    ctx.stop_agent()?;
    ctx.ensure_agent(&["--config", &config])?;
    let stop = ctx.node.work.join("stop-prober");
    let _ = fs::remove_file(&stop);
    let mut prober = ctx.request(Who::Pod(2), Kind::Http, METADATA_V4, 80, false)?;
    prober.interval_us = 1000;
    prober.stop_file = Some(stop.clone());
    let prober = attempt::spawn(&prober)?;

    let spec = ctx.spec(&ctx.agent_bin.clone(), &["--config", &config]);
    ctx.agent.take().context("no agent")?.kill()?;
    block_in_force(ctx, "SIGKILL")?;
    let agent = Agent::start(&spec)?;
    block_in_force(ctx, "restart")?;

    let tags_before = program_tags(ctx)?;
    agent.kill()?;
    let variant = ctx.spec(&ctx.variant_bin()?, &["--config", &config]);
    let agent = Agent::start(&variant)?;
    block_in_force(ctx, "upgrade to other programs")?;
    let tags_after = program_tags(ctx)?;
    ensure!(tags_before != tags_after, "the variant build's programs did not replace the pinned ones: {tags_after:?}");

    write_config(ctx, Some("169.254.170.2/32"))?;
    wait_refused(ctx, ECS_ENDPOINT, budget(Duration::from_secs(2))).context("the changed config did not apply")?;
    block_in_force(ctx, "config change")?;
    agent.stop()?;
    block_in_force(ctx, "SIGTERM")?;

    fs::write(&stop, "")?;
    let out = attempt::wait(prober)?;
    ensure!(out.ok == 0, "{} of {} attempts reached the metadata service during the lifecycle", out.ok, out.total());
    ensure!(out.eperm > 100, "the prober made too few attempts to prove anything: {out:?}");
    ensure!(out.other.is_empty(), "attempts failed other than with EPERM: {out:?}");
    ctx.running_args.clear();
    Ok(())
}

fn program_tags(ctx: &Ctx) -> Result<Vec<String>> {
    let status = ctx.status()?;
    let programs = status["programs"].as_array().context("status has no programs")?;
    Ok(programs.iter().map(|p| format!("{}={}", p["hook"], p["program_tag"])).collect())
}

/// Polls until a pod's attempt on `dest` is refused.
fn wait_refused(ctx: &Ctx, dest: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = ctx.try_once(Who::Pod(0), Kind::UdpSendto, dest, 80, false)?;
        if out.eperm == 1 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{dest} was still reachable after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_served(ctx: &Ctx, dest: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = ctx.try_once(Who::Pod(0), Kind::UdpSendto, dest, 80, false)?;
        if out.ok == 1 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{dest} was still refused after {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_after_kill(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ctx.agent.take().context("no agent")?.kill()?;
    let status = ctx.status()?;
    ensure!(status["installed"] == true && status["agent_running"] == false, "status after SIGKILL: {status}");
    // Six enforcement programs and conceal mode's sockops recorder (idle outside conceal mode).
    ensure!(status["programs"].as_array().map(Vec::len) == Some(7), "expected 7 attached programs: {status}");
    ensure!(status["mode"] == "enforce", "mode missing from status: {status}");
    let blocked = status["destinations"].as_array().context("no destinations")?;
    ensure!(blocked.iter().any(|d| d.as_str().is_some_and(|d| d.starts_with("169.254.169.254/32"))), "{status}");
    block_in_force(ctx, "SIGKILL")?;
    ctx.running_args.clear();
    Ok(())
}

fn uninstall_after_kill(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ctx.agent.take().context("no agent")?.kill()?;
    ctx.running_args.clear();
    for round in 1..=2 {
        let (ok, out, err) = ctx.oneshot(&["uninstall"])?;
        ensure!(ok, "uninstall round {round} failed: {out}{err}");
    }
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    let status = ctx.status()?;
    ensure!(status["installed"] == false, "still installed after uninstall: {status}");
    Ok(())
}

fn config_reload(ctx: &mut Ctx) -> Result<()> {
    let config = write_config(ctx, None)?;
    ctx.ensure_agent(&["--config", &config])?;
    wait_served(ctx, ECS_ENDPOINT, Duration::from_secs(2))?;

    fs::write(ctx.node.config_path(), "mode: enforcing\ndestinations: {presets: [nowhere]}\n")?;
    std::thread::sleep(Duration::from_millis(2500));
    block_in_force(ctx, "an invalid config")?;
    let log = ctx.agent()?.log_text();
    ensure!(log.contains("previous policy stays in force"), "the invalid config was not reported:\n{log}");
    let metrics = ctx.agent()?.http_get("/metrics")?.1;
    ensure!(
        metrics.lines().any(|l| l.starts_with("metadata_guard_config_last_reload_success") && l.ends_with(" 0")),
        "the failed reload is not visible in /metrics"
    );

    write_config(ctx, Some("169.254.170.2/32"))?;
    wait_refused(ctx, ECS_ENDPOINT, budget(Duration::from_secs(2)))?;
    block_in_force(ctx, "a valid config")?;

    // SIGHUP reloads too: back to the plain policy.
    write_config(ctx, None)?;
    ctx.agent()?.signal(libc::SIGHUP);
    wait_served(ctx, ECS_ENDPOINT, Duration::from_secs(2))
}

fn second_agent_refused(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    let spec = ctx.spec(&ctx.agent_bin.clone(), &[]);
    let mut second = Agent::spawn(&spec)?;
    let status = second.wait_exit(Duration::from_secs(20))?;
    ensure!(!status.success(), "a second agent started on the same bpffs");
    ensure!(second.log_text().contains("another metadata-guard agent"), "unclear refusal:\n{}", second.log_text());
    block_in_force(ctx, "a refused second agent")
}

fn check_reports_precisely(ctx: &mut Ctx) -> Result<()> {
    let bogus = ctx.node.work.join("no-such-dir/bpf/metadata-guard");
    let not_cgroup = ctx.node.work.display().to_string();
    let out = std::process::Command::new(&ctx.agent_bin)
        .args(["check", "--json", "--bpffs"])
        .arg(&bogus)
        .args(["--cgroup", &not_cgroup])
        .output()?;
    ensure!(!out.status.success(), "check passed with a bogus bpffs and cgroup");
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).context("check --json printed no JSON")?;
    let find = |name: &str| checks.as_array().and_then(|a| a.iter().find(|c| c["name"] == name)).cloned();
    let bpffs = find("bpffs").context("no bpffs check")?;
    ensure!(bpffs["outcome"] == "fail" && bpffs["detail"].as_str().unwrap_or("").contains("no-such-dir"), "{bpffs}");
    let cgroup = find("cgroup v2").context("no cgroup v2 check")?;
    ensure!(cgroup["outcome"] == "fail" && cgroup["detail"].as_str().unwrap_or("").contains(&not_cgroup), "{cgroup}");
    Ok(())
}
