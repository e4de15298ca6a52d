// SPDX-License-Identifier: Apache-2.0
//! The metadata service one hop beyond the node, as on AWS (IMDS is not an address
//! of the node: the node routes and forwards pods' packets to it). A "cloud"
//! namespace holds the metadata addresses and a stand-in; a veth joins it to the node
//! namespace, which forwards — forwarding is enabled inside the node namespace only.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use crate::{netlink::Netlink, netns::NetNs, standin::Standin};

/// Addresses served only beyond the node (blocked by the `scaleway` and `default` presets).
pub const BEYOND_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 42);
pub const BEYOND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, 0, 0x42);
const NODE_SIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 1);
/// The cloud namespace's end of its link to the node: one hop from the node, no gateway.
pub const CLOUD_SIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 199, 0, 2);
const NODE_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd41, 0, 0, 0, 0, 0, 0, 1);
const CLOUD_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd41, 0, 0, 0, 0, 0, 0, 2);
/// The simulated pods' networks (see `world`), routed back through the node.
const PODS_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 0);
const PODS_V6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0, 0, 0, 0, 0, 0, 0);
const NODE_LINK: &str = "vcloud";
const READY_WITHIN: Duration = Duration::from_secs(5);

pub struct Cloud {
    pub standin: Standin,
    pub ns: NetNs,
    /// Forwarding is turned off again here when the cloud goes.
    node: std::path::PathBuf,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Ok(node) = NetNs::from_path(&self.node) {
            let _ = set_forwarding(&node, false);
            // The pair goes with the cloud namespace, but only once the kernel has
            // cleaned that up (asynchronously): delete it now, so that the next
            // scenario's cloud can take the name at once.
            if let Ok(mut at_node) = Netlink::open_in(&node) {
                if let Ok(index) = at_node.link_index(NODE_LINK) {
                    let _ = at_node.delete_link(index);
                }
            }
        }
    }
}

impl Cloud {
    /// Wires a cloud namespace beyond `node` and turns forwarding on in `node`.
    pub fn beyond(node: &NetNs) -> Result<Cloud> {
        let ns = NetNs::new("mg-cloud")?;
        let mut cloud = Netlink::open_in(&ns)?;
        let mut at_node = Netlink::open_in(node)?;
        at_node.add_veth(NODE_LINK, "eth0", ns.as_fd())?;
        let node_end = at_node.link_index(NODE_LINK)?;
        let (lo, cloud_end) = (cloud.link_index("lo")?, cloud.link_index("eth0")?);
        at_node.set_link_up(node_end)?;
        cloud.set_link_up(lo)?;
        cloud.set_link_up(cloud_end)?;
        cloud.add_address(lo, BEYOND_V4.into(), 32)?;
        cloud.add_address(lo, BEYOND_V6.into(), 128)?;
        at_node.add_address(node_end, NODE_SIDE_V4.into(), 30)?;
        at_node.add_address(node_end, NODE_SIDE_V6.into(), 64)?;
        cloud.add_address(cloud_end, CLOUD_SIDE_V4.into(), 30)?;
        cloud.add_address(cloud_end, CLOUD_SIDE_V6.into(), 64)?;
        at_node.add_route(BEYOND_V4.into(), 32, CLOUD_SIDE_V4.into(), node_end)?;
        at_node.add_route(BEYOND_V6.into(), 128, CLOUD_SIDE_V6.into(), node_end)?;
        cloud.add_route(PODS_V4.into(), 16, NODE_SIDE_V4.into(), cloud_end)?;
        cloud.add_route(PODS_V6.into(), 16, NODE_SIDE_V6.into(), cloud_end)?;
        set_forwarding(node, true)?;
        let standin = Standin::start(&ns)?;
        let cloud = Cloud { standin, ns, node: node.path() };
        wait_reachable(node)?;
        Ok(cloud)
    }
}

/// `/proc/sys/net` shows the namespace of the thread that opens it: written from a
/// thread inside `node`, and read back there, never in the caller's namespace.
pub fn set_forwarding(node: &NetNs, on: bool) -> Result<()> {
    let value = if on { "1" } else { "0" };
    const KNOBS: [&str; 2] = ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"];
    let own_before: Vec<String> = KNOBS.iter().map(|k| std::fs::read_to_string(k).unwrap_or_default()).collect();
    node.run(|| -> Result<()> {
        for knob in KNOBS {
            std::fs::write(knob, value).with_context(|| format!("could not write {knob} in the node namespace"))?;
            ensure!(std::fs::read_to_string(knob)?.trim() == value, "{knob} did not change");
        }
        Ok(())
    })?;
    let own_after: Vec<String> = KNOBS.iter().map(|k| std::fs::read_to_string(k).unwrap_or_default()).collect();
    ensure!(own_before == own_after, "forwarding changed outside the node namespace: {own_before:?} → {own_after:?}");
    Ok(())
}

/// A new link's IPv6 is usable only once its link-local addresses have passed
/// duplicate address detection (about a second): wait until the node gets through.
fn wait_reachable(node: &NetNs) -> Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    for addr in beyond_addresses() {
        let to = std::net::SocketAddr::new(addr, 80);
        while node.run(|| std::net::TcpStream::connect_timeout(&to, Duration::from_millis(200))).is_err() {
            ensure!(Instant::now() < deadline, "{to} beyond the node did not become reachable");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

pub fn beyond_addresses() -> [IpAddr; 2] {
    [IpAddr::V4(BEYOND_V4), IpAddr::V6(BEYOND_V6)]
}

/// IPv4 source-routed packets (LSRR, SSRR) accepted in `ns` — forwarded on along
/// their route, or delivered when it ends there — or, with `on` false, dropped again
/// (the kernel's default). `conf/all` and every interface's knob must both be on;
/// written from a thread inside `ns`, never in the caller's namespace.
pub fn accept_source_routes(ns: &NetNs, on: bool) -> Result<()> {
    const CONF: &str = "/proc/sys/net/ipv4/conf";
    let value = if on { "1" } else { "0" };
    let knob = |dev: &str| format!("{CONF}/{dev}/accept_source_route");
    let own_before = std::fs::read_to_string(knob("all")).unwrap_or_default();
    ns.run(|| -> Result<()> {
        for entry in std::fs::read_dir(CONF).with_context(|| format!("could not list {CONF} in the namespace"))? {
            let dev = entry?.file_name().to_string_lossy().into_owned();
            // `default` is the template of interfaces to come: left alone.
            if dev != "default" {
                std::fs::write(knob(&dev), value).with_context(|| format!("could not write {}", knob(&dev)))?;
            }
        }
        ensure!(std::fs::read_to_string(knob("all"))?.trim() == value, "accept_source_route did not change");
        Ok(())
    })?;
    let own_after = std::fs::read_to_string(knob("all")).unwrap_or_default();
    ensure!(
        own_before == own_after,
        "accept_source_route changed outside the namespace: {own_before:?} → {own_after:?}"
    );
    Ok(())
}
