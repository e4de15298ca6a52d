// SPDX-License-Identifier: Apache-2.0
//! Whole Ethernet frames written with an `AF_PACKET` socket, as a pod with
//! `CAP_NET_RAW` can: they enter the node below any IP stack or socket hook of the
//! pod. Here: a TCP SYN (IPv4 or IPv6) with correct checksums, and a wait for the
//! SYN-ACK a user-space TCP would need to go on.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use metadata_guard_netfilter::{rtnl, NlSocket};

use crate::netns::NetNs;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ALL: u16 = 0x0003;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// Where a pod's frames go: its interface and the node end's MAC.
pub struct Wire {
    pub ifindex: u32,
    pub own_mac: [u8; 6],
    pub peer_mac: [u8; 6],
}

impl Wire {
    /// `eth0` of the pod namespace and the MAC of its peer, `node_link` in `node`.
    pub fn of(pod: &NetNs, node: &NetNs, node_link: &str) -> Result<Wire> {
        let find = |ns: &NetNs, name: &str| -> Result<rtnl::Link> {
            let mut s = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_ROUTE)?;
            rtnl::links(&mut s)?.into_iter().find(|l| l.name == name).with_context(|| format!("no link {name}"))
        };
        let eth0 = find(pod, "eth0")?;
        let peer = find(node, node_link)?;
        let mac = |v: &[u8]| -> Result<[u8; 6]> { v.try_into().context("not an Ethernet address") };
        Ok(Wire { ifindex: eth0.index, own_mac: mac(&eth0.address)?, peer_mac: mac(&peer.address)? })
    }
}

/// A frame carrying a TCP SYN from `src:sport` to `dst:dport`.
pub fn tcp_syn_frame(wire: &Wire, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    tcp_syn_frame_with_ip_options(wire, src, dst, sport, dport, &[])
}

/// The same, with `options` (a multiple of 4 bytes) in an IPv4 header: its first byte
/// is then not 0x45, the value the host side's fast test passes on.
pub fn tcp_syn_frame_with_ip_options(
    wire: &Wire,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    options: &[u8],
) -> Vec<u8> {
    let segment = Segment { sport, dport, seq: OWN_ISN, ack: 0, flags: TCP_SYN, payload: &[] };
    tcp_frame(wire, src, dst, &segment, options)
}

/// The first sequence number of every connection the tests' frames open.
const OWN_ISN: u32 = 0x1000_0000;

/// One TCP segment's fields.
struct Segment<'a> {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &'a [u8],
}

fn tcp_frame(wire: &Wire, src: IpAddr, dst: IpAddr, segment: &Segment<'_>, options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40, "IPv4 options come in words, at most 10");
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&segment.sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&segment.dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&segment.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&segment.ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = segment.flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(segment.payload);
    let tcp_len = tcp.len() as u16;
    let mut frame = Vec::new();
    frame.extend_from_slice(&wire.peer_mac);
    frame.extend_from_slice(&wire.own_mac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
            let header_len = 20 + options.len();
            let total = header_len as u16 + tcp_len;
            let mut ip = vec![0x40 | (header_len / 4) as u8, 0];
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, libc::IPPROTO_TCP as u8, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ip.extend_from_slice(options);
            let sum = checksum(&ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut pseudo = s.octets().to_vec();
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
            pseudo.extend_from_slice(&tcp_len.to_be_bytes());
            pseudo.extend_from_slice(&tcp);
            let sum = checksum(&pseudo);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            assert!(options.is_empty(), "IPv6 has extension headers, not options");
            frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&tcp_len.to_be_bytes());
            ip.extend_from_slice(&[libc::IPPROTO_TCP as u8, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let mut pseudo = s.octets().to_vec();
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&u32::from(tcp_len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, libc::IPPROTO_TCP as u8]);
            pseudo.extend_from_slice(&tcp);
            let sum = checksum(&pseudo);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        _ => panic!("source and destination of different families"),
    }
    frame.extend_from_slice(&tcp);
    frame
}

/// What a user-space TCP stack on AF_PACKET (gVisor's netstack; a Kata guest's
/// kernel behind a tap) does to fetch `dst`:`dport`: its own SYN, and on the server's
/// SYN-ACK the handshake's ACK carrying an HTTP request. Returns whether the SYN-ACK
/// came back within `wait` (the server then has a connection to accept). Run it
/// inside the pod, with the pod kernel's resets silenced.
pub fn user_space_request(
    wire: &Wire,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    wait: Duration,
) -> Result<bool> {
    let sock = PacketSocket::open(wire.ifindex).context("AF_PACKET socket in the pod")?;
    let syn = Segment { sport, dport, seq: OWN_ISN, ack: 0, flags: TCP_SYN, payload: &[] };
    match sock.send(&tcp_frame(wire, src, dst, &syn, &[])) {
        Ok(()) => {}
        Err(e) if dropped_in_send(&e) => return Ok(false),
        Err(e) => return Err(e).context("sending the SYN"),
    }
    let Some(server_isn) = sock.syn_ack_seq(sport, wait)? else { return Ok(false) };
    let request = b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n";
    let ack = Segment {
        sport,
        dport,
        seq: OWN_ISN.wrapping_add(1),
        ack: server_isn.wrapping_add(1),
        flags: TCP_ACK | TCP_PSH,
        payload: request,
    };
    sock.send(&tcp_frame(wire, src, dst, &ack, &[])).context("sending the ACK with the request")?;
    Ok(true)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Whether a frame's send failed because something on its way out dropped it within
/// the send itself: a tc program on the device it was written to, or on the lower
/// device of a macvlan/ipvlan child (`NET_XMIT_DROP` comes back as `ENOBUFS`).
pub fn dropped_in_send(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EPERM))
}

/// An `AF_PACKET` socket on the pod's interface; create it inside the pod namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl PacketSocket {
    pub fn open(ifindex: u32) -> io::Result<PacketSocket> {
        // SAFETY: plain socket(2); owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a valid sockaddr_ll.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd, ifindex })
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: valid fd, buffer and address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `wait` for a SYN-ACK to `sport`, as a user-space TCP would.
    pub fn syn_ack_to(&self, sport: u16, wait: Duration) -> Result<bool> {
        Ok(self.syn_ack_seq(sport, wait)?.is_some())
    }

    /// The same, answering the SYN-ACK's sequence number.
    pub fn syn_ack_seq(&self, sport: u16, wait: Duration) -> Result<Option<u32>> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    bail!("reading the packet socket failed: {e}");
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if let Some((flags, seq)) = tcp_to(&buf[..n as usize], sport) {
                if flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                    return Ok(Some(seq));
                }
            }
        }
        Ok(None)
    }
}

/// The TCP flags and sequence number of a frame whose destination port is `dport`.
fn tcp_to(frame: &[u8], dport: u16) -> Option<(u8, u32)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let tcp = match ethertype {
        ETH_P_IP if *frame.get(23)? == libc::IPPROTO_TCP as u8 => 14 + (*frame.get(14)? & 0x0f) as usize * 4,
        ETH_P_IPV6 if *frame.get(20)? == libc::IPPROTO_TCP as u8 => 14 + 40,
        _ => return None,
    };
    let seq = u32::from_be_bytes(frame.get(tcp + 4..tcp + 8)?.try_into().ok()?);
    (u16::from_be_bytes([*frame.get(tcp + 2)?, *frame.get(tcp + 3)?]) == dport)
        .then(|| Some((*frame.get(tcp + 13)?, seq)))?
}
