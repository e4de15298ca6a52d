// SPDX-License-Identifier: Apache-2.0
//! Pods behind a bridge (kubenet's `cbr0`, the `bridge` CNI plugin's `cni0`): every
//! pod enters the node's stack through the bridge, so the host side tells an
//! allowlisted pod from its neighbours by source address, on that bridge only.

use std::{net::IpAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    nat::Dnat,
    netlink::Netlink,
    netns::NetNs,
    node::{KubeletPod, Layout},
    sandbox::PodSandbox,
    world::{Bridge, PodNet, AZURE_WIRESERVER, IMDS_V4, IMDS_V6},
};

use crate::{
    attempt::{self, Kind},
    harness::{budget, wait_until, Ctx, Who},
    hostside::{host_status, syn_from_net, SETTLE, VIRTUAL_IP},
};

pub(crate) const SCENARIOS: [crate::Scenario; 3] = [
    (
        "hostside: behind a bridge, an allowlisted pod passes on every path, its neighbour on the bridge is refused and named",
        bridged_pod_allowed,
    ),
    ("hostside: behind a bridge, a removed address or a gone pod is refused again", bridged_allowance_withdrawn),
    ("hostside: behind a bridge, audit mode records the neighbour's attempt and drops nothing", bridged_audit),
];

/// Kubelet numbers (pod uid, container id) no other scenario uses.
const FIRST_KUBELET_NUMBER: u32 = 7100;

/// A pod whose veth is a port of the bridge; dropped in field order: its sandbox
/// process ends, then its namespace, then its cgroup and log directories.
struct BridgedPod {
    sandbox: Option<PodSandbox>,
    net: PodNet,
    kubelet: Option<KubeletPod>,
}

impl BridgedPod {
    fn start(ctx: &mut Ctx, bridge: &mut Bridge, namespace: &str, name: &str, n: u32) -> Result<BridgedPod> {
        let kubelet = ctx.node.kubelet_pod(namespace, name, Layout::SystemdContainerd, FIRST_KUBELET_NUMBER + n)?;
        let net = ctx.node.sim.add_bridged_pod(name, bridge)?;
        let sandbox = PodSandbox::start(&net.ns.path(), kubelet.cgroup.path())?;
        Ok(BridgedPod { sandbox: Some(sandbox), net, kubelet: Some(kubelet) })
    }

    /// The pod ends as the kubelet ends it: its processes, then its cgroup. The
    /// namespace stays, standing for whatever next sends with its addresses.
    fn end(&mut self) {
        self.sandbox = None;
        self.kubelet = None;
    }

    fn http(&self, ctx: &Ctx, dest: &str, port: u16) -> Result<attempt::Outcome> {
        let mut req = ctx.request(Who::Pod(0), Kind::Http, dest, port, false)?;
        req.netns = self.net.ns.path();
        req.cgroup = self.kubelet.as_ref().context("the pod has ended")?.cgroup.path().to_path_buf();
        attempt::run(&req)
    }
}

/// A bridge with an allowlisted pod (`payments/api-*`) and a neighbour beside it.
struct BridgedNode {
    allowed: BridgedPod,
    neighbour: BridgedPod,
    /// Last: its ports leave with the pods' namespaces first.
    _bridge: Bridge,
}

impl BridgedNode {
    fn build(ctx: &mut Ctx) -> Result<BridgedNode> {
        let mut bridge = ctx.node.sim.add_bridge()?;
        let allowed = BridgedPod::start(ctx, &mut bridge, "payments", "api-bridged-7x2k", 0)?;
        let neighbour = BridgedPod::start(ctx, &mut bridge, "payments", "cache-bridged-4m9q", 1)?;
        Ok(BridgedNode { allowed, neighbour, _bridge: bridge })
    }
}

/// Waits until the table holds `n` (bridge, address) pairs.
fn await_allowed_addresses(ctx: &Ctx, n: usize) -> Result<()> {
    let mut last = usize::MAX;
    wait_until(budget(Duration::from_secs(6)), || {
        last = host_status(ctx)?.allowed_addresses;
        Ok(last == n)
    })
    .with_context(|| format!("the table never held {n} allowlisted addresses behind the bridge (last: {last})"))?;
    Ok(())
}

/// An AF_PACKET SYN from `pod` to `dest`:80: (arrived in the node, answered).
fn syn(ctx: &Ctx, pod: &BridgedPod, dest: IpAddr, sport: u16) -> Result<(u64, bool)> {
    syn_from_net(ctx, ctx.node.sim.node(), &pod.net, dest, sport)
}

fn bridged_pod_allowed(ctx: &mut Ctx) -> Result<()> {
    let IpAddr::V4(wireserver) = AZURE_WIRESERVER else { unreachable!() };
    let _dnat = Dnat::add(ctx.node.sim.node(), &[(VIRTUAL_IP, wireserver, None)])?;
    let pods = BridgedNode::build(ctx)?;
    // Without the guard both pods reach the metadata stand-in: the paths are open.
    ctx.uninstall()?;
    for (n, pod) in [&pods.allowed, &pods.neighbour].into_iter().enumerate() {
        let (arrived, answered) = syn(ctx, pod, IMDS_V4, 47000 + n as u16)?;
        ensure!(arrived >= 1 && answered, "without the guard, pod {n} behind the bridge should be served");
    }
    let config = ctx.allow_api_pods_config("hostside-bridge-allow.yaml")?;
    ctx.ensure_agent(&["--config", &config])?;
    await_allowed_addresses(ctx, 2)?;
    let exempt_before = host_status(ctx)?.exempt_packets;
    for (n, dest) in [IMDS_V4, IMDS_V6].into_iter().enumerate() {
        let (arrived, answered) = syn(ctx, &pods.allowed, dest, 47010 + n as u16)?;
        ensure!(arrived >= 1 && answered, "{dest}: the allowlisted pod's AF_PACKET SYN through the bridge was stopped");
        let (arrived, answered) = syn(ctx, &pods.neighbour, dest, 47020 + n as u16)?;
        ensure!(arrived == 0 && !answered, "{dest}: the neighbour's AF_PACKET SYN through the bridge got through");
    }
    let vip = VIRTUAL_IP.to_string();
    let out = pods.allowed.http(ctx, &vip, 80)?;
    ensure!(out.ok == 1, "the allowlisted pod was not served through the DNATed Service address: {out:?}");
    let before = ctx.node.standin.arrivals();
    let out = pods.neighbour.http(ctx, &vip, 80)?;
    std::thread::sleep(SETTLE);
    ensure!(out.ok == 0 && ctx.node.standin.arrivals() == before, "the neighbour reached the WireServer via DNAT");
    let exempt = host_status(ctx)?.exempt_packets;
    ensure!(exempt > exempt_before, "exempt packets are not counted: {exempt_before} → {exempt}");
    // The bridge does not say which pod sent a packet; its source address does.
    expect_record(ctx, "blocked", &pods.neighbour, "cache-bridged-4m9q")
}

fn bridged_allowance_withdrawn(ctx: &mut Ctx) -> Result<()> {
    let mut pods = BridgedNode::build(ctx)?;
    let config = ctx.allow_api_pods_config("hostside-bridge-allow.yaml")?;
    ctx.ensure_agent(&["--config", &config])?;
    await_allowed_addresses(ctx, 2)?;
    let (arrived, _) = syn(ctx, &pods.allowed, IMDS_V4, 47100)?;
    ensure!(arrived >= 1, "the allowlisted pod behind the bridge was not let through to begin with");

    // Its IPv4 address goes (a pod's address moves): a frame still carrying it is refused.
    let mut netlink = Netlink::open_in(&pods.allowed.net.ns)?;
    let eth0 = netlink.link_index("eth0")?;
    netlink.delete_address(eth0, pods.allowed.net.ipv4.into(), 24)?;
    drop(netlink);
    await_allowed_addresses(ctx, 1)?;
    let (arrived, answered) = syn(ctx, &pods.allowed, IMDS_V4, 47101)?;
    ensure!(arrived == 0 && !answered, "a frame from the pod's removed IPv4 address still got through");
    let (arrived, _) = syn(ctx, &pods.allowed, IMDS_V6, 47102)?;
    ensure!(arrived >= 1, "the pod's remaining IPv6 address was refused with the IPv4 one");

    // The pod ends; whatever sends with its address next is refused.
    pods.allowed.end();
    await_allowed_addresses(ctx, 0)?;
    let (arrived, answered) = syn(ctx, &pods.allowed, IMDS_V6, 47103)?;
    ensure!(arrived == 0 && !answered, "a frame from a gone pod's IPv6 address still got through");
    Ok(())
}

fn bridged_audit(ctx: &mut Ctx) -> Result<()> {
    let pods = BridgedNode::build(ctx)?;
    // Where br_netfilter is loaded the log names the bridge port the packet came
    // from (the first scenario); without it only the source address tells: off here.
    let _off = BridgeNetfilterOff::set(NetNs::from_path(&ctx.node.node_netns())?)?;
    let config = ctx.allow_api_pods_config("hostside-bridge-allow.yaml")?;
    ctx.ensure_agent(&["--config", &config, "--mode", "audit"])?;
    await_allowed_addresses(ctx, 2)?;
    let before = host_status(ctx)?;
    let (arrived, answered) = syn(ctx, &pods.neighbour, IMDS_V4, 47200)?;
    ensure!(arrived >= 1 && answered, "audit mode must drop nothing: arrived {arrived}, answered {answered}");
    let (arrived, _) = syn(ctx, &pods.allowed, IMDS_V4, 47201)?;
    ensure!(arrived >= 1, "audit mode: the allowlisted pod's SYN did not arrive");
    let after = host_status(ctx)?;
    ensure!(
        after.audited_packets > before.audited_packets && after.exempt_packets > before.exempt_packets,
        "audit mode: the neighbour's SYN should count as audited and the allowlisted pod's as exempt: \
         {before:?} → {after:?}"
    );
    expect_record(ctx, "audited", &pods.neighbour, "cache-bridged-4m9q")
}

/// `net.bridge.bridge-nf-call-ip{,6}tables` set to 0 in the node namespace while it
/// lives (nothing to do where br_netfilter is not loaded).
struct BridgeNetfilterOff {
    node: NetNs,
    saved: Vec<(&'static str, String)>,
}

const BRIDGE_NF_SYSCTLS: [&str; 2] =
    ["/proc/sys/net/bridge/bridge-nf-call-iptables", "/proc/sys/net/bridge/bridge-nf-call-ip6tables"];

impl BridgeNetfilterOff {
    fn set(node: NetNs) -> Result<BridgeNetfilterOff> {
        let saved = node.run(|| -> Result<Vec<(&'static str, String)>> {
            let mut saved = Vec::new();
            for path in BRIDGE_NF_SYSCTLS {
                let Ok(value) = std::fs::read_to_string(path) else { continue };
                std::fs::write(path, "0").with_context(|| format!("could not write 0 to {path} in the node"))?;
                saved.push((path, value));
            }
            Ok(saved)
        })?;
        Ok(BridgeNetfilterOff { node, saved })
    }
}

impl Drop for BridgeNetfilterOff {
    fn drop(&mut self) {
        let saved = std::mem::take(&mut self.saved);
        self.node.run(|| {
            for (path, value) in saved {
                let _ = std::fs::write(path, value.trim());
            }
        });
    }
}

/// An audit record of the host side with `verdict` for a SYN from `pod`, naming it.
fn expect_record(ctx: &Ctx, verdict: &str, pod: &BridgedPod, name: &str) -> Result<()> {
    let source = IpAddr::V4(pod.net.ipv4);
    let mut last = Vec::new();
    wait_until(budget(Duration::from_secs(3)), || {
        last = ctx.agent()?.audit_records();
        Ok(last.iter().any(|r| r.hook == "host" && r.verdict == verdict && r.source == Some(source)))
    })
    .with_context(|| format!("no {verdict} host-side record from {source}: {last:?}"))?;
    let record = last.iter().find(|r| r.hook == "host" && r.verdict == verdict && r.source == Some(source)).unwrap();
    ensure!(
        record.pod.as_deref() == Some(name) && record.namespace.as_deref() == Some("payments"),
        "the record of {source} behind the bridge does not name pod payments/{name}: {record:?}"
    );
    Ok(())
}
