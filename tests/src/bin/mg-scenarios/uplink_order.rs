// SPDX-License-Identifier: Apache-2.0
//! The uplink next to others: another tc program on the uplink's egress (Cilium's
//! `bpf_host`) that passes everything or redirects it to another uplink, and an
//! `nft flush ruleset` in the node, which takes the host-side table but not the uplink.

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    bpf::BPF_F_BEFORE,
    drops::flush_ruleset,
    tc::{self, ClsBpf, Direction, Handoff, TC_ACT_OK},
    uplink::BEYOND,
};

use crate::{
    boot::apply,
    harness::Ctx,
    hostside::{host_status, syn_seen_in},
    uplink_world::{expect_syns_arrive, expect_syns_refused, syn_through, Datapath, DatapathPod},
};

pub(crate) const SCENARIOS: [crate::Scenario; 4] = [
    (
        "uplink: a program that ends the hook, on the uplink before the agent came (Cilium first): the guard's runs ahead of it",
        bpf_host_first,
    ),
    (
        "uplink: another tc program on the uplink's egress that passes all or redirects to another uplink: still refused",
        beside_bpf_host,
    ),
    ("uplink: after nft flush ruleset in the node the uplink still refuses, with an agent and with none", after_flush),
    (
        "uplink: GKE Workload Identity: port 80, which only the node's DNAT makes safe, never leaves through the uplink",
        gke_port_80,
    ),
];

/// Where the stand-in for Cilium's `bpf_host` goes among the cls_bpf filters: after
/// the guard's (a filter that ends the hook with `TC_ACT_OK` skips those behind it).
const BPF_HOST_PRIO: u16 = 0xc000;
/// Where Cilium's legacy tc attach puts `bpf_host`: priority 1 (handle 1), the
/// guard's own priority.
const CILIUM_PRIO: u16 = 1;

/// Cilium's `bpf_host` stand-in on an uplink's egress, held while it lives: a tcx
/// link where the kernel has tcx (Cilium 1.16+ attaches so on 6.6+), else a cls_bpf
/// filter. `head`: ahead of every program already there (tcx only).
enum BpfHost {
    Tcx { _link: std::os::fd::OwnedFd },
    Cls { _filter: ClsBpf },
}

impl BpfHost {
    fn attach(ctx: &Ctx, uplink: u32, insns: &[u64], head: bool) -> Result<BpfHost> {
        BpfHost::attach_at(ctx, uplink, insns, head, BPF_HOST_PRIO)
    }

    /// The same, at cls_bpf priority `prio` where the kernel has no tcx.
    fn attach_at(ctx: &Ctx, uplink: u32, insns: &[u64], head: bool, prio: u16) -> Result<BpfHost> {
        let node = ctx.node.sim.node();
        let prog = tc::load(insns, "mg_test_host")?;
        match tc::tcx_attach(node, uplink, Direction::Egress, &prog, if head { BPF_F_BEFORE } else { 0 }) {
            Ok(link) => Ok(BpfHost::Tcx { _link: link }),
            Err(e) if head => Err(e).context("could not put a tcx program ahead of the guard's"),
            Err(_) => Ok(BpfHost::Cls { _filter: ClsBpf::attach(node, uplink, Direction::Egress, prio, prog)? }),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            BpfHost::Tcx { .. } => "tcx",
            BpfHost::Cls { .. } => "cls_bpf",
        }
    }
}

fn beside_bpf_host(ctx: &mut Ctx) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    uplinks.add_uplink(ctx.node.sim.node())?;
    let mut pod = DatapathPod::start(ctx, &mut uplinks, Datapath::RedirectNeigh, "default", "web-bpfhost-6t1m", 40)?;
    pod.redirect(ctx, &uplinks)?;
    let (first, second) = (&uplinks.beyond[0], &uplinks.beyond[1]);
    let to_second =
        tc::redirect_program(second.index, Handoff::Plain { dst_mac: second.cloud_mac, src_mac: second.mac });

    // The second uplink carries no metadata route: named, so that the guard is on it.
    let both = ["--uplinks", "mgup0,mgup1"];
    ctx.ensure_agent(&both)?;
    // A program that passes everything, attached after the guard's.
    let passing = BpfHost::attach(ctx, first.index, &tc::verdict_program(TC_ACT_OK), false)?;
    let kind = passing.kind();
    expect_syns_refused(
        &uplinks,
        &pod.pod,
        46500,
        &format!("a passing {kind} program behind the guard on the uplink"),
    )?;
    drop(passing);

    // One that redirects everything to the other uplink, ahead of the guard: the guard
    // judges the packet where it leaves (without it, it arrives beyond the second).
    ctx.uninstall()?;
    let redirecting = BpfHost::attach(ctx, first.index, &to_second, false)?;
    expect_syns_arrive(&uplinks, &pod.pod, 46510, "with the redirecting program and no guard")?;
    let second_before = second.standin.arrivals().total();
    drop(redirecting);
    ctx.ensure_agent(&both)?;
    let redirecting = BpfHost::attach(ctx, first.index, &to_second, matches!(kind, "tcx"))?;
    expect_syns_refused(&uplinks, &pod.pod, 46520, "redirected by another program to the other uplink")?;
    for dest in BEYOND {
        let out = pod.try_once(ctx, crate::attempt::Kind::Http, dest, 80)?;
        ensure!(out.ok == 0, "the pod's connect to {dest} was served: {out:?}");
    }
    ensure!(second.standin.arrivals().total() == second_before, "something reached the cloud behind {}", second.name);
    drop(redirecting);
    ctx.stop_agent()
}

/// Cilium is on the node before the guard: its program (here one that ends the hook
/// with `TC_ACT_OK`/`TCX_PASS`, skipping whatever runs behind it) already sits on the
/// uplink's egress when the agent comes. The guard goes first (a tcx link at the
/// head; in tc, a filter at priority 1 added after Cilium's runs first) and refuses.
fn bpf_host_first(ctx: &mut Ctx) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    let mut pod =
        DatapathPod::start(ctx, &mut uplinks, Datapath::RedirectNeigh, "default", "web-cilium-first-3v8b", 41)?;
    pod.redirect(ctx, &uplinks)?;
    let uplink = uplinks.current().index;
    ctx.uninstall()?;
    let ending = BpfHost::attach_at(ctx, uplink, &tc::verdict_program(TC_ACT_OK), false, CILIUM_PRIO)?;
    expect_syns_arrive(&uplinks, &pod.pod, 46530, "with only the other program on the uplink")?;
    ctx.default_agent()?;
    let on = tc::attached(ctx.node.sim.node(), uplink, Direction::Egress)?;
    ensure!(on.tcx.len() + on.cls_bpf.len() == 2, "expected the guard's program beside the other one: {on:?}");
    expect_syns_refused(
        &uplinks,
        &pod.pod,
        46540,
        &format!("the guard beside a {} program that was there first", ending.kind()),
    )?;
    drop(ending);
    ctx.stop_agent()
}

fn after_flush(ctx: &mut Ctx) -> Result<()> {
    let uplinks = crate::uplink_world::uplinks(ctx)?;
    let cloud = &uplinks.current().ns;
    // Pod 0 is routed through the node (its netfilter, the host-side table), then out.
    ctx.uninstall()?;
    let (arrived, answered) = syn_seen_in(ctx, cloud, 0, BEYOND[0], 46600)?;
    ensure!(arrived >= 1 && answered, "without the guard a routed pod's AF_PACKET SYN should arrive beyond the node");
    ctx.default_agent()?;
    flush_ruleset(ctx.node.sim.node())?;
    for (i, dest) in BEYOND.into_iter().enumerate() {
        let (arrived, answered) = syn_seen_in(ctx, cloud, 0, dest, 46610 + i as u16)?;
        ensure!(arrived == 0 && !answered, "after nft flush ruleset, with an agent, a pod's SYN to {dest} arrived");
    }
    ctx.uninstall()?;
    let (ok, out, err) = apply(ctx, &ctx.agent_bin, &[])?;
    ensure!(ok, "apply failed:\n{out}{err}");
    flush_ruleset(ctx.node.sim.node())?;
    for (i, dest) in BEYOND.into_iter().enumerate() {
        let (arrived, answered) = syn_seen_in(ctx, cloud, 0, dest, 46620 + i as u16)?;
        ensure!(
            arrived == 0 && !answered,
            "after apply and nft flush ruleset, with no agent, a pod's SYN to {dest} arrived"
        );
    }
    // Where the flush took the host-side table, the uplink alone refused them.
    if !host_status(ctx)?.installed {
        let blocked = ctx.kernel_count_at(Some("uplink"), "blocked")?;
        ensure!(blocked >= 2, "the uplink counted {blocked} blocked packets, yet the host-side table is gone");
    }
    ctx.uninstall()
}

/// With `gke-workload-identity` the socket hooks let a pod's connects to
/// 169.254.169.254:80 go, for the node's DNAT to the GKE metadata server; a datapath
/// that skips netfilter skips that DNAT too, and the connect would reach the real
/// metadata service: the uplink refuses port 80 as the host side does.
fn gke_port_80(ctx: &mut Ctx) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    let mut pod = DatapathPod::start(ctx, &mut uplinks, Datapath::RedirectNeigh, "default", "web-gke-0p5d", 50)?;
    pod.redirect(ctx, &uplinks)?;
    let up = uplinks.current();
    ctx.ensure_agent(&["--preset", "gke-workload-identity"])?;
    let before = up.standin.arrivals().tcp(80).count;
    let out = pod.try_once(ctx, crate::attempt::Kind::Http, BEYOND[0], 80)?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = up.standin.arrivals().tcp(80).count;
    ensure!(
        out.ok == 0 && after == before,
        "the pod's connect to 169.254.169.254:80 reached the metadata service: {out:?}"
    );
    // The preset names GKE's one metadata address: an AF_PACKET SYN to it, port 80.
    let (arrived, answered) = syn_through(&uplinks, &pod.pod, BEYOND[0], 46700)?;
    ensure!(
        arrived == 0 && !answered,
        "under gke-workload-identity a pod's AF_PACKET SYN to 169.254.169.254:80 arrived"
    );
    let out = ctx.try_once(
        crate::harness::Who::HostInPodCgroup(0),
        crate::attempt::Kind::Http,
        "169.254.169.254",
        80,
        false,
    )?;
    ensure!(out.ok == 1, "a host-network process was not served 169.254.169.254:80 through the uplink: {out:?}");
    ctx.stop_agent()
}
