// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's part of the host-side table: the connections the kernel redirects to
//! the proxy are exempt from connection tracking, so no NAT rule can take them.
//!
//! ```text
//!   chain conceal_pre { hook prerouting priority -300 }   tcp to the proxy: notrack
//!   chain conceal_out { hook output     priority -300 }   tcp to or from the proxy: notrack
//! ```
//!
//! The kernel rewrites a pod's metadata connect to the proxy's address and port, a
//! node address; left at that, the node's NAT runs on the packets as on any other: a
//! Service with `externalIPs: [NODE_IP]` on the proxy's port, a `hostPort`, a CNI
//! port mapping (iptables or nftables DNAT alike) would take every pod's metadata
//! traffic, IMDSv2 tokens included. NAT needs a conntrack entry (the NAT chains run
//! only for a connection's first packet, at -100 and 100, after conntrack at -200);
//! at `raw` priority (-300) these packets are marked untracked first, so every NAT
//! rule passes them by and they reach the local socket: the proxy. The proxy's
//! answers, leaving through `output`, are untracked too, so no source NAT rewrites
//! them either. (IPVS keeps connections of its own, without conntrack: see the
//! conceal documentation.)

use std::net::SocketAddr;

use metadata_guard_netfilter::nftables::*;

use super::{IPV4_DADDR_OFFSET, IPV4_SADDR_OFFSET, IPV6_DADDR_OFFSET, IPV6_SADDR_OFFSET, TH_DPORT_OFFSET};

pub(super) const CHAINS: [(&str, u32); 2] = [("conceal_pre", NF_INET_PRE_ROUTING), ("conceal_out", NF_INET_LOCAL_OUT)];
/// `NF_IP_PRI_RAW`: before conntrack (-200) and so before every NAT chain.
pub(super) const RAW_PRIORITY: i32 = -300;
const TH_SPORT_OFFSET: u32 = 0;

/// The chains and rules that keep the proxy's connections untracked.
pub(super) fn add(b: &mut Batch, t: &str, proxy: SocketAddr) {
    for (name, hook) in CHAINS {
        b.add_chain(t, name, Some(("filter", hook, RAW_PRIORITY)));
    }
    b.add_rule(t, "conceal_pre", &untracked(proxy, Direction::ToProxy));
    b.add_rule(t, "conceal_out", &untracked(proxy, Direction::ToProxy));
    b.add_rule(t, "conceal_out", &untracked(proxy, Direction::FromProxy));
}

#[derive(Clone, Copy)]
enum Direction {
    ToProxy,
    FromProxy,
}

/// `meta nfproto F meta l4proto tcp ip[6] daddr|saddr A tcp dport|sport P notrack`.
fn untracked(proxy: SocketAddr, direction: Direction) -> Vec<Expr> {
    let (nfproto, octets, daddr, saddr) = match proxy {
        SocketAddr::V4(a) => (NFPROTO_IPV4, a.ip().octets().to_vec(), IPV4_DADDR_OFFSET, IPV4_SADDR_OFFSET),
        SocketAddr::V6(a) => (NFPROTO_IPV6, a.ip().octets().to_vec(), IPV6_DADDR_OFFSET, IPV6_SADDR_OFFSET),
    };
    let (addr_offset, port_offset) = match direction {
        Direction::ToProxy => (daddr, TH_DPORT_OFFSET),
        Direction::FromProxy => (saddr, TH_SPORT_OFFSET),
    };
    let len = octets.len() as u32;
    vec![
        Expr::Meta { key: NFT_META_NFPROTO, dreg: NFT_REG_1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![nfproto] },
        Expr::Meta { key: NFT_META_L4PROTO, dreg: NFT_REG_1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![libc::IPPROTO_TCP as u8] },
        Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: addr_offset, len, dreg: NFT_REG_1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: octets },
        Expr::Payload { base: NFT_PAYLOAD_TRANSPORT_HEADER, offset: port_offset, len: 2, dreg: NFT_REG_1 },
        Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: proxy.port().to_be_bytes().to_vec() },
        Expr::Notrack,
    ]
}
