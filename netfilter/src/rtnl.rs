// SPDX-License-Identifier: Apache-2.0
//! The rtnetlink queries that tie a host interface to a pod: the host's links with
//! the namespace id of their peer (`IFLA_LINK_NETNSID`) and the device they are
//! enslaved to (a bridge), the id the host gives a process's network namespace
//! (`RTM_GETNSID`), and — read inside a pod's namespace — the addresses of its end.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{attr::AttrWriter, attr::Attrs, socket::NlSocket};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_GETNSID: u16 = 90;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINK_NETNSID: u16 = 37;
const NETNSA_NSID: u16 = 1;
const NETNSA_FD: u16 = 3;
const IFINFOMSG_LEN: usize = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const IFADDRMSG_LEN: usize = 8;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_TENTATIVE: u32 = 0x40;
const IFA_F_DADFAILED: u32 = 0x08;
/// `RT_SCOPE_UNIVERSE`: an address other hosts can reach (not link- or host-local).
const RT_SCOPE_UNIVERSE: u8 = 0;

/// A link of the namespace the socket lives in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// The hardware (MAC) address.
    pub address: Vec<u8>,
    /// For a veth (or another link with a peer in another namespace): the peer's
    /// index there and that namespace's id as seen from here.
    pub peer: Option<(u32, i32)>,
    /// The device this one is enslaved to (a bridge's port names its bridge).
    pub master: Option<u32>,
}

pub fn links(sock: &mut NlSocket) -> io::Result<Vec<Link>> {
    let body = vec![0u8; IFINFOMSG_LEN];
    let mut out = Vec::new();
    for r in sock.dump(RTM_GETLINK, &body)? {
        if r.kind != RTM_NEWLINK || r.body.len() < IFINFOMSG_LEN {
            continue;
        }
        let index = i32::from_ne_bytes(r.body[4..8].try_into().unwrap()) as u32;
        let attrs = Attrs::new(&r.body[IFINFOMSG_LEN..]);
        let name = attrs.find(IFLA_IFNAME).map(|a| a.str()).unwrap_or_default();
        let link = attrs.find(IFLA_LINK).and_then(|a| a.ne32());
        let nsid = attrs.find(IFLA_LINK_NETNSID).and_then(|a| a.ne32()).map(|v| v as i32);
        let peer = match (link, nsid) {
            (Some(l), Some(n)) if n >= 0 => Some((l, n)),
            _ => None,
        };
        let address = attrs.find(IFLA_ADDRESS).map(|a| a.value.to_vec()).unwrap_or_default();
        let master = attrs.find(IFLA_MASTER).and_then(|a| a.ne32()).filter(|m| *m != 0);
        out.push(Link { index, name, address, peer, master });
    }
    Ok(out)
}

/// The id the socket's namespace gives the network namespace open at `fd`; `None`
/// when it has none (no link connects the two, so no packet of it can come from a link).
pub fn nsid_of_fd(sock: &mut NlSocket, fd: u32) -> io::Result<Option<i32>> {
    let mut w = AttrWriter::new();
    w.ne32(NETNSA_FD, fd);
    let mut body = vec![0u8; 4]; // struct rtgenmsg, padded
    body.extend_from_slice(&w.buf);
    let reply = sock.query(RTM_GETNSID, &body)?;
    let nsid =
        Attrs::new(reply.body.get(4..).unwrap_or_default()).find(NETNSA_NSID).and_then(|a| a.ne32()).map(|v| v as i32);
    Ok(nsid.filter(|n| *n >= 0))
}

/// The global-scope addresses (IPv4 and IPv6) of interface `index` of the socket's
/// namespace, leaving out IPv6 addresses still in (or failed) duplicate detection:
/// the addresses its packets may carry as their source.
pub fn global_addresses(sock: &mut NlSocket, index: u32) -> io::Result<Vec<IpAddr>> {
    let body = vec![0u8; IFADDRMSG_LEN]; // struct ifaddrmsg, family AF_UNSPEC: both
    let mut out = Vec::new();
    for r in sock.dump(RTM_GETADDR, &body)? {
        if r.kind != RTM_NEWADDR || r.body.len() < IFADDRMSG_LEN {
            continue;
        }
        let (family, flags, scope) = (r.body[0], r.body[2], r.body[3]);
        let ifindex = u32::from_ne_bytes(r.body[4..8].try_into().unwrap());
        if ifindex != index || scope != RT_SCOPE_UNIVERSE {
            continue;
        }
        let attrs = Attrs::new(&r.body[IFADDRMSG_LEN..]);
        let flags = attrs.find(IFA_FLAGS).and_then(|a| a.ne32()).unwrap_or(u32::from(flags));
        if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED) != 0 {
            continue;
        }
        // IFA_LOCAL is the interface's own address where a peer address differs.
        let Some(value) = attrs.find(IFA_LOCAL).or_else(|| attrs.find(IFA_ADDRESS)).map(|a| a.value.to_vec()) else {
            continue;
        };
        let addr = match (i32::from(family), value.len()) {
            (libc::AF_INET, 4) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value.as_slice()).unwrap())),
            (libc::AF_INET6, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(value.as_slice()).unwrap())),
            _ => continue,
        };
        out.push(addr);
    }
    Ok(out)
}
