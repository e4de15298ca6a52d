// SPDX-License-Identifier: Apache-2.0
//! kube-proxy in IPVS mode: a Service (here a NodePort-like service on the node's own
//! address) whose endpoint is a metadata address. IPVS rewrites in the node's
//! `input` path itself and, for a real server that is not local, sends the packet on
//! through `output` without a socket — both after the points where a DNAT rule works.
//! Needs a kernel with IPVS (Debian's cloud kernels in the VM matrix; `--without-ipvs`
//! leaves it out on kernels built without it).

use std::net::SocketAddrV4;

use anyhow::{ensure, Result};
use metadata_guard_tests::{
    forwarded::{Cloud, BEYOND_V4},
    ipvs::{self, VirtualService},
    world::AZURE_WIRESERVER,
};

use crate::{
    attempt::Kind,
    harness::{Ctx, Who},
    hostside::SETTLE,
};

pub(crate) const SCENARIOS: [crate::Scenario; 1] = [(
    "hostside: an IPVS service whose endpoint is a metadata address (local or one hop beyond) is refused",
    ipvs_endpoints_refused,
)];

/// NodePort-like ports on the pod's gateway address, one per endpoint.
const LOCAL_ENDPOINT_PORT: u16 = 30080;
const FORWARDED_ENDPOINT_PORT: u16 = 30081;
const METADATA_PORT: u16 = 80;

fn ipvs_endpoints_refused(ctx: &mut Ctx) -> Result<()> {
    ensure!(
        ipvs::available(),
        "this kernel has no IPVS ({} is missing): load ip_vs, or run with --without-ipvs",
        ipvs::PROC_IPVS
    );
    let std::net::IpAddr::V4(wireserver) = AZURE_WIRESERVER else { unreachable!() };
    let node_ip = ctx.node.pods[0].net.node_side_ipv4;
    let cloud = Cloud::beyond(ctx.node.sim.node())?;
    let local_vip = SocketAddrV4::new(node_ip, LOCAL_ENDPOINT_PORT);
    let forwarded_vip = SocketAddrV4::new(node_ip, FORWARDED_ENDPOINT_PORT);
    let _local = VirtualService::add(ctx.node.sim.node(), local_vip, SocketAddrV4::new(wireserver, METADATA_PORT))?;
    let _forwarded =
        VirtualService::add(ctx.node.sim.node(), forwarded_vip, SocketAddrV4::new(BEYOND_V4, METADATA_PORT))?;
    let node = node_ip.to_string();

    ctx.uninstall()?;
    let arrived = |ctx: &Ctx| (ctx.node.standin.arrivals().total(), cloud.standin.arrivals().total());
    let before = arrived(ctx);
    for port in [LOCAL_ENDPOINT_PORT, FORWARDED_ENDPOINT_PORT] {
        let out = ctx.try_once(Who::Pod(0), Kind::Http, &node, port, false)?;
        ensure!(out.ok == 1, "without the guard the IPVS service {node}:{port} should serve the pod: {out:?}");
    }
    let after = arrived(ctx);
    ensure!(
        after.0 > before.0 && after.1 > before.1,
        "without the guard both endpoints should see the pod's connection: {before:?} → {after:?}"
    );

    ctx.default_agent()?;
    let before = arrived(ctx);
    for port in [LOCAL_ENDPOINT_PORT, FORWARDED_ENDPOINT_PORT] {
        let out = ctx.try_once(Who::Pod(0), Kind::Http, &node, port, false)?;
        ensure!(out.ok == 0, "a pod was served through the IPVS service {node}:{port}: {out:?}");
    }
    std::thread::sleep(SETTLE);
    let after = arrived(ctx);
    ensure!(after == before, "a pod's connection reached a metadata endpoint through IPVS: {before:?} → {after:?}");

    // The node's own processes keep the service: their packets carry a socket.
    for port in [LOCAL_ENDPOINT_PORT, FORWARDED_ENDPOINT_PORT] {
        let out = ctx.try_once(Who::HostInPodCgroup(0), Kind::Http, &node, port, false)?;
        ensure!(out.ok == 1, "a host-network process was refused through the IPVS service {node}:{port}: {out:?}");
    }
    Ok(())
}
