// SPDX-License-Identifier: Apache-2.0
//! What the uplink scenarios share: pods on the datapaths that skip the node's
//! netfilter (a tc program redirecting a pod's frames to the uplink, a macvlan or
//! ipvlan child of the uplink), and every attempt a hostile pod makes, counted where
//! the metadata service lives: beyond the node.

use std::{net::IpAddr, time::Duration};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    drops::DropTable,
    frames::{dropped_in_send, tcp_syn_frame, user_space_request, PacketSocket},
    netlink::LowerChild,
    node::Layout,
    standin::BARRIER_PORT,
    tc::{self, ClsBpf, Direction, Handoff},
    uplink::{UplinkPod, Uplinks, BEYOND},
};

use crate::{
    attempt::{self, Kind, Outcome},
    harness::{budget, wait_until, Ctx, Who},
    hostside::ArrivalTap,
};

/// Kubelet numbers (pod uid, container id) no other scenario uses.
const FIRST_KUBELET_NUMBER: u32 = 7400;
/// The priority of the tests' redirect filters on a pod's veth.
const REDIRECT_PRIO: u16 = 1;
/// Long enough for a SYN-ACK from beyond the node to come back (scaled, at most
/// [`ANSWER_WAIT_MAX`]: every refused attempt waits it out, so the cap is most of the
/// uplink scenarios' time in the emulated guests). A SYN that got through is seen
/// arriving by the tap as well, whatever the answer's delay, so the cap only bounds
/// how long to hope for the answer; two seconds is hundreds of round trips even there.
const ANSWER_WAIT: Duration = Duration::from_millis(1500);
const ANSWER_WAIT_MAX: Duration = Duration::from_secs(2);
/// Long enough for a packet that got through to have arrived beyond the node.
const SETTLE: Duration = Duration::from_millis(200);
const SETTLE_MAX: Duration = Duration::from_secs(1);

fn answer_wait() -> Duration {
    budget(ANSWER_WAIT).min(ANSWER_WAIT_MAX)
}

fn settle() {
    std::thread::sleep(budget(SETTLE).min(SETTLE_MAX));
}
/// How long a new uplink may take to carry the node's traffic.
const READY_WITHIN: Duration = Duration::from_secs(5);
/// The source port raw.rs's hand-made SYN uses.
const RAW_SYN_SPORT: u16 = 40000;

/// How a pod's frames reach the uplink without the node's netfilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Datapath {
    /// A tc program on the pod's veth: `bpf_redirect_neigh` (Cilium's BPF host routing).
    RedirectNeigh,
    /// A tc program on the pod's veth: MACs rewritten, then `bpf_redirect`.
    Redirect,
    /// A macvlan child of the uplink in bridge mode (Multus secondary networks).
    Macvlan,
    /// An ipvlan child of the uplink in L2 mode (IPVLAN-based CNIs).
    Ipvlan,
}

/// A pod on a datapath; for the tc ones, the redirect on its veth (once attached).
pub(crate) struct DatapathPod {
    /// First: the redirect goes before the pod's veth does.
    redirect: Option<ClsBpf>,
    pub pod: UplinkPod,
    pub datapath: Datapath,
}

impl DatapathPod {
    /// Pod `n` of the uplink scenarios on `datapath`; a tc datapath's redirect is
    /// attached by [`DatapathPod::redirect`].
    pub(crate) fn start(
        ctx: &mut Ctx,
        uplinks: &mut Uplinks,
        datapath: Datapath,
        namespace: &str,
        name: &str,
        n: u32,
    ) -> Result<DatapathPod> {
        let kubelet = ctx.node.kubelet_pod(namespace, name, Layout::SystemdContainerd, FIRST_KUBELET_NUMBER + n)?;
        let node = ctx.node.sim.node();
        let pod = match datapath {
            Datapath::RedirectNeigh | Datapath::Redirect => UplinkPod::veth(&mut ctx.node.sim, kubelet, name)?,
            Datapath::Macvlan => {
                UplinkPod::child(node, &mut uplinks.beyond[uplinks.via], LowerChild::Macvlan, kubelet, name)?
            }
            Datapath::Ipvlan => {
                UplinkPod::child(node, &mut uplinks.beyond[uplinks.via], LowerChild::Ipvlan, kubelet, name)?
            }
        };
        Ok(DatapathPod { redirect: None, pod, datapath })
    }

    /// Whether the datapath is a tc program on the pod's veth.
    pub(crate) fn is_tc(&self) -> bool {
        matches!(self.datapath, Datapath::RedirectNeigh | Datapath::Redirect)
    }

    /// Attaches the tc redirect to the uplink the metadata routes go through.
    pub(crate) fn redirect(&mut self, ctx: &Ctx, uplinks: &Uplinks) -> Result<()> {
        let (_, host_index) = self.pod.host_end.clone().context("only a veth pod's frames are redirected")?;
        let up = uplinks.current();
        let how = match self.datapath {
            Datapath::RedirectNeigh => Handoff::Neigh,
            _ => Handoff::Plain { dst_mac: up.cloud_mac, src_mac: up.mac },
        };
        let prog = tc::load(&tc::redirect_program(up.index, how), "mg_test_lxc")?;
        self.redirect = Some(ClsBpf::attach(ctx.node.sim.node(), host_index, Direction::Ingress, REDIRECT_PRIO, prog)?);
        Ok(())
    }

    /// A request from the pod's namespace and cgroup.
    fn request(&self, ctx: &Ctx, kind: Kind, dest: IpAddr, port: u16) -> Result<attempt::Request> {
        let mut req = ctx.request(Who::Pod(0), kind, &dest.to_string(), port, false)?;
        req.netns = self.pod.ns.path();
        req.cgroup = self.pod.cgroup()?;
        Ok(req)
    }

    pub(crate) fn try_once(&self, ctx: &Ctx, kind: Kind, dest: IpAddr, port: u16) -> Result<Outcome> {
        attempt::run(&self.request(ctx, kind, dest, port)?)
    }
}

/// The node's uplinks ([`Uplinks::build`]), once a host-network process is served
/// through the current one: the world works.
pub(crate) fn uplinks(ctx: &Ctx) -> Result<Uplinks> {
    let uplinks = Uplinks::build(ctx.node.sim.node())?;
    wait_served(ctx, &uplinks)?;
    Ok(uplinks)
}

/// Waits until a host-network process (pod 0's cgroup, the node's namespace) is
/// served both metadata addresses: a new link's IPv6 takes a moment.
pub(crate) fn wait_served(ctx: &Ctx, uplinks: &Uplinks) -> Result<()> {
    for dest in BEYOND {
        let mut last = None;
        wait_until(budget(READY_WITHIN), || {
            let out = ctx.try_once(Who::HostInPodCgroup(0), Kind::Http, &dest.to_string(), 80, false)?;
            let served = out.ok == 1;
            last = Some(out);
            Ok(served)
        })
        .with_context(|| format!("{dest} beyond {} is not served to the node ({last:?})", uplinks.current().name))?;
    }
    Ok(())
}

/// A datagram from the pod to the barrier port of the cloud behind the current
/// uplink (never blocked), and a wait until it arrives: it takes the same path as
/// the attempts before it, so theirs have had their chance to arrive.
pub(crate) fn barrier(ctx: &Ctx, uplinks: &Uplinks, pod: &DatapathPod) -> Result<()> {
    let up = uplinks.current();
    let source = IpAddr::from(pod.pod.ipv4);
    let seen = || up.standin.arrivals().udp(BARRIER_PORT).from(source);
    let before = seen();
    let out = pod.try_once(ctx, Kind::UdpSendto, up.cloud_v4.into(), BARRIER_PORT)?;
    ensure!(out.ok == 1, "the barrier datagram from {} was not sent: {out:?}", pod.pod.name);
    wait_until(budget(Duration::from_secs(2)), || Ok(seen() > before)).with_context(|| {
        format!("{}'s datagram over {:?} never reached the cloud beyond {}", pod.pod.name, pod.datapath, up.name)
    })?;
    Ok(())
}

/// Shows that the tc datapath skips the node's netfilter: with a forward rule that
/// drops everything from the pod's veth, the routed path is closed, yet once the
/// redirect is attached the pod's datagrams arrive beyond the node.
pub(crate) fn redirect_past_netfilter(ctx: &Ctx, uplinks: &Uplinks, pod: &mut DatapathPod) -> Result<()> {
    let (link, index) = pod.pod.host_end.clone().context("not a veth pod")?;
    let dropped = DropTable::forwarded_from(ctx.node.sim.node(), index)?;
    let up = uplinks.current();
    let source = IpAddr::from(pod.pod.ipv4);
    let before = up.standin.arrivals().udp(BARRIER_PORT).from(source);
    pod.try_once(ctx, Kind::UdpSendto, up.cloud_v4.into(), BARRIER_PORT)?;
    settle();
    let after = up.standin.arrivals().udp(BARRIER_PORT).from(source);
    ensure!(after == before, "the node's forward rule dropping {link}'s packets did not hold on the routed path");
    pod.redirect(ctx, uplinks)?;
    barrier(ctx, uplinks, pod).context("redirected in tc, the datagram should skip the forward rule")?;
    drop(dropped);
    Ok(())
}

/// Writes a SYN frame on the pod's interface (run inside the pod) and waits for the
/// SYN-ACK; a frame dropped within the send (on a macvlan's lower device) gets none.
fn send_syn(pod: &UplinkPod, frame: &[u8], sport: u16) -> Result<bool> {
    let sock = PacketSocket::open(pod.wire.ifindex).context("AF_PACKET socket in the pod")?;
    match sock.send(frame) {
        Ok(()) => sock.syn_ack_to(sport, answer_wait()),
        Err(e) if dropped_in_send(&e) => Ok(false),
        Err(e) => Err(e).context("sending the SYN frame"),
    }
}

/// One AF_PACKET SYN from the pod to `dest`:80: (segments that arrived in any cloud,
/// whether a SYN-ACK came back).
pub(crate) fn syn_through(uplinks: &Uplinks, pod: &UplinkPod, dest: IpAddr, sport: u16) -> Result<(u64, bool)> {
    let taps: Vec<ArrivalTap> =
        uplinks.beyond.iter().map(|b| ArrivalTap::open(&b.ns, dest.is_ipv6(), sport)).collect::<Result<_>>()?;
    let frame = tcp_syn_frame(&pod.wire, pod.source_for(dest), dest, sport, 80);
    let answered = pod.ns.run(|| send_syn(pod, &frame, sport))?;
    settle();
    Ok((taps.iter().map(ArrivalTap::count).sum(), answered))
}

/// The pod's AF_PACKET SYNs to both metadata addresses never arrive, at `step`.
pub(crate) fn expect_syns_refused(uplinks: &Uplinks, pod: &UplinkPod, sport: u16, step: &str) -> Result<()> {
    for (i, dest) in BEYOND.into_iter().enumerate() {
        let (arrived, answered) = syn_through(uplinks, pod, dest, sport + i as u16)?;
        ensure!(arrived == 0 && !answered, "{step}: {}'s AF_PACKET SYN to {dest} arrived {arrived} time(s)", pod.name);
    }
    Ok(())
}

/// The pod's AF_PACKET SYNs to both metadata addresses arrive and are answered, at `step`.
pub(crate) fn expect_syns_arrive(uplinks: &Uplinks, pod: &UplinkPod, sport: u16, step: &str) -> Result<()> {
    for (i, dest) in BEYOND.into_iter().enumerate() {
        let (arrived, answered) = syn_through(uplinks, pod, dest, sport + i as u16)?;
        ensure!(arrived >= 1 && answered, "{step}: {}'s AF_PACKET SYN to {dest} did not get through", pod.name);
    }
    Ok(())
}

/// One attempt and how much of it arrived beyond the node.
#[derive(Debug)]
pub(crate) struct Tried {
    pub what: String,
    pub arrived: u64,
    /// For the plain connect: refused with EPERM at once.
    pub eperm: bool,
}

/// Every way a hostile pod tries both metadata addresses: a plain connect, an
/// AF_PACKET SYN, a raw socket's SYN and a user-space TCP handshake over AF_PACKET.
/// Source ports from `sport` up keep the attempts apart.
pub(crate) fn attempts(ctx: &Ctx, uplinks: &Uplinks, pod: &DatapathPod, sport: u16) -> Result<Vec<Tried>> {
    let up = uplinks.current();
    let mut tried = Vec::new();
    for (i, dest) in BEYOND.into_iter().enumerate() {
        let accepted = || up.standin.arrivals().tcp(80).count;
        let before = accepted();
        let out = pod.try_once(ctx, Kind::Http, dest, 80)?;
        settle();
        let (what, eperm) = (format!("plain connect to {dest} ({out:?})"), out.eperm == 1);
        tried.push(Tried { what, arrived: accepted() - before, eperm });

        let port = sport + 10 * i as u16;
        let tap = ArrivalTap::open(&up.ns, dest.is_ipv6(), port)?;
        let frame = tcp_syn_frame(&pod.pod.wire, pod.pod.source_for(dest), dest, port, 80);
        let answered = pod.pod.ns.run(|| send_syn(&pod.pod, &frame, port))?;
        settle();
        let what = format!("AF_PACKET SYN to {dest} (answered: {answered})");
        tried.push(Tried { what, arrived: tap.count(), eperm: false });

        let tap = ArrivalTap::open(&up.ns, dest.is_ipv6(), RAW_SYN_SPORT)?;
        let out = pod.try_once(ctx, Kind::RawTcpSyn, dest, 80)?;
        settle();
        tried.push(Tried { what: format!("raw socket SYN to {dest} ({out:?})"), arrived: tap.count(), eperm: false });

        let before = accepted();
        let port = port + 1;
        let _resets = DropTable::kernel_resets(&pod.pod.ns)?;
        let (wire, src) = (&pod.pod.wire, pod.pod.source_for(dest));
        let answered = pod.pod.ns.run(|| user_space_request(wire, src, dest, port, 80, answer_wait()))?;
        settle();
        let what = format!("user-space TCP handshake to {dest} (SYN-ACK: {answered})");
        tried.push(Tried { what, arrived: accepted() - before, eperm: false });
    }
    Ok(tried)
}

/// Without the guard every attempt must arrive: the paths are open, so the
/// scenario can fail.
pub(crate) fn expect_all_arrive(tried: &[Tried], on: &str) -> Result<()> {
    let closed: Vec<&Tried> = tried.iter().filter(|t| t.arrived == 0).collect();
    ensure!(
        closed.is_empty(),
        "{on}: without the guard these never arrived beyond the node (the world is broken): {closed:#?}"
    );
    Ok(())
}

/// With the guard nothing arrives, and the plain connects are refused with EPERM.
pub(crate) fn expect_none_arrive(tried: &[Tried], on: &str) -> Result<()> {
    let through: Vec<&Tried> = tried.iter().filter(|t| t.arrived > 0).collect();
    ensure!(through.is_empty(), "{on}: these reached the metadata service beyond the node: {through:#?}");
    let not_refused: Vec<&Tried> = tried.iter().filter(|t| t.what.starts_with("plain") && !t.eperm).collect();
    ensure!(not_refused.is_empty(), "{on}: plain connects not refused with EPERM: {not_refused:#?}");
    Ok(())
}
