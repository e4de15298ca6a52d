// SPDX-License-Identifier: Apache-2.0
//! Fail-closed lifecycle: the block outlives the agent through kills, restarts,
//! upgrades and reconfiguration; operators can see and remove what is in the kernel.

use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::placed;

use crate::{
    agent::Agent,
    attempt::Kind,
    harness::{budget, wait_until, Ctx, Who, METADATA_V4},
};

pub(crate) const SCENARIOS: [crate::Scenario; 7] = [
    ("lifecycle: no attempt gets through while the agent is killed, restarted, upgraded and reconfigured", never_opens),
    ("lifecycle: status after SIGKILL shows the programs attached and no agent running", status_after_kill),
    ("lifecycle: uninstall after SIGKILL lets the pod through, and running it twice succeeds", uninstall_after_kill),
    ("lifecycle: an invalid config keeps the old policy, a valid one applies within 2 s", config_reload),
    ("lifecycle: a second agent on the same bpffs is refused", second_agent_refused),
    ("lifecycle: check names a missing bpffs and a path that is not cgroup2", check_reports_precisely),
    (
        "lifecycle: with only the DaemonSet's capabilities an agent attaches, keeps and swaps programs",
        daemonset_capabilities_suffice,
    ),
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
    let prober = ctx.pod_prober("stop-prober")?;

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

    let out = prober.finish()?;
    ensure!(out.ok == 0, "{} of {} attempts reached the metadata service during the lifecycle", out.ok, out.total());
    ensure!(out.eperm > 100, "the prober made too few attempts to prove anything: {out:?}");
    ensure!(out.other.is_empty(), "attempts failed other than with EPERM: {out:?}");
    ctx.running_args.clear();
    Ok(())
}

fn program_tags(ctx: &Ctx) -> Result<Vec<String>> {
    let status = ctx.status()?;
    Ok(status.programs.iter().map(|p| format!("{}={}", p.hook, p.program_tag)).collect())
}

/// Polls until a pod's attempt on `dest` is refused.
fn wait_refused(ctx: &Ctx, dest: &str, within: Duration) -> Result<()> {
    wait_for_pod(ctx, dest, within, true)
}

/// Polls until a pod's attempt on `dest` is served.
fn wait_served(ctx: &Ctx, dest: &str, within: Duration) -> Result<()> {
    wait_for_pod(ctx, dest, within, false)
}

fn wait_for_pod(ctx: &Ctx, dest: &str, within: Duration, refused: bool) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = ctx.try_once(Who::Pod(0), Kind::UdpSendto, dest, 80, false)?;
        if (refused && out.eperm == 1) || (!refused && out.ok == 1) {
            return Ok(());
        }
        let still = if refused { "reachable" } else { "refused" };
        ensure!(Instant::now() < deadline, "{dest} was still {still} after {within:?}");
        // Each try is a process of its own: no need to spin.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status_after_kill(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ctx.agent.take().context("no agent")?.kill()?;
    let status = ctx.status()?;
    ensure!(status.enforcing && !status.agent_running, "status after SIGKILL: {status:?}");
    // The enforcement programs; conceal mode's sockops recorder is not attached in enforce mode.
    let hooks: Vec<&str> = status.programs.iter().map(|p| p.hook.as_str()).collect();
    let expected = metadata_guard_tests::bpf::enforcement_hooks();
    ensure!(hooks == expected, "expected the hooks {expected:?} attached: {status:?}");
    ensure!(status.mode.as_deref() == Some("enforce"), "mode missing from status: {status:?}");
    ensure!(status.destinations.iter().any(|d| d.starts_with("169.254.169.254/32")), "{status:?}");
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
    ensure!(!status.installed, "still installed after uninstall: {status:?}");
    Ok(())
}

fn config_reload(ctx: &mut Ctx) -> Result<()> {
    let config = write_config(ctx, None)?;
    ctx.ensure_agent(&["--config", &config])?;
    wait_served(ctx, ECS_ENDPOINT, Duration::from_secs(2))?;

    fs::write(ctx.node.config_path(), "mode: enforcing\ndestinations: {presets: [nowhere]}\n")?;
    // Readiness: the agent has read and rejected the file (it checks every second).
    let rejected = || -> Result<bool> {
        let metrics = ctx.agent()?.http_get("/metrics")?.1;
        Ok(metrics.lines().any(|l| l.starts_with("metadata_guard_config_last_reload_success") && l.ends_with(" 0")))
    };
    wait_until(budget(Duration::from_secs(3)), rejected).context("the failed reload is not visible in /metrics")?;
    block_in_force(ctx, "an invalid config")?;
    let log = ctx.agent()?.log_text();
    ensure!(log.contains("previous policy stays in force"), "the invalid config was not reported:\n{log}");

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

/// The DaemonSet's capabilities (deploy/base/daemonset.yaml; tests/tests/deploy.rs pins
/// that list): BPF, NET_ADMIN, PERFMON, SYS_RESOURCE. No SYS_ADMIN.
const DAEMONSET_CAPS: [u32; 4] = [39, 12, 38, 24];
const CAP_SYS_ADMIN: u32 = 21;

fn daemonset_capabilities_suffice(ctx: &mut Ctx) -> Result<()> {
    ctx.uninstall()?;
    let ids = |ctx: &Ctx, key: &str| -> Result<Vec<String>> {
        let status = ctx.status()?;
        Ok(status
            .programs
            .iter()
            .map(|p| format!("{}={}", p.hook, if key == "link_id" { p.link_id } else { p.program_id }))
            .collect())
    };
    let link_ids = |ctx: &Ctx| ids(ctx, "link_id");
    run_with_daemonset_caps(ctx, &ctx.agent_bin.clone(), "a first install")?;
    let (tags, links, programs) = (program_tags(ctx)?, link_ids(ctx)?, ids(ctx, "program_id")?);
    let status = ctx.status()?;
    ensure!(status.enforcing, "the first install is not enforcing with the DaemonSet's capabilities: {status:?}");
    // The same code is kept: the very same programs, not equal copies swapped in.
    run_with_daemonset_caps(ctx, &ctx.agent_bin.clone(), "a restart")?;
    ensure!(ids(ctx, "program_id")? == programs && link_ids(ctx)? == links, "a restart changed the programs or links");
    run_with_daemonset_caps(ctx, &ctx.variant_bin()?, "an upgrade to other programs")?;
    let upgraded = program_tags(ctx)?;
    // The test variant differs only in what the verdict programs report: the others
    // (which report nothing) are the same code in both builds, kept as they are.
    let same_in_variant = |t: &String| {
        metadata_guard::ATTACHMENTS.iter().any(|a| !a.reports_verdicts() && t.starts_with(&format!("{}=", a.pin)))
    };
    ensure!(upgraded.iter().all(|t| !tags.contains(t) || same_in_variant(t)), "not swapped: {upgraded:?}");
    ensure!(upgraded != tags, "the upgrade swapped no program: {upgraded:?}");
    ensure!(link_ids(ctx)? == links, "the upgrade replaced links instead of swapping their programs in place");
    ctx.uninstall()
}

/// Runs the agent as the DaemonSet does, capability-wise (the bounding set cut to
/// DAEMONSET_CAPS before exec, so even uid 0 holds only those): waits until it is
/// ready, checks the block, then stops it with SIGTERM.
fn run_with_daemonset_caps(ctx: &Ctx, binary: &std::path::Path, step: &str) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let spec = ctx.spec(binary, &[]);
    // Any port: the agent serves it on the node namespace's loopback.
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], 9965));
    let log = ctx.node.work.join("daemonset-caps.log");
    let mut cmd = std::process::Command::new(&spec.binary);
    cmd.arg("run")
        .arg("--cgroup")
        .arg(&spec.attach_cgroup)
        .arg("--bpffs")
        .arg(&spec.bpffs)
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .arg("--mount-bpffs=false")
        .env_remove("NODE_NAME")
        // The harness points every command at the node's namespace by path; here the
        // agent is in it already, as with hostNetwork.
        .env_remove("METADATA_GUARD_HOST_NETNS")
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log)?);
    // As with hostNetwork: the agent lives in the node's namespace (no --host-netns,
    // which would have it open another process's namespace, a ptrace-level access).
    placed::start_in(&mut cmd, &spec.own_cgroup, Some(&spec.host_netns))?;
    // SAFETY: only async-signal-safe calls (prctl) between fork and exec; this runs
    // after the cgroup and namespace are joined.
    unsafe {
        cmd.pre_exec(move || {
            for cap in (0..64).filter(|c| !DAEMONSET_CAPS.contains(c)) {
                // EINVAL past the last capability this kernel knows: nothing to drop.
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && *libc::__errno_location() != libc::EINVAL {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("could not start {}", binary.display()))?;
    let log_text = || fs::read_to_string(&log).unwrap_or_default();
    let ready = wait_until(budget(Duration::from_secs(30)), || {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the agent exited with {status}");
        }
        Ok(ctx.node.sim.node().run(|| http_status(metrics, "/readyz")).is_ok_and(|code| code == 200))
    });
    let outcome = ready.and_then(|_| {
        // Exactly the DaemonSet's, as far as this machine grants them to us at all.
        let ours = cap_set("self", "CapBnd:")?;
        let wanted = DAEMONSET_CAPS.iter().fold(0u64, |m, c| m | 1 << c) & ours;
        let held = cap_set(&child.id().to_string(), "CapEff:")?;
        ensure!(held == wanted, "the agent holds capabilities {held:x}, not the DaemonSet's {wanted:x}");
        ensure!(held & (1 << CAP_SYS_ADMIN) == 0, "the agent holds CAP_SYS_ADMIN");
        block_in_force(ctx, step)
    });
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exit = child.wait()?;
    outcome.with_context(|| format!("{step} with the DaemonSet's capabilities; the agent's log:\n{}", log_text()))?;
    ensure!(exit.success(), "{step}: the agent exited with {exit} after SIGTERM; its log:\n{}", log_text());
    Ok(())
}

/// A capability set of /proc/<pid>/status, e.g. `CapEff:`.
fn cap_set(pid: &str, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status.lines().find_map(|l| l.strip_prefix(field)).with_context(|| format!("no {field}"))?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

fn http_status(addr: std::net::SocketAddr, path: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    Ok(std::str::from_utf8(&head[9..12])?.parse()?)
}
