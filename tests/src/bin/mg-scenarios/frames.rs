// SPDX-License-Identifier: Apache-2.0
//! What the protocol scenarios send and count: hand-made IPv6 packets, and taps in
//! the node that count frames on a pod's veth and datagrams of any protocol.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};

use crate::harness::Ctx;

const IPPROTO_UDP: u8 = 17;

/// A UDP datagram (header with a valid checksum, then `payload`).
pub(crate) fn udp(src: Ipv6Addr, dst: Ipv6Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut d = Vec::new();
    d.extend_from_slice(&40000u16.to_be_bytes());
    d.extend_from_slice(&port.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&d);
    let sum = !fold(&pseudo);
    d[6..8].copy_from_slice(&(if sum == 0 { 0xffff } else { sum }).to_be_bytes());
    d
}

fn fold(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv6 packet: fixed header (next header `next`), one extension header, payload.
pub(crate) fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr, next: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((ext.len() + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(ext);
    p.extend_from_slice(payload);
    p
}

/// Counts frames arriving on the node end of pod 0's veth for one destination (and
/// one protocol, or IPv6 first next header): what reached the node, before anything there judged it.
pub(crate) struct FrameTap {
    fd: OwnedFd,
    dest: IpAddr,
    protocol: Option<u8>,
}

impl FrameTap {
    pub(crate) fn open(ctx: &Ctx, dest: IpAddr, protocol: Option<u8>) -> Result<FrameTap> {
        let link = CString::new(ctx.node.pods[0].net.node_side_link.as_str())?;
        let fd = ctx.node.sim.node().run(|| -> std::io::Result<OwnedFd> {
            // SAFETY: plain socket(2) and bind(2) on our own fd and sockaddr.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from((libc::ETH_P_ALL as u16).to_be()),
                );
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                addr.sll_ifindex = libc::if_nametoindex(link.as_ptr()) as i32;
                let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                if libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_ll).cast(), len) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(fd)
            }
        });
        Ok(FrameTap { fd: fd.context("could not open a packet tap on the pod's veth in the node")?, dest, protocol })
    }

    /// Incoming frames for the destination since the tap opened.
    pub(crate) fn count(&mut self) -> u64 {
        let mut seen = 0;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: valid fd, buffer and sockaddr of the stated sizes.
            let (n, from) = unsafe {
                let mut from: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                );
                (n, from)
            };
            if n <= 0 {
                return seen;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let p = &buf[..n as usize];
            let hit = match self.dest {
                IpAddr::V4(d) => {
                    p.len() >= 20
                        && p[0] >> 4 == 4
                        && p[16..20] == d.octets()
                        && self.protocol.is_none_or(|x| p[9] == x)
                }
                IpAddr::V6(d) => {
                    p.len() >= 40
                        && p[0] >> 4 == 6
                        && p[24..40] == d.octets()
                        && self.protocol.is_none_or(|x| p[6] == x)
                }
            };
            seen += u64::from(hit);
        }
    }
}

/// A socket of `protocol` on `port` of every address in the node namespace,
/// counting datagrams that arrive.
pub(crate) struct Listener {
    fd: OwnedFd,
}

impl Listener {
    pub(crate) fn open(ctx: &Ctx, protocol: i32, port: u16) -> Result<Listener> {
        let fd = ctx.node.sim.node().run(|| -> std::io::Result<OwnedFd> {
            let any = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(Ipv4Addr::UNSPECIFIED).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: socket(2) and bind(2) on our own fd and sockaddr.
            unsafe {
                let fd =
                    libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
                if libc::bind(fd.as_raw_fd(), (&any as *const libc::sockaddr_in).cast(), len) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(fd)
            }
        });
        Ok(Listener { fd: fd.with_context(|| format!("could not open a protocol-{protocol} listener in the node"))? })
    }

    /// Datagrams received since the last call.
    pub(crate) fn count(&mut self) -> u64 {
        let mut buf = [0u8; 2048];
        let mut n = 0;
        // SAFETY: valid fd and buffer.
        while unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } >= 0 {
            n += 1;
        }
        n
    }
}
