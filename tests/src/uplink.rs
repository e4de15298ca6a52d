// SPDX-License-Identifier: Apache-2.0
//! The node's uplinks, as on AWS: the metadata service on its real addresses
//! (169.254.169.254, fd00:ec2::254) one hop beyond the node, in a "cloud" namespace
//! behind an uplink veth; the node routes both addresses through the uplink and
//! forwards (inside its own namespace only). While the world stands, the node's `lo`
//! does not carry those two addresses; they are put back when it goes.
//!
//! Pods reach the uplink the ways datapaths that skip the node's netfilter do: a tc
//! program on the host end of a pod's veth redirecting its frames there (Cilium's BPF
//! host routing), or a macvlan/ipvlan child of the uplink in the pod's namespace.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    path::PathBuf,
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::{rtnl, NlSocket};

use crate::{
    forwarded::set_forwarding,
    frames::Wire,
    netlink::{LowerChild, Netlink},
    netns::NetNs,
    node::KubeletPod,
    sandbox::PodSandbox,
    standin::{Arrivals, Standin},
    world::{SimNode, IMDS_V4, IMDS_V6},
};

/// The destinations served beyond the node.
pub const BEYOND: [IpAddr; 2] = [IMDS_V4, IMDS_V6];
/// The networks behind the node the clouds route back to it: pods, bridged pods.
const BEHIND_NODE: [(IpAddr, u8); 4] = [
    (IpAddr::V4(Ipv4Addr::new(10, 200, 0, 0)), 16),
    (IpAddr::V4(Ipv4Addr::new(10, 210, 0, 0)), 16),
    (IpAddr::V6(Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, 0)), 16),
    (IpAddr::V6(Ipv6Addr::new(0xfd43, 0, 0, 0, 0, 0, 0, 0)), 16),
];
/// Hosts on an uplink's network: the node 1, the cloud 2, pods on the uplink from here.
const FIRST_CHILD_HOST: u8 = 10;

/// One uplink of the node and the cloud behind it. Uplink `K` is `mgup<K>` in the
/// node, on 10.198.K.0/24 and fd40:K::/64 (the node .1/::1, the cloud .2/::2).
pub struct Beyond {
    /// First: its sockets keep the cloud namespace alive.
    pub standin: Standin,
    pub ns: NetNs,
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    /// The cloud end's MAC: the next hop of everything leaving through this uplink.
    pub cloud_mac: [u8; 6],
    cloud_index: u32,
    pub node_v4: Ipv4Addr,
    pub cloud_v4: Ipv4Addr,
    pub node_v6: Ipv6Addr,
    pub cloud_v6: Ipv6Addr,
    number: u8,
    children: u8,
}

impl Beyond {
    fn build(node: &NetNs, number: u8) -> Result<Beyond> {
        let name = format!("mgup{number}");
        let ns = NetNs::new(&format!("mg-cloud{number}"))?;
        let mut cloud = Netlink::open_in(&ns)?;
        let mut at_node = Netlink::open_in(node)?;
        at_node.add_veth(&name, "eth0", ns.as_fd())?;
        let index = at_node.link_index(&name)?;
        let (lo, cloud_end) = (cloud.link_index("lo")?, cloud.link_index("eth0")?);
        let (node_v4, cloud_v4) = (Ipv4Addr::new(10, 198, number, 1), Ipv4Addr::new(10, 198, number, 2));
        let (node_v6, cloud_v6) = (v6_host(number, 1), v6_host(number, 2));
        at_node.set_link_up(index)?;
        cloud.set_link_up(lo)?;
        cloud.set_link_up(cloud_end)?;
        for addr in BEYOND {
            cloud.add_address(lo, addr, if addr.is_ipv4() { 32 } else { 128 })?;
        }
        at_node.add_address(index, node_v4.into(), 24)?;
        at_node.add_address(index, node_v6.into(), 64)?;
        cloud.add_address(cloud_end, cloud_v4.into(), 24)?;
        cloud.add_address(cloud_end, cloud_v6.into(), 64)?;
        for (net, len) in BEHIND_NODE {
            let via = if net.is_ipv4() { IpAddr::V4(node_v4) } else { IpAddr::V6(node_v6) };
            cloud.add_route(net, len, via, cloud_end)?;
        }
        let standin = Standin::start(&ns)?;
        let mac = link_mac(node, &name)?;
        let cloud_mac = link_mac(&ns, "eth0")?;
        Ok(Beyond {
            standin,
            ns,
            name,
            index,
            mac,
            cloud_mac,
            cloud_index: cloud_end,
            node_v4,
            cloud_v4,
            node_v6,
            cloud_v6,
            number,
            children: 0,
        })
    }
}

fn v6_host(network: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd40, network.into(), 0, 0, 0, 0, 0, host.into())
}

/// The MAC of link `name` in `ns`.
pub fn link_mac(ns: &NetNs, name: &str) -> Result<[u8; 6]> {
    let mut s = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_ROUTE)?;
    let link = rtnl::links(&mut s)?.into_iter().find(|l| l.name == name).with_context(|| format!("no link {name}"))?;
    link.address.as_slice().try_into().with_context(|| format!("{name} has no Ethernet address"))
}

/// The node's uplinks and the clouds behind them.
pub struct Uplinks {
    /// Put back on the node's `lo` when the world goes.
    node: PathBuf,
    pub beyond: Vec<Beyond>,
    /// The uplink the metadata routes go through.
    pub via: usize,
}

impl Uplinks {
    /// Takes the metadata addresses off the node's `lo`, adds uplink `mgup0` with a
    /// cloud behind it, routes the metadata addresses through it and turns forwarding on.
    /// The caller waits until the node gets through (a new link's IPv6 takes a
    /// moment) from a host process in a test cgroup: where the uplink reads socket
    /// marks, only sockets made under the guard's cgroup carry one.
    pub fn build(node: &NetNs) -> Result<Uplinks> {
        let mut netlink = Netlink::open_in(node)?;
        let lo = netlink.link_index("lo")?;
        for addr in BEYOND {
            netlink.delete_address(lo, addr, if addr.is_ipv4() { 32 } else { 128 })?;
        }
        let mut world = Uplinks { node: node.path(), beyond: Vec::new(), via: 0 };
        world.add_uplink(node)?;
        world.route_via(node, 0)?;
        set_forwarding(node, true)?;
        Ok(world)
    }

    /// Adds the next uplink and its cloud; nothing is routed through it yet.
    pub fn add_uplink(&mut self, node: &NetNs) -> Result<&Beyond> {
        let number = self.beyond.len() as u8;
        let beyond = Beyond::build(node, number).with_context(|| format!("could not add uplink {number}"))?;
        self.beyond.push(beyond);
        Ok(self.beyond.last().unwrap())
    }

    /// Routes the metadata addresses through uplink `k`.
    pub fn route_via(&mut self, node: &NetNs, k: usize) -> Result<()> {
        let b = self.beyond.get(k).context("no such uplink")?;
        let mut netlink = Netlink::open_in(node)?;
        netlink.replace_route(IMDS_V4, 32, b.cloud_v4.into(), b.index)?;
        netlink.replace_route(IMDS_V6, 128, b.cloud_v6.into(), b.index)?;
        self.via = k;
        Ok(())
    }

    /// The uplink the metadata routes go through.
    pub fn current(&self) -> &Beyond {
        &self.beyond[self.via]
    }

    /// What every cloud's stand-in saw, added up (barriers included).
    pub fn arrivals(&self) -> Vec<Arrivals> {
        self.beyond.iter().map(|b| b.standin.arrivals()).collect()
    }
}

impl Drop for Uplinks {
    fn drop(&mut self) {
        let Ok(node) = NetNs::from_path(&self.node) else { return };
        let _ = set_forwarding(&node, false);
        if let Ok(mut netlink) = Netlink::open_in(&node) {
            // Deleted here rather than with the clouds' namespaces, which the kernel
            // cleans up in the background: the next world makes links of the same names.
            for b in &self.beyond {
                let _ = netlink.delete_link(b.index);
            }
            if let Ok(lo) = netlink.link_index("lo") {
                for addr in BEYOND {
                    let _ = netlink.add_address(lo, addr, if addr.is_ipv4() { 32 } else { 128 });
                }
            }
        }
    }
}

/// A pod on one of the uplink datapaths. Dropped in field order: its sandbox
/// process, then its namespace, then its cgroup and log directories.
pub struct UplinkPod {
    sandbox: Option<PodSandbox>,
    pub ns: NetNs,
    pub kubelet: Option<KubeletPod>,
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// Its `eth0` and the MAC its frames are addressed to.
    pub wire: Wire,
    /// For a veth pod: the host end (name, index) in the node.
    pub host_end: Option<(String, u32)>,
}

impl UplinkPod {
    /// A pod on a veth (`vp<N>` in the node), as every CNI plugin makes them. Permanent
    /// neighbours on both ends, as Cilium's own ARP/NDP responders stand in for: with
    /// its IP frames handed to the uplink in tc, the pod's neighbour discovery would
    /// leave the node too.
    pub fn veth(sim: &mut SimNode, kubelet: KubeletPod, name: &str) -> Result<UplinkPod> {
        let net = sim.add_pod(name)?;
        let mut at_node = Netlink::open_in(sim.node())?;
        let host_index = at_node.link_index(&net.node_side_link)?;
        let wire = Wire::of(&net.ns, sim.node(), &net.node_side_link)?;
        let mut pod = Netlink::open_in(&net.ns)?;
        pod.add_neighbour(wire.ifindex, net.node_side_ipv4.into(), wire.peer_mac)?;
        pod.add_neighbour(wire.ifindex, net.node_side_ipv6.into(), wire.peer_mac)?;
        at_node.add_neighbour(host_index, net.ipv4.into(), wire.own_mac)?;
        at_node.add_neighbour(host_index, net.ipv6.into(), wire.own_mac)?;
        drop(pod);
        let sandbox = PodSandbox::start(&net.ns.path(), kubelet.cgroup.path())?;
        Ok(UplinkPod {
            sandbox: Some(sandbox),
            ns: net.ns,
            kubelet: Some(kubelet),
            name: name.into(),
            ipv4: net.ipv4,
            ipv6: net.ipv6,
            wire,
            host_end: Some((net.node_side_link, host_index)),
        })
    }

    /// A pod whose `eth0` is a `kind` child of uplink `beyond` (macvlan in bridge mode,
    /// ipvlan in L2 mode), on the uplink's network, its gateway the cloud.
    pub fn child(
        node: &NetNs,
        beyond: &mut Beyond,
        kind: LowerChild,
        kubelet: KubeletPod,
        name: &str,
    ) -> Result<UplinkPod> {
        let host = FIRST_CHILD_HOST + beyond.children;
        beyond.children += 1;
        let ns = NetNs::new(name)?;
        let mut at_node = Netlink::open_in(node)?;
        at_node.add_lower_child(kind, "eth0", beyond.index, ns.as_fd())?;
        let mut pod = Netlink::open_in(&ns)?;
        let (lo, eth0) = (pod.link_index("lo")?, pod.link_index("eth0")?);
        let (ipv4, ipv6) = (Ipv4Addr::new(10, 198, beyond.number, host), v6_host(beyond.number, host));
        pod.set_link_up(lo)?;
        pod.set_link_up(eth0)?;
        pod.add_address(eth0, ipv4.into(), 24)?;
        pod.add_address(eth0, ipv6.into(), 64)?;
        pod.add_default_route(beyond.cloud_v4.into(), eth0)?;
        pod.add_default_route(beyond.cloud_v6.into(), eth0)?;
        let own_mac = link_mac(&ns, "eth0")?;
        pod.add_neighbour(eth0, beyond.cloud_v4.into(), beyond.cloud_mac)?;
        pod.add_neighbour(eth0, beyond.cloud_v6.into(), beyond.cloud_mac)?;
        drop(pod);
        // And the cloud knows the pod: a new child's IPv6 answers neighbour
        // solicitations only once its link-local address has passed DAD.
        let mut cloud = Netlink::open_in(&beyond.ns)?;
        cloud.add_neighbour(beyond.cloud_index, ipv4.into(), own_mac)?;
        cloud.add_neighbour(beyond.cloud_index, ipv6.into(), own_mac)?;
        drop(cloud);
        let wire = Wire { ifindex: eth0, own_mac, peer_mac: beyond.cloud_mac };
        let sandbox = PodSandbox::start(&ns.path(), kubelet.cgroup.path())?;
        Ok(UplinkPod {
            sandbox: Some(sandbox),
            ns,
            kubelet: Some(kubelet),
            name: name.into(),
            ipv4,
            ipv6,
            wire,
            host_end: None,
        })
    }

    /// The pod's own address of `dest`'s family.
    pub fn source_for(&self, dest: IpAddr) -> IpAddr {
        if dest.is_ipv4() {
            self.ipv4.into()
        } else {
            self.ipv6.into()
        }
    }

    /// The pod's cgroup (its container's), while it runs.
    pub fn cgroup(&self) -> Result<PathBuf> {
        Ok(self.kubelet.as_ref().context("the pod has ended")?.cgroup.path().to_path_buf())
    }

    /// The pod ends as the kubelet ends it: its processes, then its cgroup.
    pub fn end(&mut self) {
        self.sandbox = None;
        self.kubelet = None;
    }
}
