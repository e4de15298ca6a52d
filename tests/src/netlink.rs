// SPDX-License-Identifier: Apache-2.0
//! Just enough rtnetlink to wire up a simulated node: veth pairs, links up,
//! addresses and routes. The socket and the attribute encoding are the workspace's
//! own (`metadata-guard-netfilter`); the messages here are the tests' alone.
//!
//! Hand-written messages rather than `ip(8)`, so the same binary works in a bare
//! initramfs. A route socket acts on the namespace it was created in, so
//! [`Netlink::open_in`] is how to configure another namespace.

use std::{
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    socket::{Message, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE},
    AttrWriter, NlSocket,
};

use crate::netns::NetNs;

// Not (all) in the libc crate; values from the kernel's uapi headers.
const VETH_INFO_PEER: u16 = 1;
const IFA_F_NODAD: u8 = 0x02;
const IFINFOMSG_LEN: usize = 16;
const IFLA_MACVLAN_MODE: u16 = 1;
const MACVLAN_MODE_BRIDGE: u32 = 4;
const IFLA_IPVLAN_MODE: u16 = 1;
const IPVLAN_MODE_L2: u16 = 0;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;

/// A device whose frames leave through its lower device.
#[derive(Clone, Copy, Debug)]
pub enum LowerChild {
    Macvlan,
    Ipvlan,
}

/// A NETLINK_ROUTE socket bound to one network namespace.
pub struct Netlink {
    sock: NlSocket,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink> {
        let sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a NETLINK_ROUTE socket")?;
        Ok(Netlink { sock })
    }

    /// Opens a socket inside `ns`.
    pub fn open_in(ns: &NetNs) -> Result<Netlink> {
        ns.run(Netlink::open).with_context(|| format!("in network namespace {}", ns.name()))
    }

    /// The index of the link called `name`.
    pub fn link_index(&mut self, name: &str) -> Result<u32> {
        let mut body = ifinfomsg(0, 0, 0).to_vec();
        body.extend_from_slice(&AttrWriter::new().str(libc::IFLA_IFNAME, name).buf);
        let reply =
            self.sock.query(libc::RTM_GETLINK, &body).with_context(|| format!("could not look up link {name}"))?;
        // ifinfomsg: family u8, pad u8, type u16, then the index.
        let index = reply.body.get(4..8).context("truncated RTM_NEWLINK reply")?;
        Ok(i32::from_ne_bytes(index.try_into().unwrap()) as u32)
    }

    pub fn set_link_up(&mut self, index: u32) -> Result<()> {
        let up = libc::IFF_UP as u32;
        self.request(libc::RTM_NEWLINK, 0, ifinfomsg(index, up, up).to_vec())
            .with_context(|| format!("could not bring link {index} up"))
    }

    /// Creates a veth pair: `name` here, `peer` inside `peer_ns`.
    pub fn add_veth(&mut self, name: &str, peer: &str, peer_ns: BorrowedFd<'_>) -> Result<()> {
        let mut w = AttrWriter::new();
        w.str(libc::IFLA_IFNAME, name).nest(libc::IFLA_LINKINFO, |w| {
            w.bytes(libc::IFLA_INFO_KIND, b"veth").nest(libc::IFLA_INFO_DATA, |w| {
                w.nest(VETH_INFO_PEER, |w| {
                    w.buf.extend_from_slice(&ifinfomsg(0, 0, 0));
                    w.str(libc::IFLA_IFNAME, peer).ne32(libc::IFLA_NET_NS_FD, peer_ns.as_raw_fd() as u32);
                });
            });
        });
        let mut body = ifinfomsg(0, 0, 0).to_vec();
        body.extend_from_slice(&w.buf);
        self.request(libc::RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
            .with_context(|| format!("could not create veth pair {name}/{peer}"))
    }

    /// Creates a bridge (no STP: ports forward as soon as they are up).
    pub fn add_bridge(&mut self, name: &str) -> Result<()> {
        let mut w = AttrWriter::new();
        w.str(libc::IFLA_IFNAME, name).nest(libc::IFLA_LINKINFO, |w| {
            w.bytes(libc::IFLA_INFO_KIND, b"bridge");
        });
        let mut body = ifinfomsg(0, 0, 0).to_vec();
        body.extend_from_slice(&w.buf);
        self.request(libc::RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
            .with_context(|| format!("could not create bridge {name} (is the bridge module there?)"))
    }

    /// Enslaves link `index` to `master` (a bridge port).
    pub fn set_master(&mut self, index: u32, master: u32) -> Result<()> {
        let mut body = ifinfomsg(index, 0, 0).to_vec();
        body.extend_from_slice(&AttrWriter::new().ne32(libc::IFLA_MASTER, master).buf);
        self.request(libc::RTM_NEWLINK, 0, body)
            .with_context(|| format!("could not make link {index} a port of {master}"))
    }

    /// Creates a child of `lower` (`kind`: "macvlan" in bridge mode, or "ipvlan" in L2
    /// mode) called `name` inside `ns`: a pod whose frames leave through `lower`.
    pub fn add_lower_child(&mut self, kind: LowerChild, name: &str, lower: u32, ns: BorrowedFd<'_>) -> Result<()> {
        let mut w = AttrWriter::new();
        w.str(libc::IFLA_IFNAME, name).ne32(libc::IFLA_LINK, lower).ne32(libc::IFLA_NET_NS_FD, ns.as_raw_fd() as u32);
        w.nest(libc::IFLA_LINKINFO, |w| match kind {
            LowerChild::Macvlan => {
                w.bytes(libc::IFLA_INFO_KIND, b"macvlan").nest(libc::IFLA_INFO_DATA, |w| {
                    w.ne32(IFLA_MACVLAN_MODE, MACVLAN_MODE_BRIDGE);
                });
            }
            LowerChild::Ipvlan => {
                w.bytes(libc::IFLA_INFO_KIND, b"ipvlan").nest(libc::IFLA_INFO_DATA, |w| {
                    w.bytes(IFLA_IPVLAN_MODE, &IPVLAN_MODE_L2.to_ne_bytes());
                });
            }
        });
        let mut body = ifinfomsg(0, 0, 0).to_vec();
        body.extend_from_slice(&w.buf);
        self.request(libc::RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
            .with_context(|| format!("could not create {kind:?} {name} on link {lower}"))
    }

    /// Adds a permanent neighbour entry: `addr` is at `mac` on link `index`.
    pub fn add_neighbour(&mut self, index: u32, addr: IpAddr, mac: [u8; 6]) -> Result<()> {
        let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // ndmsg: family, pads, ifindex, state, flags, type.
        let mut body = vec![family as u8, 0, 0, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&NUD_PERMANENT.to_ne_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&AttrWriter::new().bytes(NDA_DST, &ip_bytes(addr)).bytes(NDA_LLADDR, &mac).buf);
        self.request(libc::RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)
            .with_context(|| format!("could not add neighbour {addr} on link {index}"))
    }

    /// Points the route to `dest/prefix_len` at `gateway` on link `index`, whatever it was.
    pub fn replace_route(&mut self, dest: IpAddr, prefix_len: u8, gateway: IpAddr, index: u32) -> Result<()> {
        let mut body = rtmsg(dest, prefix_len);
        let mut w = AttrWriter::new();
        w.bytes(libc::RTA_DST, &ip_bytes(dest)).bytes(libc::RTA_GATEWAY, &ip_bytes(gateway)).ne32(libc::RTA_OIF, index);
        body.extend_from_slice(&w.buf);
        self.request(libc::RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
            .with_context(|| format!("could not route {dest}/{prefix_len} via {gateway}"))
    }

    pub fn delete_link(&mut self, index: u32) -> Result<()> {
        self.request(libc::RTM_DELLINK, 0, ifinfomsg(index, 0, 0).to_vec())
            .with_context(|| format!("could not delete link {index}"))
    }

    pub fn delete_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        let mut body = vec![family as u8, prefix_len, 0, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(
            &AttrWriter::new().bytes(libc::IFA_LOCAL, &ip_bytes(addr)).bytes(libc::IFA_ADDRESS, &ip_bytes(addr)).buf,
        );
        self.request(libc::RTM_DELADDR, 0, body)
            .with_context(|| format!("could not delete address {addr}/{prefix_len} from link {index}"))
    }

    /// Adds `addr/prefix_len` to a link. IPv6 addresses skip duplicate address
    /// detection, so they are usable at once instead of after a second or two.
    pub fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> Result<()> {
        let (family, flags) = match addr {
            IpAddr::V4(_) => (libc::AF_INET, 0),
            IpAddr::V6(_) => (libc::AF_INET6, IFA_F_NODAD),
        };
        // ifaddrmsg: family, prefixlen, flags, scope (universe), index.
        let mut body = vec![family as u8, prefix_len, flags, 0];
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(
            &AttrWriter::new().bytes(libc::IFA_LOCAL, &ip_bytes(addr)).bytes(libc::IFA_ADDRESS, &ip_bytes(addr)).buf,
        );
        self.request(libc::RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)
            .with_context(|| format!("could not add address {addr}/{prefix_len} to link {index}"))
    }

    /// Adds a default route (for the gateway's family) via `gateway` on link `index`.
    pub fn add_default_route(&mut self, gateway: IpAddr, index: u32) -> Result<()> {
        let mut body = rtmsg(gateway, 0);
        body.extend_from_slice(
            &AttrWriter::new().bytes(libc::RTA_GATEWAY, &ip_bytes(gateway)).ne32(libc::RTA_OIF, index).buf,
        );
        self.request(libc::RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
            .with_context(|| format!("could not add a default route via {gateway} on link {index}"))
    }

    /// Adds a route to `dest/prefix_len` via `gateway` on link `index`.
    pub fn add_route(&mut self, dest: IpAddr, prefix_len: u8, gateway: IpAddr, index: u32) -> Result<()> {
        let mut body = rtmsg(dest, prefix_len);
        let mut w = AttrWriter::new();
        w.bytes(libc::RTA_DST, &ip_bytes(dest)).bytes(libc::RTA_GATEWAY, &ip_bytes(gateway)).ne32(libc::RTA_OIF, index);
        body.extend_from_slice(&w.buf);
        self.request(libc::RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
            .with_context(|| format!("could not add a route to {dest}/{prefix_len} via {gateway}"))
    }

    /// Sends one acknowledged request.
    fn request(&mut self, kind: u16, flags: u16, body: Vec<u8>) -> Result<()> {
        Ok(self.sock.request(&[Message { kind, flags, body }], |_| true)?)
    }
}

impl AsFd for Netlink {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    // family (AF_UNSPEC), pad, type, index, flags, change.
    let mut m = [0u8; IFINFOMSG_LEN];
    m[4..8].copy_from_slice(&index.to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

/// rtmsg for a unicast route in the main table: family, dst_len, src_len, tos, table,
/// protocol, scope, type, flags.
fn rtmsg(family_of: IpAddr, dst_len: u8) -> Vec<u8> {
    let family = if family_of.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let mut m = vec![
        family as u8,
        dst_len,
        0,
        0,
        libc::RT_TABLE_MAIN,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_UNIVERSE,
        libc::RTN_UNICAST,
    ];
    m.extend_from_slice(&0u32.to_ne_bytes());
    m
}

fn ip_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}
