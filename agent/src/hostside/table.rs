// SPDX-License-Identifier: Apache-2.0
//! The host-side table's layout, written as one nf_tables transaction.
//!
//! ```text
//! table inet metadata_guard
//!   counter blocked / audited / exempt
//!   set allow_if      { type ifindex }            host-side interfaces of allowlisted pods
//!   set allow_src4    { type ifindex . ipv4_addr } (bridge, address) of allowlisted pods behind one
//!   set allow_src6    { type ifindex . ipv6_addr }
//!   set lead4, lead6  { 16-bit keys: a bitmap }   first 16 bits of those, when more than
//!                                                 the prefilter rule compares (prefilter.rs)
//!   set any4, any6    { interval }                every shape's destinations
//!   set d4_N, d6_N    { interval }                destinations of rule shape N
//!   set p_N           { type inet_service }       ports of rule shape N (when it lists some)
//!   chain input   { hook input   priority 101 }   daddr's lead not a covered one: accept;
//!                                                 jump judge
//!   chain forward { hook forward priority 0 }     the same
//!   chain output  { hook output  priority 0 }     the same, but packets with a socket are
//!                                                 accepted before the jump
//!   chain judge                                   from lo: accept; IPv4 source route
//!                                                 (LSRR, SSRR): jump refuse; daddr not in
//!                                                 any4/any6: return; per shape: match →
//!                                                 jump refuse
//!   chain conceal_pre, conceal_out                in conceal mode: the proxy's connections
//!                                                 untracked, so NAT cannot take them (conceal.rs)
//!   chain refuse                                  allowlisted (by iif, or iif . saddr):
//!                                                 count exempt, accept;
//!                                                 count, log (rate-limited), reject / accept
//! ```
//!
//! Every chain runs after destination NAT (prerouting, -100), so it sees the address
//! a packet will finally be delivered or forwarded to. `input` runs later still:
//! IPVS rewrites in `input` itself (priority 98/99) and, for a real server that is a
//! local address, lets the packet go on there; a chain before it would judge only
//! the virtual address. (For other real servers IPVS sends the packet through
//! `output`, socket-less, where the output chain judges it.)
//!
//! Every packet the node receives, forwards or sends passes a base chain, so each
//! leaves at the head of it, after a few inline compares, when no shape covers the
//! first 16 bits of its destination — nearly all do (prefilter.rs). The shapes' rules,
//! an interval lookup each, ran on every packet before: ~15 % on a pod's connect to
//! the node in the bench.

use metadata_guard_netfilter::nftables::*;

use super::{
    pods::Allowed,
    ruleset::{covered, interval_keys_v4, interval_keys_v6, Ports, Shape},
};

pub const TABLE: &str = "metadata_guard";
/// The NFLOG group refused packets are copied to.
pub(super) const LOG_GROUP: u16 = 9965;
pub(super) const LOG_PREFIX_BLOCKED: &str = "metadata-guard blocked";
pub(super) const LOG_PREFIX_AUDITED: &str = "metadata-guard audited";
/// Bytes of each logged packet: enough for the IPv6 header and the ports after it.
pub(super) const LOG_SNAPLEN: u32 = 96;
/// Logged packets per second, with this burst; beyond it packets are still refused
/// and counted, only not copied to the agent.
pub(super) const LOG_RATE: u64 = 200;
pub(super) const LOG_BURST: u32 = 400;
pub(crate) const COUNTERS: [&str; 3] = ["blocked", "audited", "exempt"];
/// The filter priority (0) everywhere but `input`.
const FILTER_PRIORITY: i32 = 0;
/// After IPVS's `LOCAL_IN` hooks (`NF_IP_PRI_NAT_SRC - 2` and `- 1`) and source NAT (100).
const INPUT_PRIORITY: i32 = 101;
pub(super) const BASE_CHAINS: [(&str, u32, i32); 3] = [
    ("input", NF_INET_LOCAL_IN, INPUT_PRIORITY),
    ("forward", NF_INET_FORWARD, FILTER_PRIORITY),
    ("output", NF_INET_LOCAL_OUT, FILTER_PRIORITY),
];
/// The loopback device has this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const IPV4_SADDR_OFFSET: u32 = 12;
pub(super) const IPV4_DADDR_OFFSET: u32 = 16;
const IPV6_SADDR_OFFSET: u32 = 8;
pub(super) const IPV6_DADDR_OFFSET: u32 = 24;
/// Allowlisted pods behind a shared interface: keyed by `iif . saddr`.
const ALLOW_SRC4: &str = "allow_src4";
const ALLOW_SRC6: &str = "allow_src6";
pub(super) const ALLOW_SRC_SETS: [&str; 2] = [ALLOW_SRC4, ALLOW_SRC6];
const IPV4_FRAG_OFFSET_FIELD: u32 = 6;
const IPV4_FRAG_OFFSET_MASK: [u8; 2] = [0x1f, 0xff];
const IPV6_FRAGMENT_HEADER: u8 = 44;
const IPV6_FRAG_OFFSET_FIELD: u32 = 2;
const IPV6_FRAG_OFFSET_MASK: [u8; 2] = [0xff, 0xf8];
const TH_DPORT_OFFSET: u32 = 2;
const TCP_FLAGS_OFFSET: u32 = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// (packets, bytes) per counter of [`COUNTERS`], in its order.
pub(super) type RawCounters = [(u64, u64); 3];

/// Everything the table holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Content {
    pub shapes: Vec<Shape>,
    pub audit: bool,
    /// Allowlisted pods, as the host side sees them.
    pub allowed: Allowed,
    /// Carried over from the table being replaced.
    pub counters: RawCounters,
    /// Conceal mode's proxy, when pods are redirected to it: its connections are
    /// kept out of connection tracking, and so out of every NAT rule (`conceal`).
    pub conceal: Option<std::net::SocketAddr>,
}

/// One transaction that replaces the table (or creates it) with `content`: it is
/// created first if missing so the delete cannot fail, then deleted and rebuilt.
/// Packets see the old table or the new one, never neither.
/// `flags` are the new table's (see `ownership`).
pub(super) fn replace(content: &Content, flags: u32) -> Batch {
    let mut b = Batch::new(NFPROTO_INET);
    b.add_table(TABLE).del_table(TABLE);
    build(&mut b, TABLE, content, flags);
    b
}

/// The same layout under a throwaway name, created and deleted in one transaction:
/// the kernel checks (and loads the modules for) every expression, and nothing stays.
pub(super) fn probe(content: &Content) -> Batch {
    const PROBE_TABLE: &str = "metadata_guard_probe";
    let mut b = Batch::new(NFPROTO_INET);
    build(&mut b, PROBE_TABLE, content, 0);
    b.del_table(PROBE_TABLE);
    b
}

/// The table deleted (only valid when it exists).
pub(super) fn delete() -> Batch {
    let mut b = Batch::new(NFPROTO_INET);
    b.del_table(TABLE);
    b
}

fn build(b: &mut Batch, t: &str, c: &Content, flags: u32) {
    b.add_table_with_flags(t, flags);
    for (name, (packets, bytes)) in COUNTERS.iter().zip(c.counters) {
        b.add_counter(t, name, packets, bytes);
    }
    let allow = SetSpec { name: "allow_if".into(), key_type: TYPE_IFINDEX, key_len: 4, interval: false };
    b.add_set(t, &allow);
    let keys: Vec<Element> =
        c.allowed.interfaces.iter().map(|i| Element { key: i.to_ne_bytes().to_vec(), interval_end: false }).collect();
    if !keys.is_empty() {
        b.add_elements(t, &allow.name, &keys);
    }
    let src4 = SetSpec {
        name: ALLOW_SRC4.into(),
        key_type: concat_type(&[TYPE_IFINDEX, TYPE_IPADDR]),
        key_len: 4 + 4,
        interval: false,
    };
    let src6 = SetSpec {
        name: ALLOW_SRC6.into(),
        key_type: concat_type(&[TYPE_IFINDEX, TYPE_IP6ADDR]),
        key_len: 4 + 16,
        interval: false,
    };
    b.add_set(t, &src4).add_set(t, &src6);
    let pair = |ifindex: u32, octets: &[u8]| {
        let mut key = ifindex.to_ne_bytes().to_vec();
        key.extend_from_slice(octets);
        Element { key, interval_end: false }
    };
    let e4: Vec<Element> = c.allowed.v4.iter().map(|(i, a)| pair(*i, &a.octets())).collect();
    let e6: Vec<Element> = c.allowed.v6.iter().map(|(i, a)| pair(*i, &a.octets())).collect();
    if !e4.is_empty() {
        b.add_elements(t, ALLOW_SRC4, &e4);
    }
    if !e6.is_empty() {
        b.add_elements(t, ALLOW_SRC6, &e6);
    }
    let covered = covered(&c.shapes);
    prefilter::add_sets(b, t, &covered);
    for (n, shape) in c.shapes.iter().enumerate() {
        add_shape_sets(b, t, n, shape);
    }

    b.add_chain(t, "refuse", None);
    b.add_chain(t, "judge", None);
    for (name, hook, priority) in BASE_CHAINS {
        b.add_chain(t, name, Some(("filter", hook, priority)));
    }
    refuse_rules(b, t, c.audit);
    b.add_rule(t, "judge", &[meta(NFT_META_IIF), cmp_eq(&LOOPBACK_IFINDEX.to_ne_bytes()), Expr::verdict(NF_ACCEPT)]);
    source_route::refuse_rules(b, t);
    prefilter::not_covered_returns(b, t);
    for (n, shape) in c.shapes.iter().enumerate() {
        shape_rules(b, t, n, shape);
    }
    for chain in ["input", "forward", "output"] {
        prefilter::accept_rules(b, t, chain, &covered);
        if chain == "output" {
            // IPVS sends the packets it balances through LOCAL_OUT without a socket;
            // host processes' own packets have one (loading the socket's uid fails
            // without). After the prefilter: `meta` is a function call, the prefilter's
            // expressions run inline.
            b.add_rule(
                t,
                chain,
                &[
                    meta(NFT_META_SKUID),
                    Expr::Cmp { op: CmpOp::Gte, sreg: NFT_REG_1, data: 0u32.to_ne_bytes().to_vec() },
                    Expr::verdict(NF_ACCEPT),
                ],
            );
        }
        b.add_rule(t, chain, &[Expr::jump("judge")]);
    }
    if let Some(proxy) = c.conceal {
        conceal::add(b, t, proxy);
    }
}

fn add_shape_sets(b: &mut Batch, t: &str, n: usize, shape: &Shape) {
    let v4 = SetSpec { name: format!("d4_{n}"), key_type: TYPE_IPADDR, key_len: 4, interval: true };
    let v6 = SetSpec { name: format!("d6_{n}"), key_type: TYPE_IP6ADDR, key_len: 16, interval: true };
    b.add_set(t, &v4).add_set(t, &v6);
    let e4: Vec<Element> = shape.v4.iter().flat_map(|r| elements(interval_keys_v4(*r))).collect();
    let e6: Vec<Element> = shape.v6.iter().flat_map(|r| elements(interval_keys_v6(*r))).collect();
    if !e4.is_empty() {
        b.add_elements(t, &v4.name, &e4);
    }
    if !e6.is_empty() {
        b.add_elements(t, &v6.name, &e6);
    }
    if let Ports::Only(ports) | Ports::Except(ports) = &shape.ports {
        let p = SetSpec { name: format!("p_{n}"), key_type: TYPE_INET_SERVICE, key_len: 2, interval: false };
        b.add_set(t, &p);
        let keys: Vec<Element> =
            ports.iter().map(|p| Element { key: p.to_be_bytes().to_vec(), interval_end: false }).collect();
        b.add_elements(t, &p.name, &keys);
    }
}

pub(super) fn elements((start, end): (Vec<u8>, Option<Vec<u8>>)) -> Vec<Element> {
    let mut out = vec![Element { key: start, interval_end: false }];
    out.extend(end.map(|key| Element { key, interval_end: true }));
    out
}

/// Per shape and family: the destination in the shape's set, then per protocol
/// with ports its port test, for other protocols a protocol test, and fragments
/// after the first (which carry no ports) refused outright.
fn shape_rules(b: &mut Batch, t: &str, n: usize, shape: &Shape) {
    let families = [
        (NFPROTO_IPV4, IPV4_DADDR_OFFSET, 4u32, format!("d4_{n}"), shape.v4.is_empty()),
        (NFPROTO_IPV6, IPV6_DADDR_OFFSET, 16, format!("d6_{n}"), shape.v6.is_empty()),
    ];
    for (family, offset, len, set, empty) in families {
        if empty {
            continue;
        }
        let dest = vec![
            meta(NFT_META_NFPROTO),
            cmp_eq(&[family]),
            Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset, len, dreg: NFT_REG_1 },
            Expr::Lookup { set: set.clone(), sreg: NFT_REG_1, invert: false },
        ];
        let with = |tail: &[Expr]| -> Vec<Expr> {
            let mut e = dest.clone();
            e.extend_from_slice(tail);
            e.push(Expr::jump("refuse"));
            e
        };
        let any_port = shape.ports == Ports::Any;
        if any_port && shape.blocks_other() && shape.port_protocols().len() == 2 {
            b.add_rule(t, "judge", &with(&[]));
            continue;
        }
        b.add_rule(t, "judge", &with(&fragment_test(family)));
        for proto in shape.port_protocols() {
            let mut tail = vec![meta(NFT_META_L4PROTO), cmp_eq(&[proto])];
            if let Ports::Only(_) | Ports::Except(_) = shape.ports {
                tail.push(Expr::Payload {
                    base: NFT_PAYLOAD_TRANSPORT_HEADER,
                    offset: TH_DPORT_OFFSET,
                    len: 2,
                    dreg: NFT_REG_1,
                });
                tail.push(Expr::Lookup {
                    set: format!("p_{n}"),
                    sreg: NFT_REG_1,
                    invert: matches!(shape.ports, Ports::Except(_)),
                });
            }
            b.add_rule(t, "judge", &with(&tail));
        }
        if shape.blocks_other() {
            let tail = [
                meta(NFT_META_L4PROTO),
                Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![libc::IPPROTO_TCP as u8] },
                Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![libc::IPPROTO_UDP as u8] },
            ];
            b.add_rule(t, "judge", &with(&tail));
        }
    }
}

/// Non-first fragments: with conntrack loaded (every Kubernetes node) the kernel
/// reassembles before these hooks and none arrive here.
fn fragment_test(family: u8) -> Vec<Expr> {
    let (load, mask) = if family == NFPROTO_IPV4 {
        (
            Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: IPV4_FRAG_OFFSET_FIELD, len: 2, dreg: NFT_REG_1 },
            IPV4_FRAG_OFFSET_MASK,
        )
    } else {
        (
            Expr::Exthdr { header: IPV6_FRAGMENT_HEADER, offset: IPV6_FRAG_OFFSET_FIELD, len: 2, dreg: NFT_REG_1 },
            IPV6_FRAG_OFFSET_MASK,
        )
    };
    vec![
        load,
        Expr::Bitwise { sreg: NFT_REG_1, dreg: NFT_REG_1, mask: mask.to_vec() },
        Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![0, 0] },
    ]
}

fn refuse_rules(b: &mut Batch, t: &str, audit: bool) {
    b.add_rule(
        t,
        "refuse",
        &[
            meta(NFT_META_IIF),
            Expr::Lookup { set: "allow_if".into(), sreg: NFT_REG_1, invert: false },
            Expr::CounterRef { name: "exempt".into() },
            Expr::verdict(NF_ACCEPT),
        ],
    );
    // Behind a bridge the interface is every pod's: the source address tells them
    // apart, looked up with the interface it must arrive on (a concatenated key:
    // the interface in the first 4-byte register, the address from the next).
    for (family, offset, len, set) in
        [(NFPROTO_IPV4, IPV4_SADDR_OFFSET, 4, ALLOW_SRC4), (NFPROTO_IPV6, IPV6_SADDR_OFFSET, 16, ALLOW_SRC6)]
    {
        b.add_rule(
            t,
            "refuse",
            &[
                meta(NFT_META_NFPROTO),
                cmp_eq(&[family]),
                meta(NFT_META_IIF),
                Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset, len, dreg: NFT_REG32_01 },
                Expr::Lookup { set: set.into(), sreg: NFT_REG_1, invert: false },
                Expr::CounterRef { name: "exempt".into() },
                Expr::verdict(NF_ACCEPT),
            ],
        );
    }
    let (counter, prefix) = if audit { ("audited", LOG_PREFIX_AUDITED) } else { ("blocked", LOG_PREFIX_BLOCKED) };
    b.add_rule(t, "refuse", &[Expr::CounterRef { name: counter.into() }]);
    // One record per TCP connection attempt (its SYN), per packet otherwise.
    let log = [
        Expr::Limit { rate: LOG_RATE, burst: LOG_BURST },
        Expr::Log { group: LOG_GROUP, prefix: prefix.into(), snaplen: LOG_SNAPLEN },
    ];
    let mut syn = vec![
        meta(NFT_META_L4PROTO),
        cmp_eq(&[libc::IPPROTO_TCP as u8]),
        Expr::Payload { base: NFT_PAYLOAD_TRANSPORT_HEADER, offset: TCP_FLAGS_OFFSET, len: 1, dreg: NFT_REG_1 },
        Expr::Bitwise { sreg: NFT_REG_1, dreg: NFT_REG_1, mask: vec![TCP_SYN | TCP_ACK] },
        cmp_eq(&[TCP_SYN]),
    ];
    syn.extend_from_slice(&log);
    b.add_rule(t, "refuse", &syn);
    let mut other = vec![
        meta(NFT_META_L4PROTO),
        Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![libc::IPPROTO_TCP as u8] },
    ];
    other.extend_from_slice(&log);
    b.add_rule(t, "refuse", &other);
    if audit {
        b.add_rule(t, "refuse", &[Expr::verdict(NF_ACCEPT)]);
        return;
    }
    // A reset makes a pod's connect fail at once instead of after its SYN retries.
    b.add_rule(
        t,
        "refuse",
        &[
            meta(NFT_META_L4PROTO),
            cmp_eq(&[libc::IPPROTO_TCP as u8]),
            Expr::Reject { kind: NFT_REJECT_TCP_RST, icmp_code: 0 },
        ],
    );
    b.add_rule(
        t,
        "refuse",
        &[Expr::Reject { kind: NFT_REJECT_ICMPX_UNREACH, icmp_code: NFT_REJECT_ICMPX_ADMIN_PROHIBITED }],
    );
}

fn meta(key: u32) -> Expr {
    Expr::Meta { key, dreg: NFT_REG_1 }
}

fn cmp_eq(data: &[u8]) -> Expr {
    Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: data.to_vec() }
}

mod conceal;
mod prefilter;
pub(super) mod source_route;
#[cfg(test)]
mod tests;
