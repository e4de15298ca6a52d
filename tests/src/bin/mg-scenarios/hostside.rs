// SPDX-License-Identifier: Apache-2.0
//! The host side: what enters the node from a pod is judged by its final destination
//! in the node, whatever the pod's own kernel did or did not see — frames written
//! with `AF_PACKET`, and Service addresses the node rewrites to a metadata address.
//! Each scenario first shows the path open without the guard (so it can fail).

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    frames::{tcp_syn_frame_with_ip_options, PacketSocket, Wire},
    nat::Dnat,
    netns::NetNs,
    world::{PodNet, AWS_DNS_NEIGHBOUR, AZURE_WIRESERVER, IMDS_V4, IMDS_V6},
};

use crate::{
    agent::{Agent, HostStatus},
    attempt::Kind,
    harness::{Ctx, Who, METADATA_V4},
};

pub(crate) const SCENARIOS: [crate::Scenario; 7] = [
    ("hostside: AF_PACKET SYNs from a pod (IPv4, IPv6) never arrive and get no SYN-ACK", packet_frames_stopped),
    (
        "hostside: an AF_PACKET SYN whose IPv4 header carries options (past the prefilter's 0x45 test) never arrives",
        options_frame_stopped,
    ),
    ("hostside: a Service address DNATed in the node to 168.63.129.16:80 is refused, TCP and UDP", dnat_refused),
    ("hostside: DNS on port 53 through the node and host-network processes are served", open_paths_served),
    ("hostside: status shows the table, audit mode drops nothing, uninstall removes it", status_audit_uninstall),
    (
        "hostside: GKE Workload Identity: 169.254.169.254:80 DNATed to the node's server is served",
        gke_workload_identity,
    ),
    ("hostside: the table holds through SIGKILL, restart and upgrade; counts carry over", table_outlives_agents),
];

/// A Service-like virtual address, routed to the node by the pod's default route.
pub(crate) const VIRTUAL_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub(crate) const SETTLE: Duration = Duration::from_millis(150);
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
/// Long enough for the node to resolve the pod's IPv6 neighbour before it answers.
const SYN_ACK_WAIT: Duration = Duration::from_millis(1500);

/// Counts TCP segments from source port `sport` delivered in the node namespace (the
/// SYN, and the pod kernel's reset when a SYN-ACK reaches it),
/// after every filter there (raw sockets get their copy at local delivery).
pub(crate) struct ArrivalTap {
    fd: OwnedFd,
    sport: u16,
    v6: bool,
}

impl ArrivalTap {
    pub(crate) fn open(node: &NetNs, v6: bool, sport: u16) -> Result<ArrivalTap> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let fd = node.run(|| {
            // SAFETY: plain socket(2); owned right away.
            let fd = unsafe {
                libc::socket(family, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, libc::IPPROTO_TCP)
            };
            // SAFETY: a fresh fd we own (checked below).
            (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
        });
        Ok(ArrivalTap { fd: fd.context("could not open a raw TCP tap in the node namespace")?, sport, v6 })
    }

    pub(crate) fn count(&self) -> u64 {
        self.count_matching(|_| true)
    }

    /// SYNs only (not the pod kernel's resets), drained from the queue.
    pub(crate) fn syns(&self) -> u64 {
        self.count_matching(|flags| flags & TCP_SYN != 0)
    }

    fn count_matching(&self, flags_match: impl Fn(u8) -> bool) -> u64 {
        let mut n = 0;
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: valid fd and buffer.
            let len = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if len <= 0 {
                return n;
            }
            // IPv4 raw sockets get the IP header, IPv6 ones the transport header only.
            let tcp = if self.v6 { 0 } else { (buf[0] & 0x0f) as usize * 4 };
            if len as usize > tcp + TCP_FLAGS_OFFSET
                && u16::from_be_bytes([buf[tcp], buf[tcp + 1]]) == self.sport
                && flags_match(buf[tcp + TCP_FLAGS_OFFSET])
            {
                n += 1;
            }
        }
    }
}

pub(crate) fn syn_over_af_packet(ctx: &Ctx, dest: IpAddr, sport: u16) -> Result<(u64, bool)> {
    syn_from_pod(ctx, 0, dest, sport)
}

/// Sends one SYN frame from a pod to `dest`:80; returns (segments that arrived in
/// the node, whether a SYN-ACK came back).
pub(crate) fn syn_from_pod(ctx: &Ctx, pod: usize, dest: IpAddr, sport: u16) -> Result<(u64, bool)> {
    syn_seen_in(ctx, ctx.node.sim.node(), pod, dest, sport)
}

/// The same, counting arrivals in `tap_ns` (where the destination lives).
pub(crate) fn syn_seen_in(ctx: &Ctx, tap_ns: &NetNs, pod: usize, dest: IpAddr, sport: u16) -> Result<(u64, bool)> {
    syn_from_net(ctx, tap_ns, &ctx.node.pods[pod].net, dest, sport)
}

/// The same from any pod network (one behind a bridge, too).
pub(crate) fn syn_from_net(ctx: &Ctx, tap_ns: &NetNs, pod: &PodNet, dest: IpAddr, sport: u16) -> Result<(u64, bool)> {
    syn_with_ip_options(ctx, tap_ns, pod, dest, sport, &[])
}

/// The same, with `options` in the SYN's IPv4 header.
pub(crate) fn syn_with_ip_options(
    ctx: &Ctx,
    tap_ns: &NetNs,
    pod: &PodNet,
    dest: IpAddr,
    sport: u16,
    options: &[u8],
) -> Result<(u64, bool)> {
    let wire = Wire::of(&pod.ns, ctx.node.sim.node(), &pod.node_side_link)?;
    let src = if dest.is_ipv4() { IpAddr::V4(pod.ipv4) } else { IpAddr::V6(pod.ipv6) };
    let tap = ArrivalTap::open(tap_ns, dest.is_ipv6(), sport)?;
    let frame = tcp_syn_frame_with_ip_options(&wire, src, dest, sport, 80, options);
    let mut arrived = 0;
    let answered = pod.ns.run(|| -> Result<bool> {
        let sock = PacketSocket::open(wire.ifindex).context("AF_PACKET socket in the pod")?;
        sock.send(&frame).context("sending the frame")?;
        if sock.syn_ack_to(sport, SYN_ACK_WAIT)? {
            return Ok(true);
        }
        // The SYN got there but no answer came back yet (on a busy machine the node may
        // still be resolving the pod's neighbour): retransmit once, as TCP would.
        arrived += tap.count();
        if arrived == 0 {
            return Ok(false);
        }
        sock.send(&frame).context("sending the frame again")?;
        sock.syn_ack_to(sport, SYN_ACK_WAIT)
    })?;
    std::thread::sleep(SETTLE);
    Ok((arrived + tap.count(), answered))
}

/// Three no-operation options and the end of the list: a header of six words, whose
/// first byte is 0x46. The host side's fast test passes only 0x45 headers on; any
/// other goes to the full judgement, which must find the destination all the same.
const NOP_OPTIONS: [u8; 4] = [1, 1, 1, 0];

fn options_frame_stopped(ctx: &mut Ctx) -> Result<()> {
    let send = |ctx: &Ctx, sport| {
        syn_with_ip_options(ctx, ctx.node.sim.node(), &ctx.node.pods[0].net, IMDS_V4, sport, &NOP_OPTIONS)
    };
    ctx.uninstall()?;
    let (arrived, answered) = send(ctx, 41010)?;
    ensure!(
        arrived >= 1 && answered,
        "without the guard the SYN with IP options should arrive and be answered (arrived {arrived}, answered \
         {answered})"
    );
    ctx.default_agent()?;
    let (arrived, answered) = send(ctx, 42010)?;
    ensure!(arrived == 0, "a pod's AF_PACKET SYN with IP options arrived in the node {arrived} time(s)");
    ensure!(!answered, "a pod's AF_PACKET SYN with IP options got a SYN-ACK");
    Ok(())
}

fn packet_frames_stopped(ctx: &mut Ctx) -> Result<()> {
    ctx.uninstall()?;
    for (n, dest) in [IMDS_V4, IMDS_V6].into_iter().enumerate() {
        let (arrived, answered) = syn_over_af_packet(ctx, dest, 41000 + n as u16)?;
        ensure!(
            arrived >= 1 && answered,
            "{dest}: without the guard the SYN should arrive and be answered (arrived {arrived}, answered {answered})"
        );
    }
    ctx.default_agent()?;
    for (n, dest) in [IMDS_V4, IMDS_V6].into_iter().enumerate() {
        let (arrived, answered) = syn_over_af_packet(ctx, dest, 42000 + n as u16)?;
        ensure!(arrived == 0, "{dest}: a pod's AF_PACKET SYN arrived in the node {arrived} time(s)");
        ensure!(!answered, "{dest}: a pod's AF_PACKET SYN got a SYN-ACK: a user-space handshake would go on");
    }
    Ok(())
}

fn dnat_refused(ctx: &mut Ctx) -> Result<()> {
    let IpAddr::V4(wireserver) = AZURE_WIRESERVER else { unreachable!() };
    let vip = VIRTUAL_IP.to_string();
    let _dnat = Dnat::add(ctx.node.sim.node(), &[(VIRTUAL_IP, wireserver, None)])?;
    ctx.uninstall()?;
    ctx.expect_served(Who::Pod(0), Kind::Http, &vip, 80, false).context("the DNAT itself must work")?;
    ctx.expect_served(Who::Pod(0), Kind::UdpSendto, &vip, 80, false).context("the DNAT itself must work")?;

    ctx.default_agent()?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, &AZURE_WIRESERVER.to_string(), 80, false)?;
    for kind in [Kind::Http, Kind::UdpSendto] {
        let before = ctx.node.standin.arrivals();
        let out = ctx.try_once(Who::Pod(0), kind, &vip, 80, false)?;
        std::thread::sleep(SETTLE);
        let after = ctx.node.standin.arrivals();
        ensure!(
            out.ok == 0 || kind == Kind::UdpSendto,
            "{kind:?} to {vip}:80 (DNAT to the WireServer) was served: {out:?}"
        );
        ensure!(after == before, "{kind:?} to {vip}:80 reached the WireServer: {before:?} → {after:?}");
        if kind == Kind::Http {
            ensure!(out.max_us < 1_000_000, "the refusal should be a reset, at once; took {} µs", out.max_us);
        }
    }
    Ok(())
}

fn open_paths_served(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ctx.expect_served(Who::Pod(0), Kind::UdpSendto, METADATA_V4, 53, false)?;
    ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 53, false)?;
    ctx.expect_served(Who::HostInPodCgroup(0), Kind::Http, METADATA_V4, 80, false)?;
    ctx.expect_served(Who::HostInPodCgroup(0), Kind::UdpSendto, METADATA_V4, 80, false)?;
    Ok(())
}

pub(crate) fn host_status(ctx: &Ctx) -> Result<HostStatus> {
    crate::agent::host_status(&ctx.agent_bin, &ctx.node.bpffs)
}

fn status_audit_uninstall(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    let before = host_status(ctx)?;
    ensure!(before.installed && before.mode.as_deref() == Some("enforce"), "status: {before:?}");
    syn_over_af_packet(ctx, IMDS_V4, 43000)?;
    let after = host_status(ctx)?;
    ensure!(after.blocked_packets > before.blocked_packets, "the refused frame is not counted: {before:?} → {after:?}");

    ctx.ensure_agent(&["--mode", "audit"])?;
    let audit = host_status(ctx)?;
    ensure!(audit.mode.as_deref() == Some("audit"), "status after --mode audit: {audit:?}");
    let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, 43001)?;
    ensure!(arrived >= 1 && answered, "audit mode must drop nothing: arrived {arrived}, answered {answered}");
    let audited = host_status(ctx)?;
    ensure!(audited.audited_packets >= 1, "audit mode did not count the frame: {audited:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let records = ctx.agent()?.audit_records();
        if records.iter().any(|r| r.hook == "host" && r.verdict == "audited" && r.port == 80) {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "no audit record with hook host: {records:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    ctx.uninstall()?;
    let after = host_status(ctx)?;
    ensure!(!after.installed, "the table outlived uninstall: {after:?}");
    let (arrived, _) = syn_over_af_packet(ctx, IMDS_V4, 43002)?;
    ensure!(arrived >= 1, "after uninstall the node should be open again");
    Ok(())
}

/// GKE's node DNATs pods' 169.254.169.254:80 to its metadata server (169.254.169.252:988
/// there); here the stand-in's 169.254.169.253:80 plays that server.
fn gke_workload_identity(ctx: &mut Ctx) -> Result<()> {
    let (IpAddr::V4(imds), IpAddr::V4(gke_server)) = (IMDS_V4, AWS_DNS_NEIGHBOUR) else { unreachable!() };
    ctx.ensure_agent(&["--preset", "gke-workload-identity"])?;
    {
        let _dnat = Dnat::add(ctx.node.sim.node(), &[(imds, gke_server, Some((80, 80)))])?;
        let before = ctx.node.standin.arrivals();
        ctx.expect_served(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
        let after = ctx.node.standin.arrivals();
        ensure!(
            after.tcp(80).to(AWS_DNS_NEIGHBOUR) == before.tcp(80).to(AWS_DNS_NEIGHBOUR) + 1
                && after.tcp(80).to(IMDS_V4) == before.tcp(80).to(IMDS_V4),
            "the pod must reach the node's metadata server and not the real one: {before:?} → {after:?}"
        );
        ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 443, false)?;
        ctx.expect_served(Who::Pod(0), Kind::UdpSendto, METADATA_V4, 53, false)?;
    }
    // Without the DNAT (a node without Workload Identity) the real server stays out of reach.
    let before = ctx.node.standin.arrivals();
    let out = ctx.try_once(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    std::thread::sleep(SETTLE);
    let after = ctx.node.standin.arrivals();
    ensure!(out.ok == 0 && after == before, "without the DNAT the pod reached the metadata server: {out:?}");
    ctx.expect_served(Who::HostInPodCgroup(0), Kind::Http, METADATA_V4, 80, false)?;
    Ok(())
}

fn table_outlives_agents(ctx: &mut Ctx) -> Result<()> {
    ctx.uninstall()?;
    ctx.default_agent()?;
    syn_over_af_packet(ctx, IMDS_V4, 44000)?;
    let status = host_status(ctx)?;
    let blocked = status.blocked_packets;
    ensure!(blocked >= 1, "nothing counted: {status:?}");
    let spec = ctx.spec(&ctx.agent_bin.clone(), &[]);
    ctx.agent.take().context("no agent")?.kill()?;
    ctx.running_args.clear();
    let stopped = |ctx: &Ctx, sport: u16, when: &str| -> Result<()> {
        let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, sport)?;
        ensure!(arrived == 0 && !answered, "{when}: a pod's AF_PACKET SYN got through");
        Ok(())
    };
    stopped(ctx, 44001, "no agent after SIGKILL")?;
    let agent = Agent::start(&spec)?;
    stopped(ctx, 44002, "restarted agent")?;
    let counted = host_status(ctx)?.blocked_packets;
    ensure!(counted >= blocked + 2, "the restarted agent lost the table's counts: {blocked} → {counted}");
    agent.kill()?;
    let variant = ctx.spec(&ctx.variant_bin()?, &[]);
    let agent = Agent::start(&variant)?;
    stopped(ctx, 44003, "upgraded agent")?;
    agent.stop()?;
    stopped(ctx, 44004, "after SIGTERM")?;
    Ok(())
}
