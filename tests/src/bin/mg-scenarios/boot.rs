// SPDX-License-Identifier: Apache-2.0
//! Closed from the first second: `metadata-guard apply` at the node's boot puts the
//! block in the kernel before any pod exists; the DaemonSet's agent adopts it.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};

use crate::{
    agent::{self, Agent, Status},
    attempt::{self, Kind},
    harness::{Ctx, Who, METADATA_V4, METADATA_V6},
    hostside::{host_status, syn_over_af_packet},
};

pub(crate) const SCENARIOS: [crate::Scenario; 4] = [
    (
        "boot: after apply returns no pod attempt succeeds (AF_PACKET frames too), with no agent and while an agent adopts",
        apply_then_adopt,
    ),
    ("boot: the test-variant agent adopts what apply installed, with no gap", variant_adopts),
    ("boot: apply twice changes nothing the second time, and check names the version that applied", idempotent),
    ("boot: apply refuses while an agent runs and leaves its enforcement alone", refused_while_running),
];

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `<binary> apply` with the same node flags the scenarios' agents get, and `extra`.
pub(crate) fn apply(ctx: &Ctx, binary: &Path, extra: &[&str]) -> Result<(bool, String, String)> {
    let spec = ctx.spec(binary, extra);
    let mut args = vec![
        "apply".to_string(),
        "--cgroup".into(),
        spec.attach_cgroup.display().to_string(),
        "--host-netns".into(),
        spec.host_netns.display().to_string(),
        "--bpffs".into(),
        spec.bpffs.display().to_string(),
    ];
    args.extend(spec.extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    agent::oneshot_in(binary, &spec.own_cgroup, &args)
}

fn applied(ctx: &Ctx) -> Result<String> {
    let (ok, out, err) = apply(ctx, &ctx.agent_bin, &[])?;
    ensure!(ok, "apply failed:\n{out}{err}");
    Ok(out)
}

/// Every path a pod has is refused, the host is served.
fn closed_for_pods(ctx: &Ctx, step: &str) -> Result<()> {
    let check = || -> Result<()> {
        ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
        ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V6, 80, false)?;
        ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, true)?;
        ctx.expect_refused(Who::Pod(0), Kind::UdpSendto, METADATA_V4, 80, false)?;
        ctx.expect_refused(Who::Pod(0), Kind::UdpConnect, METADATA_V6, 80, false)?;
        ctx.expect_served(Who::HostInPodCgroup(0), Kind::Http, METADATA_V4, 80, false)
    };
    check().with_context(|| format!("after {step}"))
}

fn links(status: &Status) -> Vec<(String, u32, u32)> {
    status.programs.iter().map(|p| (p.hook.clone(), p.link_id, p.program_id)).collect()
}

/// Starts a pod prober (one attempt a millisecond), runs `apply`, then `after`;
/// returns the prober's outcome and checks that nothing succeeded once apply returned.
fn probe_around_apply(ctx: &mut Ctx, after: impl FnOnce(&mut Ctx) -> Result<()>) -> Result<()> {
    ctx.uninstall()?;
    let prober = ctx.pod_prober("stop-boot-prober")?;
    // The prober must be seen succeeding before apply, or it proves nothing.
    let arrivals = ctx.node.standin.arrivals();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ctx.node.standin.arrivals() == arrivals {
        ensure!(std::time::Instant::now() < deadline, "the prober never reached the stand-in before apply");
        std::thread::sleep(Duration::from_millis(5));
    }
    let result = applied(ctx).map(|_| attempt::unix_us()).and_then(|returned| after(ctx).map(|()| returned));
    let out = prober.finish()?;
    let apply_returned = result?;
    ensure!(out.ok > 0, "the prober never succeeded before apply: {out:?}");
    ensure!(
        out.last_ok_started_unix_us < apply_returned,
        "an attempt that began {} µs after apply returned succeeded: {out:?}",
        out.last_ok_started_unix_us - apply_returned
    );
    ensure!(out.eperm > 100, "the prober made too few attempts after apply to prove anything: {out:?}");
    Ok(())
}

fn apply_then_adopt(ctx: &mut Ctx) -> Result<()> {
    probe_around_apply(ctx, |ctx| {
        closed_for_pods(ctx, "apply, with no agent running")?;
        let before = ctx.status()?;
        ensure!(before.enforcing && !before.agent_running, "{before:?}");
        let by = before.installed_by.as_ref().context("no installer recorded")?;
        ensure!(by.command == "apply" && by.version == VERSION, "installed by {by}");
        // The host side is part of the boot enforcement: a frame a pod writes itself
        // finds the node closed before any agent runs.
        let host = host_status(ctx)?;
        ensure!(host.installed && host.mode.as_deref() == Some("enforce"), "apply wrote no host-side table: {host:?}");
        let (arrived, answered) = syn_over_af_packet(ctx, METADATA_V4.parse()?, 44200)?;
        ensure!(arrived == 0 && !answered, "after apply a pod's AF_PACKET SYN arrived {arrived} time(s)");
        let agent = Agent::start(&ctx.spec(&ctx.agent_bin, &[]))?;
        closed_for_pods(ctx, "the agent adopted")?;
        let after = ctx.status()?;
        ensure!(links(&before) == links(&after), "the same version replaced links instead of adopting them");
        ensure!(after.updated_by.as_ref().is_some_and(|u| u.command == "run"), "{after:?}");
        ensure!(after.installed_by == before.installed_by, "adoption rewrote the installer: {after:?}");
        agent.stop()?;
        Ok(())
    })
}

fn variant_adopts(ctx: &mut Ctx) -> Result<()> {
    let variant = ctx.variant_bin()?;
    probe_around_apply(ctx, |ctx| {
        let before = ctx.status()?;
        let agent = Agent::start(&ctx.spec(&variant, &[]))?;
        closed_for_pods(ctx, "the test-variant agent adopted")?;
        let after = ctx.status()?;
        let tags = |s: &Status| s.programs.iter().map(|p| p.program_tag.clone()).collect::<Vec<_>>();
        ensure!(tags(&before) != tags(&after), "the variant's programs did not replace apply's: {after:?}");
        agent.stop()?;
        Ok(())
    })
}

fn idempotent(ctx: &mut Ctx) -> Result<()> {
    ctx.uninstall()?;
    let first = applied(ctx)?;
    ensure!(first.contains("installed by apply"), "apply did not say what it did:\n{first}");
    ensure!(first.contains("blocked:") && first.contains("169.254.169.254/32"), "apply printed no policy:\n{first}");
    let before = ctx.status()?;
    let second = applied(ctx)?;
    ensure!(second.contains("adopted"), "the second apply did not say it adopted:\n{second}");
    let after = ctx.status()?;
    ensure!(links(&before) == links(&after), "the second apply changed the links: {before:?} → {after:?}");
    ensure!(before.destinations == after.destinations && after.enforcing, "{after:?}");
    closed_for_pods(ctx, "apply twice")?;
    let (_, out, err) = ctx.oneshot(&["check"])?;
    let wanted = format!("installed at boot by apply {VERSION}");
    ensure!(out.contains(&wanted), "check does not say {wanted:?}:\n{out}{err}");
    Ok(())
}

fn refused_while_running(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    let before = ctx.status()?;
    let (ok, out, err) = apply(ctx, &ctx.agent_bin, &[])?;
    ensure!(!ok, "apply succeeded while an agent runs:\n{out}{err}");
    ensure!(err.contains("an agent already runs"), "unclear refusal:\n{out}{err}");
    let after = ctx.status()?;
    ensure!(links(&before) == links(&after) && after.updated_by == before.updated_by, "apply touched the agent's pins");
    ensure!(ctx.agent()?.http_get("/readyz")?.0 == 200, "the agent is no longer ready");
    closed_for_pods(ctx, "a refused apply")
}
