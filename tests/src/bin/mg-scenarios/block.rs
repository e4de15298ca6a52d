// SPDX-License-Identifier: Apache-2.0
//! The block itself: pods are refused the metadata service by every socket route,
//! host-network processes and everything else are served.

use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::{
    attempt::Kind,
    harness::{budget, wait_until, Ctx, Who, METADATA_V4, METADATA_V6},
    neighbour::Neighbour,
};

pub(crate) const SCENARIOS: [crate::Scenario; 11] = [
    ("block: pod is served before the guard starts (the world works)", world_works_without_guard),
    ("block: pod is refused TCP to 169.254.169.254 at once, nothing arrives", pod_tcp_v4_refused),
    ("block: pod is refused TCP to [fd00:ec2::254] and to ::ffff:169.254.169.254", pod_tcp_v6_and_mapped_refused),
    ("block: pod is refused UDP sendto and connected UDP to every metadata form", pod_udp_refused),
    ("block: host-network process in the pod's own cgroup is served, v4 and v6", host_network_served),
    ("block: pod reaches other node addresses and the metadata address's port 53", pod_other_destinations_served),
    ("block: audit mode serves the pod and counts it as audited", audit_mode_counts),
    ("block: every pod layout is refused (containerd, CRI-O, cgroupfs)", every_pod_refused),
    ("block: another program on the same cgroup (like Cilium's) still runs, the block holds", coexists_with_neighbour),
    ("block: the probe-program netns cookie (kernels before 5.14) judges the same", probe_cookie_mechanism),
    ("block: after the agent exits with --detach-on-exit the pod is served again", detach_opens_again),
];

fn world_works_without_guard(ctx: &mut Ctx) -> Result<()> {
    ctx.uninstall()?;
    // The first exchanges of a freshly built world (neighbour discovery, the stand-in's
    // first accept) can outlast one attempt's time limit under emulation: it has to
    // come up within the budget, once.
    for (dest, mapped) in [(METADATA_V4, false), (METADATA_V6, false), (METADATA_V4, true)] {
        let served = || Ok(ctx.try_once(Who::Pod(0), Kind::Http, dest, 80, mapped)?.ok == 1);
        wait_until(budget(Duration::from_secs(5)), served)
            .with_context(|| format!("the pod never reached the stand-in at {dest} (mapped: {mapped})"))?;
    }
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V6, 80, false)?;
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 80, true)?;
    ctx.expect_served(Who::Pod(0), Kind::UdpSendto, METADATA_V4, 80, false)
}

fn pod_tcp_v4_refused(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 443, false)
}

fn pod_tcp_v6_and_mapped_refused(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V6, 80, false)?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, true)
}

fn pod_udp_refused(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    for kind in [Kind::UdpSendto, Kind::UdpConnect] {
        ctx.expect_refused(Who::Pod(0), kind, METADATA_V4, 80, false)?;
        ctx.expect_refused(Who::Pod(0), kind, METADATA_V6, 80, false)?;
        ctx.expect_refused(Who::Pod(0), kind, METADATA_V4, 80, true)?;
    }
    Ok(())
}

fn host_network_served(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ctx.expect_served(Who::HostInPodCgroup(0), Kind::Http, METADATA_V4, 80, false)?;
    ctx.expect_served(Who::HostInPodCgroup(0), Kind::Http, METADATA_V6, 80, false)?;
    ctx.expect_served(Who::HostInPodCgroup(0), Kind::UdpSendto, METADATA_V4, 80, false)
}

fn pod_other_destinations_served(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    let node_v4 = ctx.node.pods[0].net.node_side_ipv4.to_string();
    let node_v6 = ctx.node.pods[0].net.node_side_ipv6.to_string();
    ctx.expect_served(Who::Pod(0), Kind::Http, &node_v4, 80, false)?;
    ctx.expect_served(Who::Pod(0), Kind::Http, &node_v6, 80, false)?;
    // GKE serves DNS on the metadata address: port 53 must keep working.
    ctx.expect_served(Who::Pod(0), Kind::UdpSendto, METADATA_V4, 53, false)?;
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 53, false)?;
    ctx.expect_served(Who::Pod(0), Kind::UdpSendto, METADATA_V6, 53, false)
}

fn audit_mode_counts(ctx: &mut Ctx) -> Result<()> {
    ctx.ensure_agent(&["--mode", "audit"])?;
    let before = ctx.kernel_count("audited")?;
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    let after = ctx.kernel_count("audited")?;
    ensure!(after > before, "the audited counter did not move ({before} → {after})");
    ctx.default_agent()?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)
}

fn every_pod_refused(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    for n in 0..ctx.node.pods.len() {
        ctx.expect_refused(Who::Pod(n), Kind::Http, METADATA_V4, 80, false)?;
    }
    Ok(())
}

fn detach_opens_again(ctx: &mut Ctx) -> Result<()> {
    ctx.ensure_agent(&["--detach-on-exit"])?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    ctx.stop_agent()?;
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    let status = ctx.status()?;
    ensure!(!status.installed, "programs are still pinned after detach: {status:?}");
    Ok(())
}

/// Kernels before 5.14 have no SO_NETNS_COOKIE; the agent then learns the host's cookie
/// with a probe program. Forcing it here proves that path on any kernel.
fn probe_cookie_mechanism(ctx: &mut Ctx) -> Result<()> {
    ctx.ensure_agent(&["--netns-cookie-from", "probe"])?;
    ensure!(
        ctx.agent()?.log_text().contains("probe program"),
        "the agent did not use the probe:\n{}",
        ctx.agent()?.log_text()
    );
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    ctx.expect_served(Who::HostInPodCgroup(0), Kind::Http, METADATA_V4, 80, false)
}

fn coexists_with_neighbour(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    let neighbour = Neighbour::attach(ctx.node.root.path())?;
    let before = neighbour.run_count()?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    let node_v4 = ctx.node.pods[0].net.node_side_ipv4.to_string();
    ctx.expect_served(Who::Pod(0), Kind::Http, &node_v4, 80, false)?;
    let runs = neighbour.run_count()? - before;
    ensure!(runs >= 1, "the neighbour program stopped running beside the guard ({runs} runs)");
    Ok(())
}
