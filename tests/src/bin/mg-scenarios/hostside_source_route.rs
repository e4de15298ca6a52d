// SPDX-License-Identifier: Apache-2.0
//! IPv4 source routes: a packet addressed to the node whose LSRR (or SSRR) option names
//! the metadata service one hop beyond. A node with `accept_source_route` judges it
//! in `forward` by its own address, then rewrites the destination and sends it on.
//! Source routes are accepted in the scenario's own node and cloud namespaces only;
//! each path is first shown open without the guard (so the scenario can fail).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    forwarded::{accept_source_routes, Cloud, BEYOND_V4, CLOUD_SIDE_V4},
    netns::NetNs,
};

use crate::{
    attempt::{self, Kind},
    harness::{budget, wait_until, Ctx, Who},
    hostside::{host_status, syn_with_ip_options},
    packets::PacketTap,
};

pub(crate) const SCENARIOS: [crate::Scenario; 2] = [
    (
        "hostside: AF_PACKET frames to the node with a source route (LSRR to the metadata address beyond, SSRR) \
         never get past the node; audited with the route's end",
        frames_refused,
    ),
    (
        "hostside: a pod's raw-socket SYN to the node with a loose source route naming the metadata address never \
         gets past the node",
        raw_refused,
    ),
];

/// RFC 791 option kinds, a one-hop route's length and the pointer to its first address.
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 131;
const IPOPT_SSRR: u8 = 137;
const ONE_HOP_LEN: u8 = 7;
const FIRST_POINTER: u8 = 4;
const SETTLE: Duration = Duration::from_millis(300);

/// A no-operation, then a source route of `kind` naming `hop`: two words.
fn route(kind: u8, hop: Ipv4Addr) -> Vec<u8> {
    let mut options = vec![IPOPT_NOOP, kind, ONE_HOP_LEN, FIRST_POINTER];
    options.extend_from_slice(&hop.octets());
    options
}

/// Source routes accepted in the node and cloud namespaces while it lives.
pub(crate) struct SourceRoutes(Vec<std::path::PathBuf>);

impl SourceRoutes {
    pub(crate) fn accept(namespaces: &[&NetNs]) -> Result<SourceRoutes> {
        let mut accepting = SourceRoutes(Vec::new());
        for ns in namespaces {
            accept_source_routes(ns, true)?;
            accepting.0.push(ns.path());
        }
        Ok(accepting)
    }
}

impl Drop for SourceRoutes {
    fn drop(&mut self) {
        for path in &self.0 {
            if let Ok(ns) = NetNs::from_path(path) {
                let _ = accept_source_routes(&ns, false);
            }
        }
    }
}

fn frames_refused(ctx: &mut Ctx) -> Result<()> {
    let cloud = Cloud::beyond(ctx.node.sim.node())?;
    let _accepting = SourceRoutes::accept(&[ctx.node.sim.node(), &cloud.ns])?;
    let to_node = IpAddr::V4(ctx.node.pods[0].net.node_side_ipv4);
    // LSRR on to the metadata address beyond; SSRR to the cloud's end of the node's
    // link (a strict route's hop must be a neighbour).
    let routes = [("LSRR", route(IPOPT_LSRR, BEYOND_V4)), ("SSRR", route(IPOPT_SSRR, CLOUD_SIDE_V4))];
    ctx.uninstall()?;
    for (n, (name, options)) in routes.iter().enumerate() {
        let (arrived, _) =
            syn_with_ip_options(ctx, &cloud.ns, &ctx.node.pods[0].net, to_node, 46000 + n as u16, options)?;
        ensure!(arrived >= 1, "{name}: without the guard the source-routed frame should arrive beyond the node");
    }

    ctx.default_agent()?;
    let blocked_before = host_status(ctx)?.blocked_packets;
    for (n, (name, options)) in routes.iter().enumerate() {
        let (arrived, answered) =
            syn_with_ip_options(ctx, &cloud.ns, &ctx.node.pods[0].net, to_node, 46100 + n as u16, options)?;
        ensure!(arrived == 0 && !answered, "{name}: a source-routed frame got past the node {arrived} time(s)");
    }
    let blocked = host_status(ctx)?.blocked_packets - blocked_before;
    ensure!(blocked >= 2, "the host side counted {blocked} refusals for two source-routed frames");
    // The audit record names where the route ends, not the node it was addressed to.
    let deadline = Instant::now() + budget(Duration::from_secs(3));
    loop {
        let records = ctx.agent()?.audit_records();
        if records.iter().any(|r| r.hook == "host" && r.destination == Some(IpAddr::V4(BEYOND_V4)) && r.port == 80) {
            break;
        }
        ensure!(Instant::now() < deadline, "no host audit record names {BEYOND_V4}:80: {records:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(cloud);
    ctx.stop_agent()
}

fn raw_refused(ctx: &mut Ctx) -> Result<()> {
    let cloud = Cloud::beyond(ctx.node.sim.node())?;
    let _accepting = SourceRoutes::accept(&[ctx.node.sim.node(), &cloud.ns])?;
    let via = IpAddr::V4(ctx.node.pods[0].net.node_side_ipv4);
    let send = |ctx: &Ctx| -> Result<(attempt::Outcome, PacketTap)> {
        let mut tap = PacketTap::open(&cloud.ns, libc::IPPROTO_TCP, BEYOND_V4)?;
        tap.count();
        let mut req = ctx.request(Who::Pod(0), Kind::RawTcpSynSourceRouted, &BEYOND_V4.to_string(), 80, false)?;
        req.via = Some(via);
        Ok((attempt::run(&req)?, tap))
    };
    ctx.uninstall()?;
    let (out, mut tap) = send(ctx)?;
    ensure!(out.ok == 1, "the pod could not send a source-routed raw SYN: {out:?}");
    wait_until(budget(Duration::from_secs(2)), || Ok(tap.count() > 0))
        .context("without the guard the source-routed raw SYN never arrived beyond the node")?;

    ctx.default_agent()?;
    let (out, mut tap) = send(ctx)?;
    std::thread::sleep(SETTLE);
    ensure!(tap.count() == 0, "a pod's source-routed raw SYN reached {BEYOND_V4} ({out:?})");
    // The pod's backstop refuses it before it leaves (any source route from a pod:
    // backstop_source_route.rs shows that alone); the table's part is `frames_refused`.
    ensure!(out.eperm == 1, "the pod's backstop did not refuse the source-routed raw SYN ({out:?})");
    drop(cloud);
    ctx.stop_agent()
}
