// SPDX-License-Identifier: Apache-2.0
//! A kube-proxy-like DNAT in the node namespace, over netlink (no `nft` binary in
//! the VM): a virtual address rewritten to a metadata address at prerouting.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    nftables::{self, Batch, CmpOp, Expr},
    NlSocket,
};

use crate::netns::NetNs;

const TABLE: &str = "mg_test_nat";

/// Packets to the first address (and, when given, only to the first port) go to the
/// second address (and the second port).
pub type Rewrite = (Ipv4Addr, Ipv4Addr, Option<(u16, u16)>);
const NAT_PRIORITY: i32 = -100;

/// Installs `table ip mg_test_nat` in `ns`: packets to `virtual_ip` (optionally only
/// on `port`) go to `target` (and `target_port`). Dropping it removes the table.
pub struct Dnat {
    /// The namespace's path; valid while its [`NetNs`] lives.
    ns: std::path::PathBuf,
}

impl Dnat {
    pub fn add(ns: &NetNs, rules: &[Rewrite]) -> Result<Dnat> {
        let mut b = Batch::new(nftables::NFPROTO_IPV4);
        b.add_table(TABLE);
        b.add_chain(TABLE, "prerouting", Some(("nat", nftables::NF_INET_PRE_ROUTING, NAT_PRIORITY)));
        for (vip, target, ports) in rules {
            let mut e = vec![
                Expr::Payload {
                    base: nftables::NFT_PAYLOAD_NETWORK_HEADER,
                    offset: 16,
                    len: 4,
                    dreg: nftables::NFT_REG_1,
                },
                Expr::Cmp { op: CmpOp::Eq, sreg: nftables::NFT_REG_1, data: vip.octets().to_vec() },
            ];
            if let Some((port, _)) = ports {
                e.push(Expr::Payload {
                    base: nftables::NFT_PAYLOAD_TRANSPORT_HEADER,
                    offset: 2,
                    len: 2,
                    dreg: nftables::NFT_REG_1,
                });
                e.push(Expr::Cmp { op: CmpOp::Eq, sreg: nftables::NFT_REG_1, data: port.to_be_bytes().to_vec() });
            }
            e.push(Expr::Data { dreg: nftables::NFT_REG_1, data: target.octets().to_vec() });
            let port_reg = ports.map(|(_, to)| {
                e.push(Expr::Data { dreg: nftables::NFT_REG_2, data: to.to_be_bytes().to_vec() });
                nftables::NFT_REG_2
            });
            e.push(Expr::Nat {
                kind: nftables::NFT_NAT_DNAT,
                family: u32::from(nftables::NFPROTO_IPV4),
                addr_reg: nftables::NFT_REG_1,
                port_reg,
            });
            b.add_rule(TABLE, "prerouting", &e);
        }
        let mut sock = NlSocket::open_in(Some(&ns.path()), libc::NETLINK_NETFILTER)?;
        sock.request(&b.finish(), nftables::wants_ack).context("could not add the test DNAT table")?;
        Ok(Dnat { ns: ns.path() })
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        let mut b = Batch::new(nftables::NFPROTO_IPV4);
        b.del_table(TABLE);
        if let Ok(mut sock) = NlSocket::open_in(Some(&self.ns), libc::NETLINK_NETFILTER) {
            let _ = sock.request(&b.finish(), nftables::wants_ack);
        }
    }
}
