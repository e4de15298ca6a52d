// SPDX-License-Identifier: Apache-2.0
//! A simulated node: a "node" network namespace that answers on the metadata
//! addresses, and pods wired to it by veth pairs.
//!
//! Every destination lives on the node's `lo`, so pod traffic is delivered locally
//! in the node namespace: no forwarding, no NAT, nothing touches the real host.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
};

use anyhow::{ensure, Context, Result};

use crate::{netlink::Netlink, netns::NetNs};

/// The instance metadata service (AWS, GCP, Azure, OCI, ...).
pub const IMDS_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
/// The AWS Nitro metadata service over IPv6.
pub const IMDS_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254));
/// The ECS task metadata and credentials endpoint.
pub const ECS_TASK_METADATA: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2));
/// The EKS Pod Identity agent.
pub const EKS_POD_IDENTITY: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 170, 23));
/// Alibaba Cloud's metadata service.
pub const ALIBABA_METADATA: IpAddr = IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200));
/// Oracle Cloud Classic's metadata service.
pub const ORACLE_CLASSIC_METADATA: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192));
/// Azure's WireServer.
pub const AZURE_WIRESERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16));
/// The Amazon VPC DNS resolver: a link-local neighbour of IMDS that a guard for
/// 169.254.169.254/32 must leave alone.
pub const AWS_DNS_NEIGHBOUR: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 253));

/// Every address the node's `lo` carries (as /32 or /128) and the stand-in serves.
pub const STANDIN_ADDRS: &[IpAddr] = &[
    IMDS_V4,
    IMDS_V6,
    ECS_TASK_METADATA,
    EKS_POD_IDENTITY,
    ALIBABA_METADATA,
    ORACLE_CLASSIC_METADATA,
    AZURE_WIRESERVER,
    AWS_DNS_NEIGHBOUR,
];

/// Pod `N` gets 10.200.N.0/24, so N fits in an octet (0 is left unused).
const MAX_PODS: u8 = 254;

/// The node namespace and the pods made so far. Dropping it closes the node
/// namespace; pods' veth pairs go with whichever end's namespace goes first.
pub struct SimNode {
    node: NetNs,
    netlink: Netlink,
    pods: u8,
    bridges: u8,
}

/// A bridge in the node namespace with pods' veths as its ports, as kubenet's `cbr0`
/// or the `bridge` CNI plugin's `cni0` are: every pod behind it enters the node's
/// stack through the bridge. Bridge `B` carries 10.210.B.1/24 and fd43:B::1/64, its
/// pods the next addresses. Deleted (with its ports' veths) when dropped.
pub struct Bridge {
    pub name: String,
    pub index: u32,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    number: u8,
    ports: u8,
    netlink: Netlink,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.netlink.delete_link(self.index);
    }
}

/// One pod's network: its namespace and the addresses on both ends of its veth.
#[derive(Debug)]
pub struct PodNet {
    pub ns: NetNs,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The pod's gateway: the node end of the veth.
    pub node_side_ipv4: Ipv4Addr,
    pub node_side_ipv6: Ipv6Addr,
    /// The link the pod's frames are addressed to: the node end of its veth,
    /// `vp<N>`, or for a pod behind a bridge the bridge.
    pub node_side_link: String,
}

impl SimNode {
    /// Creates the node namespace with `lo` up and carrying [`STANDIN_ADDRS`].
    pub fn new(name: &str) -> Result<SimNode> {
        let node = NetNs::new(name)?;
        let mut netlink = Netlink::open_in(&node)?;
        let lo = netlink.link_index("lo")?;
        netlink.set_link_up(lo)?;
        for &addr in STANDIN_ADDRS {
            let host_prefix = if addr.is_ipv4() { 32 } else { 128 };
            netlink.add_address(lo, addr, host_prefix)?;
        }
        Ok(SimNode { node, netlink, pods: 0, bridges: 0 })
    }

    pub fn node(&self) -> &NetNs {
        &self.node
    }

    /// Creates a pod namespace wired to the node: pod `N` (counting from 1) gets
    /// 10.200.N.2/24 and fd42:N::2/64 on `eth0`, with default routes via the node
    /// end `vp<N>` (10.200.N.1, fd42:N::1).
    pub fn add_pod(&mut self, name: &str) -> Result<PodNet> {
        ensure!(self.pods < MAX_PODS, "a simulated node holds at most {MAX_PODS} pods; could not add {name}");
        // Numbers are never reused: a failed pod's veth leaves the node namespace
        // only once the kernel has cleaned up the pod namespace, in the background.
        self.pods += 1;
        let ns = NetNs::new(name)?;
        self.wire_pod(self.pods, ns).with_context(|| format!("could not wire pod {name} to node {}", self.node.name()))
    }

    /// Creates bridge `br<B>` in the node namespace, up and carrying its addresses.
    pub fn add_bridge(&mut self) -> Result<Bridge> {
        ensure!(self.bridges < MAX_PODS, "a simulated node holds at most {MAX_PODS} bridges");
        self.bridges += 1;
        let b = self.bridges;
        let name = format!("br{b}");
        self.netlink.add_bridge(&name)?;
        let mut netlink = Netlink::open_in(&self.node)?;
        let index = netlink.link_index(&name)?;
        let bridge = Bridge {
            ipv4: Ipv4Addr::new(10, 210, b, 1),
            ipv6: Ipv6Addr::new(0xfd43, b.into(), 0, 0, 0, 0, 0, 1),
            name,
            index,
            number: b,
            ports: 0,
            netlink,
        };
        bridge_up(&mut self.netlink, &bridge).with_context(|| format!("could not set up bridge {}", bridge.name))?;
        Ok(bridge)
    }

    /// Creates a pod namespace whose `eth0` is a veth with its node end a port of
    /// `bridge`: the pod's gateway, and the link its frames go to
    /// ([`PodNet::node_side_link`]), is the bridge.
    pub fn add_bridged_pod(&mut self, name: &str, bridge: &mut Bridge) -> Result<PodNet> {
        ensure!(bridge.ports < MAX_PODS - 1, "bridge {} holds at most {} pods", bridge.name, MAX_PODS - 1);
        bridge.ports += 1;
        let host = bridge.ports + 1;
        let net = PodNet {
            ns: NetNs::new(name)?,
            ipv4: Ipv4Addr::new(10, 210, bridge.number, host),
            ipv6: Ipv6Addr::new(0xfd43, bridge.number.into(), 0, 0, 0, 0, 0, host.into()),
            node_side_ipv4: bridge.ipv4,
            node_side_ipv6: bridge.ipv6,
            node_side_link: bridge.name.clone(),
        };
        let port = format!("vb{}p{}", bridge.number, bridge.ports);
        self.wire_bridged(&net, &port, bridge.index)
            .with_context(|| format!("could not wire pod {name} to bridge {}", bridge.name))?;
        Ok(net)
    }

    fn wire_bridged(&mut self, net: &PodNet, port: &str, bridge: u32) -> Result<()> {
        let mut pod = Netlink::open_in(&net.ns)?;
        self.netlink.add_veth(port, "eth0", net.ns.as_fd())?;
        let node_end = self.netlink.link_index(port)?;
        self.netlink.set_master(node_end, bridge)?;
        self.netlink.set_link_up(node_end)?;
        let pod_lo = pod.link_index("lo")?;
        let pod_end = pod.link_index("eth0")?;
        pod.set_link_up(pod_lo)?;
        pod.set_link_up(pod_end)?;
        pod.add_address(pod_end, net.ipv4.into(), 24)?;
        pod.add_address(pod_end, net.ipv6.into(), 64)?;
        pod.add_default_route(net.node_side_ipv4.into(), pod_end)?;
        pod.add_default_route(net.node_side_ipv6.into(), pod_end)?;
        Ok(())
    }

    fn wire_pod(&mut self, n: u8, ns: NetNs) -> Result<PodNet> {
        let node_side_link = format!("vp{n}");
        let net = PodNet {
            ipv4: Ipv4Addr::new(10, 200, n, 2),
            ipv6: Ipv6Addr::new(0xfd42, n.into(), 0, 0, 0, 0, 0, 2),
            node_side_ipv4: Ipv4Addr::new(10, 200, n, 1),
            node_side_ipv6: Ipv6Addr::new(0xfd42, n.into(), 0, 0, 0, 0, 0, 1),
            node_side_link,
            ns,
        };
        // Closed at the end of this function: an open route socket would keep the
        // pod namespace alive after the PodNet is dropped.
        let mut pod = Netlink::open_in(&net.ns)?;
        self.netlink.add_veth(&net.node_side_link, "eth0", net.ns.as_fd())?;
        let node_end = self.netlink.link_index(&net.node_side_link)?;
        let pod_lo = pod.link_index("lo")?;
        let pod_end = pod.link_index("eth0")?;

        // Links first: IPv4 connected routes appear only on up links, and the
        // default routes below need them to reach their gateways.
        self.netlink.set_link_up(node_end)?;
        pod.set_link_up(pod_lo)?;
        pod.set_link_up(pod_end)?;

        self.netlink.add_address(node_end, net.node_side_ipv4.into(), 24)?;
        self.netlink.add_address(node_end, net.node_side_ipv6.into(), 64)?;
        pod.add_address(pod_end, net.ipv4.into(), 24)?;
        pod.add_address(pod_end, net.ipv6.into(), 64)?;
        pod.add_default_route(net.node_side_ipv4.into(), pod_end)?;
        pod.add_default_route(net.node_side_ipv6.into(), pod_end)?;
        // Traffic flows from here on. The pod end's operstate may read DOWN for up
        // to a second more (linkwatch batches the change); nothing depends on it.
        Ok(net)
    }
}

fn bridge_up(netlink: &mut Netlink, bridge: &Bridge) -> Result<()> {
    netlink.set_link_up(bridge.index)?;
    netlink.add_address(bridge.index, bridge.ipv4.into(), 24)?;
    netlink.add_address(bridge.index, bridge.ipv6.into(), 64)?;
    Ok(())
}

impl std::fmt::Debug for SimNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNode").field("node", &self.node).field("pods", &self.pods).finish()
    }
}
