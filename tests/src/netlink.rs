//! Just enough rtnetlink to wire up a simulated node: veth pairs, links up,
//! addresses and default routes.
//!
//! Hand-written messages rather than `ip(8)`, so the same binary works in a bare
//! initramfs. A route socket acts on the namespace it was created in, so
//! [`Netlink::open_in`] is how to configure another namespace.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use anyhow::{anyhow, Context, Result};

use crate::netns::NetNs;

// Not (all) in the libc crate; values from the kernel's uapi headers.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_EXT_ACK: libc::c_int = 11;
const VETH_INFO_PEER: u16 = 1;
const IFA_F_NODAD: u8 = 0x02;

/// A NETLINK_ROUTE socket bound to one network namespace.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink> {
        // SAFETY: plain socket(2); the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("could not open a NETLINK_ROUTE socket");
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel's own words ("Invalid prefix for given prefix length") make
        // far better errors than a bare errno. Kernels without it ignore nothing
        // we depend on, so failing to enable it is fine.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to a c_int and its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_EXT_ACK,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(Netlink { fd, seq: 0 })
    }

    /// Opens a socket inside `ns`.
    pub fn open_in(ns: &NetNs) -> Result<Netlink> {
        ns.run(Netlink::open).with_context(|| format!("in network namespace {}", ns.name()))
    }

    /// The index of the link called `name`.
    pub fn link_index(&mut self, name: &str) -> Result<u32> {
        let mut msg = Message::new(libc::RTM_GETLINK, 0);
        msg.push(&ifinfomsg(0, 0, 0));
        msg.attr_str(libc::IFLA_IFNAME, name);
        let replies = self.request(msg).with_context(|| format!("could not look up link {name}"))?;
        let reply = replies.first().with_context(|| format!("the kernel sent no link for {name}"))?;
        // ifinfomsg: family u8, pad u8, type u16, then the index.
        let index = reply.get(NLMSG_HDRLEN + 4..NLMSG_HDRLEN + 8).context("truncated RTM_NEWLINK reply")?;
        Ok(i32::from_ne_bytes(index.try_into().unwrap()) as u32)
    }

    pub fn set_link_up(&mut self, index: u32) -> Result<()> {
        let up = libc::IFF_UP as u32;
        let mut msg = Message::new(libc::RTM_NEWLINK, 0);
        msg.push(&ifinfomsg(index, up, up));
        self.request(msg).with_context(|| format!("could not bring link {index} up"))?;
        Ok(())
    }

    /// Creates a veth pair: `name` here, `peer` inside `peer_ns`.
    pub fn add_veth(&mut self, name: &str, peer: &str, peer_ns: BorrowedFd<'_>) -> Result<()> {
        let mut msg = Message::new(libc::RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        msg.push(&ifinfomsg(0, 0, 0));
        msg.attr_str(libc::IFLA_IFNAME, name);
        msg.nested(libc::IFLA_LINKINFO, |m| {
            m.attr(libc::IFLA_INFO_KIND, b"veth");
            m.nested(libc::IFLA_INFO_DATA, |m| {
                m.nested(VETH_INFO_PEER, |m| {
                    m.push(&ifinfomsg(0, 0, 0));
                    m.attr_str(libc::IFLA_IFNAME, peer);
                    m.attr(libc::IFLA_NET_NS_FD, &(peer_ns.as_raw_fd() as u32).to_ne_bytes());
                });
            });
        });
        self.request(msg).with_context(|| format!("could not create veth pair {name}/{peer}"))?;
        Ok(())
    }

    /// Adds `addr/prefix_len` to a link. IPv6 addresses skip duplicate address
    /// detection, so they are usable at once instead of after a second or two.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let (family, flags) = match addr {
            IpAddr::V4(_) => (libc::AF_INET, 0),
            IpAddr::V6(_) => (libc::AF_INET6, IFA_F_NODAD),
        };
        let mut msg = Message::new(libc::RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
        // ifaddrmsg: family, prefixlen, flags, scope (universe), index.
        msg.push(&[family as u8, prefix_len, flags, 0]);
        msg.push(&index.to_ne_bytes());
        msg.attr(libc::IFA_LOCAL, &ip_bytes(addr));
        msg.attr(libc::IFA_ADDRESS, &ip_bytes(addr));
        self.request(msg).with_context(|| format!("could not add address {addr}/{prefix_len} to link {index}"))?;
        Ok(())
    }

    /// Adds a default route (for the gateway's family) via `gateway` on link `index`.
    pub fn add_default_route(&mut self, gateway: IpAddr, index: u32) -> Result<()> {
        let family = match gateway {
            IpAddr::V4(_) => libc::AF_INET,
            IpAddr::V6(_) => libc::AF_INET6,
        };
        let mut msg = Message::new(libc::RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        msg.push(&[
            family as u8,
            0,
            0,
            0,
            libc::RT_TABLE_MAIN,
            libc::RTPROT_BOOT,
            libc::RT_SCOPE_UNIVERSE,
            libc::RTN_UNICAST,
        ]);
        msg.push(&0u32.to_ne_bytes());
        msg.attr(libc::RTA_GATEWAY, &ip_bytes(gateway));
        msg.attr(libc::RTA_OIF, &index.to_ne_bytes());
        self.request(msg).with_context(|| format!("could not add a default route via {gateway} on link {index}"))?;
        Ok(())
    }

    /// Adds a route to `dest/prefix_len` via `gateway` on link `index`.
    pub fn add_route(&mut self, dest: IpAddr, prefix_len: u8, gateway: IpAddr, index: u32) -> Result<()> {
        let family = if dest.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let mut msg = Message::new(libc::RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL);
        msg.push(&[
            family as u8,
            prefix_len,
            0,
            0,
            libc::RT_TABLE_MAIN,
            libc::RTPROT_BOOT,
            libc::RT_SCOPE_UNIVERSE,
            libc::RTN_UNICAST,
        ]);
        msg.push(&0u32.to_ne_bytes());
        msg.attr(libc::RTA_DST, &ip_bytes(dest));
        msg.attr(libc::RTA_GATEWAY, &ip_bytes(gateway));
        msg.attr(libc::RTA_OIF, &index.to_ne_bytes());
        self.request(msg).with_context(|| format!("could not add a route to {dest}/{prefix_len} via {gateway}"))?;
        Ok(())
    }

    /// Sends one request and returns the replies that came before its ACK.
    fn request(&mut self, msg: Message) -> Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let buf = msg.finish(seq);
        // SAFETY: buf is a valid, initialised buffer of buf.len() bytes; with no
        // address, send(2) goes to the kernel a netlink socket is connected to.
        if unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) } < 0 {
            return Err(io::Error::last_os_error()).context("could not send a netlink request");
        }
        let mut replies = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: rx is a writable buffer of rx.len() bytes.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), rx.as_mut_ptr().cast(), rx.len(), 0) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err).context("could not read the netlink answer");
            }
            let mut data = &rx[..n as usize];
            while data.len() >= NLMSG_HDRLEN {
                let len = (u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize).clamp(NLMSG_HDRLEN, data.len());
                let (this, rest) = data.split_at(len);
                data = rest.get(align(len) - len..).unwrap_or_default();
                let kind = u16::from_ne_bytes(this[4..6].try_into().unwrap());
                let flags = u16::from_ne_bytes(this[6..8].try_into().unwrap());
                if u32::from_ne_bytes(this[8..12].try_into().unwrap()) != seq {
                    continue;
                }
                if kind != NLMSG_ERROR {
                    replies.push(this.to_vec());
                    continue;
                }
                let errno = this.get(16..20).map_or(-libc::EPROTO, |e| i32::from_ne_bytes(e.try_into().unwrap()));
                if errno == 0 {
                    return Ok(replies);
                }
                let err = io::Error::from_raw_os_error(-errno);
                return Err(match ext_ack_message(this, flags) {
                    Some(text) => anyhow!("{err} (kernel: {text})"),
                    None => anyhow!(err),
                });
            }
        }
    }
}

impl AsFd for Netlink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The text an extended ACK carries after the error code and the echoed request.
fn ext_ack_message(msg: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32::from_ne_bytes(msg.get(20..24)?.try_into().ok()?) as usize
    };
    let mut attrs = msg.get(NLMSG_HDRLEN + 4 + align(echoed)..)?;
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes(attrs[0..2].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(attrs[2..4].try_into().ok()?);
        let payload = attrs.get(4..len)?;
        if kind == NLMSGERR_ATTR_MSG {
            let text = payload.split(|&b| b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        attrs = attrs.get(align(len)..)?;
    }
    None
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    // family (AF_UNSPEC), pad, type, index, flags, change.
    let mut m = [0u8; 16];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A request under construction: header, fixed part, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16) -> Message {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Message { buf }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align(self.buf.len()), 0);
    }

    fn attr(&mut self, kind: u16, payload: &[u8]) {
        self.buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.push(payload);
    }

    fn attr_str(&mut self, kind: u16, s: &str) {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes);
    }

    fn nested(&mut self, kind: u16, fill: impl FnOnce(&mut Message)) {
        let start = self.buf.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        fill(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}
