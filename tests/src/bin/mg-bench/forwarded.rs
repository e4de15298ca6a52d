// SPDX-License-Identifier: Apache-2.0
//! Figure 8: forwarded pod traffic — a pod talking to a network one hop beyond the
//! node, through the node (as pods reach other nodes, or IMDS where it is not a
//! local address). The guard's programs run in the pod; a node firewall judges the
//! same packets on its FORWARD hook.
//!
//! The variants are figure 1's ([`ALL`]): here the host-side table's `forward` chain
//! judges each packet of the pod's, where figure 1's `input` chain does.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::{fd::AsFd, unix::fs::MetadataExt},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{netlink::Netlink, netns::NetNs};

use crate::{
    bench::{Bench, Servers, BULK_PORT, TCP_PORT},
    figures::{all_ok, interleave, label, row, scale_row, ALL},
    report::{Figure, Target},
    variant::Variant,
    worker::Op,
};

/// The node end of the link to the network beyond, and the far end.
const NODE_SIDE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const BEYOND: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const PREFIX: u8 = 24;
pub(crate) const NODE_LINK: &str = "vb0";

/// The node firewall a cloud's node image adds instead of a guard (EKS's
/// `FORWARD -i eni+ -d 169.254.169.254 -j DROP`).
pub(crate) const FORWARD_RULE: &str =
    "*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -s 10.200.0.0/16 -d 169.254.169.254/32 -j DROP\nCOMMIT\n";

/// A namespace beyond the node, wired to it by a veth, with sink servers; the node
/// forwards between its pods and it (forwarding is switched on in the node namespace
/// only, after checking that it is not the machine's).
pub(crate) struct Beyond {
    _ns: NetNs,
    pub servers: Servers,
}

impl Beyond {
    pub(crate) fn build(node: &crate::node::Node) -> Result<Beyond> {
        let ns = NetNs::new("mg-bench-beyond")?;
        let node_ns = node.sim.node();
        let mut nl = Netlink::open_in(node_ns)?;
        nl.add_veth(NODE_LINK, "eth0", ns.as_fd())?;
        let node_end = nl.link_index(NODE_LINK)?;
        nl.set_link_up(node_end)?;
        nl.add_address(node_end, NODE_SIDE.into(), PREFIX)?;
        drop(nl);
        let mut far = Netlink::open_in(&ns)?;
        let (lo, eth0) = (far.link_index("lo")?, far.link_index("eth0")?);
        far.set_link_up(lo)?;
        far.set_link_up(eth0)?;
        far.add_address(eth0, BEYOND.into(), PREFIX)?;
        far.add_default_route(NODE_SIDE.into(), eth0)?;
        drop(far);
        enable_forwarding(node_ns)?;
        let servers = Servers::start(&ns)?;
        Ok(Beyond { _ns: ns, servers })
    }

    pub(crate) fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(BEYOND, port)
    }
}

fn enable_forwarding(node_ns: &NetNs) -> Result<()> {
    let target = std::fs::metadata(node_ns.path())?;
    let machine = std::fs::metadata("/proc/self/ns/net")?;
    ensure!(
        (target.dev(), target.ino()) != (machine.dev(), machine.ino()),
        "refusing to enable forwarding: the node namespace is the machine's own"
    );
    node_ns.run(|| -> Result<()> {
        // /proc/sys/net follows the opening thread's namespace: check it is the node's.
        let here = std::fs::metadata("/proc/thread-self/ns/net")?;
        ensure!((here.dev(), here.ino()) == (target.dev(), target.ino()), "not in the node namespace");
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("could not enable forwarding in the node")
    })
}

/// Forwarded connects and throughput, every variant interleaved.
pub(crate) fn forwarded(b: &mut Bench) -> Result<Figure> {
    let (rounds, count, ms) = if b.quick { (3, 300, 100) } else { (301, 200, 50) };
    let tcp = b.beyond.addr(TCP_PORT);
    let bulk = b.beyond.addr(BULK_PORT);
    let rules = |fw: &crate::bench::Firewall| fw.iptables_restore(FORWARD_RULE);
    let connects = interleave(b, &ALL, rounds, &rules, &mut |b, v| {
        let r = b.run(v, Op::TcpConnect { dest: tcp, count })?;
        all_ok(&r, count, &format!("forwarded TCP connect to {tcp} ({})", label(v)))?;
        Ok(r.per_op_ns())
    })?;
    let throughput = interleave(b, &ALL, rounds.min(151), &rules, &mut |b, v| {
        let r = b.run(v, Op::Bulk { dest: bulk, ms })?;
        all_ok(&r, 1, &format!("forwarded bulk TCP to {bulk} ({})", label(v)))?;
        ensure!(r.bytes > 0, "forwarded bulk TCP to {bulk} ({}): no bytes sent", label(v));
        Ok(r.gbit_per_s())
    })?;
    let connect_row = scale_row(row("connect + close, forwarded", &ALL, connects), 1e-3);
    let bulk_row = row("64 KiB writes, forwarded (Gbit/s)", &ALL, throughput);
    let (c_guard, c_fw) = (connect_row.paired(1), connect_row.paired(2));
    let (t_guard, t_fw) = (bulk_row.paired(1), bulk_row.paired(2));
    Ok(Figure {
        title: "8. Forwarded pod traffic (pod → a network beyond the node)".into(),
        unit: "µs per connect; Gbit/s".into(),
        rows: vec![connect_row, bulk_row],
        targets: vec![
            Target::at_most("8. forwarded TCP connect+close, guard / no guard", c_guard, 1.01),
            Target::at_most("8. forwarded connect+close, guard ratio ≤ one FORWARD rule's", c_guard, c_fw),
            Target::at_least("8. forwarded bulk throughput, guard / no guard", t_guard, 0.99),
            Target::at_least("8. forwarded bulk, guard ratio ≥ one FORWARD rule's", t_guard, t_fw),
        ],
        notes: vec![format!(
            "The pod connects to {tcp} (and writes to {bulk}) in a namespace one veth beyond the node; the node forwards \
             (ip_forward=1 in the node namespace only). {count} connects per sample; bulk samples write for {ms} ms. \
             The {} column has one rule on the node's FORWARD hook (`-s 10.200.0.0/16 -d 169.254.169.254/32 -j DROP`, \
             as EKS nodes do for IMDS). The packets leave through `vb0`: the guard's columns run `mg_uplink` on its \
             egress, the floor's an empty program there (figure 10 takes that hook apart). Throughput ratios are over \
             no guard's Gbit/s, so higher is better.",
            label(Variant::Firewall)
        )],
        ..Default::default()
    })
}
