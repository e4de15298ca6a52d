// SPDX-License-Identifier: Apache-2.0
//! Conceal mode with no agent: no proxy runs before the DaemonSet's agent (`apply` at
//! the node's boot) or after it stops, and pods must then be refused as in enforce
//! mode, never sent to a port nobody answers.

use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::{
    attempt::Kind,
    conceal::{conceal_agent, expect, get, metadata, proxy_addr},
    harness::{budget, Ctx, Who, METADATA_V4, METADATA_V6},
};

pub(crate) const SCENARIOS: [crate::Scenario; 1] = [(
    "conceal: with no agent (after apply --mode conceal, a stopped agent) pods are refused at once (EPERM), host served; the agent's proxy then serves them",
    without_agent,
)];

/// Pods' metadata connections while no proxy listens: refused by the kernel (EPERM)
/// after `apply` at boot and after the agent stops; served once the agent's proxy is
/// up. An agent killed outright leaves its redirect pinned: pods then meet a closed
/// port on the node (ECONNREFUSED, at once, nothing reaches the service) until the
/// next agent or `apply` turns it off.
fn without_agent(ctx: &mut Ctx) -> Result<()> {
    let imds = metadata(METADATA_V4);
    let zone = get("/latest/meta-data/placement/availability-zone", "");
    let creds = get("/latest/meta-data/iam/security-credentials/", "");
    let refused = |ctx: &Ctx, step: &str| -> Result<()> {
        let check = || -> Result<()> {
            ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
            ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V6, 80, false)?;
            ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, true)?;
            ctx.expect_served(Who::HostInPodCgroup(0), Kind::Http, METADATA_V4, 80, false)
        };
        check().with_context(|| format!("after {step}"))
    };

    conceal_agent(ctx, None)?;
    expect(ctx, Who::Pod(0), imds, &zone, 200, 1)?;
    ctx.stop_agent()?;
    refused(ctx, "the agent stopped")?;

    conceal_agent(ctx, None)?;
    expect(ctx, Who::Pod(0), imds, &zone, 200, 1)?;
    ctx.agent.take().context("no agent")?.kill()?;
    ctx.running_args.clear();
    let proxy = proxy_addr(ctx);
    let conceal = |ctx: &Ctx| -> Result<metadata_guard::ConcealStatus> {
        ctx.status()?.conceal.context("status shows no conceal part")
    };
    let shown = conceal(ctx)?;
    ensure!(
        shown.proxy.as_deref() == Some(proxy.as_str()) && shown.listening == Some(false) && shown.redirected > 0,
        "status after the agent was killed: {shown:?}"
    );
    let dead = expect(ctx, Who::Pod(0), imds, &zone, 0, 0).context("after the agent was killed")?;
    ensure!(
        dead.error.as_deref().is_some_and(|e| e.contains("refused"))
            && dead.micros < budget(Duration::from_millis(500)).as_micros() as u64,
        "a killed agent's pinned redirect: expected a refused connection at once, got {dead:?}"
    );

    // The node's boot: apply with no agent turns that redirect off.
    let (ok, out, err) = crate::boot::apply(ctx, &ctx.agent_bin, &["--mode", "conceal", "--conceal-addr", &proxy])?;
    ensure!(ok, "apply --mode conceal failed:\n{out}{err}");
    ensure!(
        out.contains("refused (EPERM) until the agent's proxy listens"),
        "apply did not say what pods meet:\n{out}"
    );
    refused(ctx, "apply --mode conceal")?;
    let shown = conceal(ctx)?;
    ensure!(shown.proxy.is_none() && shown.listening.is_none(), "status after apply: {shown:?}");

    conceal_agent(ctx, None)?;
    expect(ctx, Who::Pod(0), imds, &zone, 200, 1)?;
    expect(ctx, Who::Pod(0), imds, &creds, 404, 0)?;
    let shown = conceal(ctx)?;
    ensure!(
        shown.proxy.as_deref() == Some(proxy.as_str()) && shown.listening == Some(true) && shown.recorded > 0,
        "status with the agent's proxy up: {shown:?}"
    );
    Ok(())
}
