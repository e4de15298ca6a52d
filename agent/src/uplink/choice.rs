// SPDX-License-Identifier: Apache-2.0
//! Which devices are uplinks: every device of the host's network namespace that a
//! packet can leave the node through. Plain data in, plain data out.
//!
//! - physical NICs (Ethernet devices of no software kind), bonds, teams and VLANs;
//! - the lower devices of macvlan and ipvlan children (their frames leave there);
//! - any Ethernet device with a unicast route (in any table) to a blocked destination,
//!   or to a prefix containing one (a default route).
//!
//! Never loopback (packets to the node itself never leave it), nor the host end of a
//! pod's veth (its peer lives in another namespace; its routes are to pod addresses),
//! nor devices without Ethernet headers (tunnels, WireGuard, tun: what they carry
//! leaves the node encapsulated, through an Ethernet uplink, and the metadata service
//! is reachable only on the VM's own link).

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use metadata_guard_netfilter::devices::{Device, Route};

/// `ARPHRD_ETHER`: the program parses Ethernet headers.
pub(crate) const ARPHRD_ETHER: u16 = 1;
/// `IFF_LOOPBACK`.
const IFF_LOOPBACK: u32 = 0x8;
/// `RTN_UNICAST`: a route that sends packets out (not local, broadcast, blackhole…).
pub(crate) const RTN_UNICAST: u8 = 1;

/// `--uplinks`: how the devices are chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum UplinkSpec {
    /// By the rules above, following the devices as they come and go.
    Auto,
    /// No uplink program at all.
    None,
    /// Exactly these devices (by name), as they exist (Ethernet devices only).
    Named(Vec<String>),
}

impl UplinkSpec {
    pub(crate) fn parse(text: &str) -> Result<UplinkSpec, String> {
        match text.trim() {
            "auto" => Ok(UplinkSpec::Auto),
            "none" => Ok(UplinkSpec::None),
            "" => Err("--uplinks is empty; use auto, none or a comma-separated list of interfaces".into()),
            list => {
                let names: Vec<String> = list.split(',').map(|n| n.trim().to_string()).collect();
                if let Some(bad) = names.iter().find(|n| n.is_empty() || n.len() > 15 || n.contains('/')) {
                    return Err(format!(
                        "--uplinks: `{bad}` is not an interface name (1 to 15 characters, no `/`); \
                         use auto, none or a comma-separated list such as eth0,eth1"
                    ));
                }
                Ok(UplinkSpec::Named(names))
            }
        }
    }
}

impl fmt::Display for UplinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkSpec::Auto => f.write_str("auto"),
            UplinkSpec::None => f.write_str("none"),
            UplinkSpec::Named(names) => f.write_str(&names.join(",")),
        }
    }
}

/// Why a device is an uplink (status shows it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Reason {
    /// A physical NIC.
    Nic,
    /// A bond, team or VLAN device.
    Aggregate(String),
    /// The lower device of a macvlan or ipvlan child.
    LowerOf(String),
    /// It carries a route to a blocked destination.
    Route(IpNet),
    /// Named by `--uplinks`.
    Named,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Nic => f.write_str("physical NIC"),
            Reason::Aggregate(kind) => write!(f, "{kind} device"),
            Reason::LowerOf(child) => write!(f, "lower device of {child}"),
            Reason::Route(net) => write!(f, "route to {net}"),
            Reason::Named => f.write_str("named by --uplinks"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Uplink {
    pub index: u32,
    pub name: String,
    pub reason: Reason,
}

const AGGREGATES: [&str; 3] = ["bond", "team", "vlan"];
const CHILDREN: [&str; 4] = ["macvlan", "macvtap", "ipvlan", "ipvtap"];

/// The uplinks among `devices`, by `spec`, sorted by index. `blocked` is every prefix
/// the node's policy blocks (both families).
pub(crate) fn choose(devices: &[Device], routes: &[Route], blocked: &[IpNet], spec: &UplinkSpec) -> Vec<Uplink> {
    match spec {
        UplinkSpec::None => return Vec::new(),
        UplinkSpec::Named(names) => {
            return devices
                .iter()
                // Only Ethernet devices: the program reads an Ethernet header first.
                .filter(|d| names.contains(&d.name) && d.hw_type == ARPHRD_ETHER)
                .map(|d| Uplink { index: d.index, name: d.name.clone(), reason: Reason::Named })
                .collect();
        }
        UplinkSpec::Auto => {}
    }
    let by_index: BTreeMap<u32, &Device> = devices.iter().map(|d| (d.index, d)).collect();
    let mut chosen: BTreeMap<u32, Reason> = BTreeMap::new();
    let eligible = |d: &Device| d.hw_type == ARPHRD_ETHER && d.flags & IFF_LOOPBACK == 0 && !is_pod_end(d);
    for d in devices.iter().filter(|d| eligible(d)) {
        if d.kind.is_empty() {
            chosen.entry(d.index).or_insert(Reason::Nic);
        } else if AGGREGATES.contains(&d.kind.as_str()) {
            chosen.entry(d.index).or_insert_with(|| Reason::Aggregate(d.kind.clone()));
        }
    }
    for child in devices.iter().filter(|d| CHILDREN.contains(&d.kind.as_str()) && d.link_netnsid.is_none()) {
        if let Some(lower) = child.link.and_then(|l| by_index.get(&l)).filter(|l| eligible(l)) {
            chosen.entry(lower.index).or_insert_with(|| Reason::LowerOf(child.name.clone()));
        }
    }
    for route in routes {
        let Some(net) = IpNet::new(route.dst, route.prefix_len).ok().map(|n| n.trunc()) else { continue };
        if route.kind != RTN_UNICAST || !blocked.iter().any(|b| overlaps(&net, b)) {
            continue;
        }
        for dev in route.devices.iter().filter_map(|i| by_index.get(i)) {
            if dev.hw_type == ARPHRD_ETHER && dev.flags & IFF_LOOPBACK == 0 {
                chosen.entry(dev.index).or_insert(Reason::Route(net));
            }
        }
    }
    chosen
        .into_iter()
        .filter_map(|(index, reason)| Some(Uplink { index, name: by_index.get(&index)?.name.clone(), reason }))
        .collect()
}

/// The host end of a pod's veth: its peer lives in another network namespace.
/// (A veth to another namespace that carries a route to a blocked destination — the
/// node's link to the outside in a test world — is still chosen by its route.)
fn is_pod_end(d: &Device) -> bool {
    d.kind == "veth" || d.kind == "netkit" || d.link_netnsid.is_some()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    same_family(a.addr(), b.addr()) && (a.contains(&b.network()) || b.contains(&a.network()))
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

#[cfg(test)]
mod tests;
