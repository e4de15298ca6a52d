// SPDX-License-Identifier: Apache-2.0
//! The uplink: on datapaths that skip the node's netfilter — a pod's frames handed to
//! the uplink in tc (Cilium's BPF host routing), macvlan and ipvlan pods on the
//! uplink — nothing a pod sends reaches the metadata service one hop beyond the
//! node: not a plain connect, not an AF_PACKET or raw SYN, not a user-space TCP
//! stack's handshake (gVisor's way). Each scenario first shows every path open.

use anyhow::{Context, Result};

use crate::{
    harness::Ctx,
    uplink_world::{
        attempts, barrier, expect_all_arrive, expect_none_arrive, redirect_past_netfilter, Datapath, DatapathPod,
    },
};

pub(crate) const SCENARIOS: [crate::Scenario; 3] = [
    (
        "uplink: tc bpf_redirect_neigh from a pod's veth past netfilter: connect, AF_PACKET, raw and user-space TCP never arrive",
        redirect_neigh,
    ),
    (
        "uplink: tc bpf_redirect (MACs rewritten) from a pod's veth: connect, AF_PACKET, raw and user-space TCP never arrive",
        redirect_plain,
    ),
    ("uplink: a macvlan pod on the uplink: connect, AF_PACKET, raw and user-space TCP never arrive", macvlan),
];

/// Needs the kernel's ipvlan (Debian's guest kernels have it; this project's
/// development kernel does not: `--without-ipvlan`).
pub(crate) const IPVLAN_SCENARIOS: [crate::Scenario; 1] =
    [("uplink: an ipvlan L2 pod on the uplink: connect, AF_PACKET, raw and user-space TCP never arrive", ipvlan)];

fn redirect_neigh(ctx: &mut Ctx) -> Result<()> {
    datapath(ctx, Datapath::RedirectNeigh, "web-neigh-5x8k", 0)
}

fn redirect_plain(ctx: &mut Ctx) -> Result<()> {
    datapath(ctx, Datapath::Redirect, "web-redirect-9q2w", 1)
}

fn macvlan(ctx: &mut Ctx) -> Result<()> {
    datapath(ctx, Datapath::Macvlan, "web-macvlan-3h7j", 2)
}

fn ipvlan(ctx: &mut Ctx) -> Result<()> {
    datapath(ctx, Datapath::Ipvlan, "web-ipvlan-8d4f", 3).context(
        "an ipvlan pod needs the kernel's ipvlan (modprobe ipvlan); a kernel built without it runs the other \
         scenarios with --without-ipvlan, and the VM matrix's Debian guests (5.10, 6.1) run this one",
    )
}

fn datapath(ctx: &mut Ctx, datapath: Datapath, name: &str, n: u32) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    ctx.uninstall()?;
    let mut pod = DatapathPod::start(ctx, &mut uplinks, datapath, "default", name, n)?;
    if pod.is_tc() {
        redirect_past_netfilter(ctx, &uplinks, &mut pod)?;
    }
    barrier(ctx, &uplinks, &pod)?;
    let on = format!("{datapath:?} through {}", uplinks.current().name);
    expect_all_arrive(&attempts(ctx, &uplinks, &pod, 46000)?, &on)?;

    ctx.default_agent()?;
    let tried = attempts(ctx, &uplinks, &pod, 46100)?;
    expect_none_arrive(&tried, &on)?;
    // The guard judges metadata destinations only: the datapath still carries the rest.
    barrier(ctx, &uplinks, &pod).context("with the guard, the pod's other traffic must still flow")?;
    Ok(())
}
