// SPDX-License-Identifier: Apache-2.0
//! Headers and protocols a pod might hide behind: raw IPv6 packets with extension
//! headers or in fragments, to a destination blocked on one port only, and the
//! transport protocols beside TCP and UDP (UDP-Lite, SCTP, DCCP). Every case counts
//! what arrived in the node — frames on the pod's veth, and datagrams at a listener —
//! next to a control that shows the same packet does arrive without the guard.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{ensure, Result};

use crate::{
    frames::{ipv6_packet, udp, FrameTap, Listener},
    harness::Ctx,
};

pub(crate) const SCENARIOS: [crate::Scenario; 4] = [
    (
        "protocols: raw IPv6 with a hop-by-hop, routing or destination-options header to a blocked port never arrives",
        extension_headers_dropped,
    ),
    (
        "protocols: a raw IPv6 datagram in fragments to a blocked port never arrives, not one fragment",
        fragments_dropped,
    ),
    ("protocols: UDP-Lite from a pod reaches neither a fully blocked nor a port-limited address", udplite_stopped),
    (
        "protocols: SCTP and DCCP from a pod never reach the metadata address (where the kernel has them)",
        sctp_dccp_stopped,
    ),
];

const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const WIRESERVER: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
const BLOCKED_PORT: u16 = 80;
const SETTLE: Duration = Duration::from_millis(150);

const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: i32 = 33;
const IPPROTO_SCTP: i32 = 132;
const IPPROTO_UDPLITE: i32 = 136;

/// Only TCP and UDP to port 80 of the IPv6 metadata address are blocked (and every
/// protocol on port 80 of the IPv4 one): ports are what these packets try to hide.
fn port_limited_config(ctx: &Ctx) -> Result<String> {
    let path = ctx.node.work.join("port-limited.yaml");
    std::fs::write(
        &path,
        "destinations:\n  presets: []\n  block:\n    - cidr: \"fd00:ec2::254/128\"\n      protocols: [tcp, udp]\n      \
         ports: [80]\n    - cidr: 169.254.169.254/32\n      ports: [80]\n",
    )?;
    Ok(path.display().to_string())
}

fn extension_headers_dropped(ctx: &mut Ctx) -> Result<()> {
    let src = ctx.node.pods[0].net.ipv6;
    // An 8-byte header of each kind, carrying a PadN option (routing: type 0 with no
    // segments left, which a receiver processes as if it were absent).
    let cases: [(&str, u8, [u8; 6]); 3] = [
        ("hop-by-hop", NEXTHDR_HOP, [1, 4, 0, 0, 0, 0]),
        ("routing", NEXTHDR_ROUTING, [0, 0, 0, 0, 0, 0]),
        ("destination options", NEXTHDR_DEST, [1, 4, 0, 0, 0, 0]),
    ];
    let packets: Vec<(&str, Vec<Vec<u8>>)> = cases
        .iter()
        .map(|(name, kind, body)| {
            let mut ext = vec![IPPROTO_UDP, 0];
            ext.extend_from_slice(body);
            (*name, vec![ipv6_packet(src, IMDS_V6, *kind, &ext, &udp(src, IMDS_V6, BLOCKED_PORT, b"metadata"))])
        })
        .collect();
    expect_stopped_v6(ctx, &packets)
}

fn fragments_dropped(ctx: &mut Ctx) -> Result<()> {
    let src = ctx.node.pods[0].net.ipv6;
    let datagram = udp(src, IMDS_V6, BLOCKED_PORT, b"metadata-in-two-parts...");
    // First fragment: the UDP header and 8 bytes; second: the rest (offset 16 bytes).
    let frag = |offset: u16, more: bool| {
        let off = (offset / 8) << 3 | u16::from(more);
        let mut h = vec![IPPROTO_UDP, 0];
        h.extend_from_slice(&off.to_be_bytes());
        h.extend_from_slice(&0x4d47_0001u32.to_be_bytes());
        h
    };
    let first = ipv6_packet(src, IMDS_V6, NEXTHDR_FRAGMENT, &frag(0, true), &datagram[..16]);
    let second = ipv6_packet(src, IMDS_V6, NEXTHDR_FRAGMENT, &frag(16, false), &datagram[16..]);
    expect_stopped_v6(
        ctx,
        &[("both fragments", vec![first.clone(), second.clone()]), ("a later fragment alone", vec![second])],
    )
}

/// Without the guard each case's packets reach the node (frames on the veth; whole
/// datagrams also the stand-in); with the port-limited policy, not one frame does.
fn expect_stopped_v6(ctx: &mut Ctx, cases: &[(&str, Vec<Vec<u8>>)]) -> Result<()> {
    ctx.uninstall()?;
    let mut delivered = Vec::new();
    for (name, packets) in cases {
        let before = ctx.node.standin.arrivals().udp(BLOCKED_PORT).to(IMDS_V6.into());
        let frames = send_and_count(ctx, packets)?;
        ensure!(
            frames == packets.len() as u64,
            "control without the guard, {name}: {frames} of {} frames arrived",
            packets.len()
        );
        delivered.push(ctx.node.standin.arrivals().udp(BLOCKED_PORT).to(IMDS_V6.into()) - before);
    }
    ensure!(
        delivered[0] == 1,
        "control without the guard, {}: the stand-in got {} datagrams",
        cases[0].0,
        delivered[0]
    );
    let config = port_limited_config(ctx)?;
    ctx.ensure_agent(&["--config", &config])?;
    for (name, packets) in cases {
        let frames = send_and_count(ctx, packets)?;
        ensure!(frames == 0, "with the guard, {name}: {frames} frames reached the node");
    }
    Ok(())
}

/// Sends raw IPv6 packets (header included) from pod 0; frames that reached the node.
fn send_and_count(ctx: &Ctx, packets: &[Vec<u8>]) -> Result<u64> {
    // Only frames with the packets' own first header: the pod's ICMPv6 answer to the
    // stand-in's echo goes to the same address.
    let mut tap = FrameTap::open(ctx, IpAddr::V6(IMDS_V6), packets.first().map(|p| p[6]))?;
    for p in packets {
        let errno = in_pod(ctx, || raw_send_v6(p))?;
        // A send the backstop dropped fails with EPERM; anything else is an error here.
        ensure!(errno == 0 || errno == libc::EPERM, "sending a raw IPv6 packet failed: errno {errno}");
    }
    std::thread::sleep(SETTLE);
    Ok(tap.count())
}

fn udplite_stopped(ctx: &mut Ctx) -> Result<()> {
    let mut listener = Listener::open(ctx, IPPROTO_UDPLITE, BLOCKED_PORT)?;
    ctx.default_agent()?;
    for (dest, what) in [(IMDS_V4, "blocked on every port but 53"), (WIRESERVER, "blocked on ports 80 and 32526")] {
        // Control: the host's namespace reaches the listener (the guard lets it).
        let sent = in_host(ctx, || datagram_v4(IPPROTO_UDPLITE, dest, true))?;
        std::thread::sleep(SETTLE);
        ensure!(
            sent == 0 && listener.count() == 1,
            "UDP-Lite from the host to {dest}:80 did not arrive (errno {sent})"
        );
        // Which hook stops it: UDP-Lite has no `pre_connect`, so its connect never runs
        // the connect4 program; the backstop drops its datagrams.
        let connect = in_pod(ctx, || connect_only_v4(IPPROTO_UDPLITE, dest))?;
        println!("     note: UDP-Lite connect from a pod to {dest}:80: errno {connect} (0: the connect itself passes)");
        for connected in [true, false] {
            let errno = in_pod(ctx, || datagram_v4(IPPROTO_UDPLITE, dest, connected))?;
            std::thread::sleep(SETTLE);
            let arrived = listener.count();
            let how = if connected { "connect + send" } else { "sendto" };
            ensure!(arrived == 0, "UDP-Lite {how} from a pod to {dest}:80 ({what}): {arrived} arrived (errno {errno})");
            ensure!(errno == libc::EPERM, "UDP-Lite {how} from a pod to {dest}:80: expected EPERM, got errno {errno}");
        }
    }
    Ok(())
}

fn sctp_dccp_stopped(ctx: &mut Ctx) -> Result<()> {
    let protocols: Vec<(&str, i32)> = [("SCTP", IPPROTO_SCTP), ("DCCP", IPPROTO_DCCP)]
        .into_iter()
        .filter(|(name, protocol)| {
            let there = supported(*protocol);
            if !there {
                println!("     note: this kernel has no {name} (socket() refuses it): a pod cannot use it either");
            }
            there
        })
        .collect();
    // Control: without the guard the handshake's first packet reaches the node.
    ctx.uninstall()?;
    for (name, protocol) in &protocols {
        let mut tap = FrameTap::open(ctx, IpAddr::V4(IMDS_V4), Some(*protocol as u8))?;
        in_pod(ctx, || stream_connect_v4(*protocol, IMDS_V4))?;
        std::thread::sleep(SETTLE);
        ensure!(tap.count() >= 1, "without the guard, a {name} connect from a pod sent nothing to the node");
    }
    ctx.default_agent()?;
    for (name, protocol) in protocols {
        let mut tap = FrameTap::open(ctx, IpAddr::V4(IMDS_V4), Some(protocol as u8))?;
        let errno = in_pod(ctx, || stream_connect_v4(protocol, IMDS_V4))?;
        std::thread::sleep(SETTLE);
        let frames = tap.count();
        ensure!(frames == 0, "{name} connect from a pod to {IMDS_V4}:80: {frames} frames reached the node");
        println!("     note: {name} connect from a pod to {IMDS_V4}:80: errno {errno} (0: left in progress)");
        // The backstop drops the handshake's first packet; SCTP and DCCP (5.10, 6.1)
        // do not report that to a non-blocking connect, which stays in progress and
        // never completes. What matters is that nothing arrived.
        ensure!(
            errno == libc::EPERM || errno == 0,
            "{name} connect from a pod to {IMDS_V4}:80: expected EPERM or a connect left in progress, got errno {errno}"
        );
    }
    Ok(())
}

/// The socket type of a connection-oriented `protocol`: DCCP has a type of its own
/// (`socket(AF_INET, SOCK_STREAM, IPPROTO_DCCP)` is refused even where DCCP is there).
fn stream_type(protocol: i32) -> i32 {
    if protocol == IPPROTO_DCCP {
        libc::SOCK_DCCP
    } else {
        libc::SOCK_STREAM
    }
}

fn supported(protocol: i32) -> bool {
    // SAFETY: plain socket(2), closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, stream_type(protocol), protocol) };
    if fd < 0 {
        return false;
    }
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    true
}

/// Runs `f` in a forked child that joined pod 0's network namespace and cgroup; its
/// errno (0: success). The child makes only system calls: no allocation after fork.
fn in_pod(ctx: &Ctx, f: impl Fn() -> i32) -> Result<i32> {
    let pod = &ctx.node.pods[0];
    fork_in(&pod.net.ns.path(), &pod.cgroup.path().join("cgroup.procs"), f)
}

/// The same from the node's (the host's) namespace, in pod 0's cgroup.
fn in_host(ctx: &Ctx, f: impl Fn() -> i32) -> Result<i32> {
    fork_in(&ctx.node.node_netns(), &ctx.node.pods[0].cgroup.path().join("cgroup.procs"), f)
}

fn fork_in(netns: &std::path::Path, procs: &std::path::Path, f: impl Fn() -> i32) -> Result<i32> {
    let netns = CString::new(netns.as_os_str().as_encoded_bytes())?;
    let procs = CString::new(procs.as_os_str().as_encoded_bytes())?;
    // SAFETY: the child only makes system calls on data prepared before the fork and
    // leaves with _exit.
    unsafe {
        let pid = libc::fork();
        ensure!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let ns = libc::open(netns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            let cg = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if ns < 0
                || cg < 0
                || libc::setns(ns, libc::CLONE_NEWNET) != 0
                || libc::write(cg, b"0".as_ptr().cast(), 1) != 1
            {
                libc::_exit(255);
            }
            libc::_exit(f());
        }
        let mut status = 0;
        ensure!(libc::waitpid(pid, &mut status, 0) == pid, "waitpid failed");
        ensure!(libc::WIFEXITED(status), "the pod child died: status {status}");
        let code = libc::WEXITSTATUS(status);
        ensure!(code != 255, "the pod child could not join the pod's namespace and cgroup");
        Ok(code)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn raw_send_v6(packet: &[u8]) -> i32 {
    // SAFETY: system calls on a local buffer and sockaddr (in the forked child).
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW);
        if fd < 0 {
            return errno();
        }
        let mut to: libc::sockaddr_in6 = std::mem::zeroed();
        to.sin6_family = libc::AF_INET6 as u16;
        to.sin6_addr.s6_addr = IMDS_V6.octets();
        let n =
            libc::sendto(fd, packet.as_ptr().cast(), packet.len(), 0, (&to as *const libc::sockaddr_in6).cast(), 28);
        if n < 0 {
            errno()
        } else {
            0
        }
    }
}

fn sockaddr_v4(dest: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(dest).to_be() },
        sin_zero: [0; 8],
    }
}

fn datagram_v4(protocol: i32, dest: Ipv4Addr, connected: bool) -> i32 {
    let to = sockaddr_v4(dest, BLOCKED_PORT);
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: system calls on local buffers (in the forked child).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, protocol);
        if fd < 0 {
            return errno();
        }
        let msg = b"metadata?";
        let n = if connected {
            if libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len) != 0 {
                return errno();
            }
            libc::send(fd, msg.as_ptr().cast(), msg.len(), 0)
        } else {
            libc::sendto(fd, msg.as_ptr().cast(), msg.len(), 0, (&to as *const libc::sockaddr_in).cast(), len)
        };
        if n < 0 {
            errno()
        } else {
            0
        }
    }
}

fn connect_only_v4(protocol: i32, dest: Ipv4Addr) -> i32 {
    let to = sockaddr_v4(dest, BLOCKED_PORT);
    // SAFETY: system calls on local data (in the forked child).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, protocol);
        if fd < 0 {
            return errno();
        }
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        if libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len) != 0 {
            return errno();
        }
        0
    }
}

fn stream_connect_v4(protocol: i32, dest: Ipv4Addr) -> i32 {
    let to = sockaddr_v4(dest, BLOCKED_PORT);
    // SAFETY: system calls on local data (in the forked child).
    unsafe {
        let fd = libc::socket(libc::AF_INET, stream_type(protocol) | libc::SOCK_NONBLOCK, protocol);
        if fd < 0 {
            return errno();
        }
        if libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as u32)
            == 0
        {
            return 0;
        }
        let e = errno();
        if e == libc::EINPROGRESS {
            // Give the handshake's first packet time to leave before the child exits.
            libc::usleep(100_000);
            return 0;
        }
        e
    }
}
