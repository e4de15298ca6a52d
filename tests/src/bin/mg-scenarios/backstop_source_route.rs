// SPDX-License-Identifier: Apache-2.0
//! IPv4 source routes against the packet backstop alone: the host-side table, which
//! refuses them where they enter the node (hostside_source_route.rs), is deleted, and
//! no uplink is judged, so only the pod's cgroup egress programs stand between a pod
//! and the metadata stand-in one hop beyond the node. Source routes are accepted in the scenario's own
//! node and cloud namespaces only; each path is first shown open without the guard.

use std::{net::IpAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use metadata_guard_netfilter::NlSocket;
use metadata_guard_tests::forwarded::{Cloud, BEYOND_V4, CLOUD_SIDE_V4};

use crate::{
    attempt::{self, Kind, Outcome},
    boot,
    harness::{budget, Ctx, Who},
    hostside::host_status,
    hostside_flush::flush_ruleset,
    hostside_source_route::SourceRoutes,
    packets::PacketTap,
};

pub(crate) const SCENARIOS: [crate::Scenario; 2] = [
    (
        "backstop: with no host-side table, a pod's source-routed packets (raw IP_OPTIONS and IP_HDRINCL SYNs, one \
         behind padding, a UDP datagram with IP_OPTIONS; LSRR via the node naming the metadata address) never get \
         past the node, with either backstop; a host-network process's source route and a pod's record route still do",
        backstop_refuses_source_routes,
    ),
    (
        "backstop: in audit mode a pod's source-routed raw SYN gets past the node and is recorded at egress with the \
         route's end as its destination",
        backstop_audits_source_routes,
    ),
];

/// The backstops to try: the kernel's best, and the socket marks every kernel has.
const BACKSTOPS: [(&str, &[&str]); 2] = [("auto", &[]), ("marks", &["--packet-netns-from", "marks"])];

/// How long a packet gets to arrive beyond the node.
const ARRIVAL: Duration = Duration::from_secs(2);
const METADATA_PORT: u16 = 80;

/// Whether a packet of `protocol` to `dest` arrived in the cloud namespace while `send` ran.
fn arrives(
    cloud: &Cloud,
    protocol: i32,
    dest: std::net::Ipv4Addr,
    send: impl FnOnce() -> Result<Outcome>,
) -> Result<(bool, Outcome)> {
    let mut tap = PacketTap::open(&cloud.ns, protocol, dest)?;
    tap.count();
    let out = send()?;
    let deadline = std::time::Instant::now() + budget(ARRIVAL);
    while std::time::Instant::now() < deadline {
        if tap.count() > 0 {
            return Ok((true, out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((false, out))
}

/// `who`'s raw SYN of `kind` to the metadata address beyond, by a loose source
/// route through `via`.
fn raw_syn(ctx: &Ctx, cloud: &Cloud, who: Who, kind: Kind, via: IpAddr) -> Result<(bool, Outcome)> {
    arrives(cloud, libc::IPPROTO_TCP, BEYOND_V4, || {
        let mut req = ctx.request(who, kind, &BEYOND_V4.to_string(), METADATA_PORT, false)?;
        req.via = Some(via);
        attempt::run(&req)
    })
}

/// A pod's UDP datagram routed through the node, then the metadata address, to the
/// cloud's end of the node's link: it arrives there only by way of the route.
fn udp(ctx: &Ctx, cloud: &Cloud) -> Result<(bool, Outcome)> {
    let via = IpAddr::V4(ctx.node.pods[0].net.node_side_ipv4);
    arrives(cloud, libc::IPPROTO_UDP, CLOUD_SIDE_V4, || {
        let mut req = ctx.request(Who::Pod(0), Kind::UdpSourceRouted, &BEYOND_V4.to_string(), METADATA_PORT, false)?;
        req.via = Some(via);
        req.final_hop = Some(IpAddr::V4(CLOUD_SIDE_V4));
        attempt::run(&req)
    })
}

/// A pod's datagram to the cloud's end of the node's link that records its route:
/// IPv4 options, but no source route.
fn udp_recording_route(ctx: &Ctx, cloud: &Cloud) -> Result<(bool, Outcome)> {
    arrives(cloud, libc::IPPROTO_UDP, CLOUD_SIDE_V4, || {
        let req = ctx.request(Who::Pod(0), Kind::UdpRecordRoute, &CLOUD_SIDE_V4.to_string(), METADATA_PORT, false)?;
        attempt::run(&req)
    })
}

/// `nft flush ruleset` in the node namespace with no agent running: the host-side
/// table goes and stays gone.
fn delete_host_table(ctx: &Ctx) -> Result<()> {
    let netns = ctx.node.node_netns();
    let mut nft = NlSocket::open_in(Some(&netns), libc::NETLINK_NETFILTER)
        .with_context(|| format!("could not open a netfilter socket in {}", netns.display()))?;
    flush_ruleset(&mut nft)?;
    let host = host_status(ctx)?;
    ensure!(!host.installed, "the host-side table outlived the flush: {host:?}");
    Ok(())
}

/// A pod's source-routed raw SYNs (`IP_OPTIONS`, then `IP_HDRINCL`, then that with
/// the route behind eight no-operations, beyond the backstop's walk).
const POD_RAW: [Kind; 3] =
    [Kind::RawTcpSynSourceRouted, Kind::RawHdrinclSourceRouted, Kind::RawHdrinclPaddedSourceRouted];

fn backstop_refuses_source_routes(ctx: &mut Ctx) -> Result<()> {
    // No guard first: a running agent would put its uplink program on the cloud's new
    // link, and on kernels where it reads socket marks this harness's own probe of the
    // cloud (from outside the test cgroup, so unmarked) would not get through.
    ctx.uninstall()?;
    let cloud = Cloud::beyond(ctx.node.sim.node())?;
    let _accepting = SourceRoutes::accept(&[ctx.node.sim.node(), &cloud.ns])?;
    let node = IpAddr::V4(ctx.node.pods[0].net.node_side_ipv4);
    let host_via = IpAddr::V4(CLOUD_SIDE_V4);

    for kind in POD_RAW {
        let (arrived, out) = raw_syn(ctx, &cloud, Who::Pod(0), kind, node)?;
        ensure!(out.ok == 1 && arrived, "without the guard the pod's {kind:?} should arrive: {out:?}");
    }
    let (arrived, out) = udp(ctx, &cloud)?;
    ensure!(out.ok == 1 && arrived, "without the guard the pod's source-routed datagram should arrive: {out:?}");
    let host = Who::HostInPodCgroup(0);
    let (arrived, out) = raw_syn(ctx, &cloud, host, Kind::RawTcpSynSourceRouted, host_via)?;
    ensure!(out.ok == 1 && arrived, "without the guard the host's source-routed raw SYN should arrive: {out:?}");

    for (backstop, extra) in BACKSTOPS {
        // Boot-time enforcement with no agent and no uplink point (it would refuse what
        // the node forwards to the metadata address), the table deleted: the backstop alone.
        let args: Vec<&str> = ["--uplinks", "none"].iter().chain(extra).copied().collect();
        let (ok, out, err) = boot::apply(ctx, &ctx.agent_bin, &args)?;
        ensure!(ok, "apply ({backstop}) failed:\n{out}{err}");
        delete_host_table(ctx)?;
        let before = ctx.kernel_count_at(Some("egress"), "blocked")?;
        for kind in POD_RAW {
            let (arrived, out) = raw_syn(ctx, &cloud, Who::Pod(0), kind, node)?;
            ensure!(!arrived, "{backstop}: a pod's {kind:?} got past the node with only the backstop: {out:?}");
        }
        let (arrived, out) = udp(ctx, &cloud)?;
        ensure!(!arrived, "{backstop}: a pod's source-routed UDP datagram got past the node: {out:?}");
        let blocked = ctx.kernel_count_at(Some("egress"), "blocked")? - before;
        ensure!(blocked >= 4, "{backstop}: the backstop counted {blocked} refusals for four source-routed packets");

        let (arrived, out) = raw_syn(ctx, &cloud, host, Kind::RawTcpSynSourceRouted, host_via)?;
        ensure!(out.ok == 1 && arrived, "{backstop}: a host-network process's source-routed SYN was stopped: {out:?}");
        let (arrived, out) = udp_recording_route(ctx, &cloud)?;
        ensure!(out.ok == 1 && arrived, "{backstop}: a pod's datagram recording its route was stopped: {out:?}");
        ctx.uninstall()?;
    }
    drop(cloud);
    Ok(())
}

fn backstop_audits_source_routes(ctx: &mut Ctx) -> Result<()> {
    // No guard while the cloud is joined (see above).
    ctx.uninstall()?;
    let cloud = Cloud::beyond(ctx.node.sim.node())?;
    let _accepting = SourceRoutes::accept(&[ctx.node.sim.node(), &cloud.ns])?;
    let node = IpAddr::V4(ctx.node.pods[0].net.node_side_ipv4);
    ctx.ensure_agent(&["--mode", "audit", "--uplinks", "none"])?;
    let before = ctx.kernel_count_at(Some("egress"), "audited")?;
    let (arrived, out) = raw_syn(ctx, &cloud, Who::Pod(0), Kind::RawTcpSynSourceRouted, node)?;
    ensure!(out.ok == 1 && arrived, "audit mode stopped a pod's source-routed raw SYN: {out:?}");
    let audited = ctx.kernel_count_at(Some("egress"), "audited")? - before;
    ensure!(audited >= 1, "the backstop counted no audited source route");
    let pod = ctx.node.pods[0].name.clone();
    let deadline = std::time::Instant::now() + budget(ARRIVAL);
    loop {
        let records = ctx.agent()?.audit_records();
        let named = |r: &&metadata_guard_tests::agent::RecordLine| {
            r.hook == "egress" && r.pod.as_deref() == Some(pod.as_str()) && r.destination == Some(IpAddr::V4(BEYOND_V4))
        };
        if records.iter().any(|r| named(&r)) {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "no egress audit record names {BEYOND_V4}: {records:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(cloud);
    ctx.stop_agent()?;
    ctx.uninstall()
}
