// SPDX-License-Identifier: Apache-2.0
//! The host-side table under the running agent's health check: deleted by hand
//! (`nft delete table inet metadata_guard`, a firewall manager flushing the ruleset),
//! it turns /readyz 503 and `status` says so until the agent has put it back; put to
//! sleep by hand (`flags dormant`), the same until someone wakes it. Where the agent
//! owns its table (kernel 6.9+) both are refused to every other process instead.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use metadata_guard::{remove_host_table, Removal, HOST_TABLE};
use metadata_guard_netfilter::{
    nftables::{wants_ack, Batch, NFPROTO_INET, NFT_TABLE_F_DORMANT},
    NlSocket,
};
use metadata_guard_tests::world::IMDS_V4;

use crate::{
    harness::{budget, Ctx},
    health::{metric, wait_readyz, NOTICE},
    hostside::{host_status, syn_over_af_packet},
};

pub(crate) const SCENARIOS: [crate::Scenario; 2] = [
    (
        "health: the host-side table deleted by hand turns /readyz 503 and status says so until the agent restores it \
         (refused outright where the agent owns it)",
        table_deleted,
    ),
    (
        "health: the host-side table put to sleep by hand (flags dormant) lets frames through, turns /readyz 503 and \
         status says so until it is woken (refused outright where the agent owns it)",
        table_dormant,
    ),
];

/// How often the scenario deletes the table while it wants it gone: much more often
/// than the agent checks (every second), so the agent finds it missing at every check.
const DELETE_EVERY: Duration = Duration::from_millis(20);

fn table_deleted(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ensure!(host_status(ctx)?.installed, "no table to start with: {:?}", host_status(ctx)?);
    if let Some(owner) = host_status(ctx)?.owner {
        return deletion_refused(ctx, owner);
    }
    let restores_before = metric(ctx.agent()?, "metadata_guard_enforcement_restores_total")?;

    let netns = ctx.node.node_netns();
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = {
        let (stop, netns) = (stop.clone(), netns.clone());
        std::thread::spawn(move || -> Result<u32> {
            let mut deleted = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Removal::Removed = remove_host_table(Some(&netns))? {
                    deleted += 1;
                }
                std::thread::sleep(DELETE_EVERY);
            }
            Ok(deleted)
        })
    };
    let outage = observe_outage(ctx);
    stop.store(true, Ordering::Relaxed);
    let deleted = deleter.join().map_err(|_| anyhow::anyhow!("the deleting thread panicked"))??;
    outage?;
    ensure!(deleted >= 2, "the agent never put the table back while it was being deleted ({deleted} deletions)");

    let agent = ctx.agent()?;
    wait_readyz(agent, 200, NOTICE)?;
    ensure!(
        metric(agent, "metadata_guard_enforcement_restores_total")? > restores_before,
        "no restore counted in metadata_guard_enforcement_restores_total"
    );
    let status = ctx.status()?;
    ensure!(status.enforcing && status.problems.is_empty(), "not whole after the restore: {status:?}");
    let host = host_status(ctx)?;
    ensure!(host.installed && host.mode.as_deref() == Some("enforce"), "the table is not back as it was: {host:?}");
    let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, 44100)?;
    ensure!(arrived == 0 && !answered, "the restored table let a SYN through: arrived {arrived}, answered {answered}");
    Ok(())
}

/// 6.9+: the running agent owns its table: another process's deletion is refused,
/// and nothing changes for the agent or for packets.
fn deletion_refused(ctx: &Ctx, owner: u32) -> Result<()> {
    match remove_host_table(Some(&ctx.node.node_netns())) {
        Err(e) if format!("{e:#}").contains("a running agent owns it") => {}
        Err(e) => return Err(e.context("deleting the owned table failed, but not as refused by its owner")),
        Ok(_) => anyhow::bail!("another process deleted the table the running agent owns"),
    }
    let host = host_status(ctx)?;
    ensure!(host.installed && host.owner == Some(owner), "the refused deletion changed the table: {host:?}");
    wait_readyz(ctx.agent()?, 200, NOTICE)?;
    let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, 44103)?;
    ensure!(arrived == 0 && !answered, "a SYN got through the owned table: arrived {arrived}");
    Ok(())
}

/// While the table keeps being deleted: /readyz names the host side, `status` is not
/// enforcing and says why.
fn observe_outage(ctx: &Ctx) -> Result<()> {
    let body = wait_readyz(ctx.agent()?, 503, NOTICE)?;
    ensure!(
        body.contains("host side") && body.contains("metadata_guard"),
        "/readyz does not say what is missing: {body}"
    );
    let deadline = Instant::now() + budget(NOTICE);
    loop {
        let status = ctx.status()?;
        if !status.enforcing && status.problems.iter().any(|p| p.contains("host-side table")) {
            let (ok, text, err) = metadata_guard_tests::agent::oneshot(
                &ctx.agent_bin,
                &["status", "--bpffs", &ctx.node.bpffs.display().to_string()],
            )?;
            ensure!(ok, "status failed: {err}");
            if text.contains("NOT enforcing") && text.contains("no table") {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "status never said the table is missing: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn table_dormant(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    wait_readyz(ctx.agent()?, 200, NOTICE)?;
    if host_status(ctx)?.owner.is_some() {
        // 6.9+: no other process may change the agent's own table.
        let refused = set_dormant(ctx, true);
        ensure!(refused.is_err(), "another process put the table the running agent owns to sleep");
        ensure!(!host_status(ctx)?.dormant, "the refused change made the table dormant");
        let (arrived, _) = syn_over_af_packet(ctx, IMDS_V4, 44104)?;
        ensure!(arrived == 0, "a SYN got through the owned table: arrived {arrived}");
        return wait_readyz(ctx.agent()?, 200, NOTICE).map(drop);
    }
    set_dormant(ctx, true)?;
    // Asleep, the table really judges nothing: what the health check reports is real.
    let (arrived, _) = syn_over_af_packet(ctx, IMDS_V4, 44101)?;
    ensure!(arrived > 0, "a SYN frame from the pod did not arrive with the table dormant: is it judging still?");
    let body = wait_readyz(ctx.agent()?, 503, NOTICE)?;
    ensure!(body.contains("host side") && body.contains("dormant"), "/readyz does not say the table sleeps: {body}");
    let status = ctx.status()?;
    ensure!(
        !status.enforcing && status.problems.iter().any(|p| p.contains("dormant") && p.contains("nft add table")),
        "status does not say the table sleeps, nor how to wake it: {status:?}"
    );
    ensure!(host_status(ctx)?.dormant, "status --json has no `dormant: true`: {:?}", host_status(ctx)?);

    set_dormant(ctx, false)?;
    wait_readyz(ctx.agent()?, 200, NOTICE)?;
    let status = ctx.status()?;
    ensure!(status.enforcing && status.problems.is_empty(), "not whole once woken: {status:?}");
    let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, 44102)?;
    ensure!(arrived == 0 && !answered, "the woken table let a SYN through: arrived {arrived}, answered {answered}");
    Ok(())
}

/// Puts the agent's table to sleep or wakes it, as `nft add table inet metadata_guard
/// { flags dormant; }` and `nft add table inet metadata_guard` do.
fn set_dormant(ctx: &Ctx, dormant: bool) -> Result<()> {
    let netns = ctx.node.node_netns();
    let mut nft = NlSocket::open_in(Some(&netns), libc::NETLINK_NETFILTER)
        .with_context(|| format!("could not open a netfilter socket in {}", netns.display()))?;
    let mut batch = Batch::new(NFPROTO_INET);
    batch.set_table_flags(HOST_TABLE, if dormant { NFT_TABLE_F_DORMANT } else { 0 });
    nft.request(&batch.finish(), wants_ack)
        .with_context(|| format!("could not set the host-side table's dormant flag to {dormant}"))?;
    Ok(())
}
