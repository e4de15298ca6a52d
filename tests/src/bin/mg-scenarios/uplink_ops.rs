// SPDX-License-Identifier: Apache-2.0
//! The uplink in operation: host-network processes served through every uplink, a
//! new uplink guarded under a running agent, an allowlisted pod served while its
//! neighbour is refused and named, and the point's life: SIGKILL, restart, upgrade,
//! `apply` at boot, `uninstall` (nothing of ours left on the devices).

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    tc::{self, Direction},
    uplink::{Uplinks, BEYOND},
};

use crate::{
    agent::Agent,
    attempt::Kind,
    boot::apply,
    harness::{budget, wait_until, Ctx, Who},
    uplink_world::{expect_syns_arrive, expect_syns_refused, Datapath, DatapathPod},
};

pub(crate) const SCENARIOS: [crate::Scenario; 4] = [
    ("uplink: host-network processes are served through each uplink", host_served),
    ("uplink: a new uplink under a running agent is guarded within a bounded time", new_uplink_guarded),
    (
        "uplink: an allowlisted pod on the tc datapath is served; its neighbour is refused, the record names it",
        allowlisted,
    ),
    (
        "uplink: holds through SIGKILL, restart and upgrade; apply guards it with no agent; uninstall leaves nothing",
        lifecycle,
    ),
];

/// How soon a new uplink must carry the program: the agent hears of the link from
/// rtnetlink and attaches at once; a CNI routes pods through it only later.
const NEW_UPLINK_WITHIN: Duration = Duration::from_millis(500);

/// A host-network process (pod 0's cgroup, the node's namespace) fetches both
/// metadata addresses through the current uplink, and the cloud behind it serves.
fn expect_host_served(ctx: &Ctx, uplinks: &Uplinks) -> Result<()> {
    let up = uplinks.current();
    for dest in BEYOND {
        let before = up.standin.arrivals().tcp(80).count;
        let out = ctx.try_once(Who::HostInPodCgroup(0), Kind::Http, &dest.to_string(), 80, false)?;
        ensure!(out.ok == 1, "a host-network process was not served {dest} through {}: {out:?}", up.name);
        ensure!(up.standin.arrivals().tcp(80).count > before, "{dest} was served, but not from beyond {}", up.name);
    }
    Ok(())
}

/// The guard's program sits on `uplink`'s egress (in whichever form this kernel has).
fn guarded(ctx: &Ctx, uplink: u32) -> Result<bool> {
    Ok(!tc::attached(ctx.node.sim.node(), uplink, Direction::Egress)?.is_empty())
}

fn host_served(ctx: &mut Ctx) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    uplinks.add_uplink(ctx.node.sim.node())?;
    ctx.default_agent()?;
    for k in 0..uplinks.beyond.len() {
        uplinks.route_via(ctx.node.sim.node(), k)?;
        let up = uplinks.current();
        ensure!(guarded(ctx, up.index)?, "the agent put no program on uplink {}", up.name);
        expect_host_served(ctx, &uplinks)?;
        // UDP and ICMP too: the host's own datagrams carry their sockets.
        let before = up.standin.arrivals();
        let out = ctx.try_once(Who::HostInPodCgroup(0), Kind::UdpSendto, "169.254.169.254", 53, false)?;
        ensure!(out.ok == 1, "a host-network process could not send to 169.254.169.254:53: {out:?}");
        wait_until(budget(Duration::from_secs(2)), || Ok(up.standin.arrivals().udp(53).count > before.udp(53).count))
            .with_context(|| format!("the host's datagram never arrived beyond {}", up.name))?;
    }
    Ok(())
}

fn new_uplink_guarded(ctx: &mut Ctx) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    ctx.default_agent()?;
    // A veth is an uplink once it carries a route to a blocked destination (a NIC,
    // bond or VLAN from the moment it appears): time it from the route.
    let index = uplinks.add_uplink(ctx.node.sim.node())?.index;
    let routed = Instant::now();
    uplinks.route_via(ctx.node.sim.node(), 1)?;
    let mut took = None;
    let within = budget(NEW_UPLINK_WITHIN);
    while routed.elapsed() < within {
        if guarded(ctx, index)? {
            took = Some(routed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let took =
        took.with_context(|| format!("uplink mgup1 carried no program {within:?} after the route through it"))?;
    eprintln!("  new uplink mgup1 guarded {} µs after the metadata route went through it", took.as_micros());
    crate::uplink_world::wait_served(ctx, &uplinks)?;
    expect_host_served(ctx, &uplinks)?;
    let mut pod =
        DatapathPod::start(ctx, &mut uplinks, Datapath::RedirectNeigh, "default", "web-late-uplink-2n6v", 10)?;
    pod.redirect(ctx, &uplinks)?;
    expect_syns_refused(&uplinks, &pod.pod, 46200, "through the new uplink")?;
    let mut macvlan = DatapathPod::start(ctx, &mut uplinks, Datapath::Macvlan, "default", "web-late-macvlan-5c1z", 11)?;
    expect_syns_refused(&uplinks, &macvlan.pod, 46210, "a macvlan pod on the new uplink")?;
    macvlan.pod.end();
    Ok(())
}

/// The tc-datapath pods of [`allowlisted`]: `payments/api-*` is allowlisted.
const ALLOWED: (&str, &str) = ("payments", "api-uplink-4k2m");
const NEIGHBOUR: (&str, &str) = ("payments", "cache-uplink-7p3x");

fn allow_config(ctx: &Ctx) -> Result<String> {
    let path = ctx.node.work.join("uplink-allow.yaml");
    std::fs::write(
        &path,
        "destinations:\n  presets: [default]\nallow_pods:\n  - namespace: payments\n    pod: \"api-*\"\n",
    )?;
    Ok(path.display().to_string())
}

fn allowlisted(ctx: &mut Ctx) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    let mut allowed = DatapathPod::start(ctx, &mut uplinks, Datapath::RedirectNeigh, ALLOWED.0, ALLOWED.1, 20)?;
    let mut neighbour = DatapathPod::start(ctx, &mut uplinks, Datapath::RedirectNeigh, NEIGHBOUR.0, NEIGHBOUR.1, 21)?;
    allowed.redirect(ctx, &uplinks)?;
    neighbour.redirect(ctx, &uplinks)?;
    let config = allow_config(ctx)?;
    ctx.ensure_agent(&["--config", &config])?;
    let mut last = String::new();
    // The agent learns the allowlisted pod's interface from its sandbox, in the background.
    wait_until(budget(Duration::from_secs(6)), || {
        let (arrived, answered) = crate::uplink_world::syn_through(&uplinks, &allowed.pod, BEYOND[0], 46300)?;
        last = format!("arrived {arrived}, answered {answered}");
        Ok(arrived >= 1 && answered)
    })
    .with_context(|| format!("the allowlisted pod's AF_PACKET SYN never got through the uplink ({last})"))?;
    expect_syns_arrive(&uplinks, &allowed.pod, 46310, "the allowlisted pod")?;
    for dest in BEYOND {
        let out = allowed.try_once(ctx, Kind::Http, dest, 80)?;
        ensure!(out.ok == 1, "the allowlisted pod's connect to {dest} was not served: {out:?}");
    }
    expect_syns_refused(&uplinks, &neighbour.pod, 46320, "the allowlisted pod's neighbour")?;
    expect_uplink_record(ctx, &neighbour, NEIGHBOUR)?;
    // Once the allowlisted pod ends, whatever is left behind its interface is a stranger.
    allowed.pod.end();
    wait_until(budget(Duration::from_secs(6)), || {
        Ok(crate::uplink_world::syn_through(&uplinks, &allowed.pod, BEYOND[0], 46330)?.0 == 0)
    })
    .context("frames from an ended allowlisted pod's interface still got through the uplink")?;
    ctx.stop_agent()
}

/// A blocked record of hook `uplink` for the pod's source address names the pod.
fn expect_uplink_record(ctx: &Ctx, pod: &DatapathPod, (namespace, name): (&str, &str)) -> Result<()> {
    let sources: Vec<IpAddr> = vec![pod.pod.ipv4.into(), pod.pod.ipv6.into()];
    let mut last = Vec::new();
    let ours = |r: &crate::agent::RecordLine| {
        r.hook == "uplink" && r.verdict == "blocked" && r.source.is_some_and(|s| sources.contains(&s))
    };
    wait_until(budget(Duration::from_secs(3)), || {
        last = ctx.agent()?.audit_records();
        Ok(last.iter().any(ours))
    })
    .with_context(|| format!("no blocked uplink record from {sources:?}: {last:#?}"))?;
    for record in last.iter().filter(|r| ours(r)) {
        ensure!(
            record.pod.as_deref() == Some(name) && record.namespace.as_deref() == Some(namespace),
            "the uplink's record of {:?} does not name pod {namespace}/{name}: {record:?}",
            record.source
        );
    }
    Ok(())
}

fn lifecycle(ctx: &mut Ctx) -> Result<()> {
    let mut uplinks = crate::uplink_world::uplinks(ctx)?;
    let mut pod = DatapathPod::start(ctx, &mut uplinks, Datapath::RedirectNeigh, "default", "web-life-8j3r", 30)?;
    pod.redirect(ctx, &uplinks)?;
    let uplink = uplinks.current().index;
    ctx.uninstall()?;
    expect_syns_arrive(&uplinks, &pod.pod, 46400, "with no guard")?;
    ctx.default_agent()?;
    let first = tc::attached(ctx.node.sim.node(), uplink, Direction::Egress)?;
    expect_syns_refused(&uplinks, &pod.pod, 46410, "with the agent")?;

    let killed = ctx.agent.take().context("no agent")?;
    killed.kill()?;
    ctx.running_args.clear();
    expect_syns_refused(&uplinks, &pod.pod, 46420, "after the agent was killed")?;
    ctx.default_agent()?;
    let again = tc::attached(ctx.node.sim.node(), uplink, Direction::Egress)?;
    ensure!(
        again.tcx.len() + again.cls_bpf.len() == first.tcx.len() + first.cls_bpf.len(),
        "a restarted agent stacked a second program on the uplink: {first:?} → {again:?}"
    );
    expect_syns_refused(&uplinks, &pod.pod, 46430, "after a restart")?;

    let variant = ctx.variant_bin()?;
    ctx.stop_agent()?;
    let upgraded = Agent::start(&ctx.spec(&variant, &[]))?;
    let now = tc::attached(ctx.node.sim.node(), uplink, Direction::Egress)?;
    ensure!(
        now.tcx.len() + now.cls_bpf.len() == first.tcx.len() + first.cls_bpf.len(),
        "the upgrade left two programs on the uplink: {first:?} → {now:?}"
    );
    expect_syns_refused(&uplinks, &pod.pod, 46440, "after an upgrade to the test variant")?;
    upgraded.stop()?;

    ctx.uninstall()?;
    let left = tc::attached(ctx.node.sim.node(), uplink, Direction::Egress)?;
    // A clsact qdisc with no filters (older kernels) is an empty hook: the agent cannot
    // tell one it made from one another datapath shares, so it stays.
    ensure!(left.is_empty(), "uninstall left a program on the uplink: {left:?}");
    expect_syns_arrive(&uplinks, &pod.pod, 46450, "after uninstall")?;

    let (ok, out, err) = apply(ctx, &ctx.agent_bin, &[])?;
    ensure!(ok, "apply failed:\n{out}{err}");
    ensure!(guarded(ctx, uplink)?, "apply put no program on the uplink");
    expect_syns_refused(&uplinks, &pod.pod, 46460, "after apply, with no agent")?;
    ctx.default_agent()?;
    expect_syns_refused(&uplinks, &pod.pod, 46470, "once an agent adopted apply's enforcement")?;
    ctx.uninstall()
}
