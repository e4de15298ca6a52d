// SPDX-License-Identifier: Apache-2.0
//! The forwarded topology: the metadata service one hop beyond the node (as on AWS),
//! reached through the node's forwarding. Every bypass path is tried against it;
//! arrivals are counted in the namespace beyond the node.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    forwarded::{beyond_addresses, Cloud, BEYOND_V4},
    nat::Dnat,
};

use crate::{
    attempt::Kind,
    harness::{Ctx, Who},
    hostside::syn_seen_in,
};

pub(crate) const SCENARIOS: [crate::Scenario; 1] =
    [("hostside: metadata one hop beyond the node: every bypass path is stopped in the forward path", forwarded)];

const VIRTUAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const SETTLE: Duration = Duration::from_millis(150);

fn forwarded(ctx: &mut Ctx) -> Result<()> {
    let cloud = Cloud::beyond(ctx.node.sim.node())?;
    let _dnat = Dnat::add(ctx.node.sim.node(), &[(VIRTUAL_IP, BEYOND_V4, None)])?;
    ctx.uninstall()?;
    // The world works: without the guard every path arrives beyond the node.
    for (n, dest) in beyond_addresses().into_iter().enumerate() {
        let before = cloud.standin.arrivals().total();
        let out = ctx.try_once(Who::Pod(0), Kind::Http, &dest.to_string(), 80, false)?;
        ensure!(out.ok == 1 && cloud.standin.arrivals().total() > before, "{dest} is not reachable: {out:?}");
        let (arrived, answered) = syn_seen_in(ctx, &cloud.ns, 0, dest, 47000 + n as u16)?;
        ensure!(arrived >= 1 && answered, "{dest}: AF_PACKET without the guard should pass");
    }
    let out = ctx.try_once(Who::Pod(0), Kind::Http, &VIRTUAL_IP.to_string(), 80, false)?;
    ensure!(out.ok == 1, "the DNAT to the forwarded address does not work: {out:?}");

    ctx.default_agent()?;
    let before = cloud.standin.arrivals();
    for dest in beyond_addresses() {
        let d = dest.to_string();
        for kind in [Kind::Http, Kind::UdpSendto, Kind::UdpConnect, Kind::RawTcpSyn, Kind::RawUdp, Kind::RawIcmp] {
            let out = ctx.try_once(Who::Pod(0), kind, &d, 80, false)?;
            ensure!(out.ok == 0 || !matches!(kind, Kind::Http), "{kind:?} to {d} was served: {out:?}");
        }
    }
    for kind in [Kind::Http, Kind::UdpSendto] {
        let out = ctx.try_once(Who::Pod(0), kind, &VIRTUAL_IP.to_string(), 80, false)?;
        ensure!(out.ok == 0 || kind == Kind::UdpSendto, "{kind:?} via DNAT was served: {out:?}");
    }
    std::thread::sleep(SETTLE);
    let after = cloud.standin.arrivals();
    ensure!(after == before, "something reached the metadata service beyond the node: {before:?} → {after:?}");
    for (n, dest) in beyond_addresses().into_iter().enumerate() {
        let (arrived, answered) = syn_seen_in(ctx, &cloud.ns, 0, dest, 47100 + n as u16)?;
        ensure!(arrived == 0 && !answered, "{dest}: a pod's AF_PACKET SYN was forwarded");
    }
    // The node's own processes still get there: their packets leave with a socket.
    for dest in beyond_addresses() {
        let out = ctx.try_once(Who::HostInPodCgroup(0), Kind::Http, &dest.to_string(), 80, false)?;
        ensure!(out.ok == 1, "a host process could not reach {dest}: {out:?}");
    }
    drop(cloud);
    ctx.stop_agent().context("stopping the agent")
}
