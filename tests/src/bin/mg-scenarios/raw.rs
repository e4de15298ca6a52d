// SPDX-License-Identifier: Apache-2.0
//! Ways around the socket hooks that a hostile pod would try: raw packets and TCP Fast
//! Open. Each returns the send's own result; arrival is judged at the stand-in.

use std::{
    io,
    net::SocketAddr,
    os::fd::{FromRawFd, OwnedFd},
};

use crate::attempt::sendto;

fn socket(family: i32, ty: i32, protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn family(to: &SocketAddr) -> i32 {
    if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

/// Raw sockets of other protocols take the port field as zero.
fn without_port(to: &SocketAddr) -> SocketAddr {
    SocketAddr::new(to.ip(), 0)
}

/// Internet checksum; the kernel fills it for ICMPv6 but not for ICMP.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(crate) fn icmp_echo(to: &SocketAddr) -> io::Result<()> {
    let (proto, ty) = if to.is_ipv4() { (libc::IPPROTO_ICMP, 8u8) } else { (libc::IPPROTO_ICMPV6, 128u8) };
    let sock = socket(family(to), libc::SOCK_RAW, proto)?;
    let mut packet = vec![ty, 0, 0, 0, 0x12, 0x34, 0, 1];
    packet.extend_from_slice(b"metadata?");
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    sendto(&sock, &packet, &without_port(to))
}

pub(crate) fn tcp_syn(to: &SocketAddr) -> io::Result<()> {
    let sock = socket(family(to), libc::SOCK_RAW, libc::IPPROTO_TCP)?;
    let mut header = [0u8; 20];
    header[0..2].copy_from_slice(&40000u16.to_be_bytes());
    header[2..4].copy_from_slice(&to.port().to_be_bytes());
    header[4..8].copy_from_slice(&1u32.to_be_bytes());
    header[12] = 5 << 4; // data offset: 5 words
    header[13] = 0x02; // SYN
    header[14..16].copy_from_slice(&1024u16.to_be_bytes());
    sendto(&sock, &header, &without_port(to))
}

/// Option kinds (RFC 791): no-operation, loose source route; the route's length
/// with one address, and the pointer to its first address.
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 131;
const LSRR_ONE_HOP_LEN: u8 = 7;
const LSRR_TWO_HOPS_LEN: u8 = 11;
/// Record route with room for one address, and the end of the option list.
const IPOPT_RR: u8 = 7;
const RR_ONE_SLOT_LEN: u8 = 7;
const IPOPT_END: u8 = 0;
/// An IPv4 header with one word of no-operation and a one-hop route: 28 bytes.
const HDRINCL_HEADER_LEN: usize = 28;
const IPV4_FIXED_HEADER_LEN: usize = 20;
const IPV4_WORD: usize = 4;
const IP_DEFAULT_TTL: u8 = 64;
const SOURCE_ROUTE_FIRST_POINTER: u8 = 4;

/// The SYN of [`tcp_syn`] to `to`, through `via` by a loose source route set with
/// `IP_OPTIONS` (what a pod with CAP_NET_RAW can do): the kernel addresses the packet
/// to `via` and names `to` in the route, so no destination test on `via` sees `to`.
pub(crate) fn tcp_syn_source_routed(to: &SocketAddr, via: Option<std::net::IpAddr>) -> io::Result<()> {
    let Some(std::net::IpAddr::V4(via)) = via else {
        return Err(io::Error::other("a loose source route needs an IPv4 first hop (`via`)"));
    };
    let sock = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP)?;
    // The first address given is the first hop; the kernel takes it out of the route.
    let mut options = vec![IPOPT_NOOP, IPOPT_LSRR, LSRR_ONE_HOP_LEN, SOURCE_ROUTE_FIRST_POINTER];
    options.extend_from_slice(&via.octets());
    // SAFETY: setsockopt on our own fd with a buffer and its length.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            options.as_ptr().cast(),
            options.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut header = [0u8; 20];
    header[0..2].copy_from_slice(&40002u16.to_be_bytes());
    header[2..4].copy_from_slice(&to.port().to_be_bytes());
    header[4..8].copy_from_slice(&1u32.to_be_bytes());
    header[12] = 5 << 4;
    header[13] = 0x02;
    header[14..16].copy_from_slice(&1024u16.to_be_bytes());
    sendto(&sock, &header, &without_port(to))
}

/// The SYN of [`tcp_syn`] to `via` in a whole IPv4 header the pod writes itself
/// (`IPPROTO_RAW`, which implies `IP_HDRINCL`), whose loose source route names `to`:
/// the kernel checks nothing of the options it is handed.
/// `padding` more no-operation words come before the route.
pub(crate) fn tcp_syn_hdrincl_source_routed(
    to: &SocketAddr,
    via: Option<std::net::IpAddr>,
    padding: usize,
) -> io::Result<()> {
    let (Some(std::net::IpAddr::V4(via)), std::net::IpAddr::V4(hop)) = (via, to.ip()) else {
        return Err(io::Error::other("a loose source route needs IPv4 addresses (`via`, `dest`)"));
    };
    let sock = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let header_len = HDRINCL_HEADER_LEN + padding * IPV4_WORD;
    let mut packet = vec![0u8; IPV4_FIXED_HEADER_LEN];
    packet[0] = (4 << 4) | (header_len / IPV4_WORD) as u8; // version 4, ihl in words
    packet[8] = IP_DEFAULT_TTL;
    packet[9] = libc::IPPROTO_TCP as u8;
    // Total length, id, checksum and a zero source are filled in by the kernel.
    packet[16..20].copy_from_slice(&via.octets());
    packet.extend(std::iter::repeat_n(IPOPT_NOOP, padding * IPV4_WORD));
    packet.extend_from_slice(&[IPOPT_NOOP, IPOPT_LSRR, LSRR_ONE_HOP_LEN, SOURCE_ROUTE_FIRST_POINTER]);
    packet.extend_from_slice(&hop.octets());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40003u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    packet.extend_from_slice(&tcp);
    sendto(&sock, &packet, &SocketAddr::new(std::net::IpAddr::V4(via), 0))
}

/// A datagram from an ordinary (unprivileged) UDP socket whose `IP_OPTIONS` route it
/// through `via`, then `to`, to `final_hop`: the socket hooks see only `final_hop`,
/// the packet is addressed to `via`.
pub(crate) fn udp_source_routed(
    to: &SocketAddr,
    via: Option<std::net::IpAddr>,
    final_hop: Option<std::net::IpAddr>,
) -> io::Result<()> {
    let (Some(std::net::IpAddr::V4(via)), Some(final_hop), std::net::IpAddr::V4(hop)) = (via, final_hop, to.ip())
    else {
        return Err(io::Error::other("a loose source route needs IPv4 addresses (`via`, `dest`, `final_hop`)"));
    };
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let mut options = vec![IPOPT_NOOP, IPOPT_LSRR, LSRR_TWO_HOPS_LEN, SOURCE_ROUTE_FIRST_POINTER];
    options.extend_from_slice(&via.octets());
    options.extend_from_slice(&hop.octets());
    set_ip_options(&sock, &options)?;
    sendto(&sock, b"metadata?", &SocketAddr::new(final_hop, to.port()))
}

/// A datagram from an ordinary UDP socket recording its route (`IP_OPTIONS` record
/// route, one slot): options that are no source route.
pub(crate) fn udp_record_route(to: &SocketAddr) -> io::Result<()> {
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    let options = [IPOPT_RR, RR_ONE_SLOT_LEN, SOURCE_ROUTE_FIRST_POINTER, 0, 0, 0, 0, IPOPT_END];
    set_ip_options(&sock, &options)?;
    sendto(&sock, b"metadata?", to)
}

fn set_ip_options(sock: &OwnedFd, options: &[u8]) -> io::Result<()> {
    // SAFETY: setsockopt on our own fd with a buffer and its length.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(sock),
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            options.as_ptr().cast(),
            options.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn udp(to: &SocketAddr) -> io::Result<()> {
    let sock = socket(family(to), libc::SOCK_RAW, libc::IPPROTO_UDP)?;
    let payload = b"metadata?";
    let mut datagram = Vec::with_capacity(8 + payload.len());
    datagram.extend_from_slice(&40001u16.to_be_bytes());
    datagram.extend_from_slice(&to.port().to_be_bytes());
    datagram.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&[0, 0]); // no checksum (allowed for UDP over IPv4)
    datagram.extend_from_slice(payload);
    sendto(&sock, &datagram, &without_port(to))
}

pub(crate) fn fast_open(to: &SocketAddr) -> io::Result<()> {
    let sock = socket(family(to), libc::SOCK_STREAM, 0)?;
    let addr = nix::sys::socket::SockaddrStorage::from(*to);
    let request = b"GET / HTTP/1.0\r\n\r\n";
    // SAFETY: valid fd, buffer and address of the stated lengths.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            request.as_ptr().cast(),
            request.len(),
            libc::MSG_FASTOPEN,
            nix::sys::socket::SockaddrLike::as_ptr(&addr),
            nix::sys::socket::SockaddrLike::len(&addr),
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `Err(ENOSYS)`-like errors mean this kernel (or its sysctl) refuses io_uring.
pub(crate) fn io_uring_connect(to: &SocketAddr) -> io::Result<()> {
    use io_uring::{opcode, types, IoUring};
    let sock = socket(family(to), libc::SOCK_STREAM, 0)?;
    let addr = nix::sys::socket::SockaddrStorage::from(*to);
    let mut ring = IoUring::new(4)?;
    let connect = opcode::Connect::new(
        types::Fd(std::os::fd::AsRawFd::as_raw_fd(&sock)),
        nix::sys::socket::SockaddrLike::as_ptr(&addr),
        nix::sys::socket::SockaddrLike::len(&addr),
    )
    .build();
    // SAFETY: the socket and address outlive the submission, which we wait for.
    unsafe { ring.submission().push(&connect).map_err(io::Error::other)? };
    ring.submit_and_wait(1)?;
    let result = ring.completion().next().map(|c| c.result()).ok_or_else(|| io::Error::other("no completion"))?;
    if result < 0 {
        return Err(io::Error::from_raw_os_error(-result));
    }
    crate::attempt::request_on(std::net::TcpStream::from(sock))
}

/// Creates a TCP socket in `netns` and hands it over a unix socket pair with
/// SCM_RIGHTS, as a host process would pass one to a pod; returns the received fd.
pub(crate) fn handed_socket(netns: &std::path::Path, to: &SocketAddr) -> anyhow::Result<OwnedFd> {
    use anyhow::Context;
    use nix::sys::socket::{
        recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
        UnixAddr,
    };
    let own = std::fs::File::open("/proc/thread-self/ns/net")?;
    let ns = std::fs::File::open(netns).with_context(|| format!("could not open {}", netns.display()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let created = socket(family(to), libc::SOCK_STREAM, 0);
    nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let created = created.context("could not create the host socket")?;
    let (a, b) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)?;
    let fds = [std::os::fd::AsRawFd::as_raw_fd(&created)];
    sendmsg::<UnixAddr>(
        std::os::fd::AsRawFd::as_raw_fd(&a),
        &[io::IoSlice::new(b"fd")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    drop(created);
    let mut buf = [0u8; 2];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<UnixAddr>(std::os::fd::AsRawFd::as_raw_fd(&b), &mut iov, Some(&mut space), MsgFlags::empty())?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            if let Some(&fd) = received.first() {
                // SAFETY: the kernel just installed this fd for us.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    anyhow::bail!("no fd arrived over the unix socket")
}

pub(crate) fn connect_and_get(sock: OwnedFd, to: &SocketAddr) -> io::Result<()> {
    let addr = nix::sys::socket::SockaddrStorage::from(*to);
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&sock), &addr).map_err(io::Error::from)?;
    crate::attempt::request_on(std::net::TcpStream::from(sock))
}
