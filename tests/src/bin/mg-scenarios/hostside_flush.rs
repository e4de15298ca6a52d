// SPDX-License-Identifier: Apache-2.0
//! `nft flush ruleset` (what nftables.service runs at start and reload, CIS hardening
//! scripts, an admin) against the host-side table. Where the kernel lets a table keep
//! an owner through its owner's exit (6.9+) the running agent owns it and the flush
//! leaves it; elsewhere the agent restores it. With no agent running, a flush deletes
//! it on every kernel: measured here, and `status` says so.
//!
//! (What leaves the node through an uplink, forwarded or redirected, is judged by the
//! uplink point too, which no flush removes; these scenarios count what reaches the
//! node itself, which only the host side judges.)

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_netfilter::{
    nftables::{wants_ack, Batch, NFPROTO_UNSPEC},
    NlSocket,
};
use metadata_guard_tests::{
    frames::{tcp_syn_frame, PacketSocket, Wire},
    world::IMDS_V4,
};

use crate::{
    boot,
    harness::{budget, wait_until, Ctx},
    health::{wait_readyz, NOTICE},
    hostside::{host_status, syn_over_af_packet, ArrivalTap},
};

pub(crate) const SCENARIOS: [crate::Scenario; 2] = [
    (
        "hostside: `nft flush ruleset` under a running agent: the agent's own table stays (6.9+) or is restored; \
         SYN frames counted meanwhile",
        flush_under_agent,
    ),
    (
        "hostside: `nft flush ruleset` with no agent after apply deletes the table: frames arrive, status says so, \
         apply writes it again",
        flush_without_agent,
    ),
];

/// A pod's SYN frame to the metadata address this often, for this long, the ruleset
/// flushed this far into it.
const FRAME_EVERY: Duration = Duration::from_millis(1);
const WINDOW: Duration = Duration::from_millis(2500);
const FLUSH_AT: Duration = Duration::from_millis(500);
const SETTLE: Duration = Duration::from_millis(150);

/// What `nft flush ruleset` sends: one table deletion naming no table and no family.
pub(crate) fn flush_ruleset(nft: &mut NlSocket) -> Result<()> {
    let mut batch = Batch::new(NFPROTO_UNSPEC);
    batch.del_all_tables();
    nft.request(&batch.finish(), wants_ack).context("`flush ruleset` in the node namespace failed")
}

/// Frames sent and SYNs that arrived in the node while a pod sent a SYN frame to the
/// metadata address every millisecond, the ruleset flushed [`FLUSH_AT`] in.
struct Around {
    sent: u64,
    arrived: u64,
    /// Arrivals after the flush: (first, last) since the flush.
    after_flush: Option<(Duration, Duration)>,
}

fn frames_around_flush(ctx: &Ctx, sport: u16) -> Result<Around> {
    let pod = &ctx.node.pods[0].net;
    let wire = Wire::of(&pod.ns, ctx.node.sim.node(), &pod.node_side_link)?;
    let frame = tcp_syn_frame(&wire, IpAddr::V4(pod.ipv4), IMDS_V4, sport, 80);
    let tap = ArrivalTap::open(ctx.node.sim.node(), false, sport)?;
    let netns = ctx.node.node_netns();
    let mut nft = NlSocket::open_in(Some(&netns), libc::NETLINK_NETFILTER)
        .with_context(|| format!("could not open a netfilter socket in {}", netns.display()))?;
    let mut around = pod.ns.run(|| -> Result<Around> {
        let sock = PacketSocket::open(wire.ifindex).context("AF_PACKET socket in the pod")?;
        let (start, mut flushed_at) = (Instant::now(), None::<Instant>);
        let mut around = Around { sent: 0, arrived: 0, after_flush: None };
        while start.elapsed() < WINDOW {
            if flushed_at.is_none() && start.elapsed() >= FLUSH_AT {
                flush_ruleset(&mut nft)?;
                flushed_at = Some(Instant::now());
            }
            sock.send(&frame).context("sending the frame")?;
            around.sent += 1;
            std::thread::sleep(FRAME_EVERY);
            let arrived = tap.syns();
            around.arrived += arrived;
            if let (Some(at), true) = (flushed_at, arrived > 0) {
                let since = at.elapsed();
                around.after_flush = Some(around.after_flush.map_or((since, since), |(first, _)| (first, since)));
            }
        }
        Ok(around)
    })?;
    std::thread::sleep(SETTLE);
    around.arrived += tap.syns();
    Ok(around)
}

fn flush_under_agent(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    wait_readyz(ctx.agent()?, 200, NOTICE)?;
    let before = host_status(ctx)?;
    ensure!(before.installed, "no table to start with: {before:?}");
    let around = frames_around_flush(ctx, 45000)?;
    let after = host_status(ctx)?;
    eprintln!(
        "    measured: `nft flush ruleset` under a running agent ({}): {} of {} SYN frames arrived{}",
        if before.owner.is_some() { "table owned by the agent" } else { "this kernel keeps no owned table" },
        around.arrived,
        around.sent,
        around.after_flush.map_or(String::new(), |(first, last)| format!(
            ", from {} ms to {} ms after the flush",
            first.as_millis(),
            last.as_millis()
        )),
    );
    if let Some(owner) = before.owner {
        // 6.9+: the flush skipped the agent's table; nothing changed, nothing arrived.
        ensure!(around.arrived == 0, "{} SYN frames arrived although the agent owns the table", around.arrived);
        ensure!(after.installed && after.owner == Some(owner), "the flush touched the owned table: {after:?}");
        wait_readyz(ctx.agent()?, 200, NOTICE)?;
        return Ok(());
    }
    // Before 6.9 the table has no owner: the flush deletes it and the agent, checking
    // every second, writes it again.
    wait_until(budget(NOTICE), || Ok(host_status(ctx)?.installed)).context("the agent never restored the table")?;
    wait_readyz(ctx.agent()?, 200, NOTICE)?;
    let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, 45001)?;
    ensure!(arrived == 0 && !answered, "the restored table let a SYN through: arrived {arrived}");
    Ok(())
}

fn flush_without_agent(ctx: &mut Ctx) -> Result<()> {
    ctx.uninstall()?;
    let (ok, out, err) = boot::apply(ctx, &ctx.agent_bin, &[])?;
    ensure!(ok, "apply failed:\n{out}{err}");
    let applied = host_status(ctx)?;
    // `apply` has exited: a table it owned has lost its owner (and stays, 6.9+).
    ensure!(applied.installed && applied.owner.is_none(), "after apply: {applied:?}");
    let (arrived, _) = syn_over_af_packet(ctx, IMDS_V4, 45100)?;
    ensure!(arrived == 0, "after apply a SYN frame arrived {arrived} time(s)");

    let around = frames_around_flush(ctx, 45101)?;
    eprintln!(
        "    measured: `nft flush ruleset` with no agent after apply: {} of {} SYN frames arrived (the table is gone)",
        around.arrived, around.sent
    );
    ensure!(around.arrived > 0, "no frame arrived after the flush: did the table survive it? {:?}", host_status(ctx)?);
    let host = host_status(ctx)?;
    ensure!(!host.installed, "the table outlived the flush with no agent: {host:?}");
    let status = ctx.status()?;
    ensure!(
        !status.enforcing && status.problems.iter().any(|p| p.contains("host-side table")),
        "status does not say the table is missing: {status:?}"
    );
    let (ok, text, err) = ctx.oneshot(&["status"])?;
    ensure!(ok && text.contains("no table"), "`status` does not say so:\n{text}{err}");

    let (ok, out, err) = boot::apply(ctx, &ctx.agent_bin, &[])?;
    ensure!(ok, "apply (again) failed:\n{out}{err}");
    let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, 45102)?;
    ensure!(arrived == 0 && !answered, "after apply wrote the table again a SYN frame arrived");
    ctx.uninstall()
}
