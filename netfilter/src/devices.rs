// SPDX-License-Identifier: Apache-2.0
//! The rtnetlink views the uplink guard needs: every link with its type, kind and
//! lower device, the routes (to find the devices that carry a blocked destination),
//! the tc filters on a device's egress hook, and a subscription to link and route
//! changes.

use std::{io, net::IpAddr};

use crate::{
    attr::Attrs,
    socket::{NetlinkError, NlSocket},
};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
/// `ETH_P_ALL`: the protocol aya (and `tc ... protocol all`) gives a filter.
const ETH_P_ALL: u16 = 0x0003;
const IFINFOMSG_LEN: usize = 16;
const RTMSG_LEN: usize = 12;
const TCMSG_LEN: usize = 20;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_LINK_NETNSID: u16 = 37;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
/// `struct rtnexthop`: len u16, flags u8, hops u8, ifindex i32.
const RTNEXTHOP_LEN: usize = 8;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS)`: the clsact qdisc's egress hook.
pub const TC_EGRESS_PARENT: u32 = 0xffff_fff3;
/// Multicast groups (`enum rtnetlink_groups`).
pub const RTNLGRP_LINK: u32 = 1;
pub const RTNLGRP_IPV4_ROUTE: u32 = 7;
pub const RTNLGRP_IPV6_ROUTE: u32 = 11;
/// `NETLINK_ADD_MEMBERSHIP` (linux/netlink.h).
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const SOL_NETLINK: libc::c_int = 270;

/// A link of the socket's namespace, as the uplink choice reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub index: u32,
    pub name: String,
    /// `ifi_type` (`ARPHRD_*`): 1 for Ethernet, 772 for loopback.
    pub hw_type: u16,
    /// `ifi_flags` (`IFF_*`).
    pub flags: u32,
    /// `IFLA_INFO_KIND`: "veth", "bond", "vlan", "macvlan", "ipvlan", "bridge", …;
    /// empty for a physical NIC.
    pub kind: String,
    /// `IFLA_LINK`: a VLAN's, macvlan's or ipvlan's lower device, or a veth's peer.
    pub link: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the namespace of `link` when it is another one.
    pub link_netnsid: Option<i32>,
    /// The device it is enslaved to (a bond's or a bridge's port).
    pub master: Option<u32>,
}

pub fn devices(sock: &mut NlSocket) -> io::Result<Vec<Device>> {
    let body = vec![0u8; IFINFOMSG_LEN];
    let replies = sock.dump(RTM_GETLINK, &body)?;
    Ok(replies.iter().filter(|r| r.kind == RTM_NEWLINK).filter_map(|r| parse_device(&r.body)).collect())
}

/// A `RTM_NEWLINK` body (dumped or announced).
pub fn parse_device(body: &[u8]) -> Option<Device> {
    if body.len() < IFINFOMSG_LEN {
        return None;
    }
    let hw_type = u16::from_ne_bytes(body[2..4].try_into().ok()?);
    let index = i32::from_ne_bytes(body[4..8].try_into().ok()?) as u32;
    let flags = u32::from_ne_bytes(body[8..12].try_into().ok()?);
    let attrs = Attrs::new(&body[IFINFOMSG_LEN..]);
    let kind = attrs
        .find(IFLA_LINKINFO)
        .and_then(|info| info.nested().find(IFLA_INFO_KIND))
        .map(|k| k.str())
        .unwrap_or_default();
    Some(Device {
        index,
        name: attrs.find(IFLA_IFNAME).map(|a| a.str()).unwrap_or_default(),
        hw_type,
        flags,
        kind,
        link: attrs.find(IFLA_LINK).and_then(|a| a.ne32()).filter(|l| *l != 0 && *l != index),
        link_netnsid: attrs.find(IFLA_LINK_NETNSID).and_then(|a| a.ne32()).map(|v| v as i32).filter(|n| *n >= 0),
        master: attrs.find(IFLA_MASTER).and_then(|a| a.ne32()).filter(|m| *m != 0),
    })
}

/// A route: its destination prefix and the devices it sends through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub table: u32,
    /// `rtm_type`: `RTN_UNICAST` (1) for a route that sends packets out.
    pub kind: u8,
    /// The destination prefix (`0.0.0.0/0` or `::/0` for a default route).
    pub dst: IpAddr,
    pub prefix_len: u8,
    /// The output devices (several for a multipath route).
    pub devices: Vec<u32>,
}

/// Every route of both families in every table.
pub fn routes(sock: &mut NlSocket) -> io::Result<Vec<Route>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut body = vec![0u8; RTMSG_LEN];
        body[0] = family;
        for r in sock.dump(RTM_GETROUTE, &body)? {
            if r.kind == RTM_NEWROUTE {
                out.extend(parse_route(&r.body));
            }
        }
    }
    Ok(out)
}

fn parse_route(body: &[u8]) -> Option<Route> {
    if body.len() < RTMSG_LEN {
        return None;
    }
    let (family, prefix_len, table, kind) = (body[0], body[1], u32::from(body[4]), body[7]);
    let attrs = Attrs::new(&body[RTMSG_LEN..]);
    let dst = match (i32::from(family), attrs.find(RTA_DST).map(|a| a.value)) {
        (libc::AF_INET, Some(v)) => IpAddr::from(<[u8; 4]>::try_from(v.get(..4)?).ok()?),
        (libc::AF_INET, None) => IpAddr::from([0u8; 4]),
        (libc::AF_INET6, Some(v)) => IpAddr::from(<[u8; 16]>::try_from(v.get(..16)?).ok()?),
        (libc::AF_INET6, None) => IpAddr::from([0u8; 16]),
        _ => return None,
    };
    let table = attrs.find(RTA_TABLE).and_then(|a| a.ne32()).unwrap_or(table);
    let mut devices: Vec<u32> = attrs.find(RTA_OIF).and_then(|a| a.ne32()).into_iter().collect();
    if let Some(mp) = attrs.find(RTA_MULTIPATH) {
        let mut rest = mp.value;
        while rest.len() >= RTNEXTHOP_LEN {
            let len = usize::from(u16::from_ne_bytes(rest[0..2].try_into().ok()?));
            devices.push(i32::from_ne_bytes(rest[4..8].try_into().ok()?) as u32);
            if len < RTNEXTHOP_LEN {
                break;
            }
            rest = rest.get(crate::attr::align4(len)..).unwrap_or_default();
        }
    }
    Some(Route { table, kind, dst, prefix_len, devices })
}

/// A tc filter on a device's egress hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    pub handle: u32,
    /// "bpf" for cls_bpf.
    pub kind: String,
    /// cls_bpf: the program's name and id, and whether it runs in direct-action mode.
    pub bpf_name: Option<String>,
    pub bpf_id: Option<u32>,
    pub direct_action: bool,
}

/// The filters on the egress hook of the clsact qdisc of device `ifindex`; empty when
/// it has no clsact qdisc.
pub fn egress_filters(sock: &mut NlSocket, ifindex: u32) -> io::Result<Vec<TcFilter>> {
    let mut body = vec![0u8; TCMSG_LEN];
    body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    body[12..16].copy_from_slice(&TC_EGRESS_PARENT.to_ne_bytes());
    let replies = match sock.dump(RTM_GETTFILTER, &body) {
        Ok(r) => r,
        // No clsact (or no such device): no filters.
        Err(e) if matches!(NetlinkError::errno_of(&e), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for r in replies.iter().filter(|r| r.kind == RTM_NEWTFILTER && r.body.len() >= TCMSG_LEN) {
        let handle = u32::from_ne_bytes(r.body[8..12].try_into().unwrap());
        let info = u32::from_ne_bytes(r.body[16..20].try_into().unwrap());
        let attrs = Attrs::new(&r.body[TCMSG_LEN..]);
        let kind = attrs.find(TCA_KIND).map(|a| a.str()).unwrap_or_default();
        let options = attrs.find(TCA_OPTIONS).map(|o| o.nested());
        // A filter chain's head (handle 0) carries no program.
        if handle == 0 {
            continue;
        }
        out.push(TcFilter {
            priority: (info >> 16) as u16,
            handle,
            bpf_name: options.and_then(|o| o.find(TCA_BPF_NAME)).map(|a| a.str()),
            bpf_id: options.and_then(|o| o.find(TCA_BPF_ID)).and_then(|a| a.ne32()),
            direct_action: options
                .and_then(|o| o.find(TCA_BPF_FLAGS))
                .and_then(|a| a.ne32())
                .is_some_and(|f| f & TCA_BPF_FLAG_ACT_DIRECT != 0),
            kind,
        });
    }
    Ok(out)
}

/// Deletes the filter at `priority`/`handle` from device `ifindex`'s egress hook
/// (`RTM_DELTFILTER`); a filter already gone is no error.
pub fn delete_egress_filter(sock: &mut NlSocket, ifindex: u32, priority: u16, handle: u32) -> io::Result<()> {
    let mut body = vec![0u8; TCMSG_LEN];
    body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    body[8..12].copy_from_slice(&handle.to_ne_bytes());
    body[12..16].copy_from_slice(&TC_EGRESS_PARENT.to_ne_bytes());
    let info = (u32::from(priority) << 16) | u32::from(ETH_P_ALL.to_be());
    body[16..20].copy_from_slice(&info.to_ne_bytes());
    let mut w = crate::AttrWriter::new();
    w.str(TCA_KIND, "bpf");
    body.extend_from_slice(&w.buf);
    let message = crate::socket::Message { kind: RTM_DELTFILTER, flags: 0, body };
    match sock.request(&[message], |_| true) {
        Ok(()) => Ok(()),
        Err(e) if NetlinkError::errno_of(&e) == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Subscribes `sock` to the multicast group `group` (`RTNLGRP_*`).
pub fn subscribe(sock: &NlSocket, group: u32) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a u32 and its size on our own fd.
    let rc = unsafe {
        libc::setsockopt(
            sock.raw_fd(),
            SOL_NETLINK,
            NETLINK_ADD_MEMBERSHIP,
            (&group as *const u32).cast(),
            std::mem::size_of::<u32>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multipath_route_names_every_device() {
        let mut body = vec![0u8; RTMSG_LEN];
        body[0] = libc::AF_INET as u8;
        body[1] = 0;
        body[4] = 254;
        body[7] = 1;
        let mut w = crate::AttrWriter::new();
        let mut nh = Vec::new();
        for ifindex in [3i32, 4] {
            nh.extend_from_slice(&(RTNEXTHOP_LEN as u16).to_ne_bytes());
            nh.extend_from_slice(&[0, 0]);
            nh.extend_from_slice(&ifindex.to_ne_bytes());
        }
        w.bytes(RTA_MULTIPATH, &nh);
        body.extend_from_slice(&w.buf);
        let route = parse_route(&body).unwrap();
        assert_eq!(route.devices, [3, 4]);
        assert_eq!(route.dst, IpAddr::from([0u8; 4]));
        assert_eq!((route.prefix_len, route.table, route.kind), (0, 254, 1));
    }
}
