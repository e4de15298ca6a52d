// SPDX-License-Identifier: Apache-2.0
//! The prefilter every packet the node receives, forwards or sends goes through: one
//! rule per family at the head of each base chain that accepts the packet when no
//! shape covers the first 16 bits (the lead) of its destination — nearly every packet
//! — then, for a packet that shares a lead with a blocked destination (NodeLocal
//! DNSCache's 169.254.20.10 beside 169.254.169.254), one that accepts it when no shape
//! covers its next 16 bits either (as the socket hooks' second prefilter); the rest
//! go on to the interval check in `judge`.
//!
//! The rule is made of the expressions nf_tables runs inline, without a function call
//! (`payload` of 1, 2 or 4 aligned bytes, `cmp` of equality on at most 4 bytes,
//! `bitwise` on 4): the IP version from the header's first word, then the lead
//! compared with each covered lead. Measured per UDP datagram on the node's input hook
//! (mg-bench, a base chain with no rules as the zero): `meta nfproto` and a bitmap set
//! lookup cost ~160 ns; the version word and four compares ~70 ns, of which ~50 ns is
//! any rule's own cost. A set lookup costs about as much as
//! [`MAX_LEAD_COMPARES`] compares, so policies with more leads than that get one.

use metadata_guard_netfilter::nftables::*;

use super::{elements, IPV4_DADDR_OFFSET, IPV6_DADDR_OFFSET};
use crate::hostside::ruleset::{interval_keys_v4, interval_keys_v6, Covered};

pub(super) const ANY4: &str = "any4";
pub(super) const ANY6: &str = "any6";
pub(super) const LEAD4: &str = "lead4";
pub(super) const LEAD6: &str = "lead6";
/// Bytes of a destination's lead, the prefilter's key.
const LEAD_LEN: u32 = 2;
/// Up to this many leads a family's rule compares one by one; beyond, it looks the
/// lead up in a set (a bitmap: 2-byte keys).
pub(super) const MAX_LEAD_COMPARES: usize = 16;

/// The IP version is the high nibble of the header's first byte: the first word
/// masked, compared with the version shifted up.
const VERSION_WORD_LEN: u32 = 4;
const VERSION_MASK: [u8; 4] = [0xf0, 0, 0, 0];
/// Nearly every IPv4 header's first byte: version 4, five 32-bit words (no options).
/// One byte compared, where the version alone takes a mask too; a header with
/// options fails the test and goes on to be judged in full.
const IPV4_WITHOUT_OPTIONS: u8 = 0x45;

/// One family's prefilter inputs.
struct Family {
    nfproto: u8,
    /// The version nibble, in place in the header's first byte.
    version: u8,
    daddr_offset: u32,
    /// Where the destination's next 16 bits are.
    next_offset: u32,
    address_len: u32,
    any: &'static str,
    lead_set: &'static str,
}

const FAMILIES: [Family; 2] = [
    Family {
        nfproto: NFPROTO_IPV4,
        version: 0x40,
        daddr_offset: IPV4_DADDR_OFFSET,
        next_offset: IPV4_DADDR_OFFSET + LEAD_LEN,
        address_len: 4,
        any: ANY4,
        lead_set: LEAD4,
    },
    Family {
        nfproto: NFPROTO_IPV6,
        version: 0x60,
        daddr_offset: IPV6_DADDR_OFFSET,
        next_offset: IPV6_DADDR_OFFSET + LEAD_LEN,
        address_len: 16,
        any: ANY6,
        lead_set: LEAD6,
    },
];

/// How a family's rule tells a covered lead.
#[derive(Debug, PartialEq, Eq)]
enum Leads {
    /// Each compared in the rule (none: every packet of the family is accepted).
    Compared(Vec<u16>),
    /// Looked up in the family's lead set.
    InSet(Vec<u16>),
    /// Too many to list: every packet of the family goes on to `judge`.
    Unlisted,
}

fn leads(covered: Option<Vec<u16>>) -> Leads {
    match covered {
        Some(leads) if leads.len() <= MAX_LEAD_COMPARES => Leads::Compared(leads),
        Some(leads) => Leads::InSet(leads),
        None => Leads::Unlisted,
    }
}

fn per_family(covered: &Covered) -> [Leads; 2] {
    [leads(covered.leads_v4()), leads(covered.leads_v6())]
}

/// The interval sets `judge` checks, and the lead sets of families with many leads.
pub(super) fn add_sets(b: &mut Batch, t: &str, covered: &Covered) {
    let v4 = SetSpec { name: ANY4.into(), key_type: TYPE_IPADDR, key_len: 4, interval: true };
    let v6 = SetSpec { name: ANY6.into(), key_type: TYPE_IP6ADDR, key_len: 16, interval: true };
    b.add_set(t, &v4).add_set(t, &v6);
    for (family, leads) in FAMILIES.iter().zip(per_family(covered)) {
        let Leads::InSet(leads) = leads else { continue };
        let set = SetSpec { name: family.lead_set.into(), key_type: TYPE_INTEGER, key_len: LEAD_LEN, interval: false };
        b.add_set(t, &set);
        let keys: Vec<Element> =
            leads.iter().map(|l| Element { key: l.to_be_bytes().to_vec(), interval_end: false }).collect();
        b.add_elements(t, family.lead_set, &keys);
    }
    let e4: Vec<Element> = covered.v4.iter().flat_map(|r| elements(interval_keys_v4(*r))).collect();
    let e6: Vec<Element> = covered.v6.iter().flat_map(|r| elements(interval_keys_v6(*r))).collect();
    if !e4.is_empty() {
        b.add_elements(t, ANY4, &e4);
    }
    if !e6.is_empty() {
        b.add_elements(t, ANY6, &e6);
    }
}

/// The head of a base chain: a packet whose destination's lead no shape covers leaves
/// at its family's rule (accept ends only this chain: other tables still see the
/// packet, as when it falls off the end); the caller sends the rest on to `judge`.
/// Accepting on a miss, not jumping on a hit, spares the common packet the other
/// family's rule.
pub(super) fn accept_rules(b: &mut Batch, t: &str, chain: &str, covered: &Covered) {
    for (family, leads) in FAMILIES.iter().zip(per_family(covered)) {
        if let Some(rule) = accept_rule(family, &leads) {
            b.add_rule(t, chain, &rule);
        }
    }
    let nexts = [covered.nexts_v4(MAX_LEAD_COMPARES), covered.nexts_v6(MAX_LEAD_COMPARES)];
    for (family, nexts) in FAMILIES.iter().zip(nexts) {
        // Too many values (a prefix shorter than /28 or so): `judge` answers.
        if let Some(nexts) = nexts {
            b.add_rule(t, chain, &next_rule(family, &nexts));
        }
    }
}

/// Accepts a packet of the family whose destination's next 16 bits no shape covers.
fn next_rule(family: &Family, nexts: &[u16]) -> Vec<Expr> {
    let mut rule = family_then_load(family, family.next_offset);
    rule.extend(none_of(nexts));
    rule.push(Expr::verdict(NF_ACCEPT));
    rule
}

/// The family's test, then the 16 bits at `offset` into the register the compares read.
fn family_then_load(family: &Family, offset: u32) -> Vec<Expr> {
    let mut exprs = version_test(family);
    exprs.push(Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset, len: LEAD_LEN, dreg: NFT_REG_1 });
    exprs
}

/// The register holds none of `values` (16 bits each, compared in network order).
fn none_of(values: &[u16]) -> impl Iterator<Item = Expr> + '_ {
    values.iter().map(|v| Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: v.to_be_bytes().to_vec() })
}

/// Whether the packet is of the family, from the header's first byte or word.
fn version_test(family: &Family) -> Vec<Expr> {
    if family.nfproto == NFPROTO_IPV4 {
        return vec![
            Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 0, len: 1, dreg: NFT_REG_1 },
            Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![IPV4_WITHOUT_OPTIONS] },
        ];
    }
    // IPv6's first byte also holds half the traffic class: the version is masked out.
    vec![
        Expr::Payload { base: NFT_PAYLOAD_NETWORK_HEADER, offset: 0, len: VERSION_WORD_LEN, dreg: NFT_REG_1 },
        Expr::Bitwise { sreg: NFT_REG_1, dreg: NFT_REG_1, mask: VERSION_MASK.to_vec() },
        Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![family.version, 0, 0, 0] },
    ]
}

/// The family's prefilter rule; none when its leads are too many to list.
fn accept_rule(family: &Family, leads: &Leads) -> Option<Vec<Expr>> {
    let mut rule = family_then_load(family, family.daddr_offset);
    match leads {
        Leads::Compared(leads) => rule.extend(none_of(leads)),
        Leads::InSet(_) => rule.push(Expr::Lookup { set: family.lead_set.into(), sreg: NFT_REG_1, invert: true }),
        Leads::Unlisted => return None,
    }
    rule.push(Expr::verdict(NF_ACCEPT));
    Some(rule)
}

/// In `judge`: a destination no shape covers (it only shares its lead with one)
/// returns after one interval lookup instead of going through every shape's rules.
pub(super) fn not_covered_returns(b: &mut Batch, t: &str) {
    for family in &FAMILIES {
        b.add_rule(
            t,
            "judge",
            &[
                Expr::Meta { key: NFT_META_NFPROTO, dreg: NFT_REG_1 },
                Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![family.nfproto] },
                Expr::Payload {
                    base: NFT_PAYLOAD_NETWORK_HEADER,
                    offset: family.daddr_offset,
                    len: family.address_len,
                    dreg: NFT_REG_1,
                },
                Expr::Lookup { set: family.any.into(), sreg: NFT_REG_1, invert: true },
                Expr::verdict(NFT_RETURN),
            ],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(v4: &[(u32, u32)], v6: &[(u128, u128)]) -> Covered {
        Covered { v4: v4.to_vec(), v6: v6.to_vec() }
    }

    #[test]
    fn a_few_leads_are_compared_inline_many_looked_up_too_many_sent_on() {
        let few = covered(&[(0xa9fe_a9fe, 0xa9fe_a9fe)], &[]);
        assert_eq!(per_family(&few), [Leads::Compared(vec![0xa9fe]), Leads::Compared(vec![])]);
        let many = covered(&[(0x0a00_0000, 0x0aff_ffff)], &[]);
        assert_eq!(per_family(&many)[0], Leads::InSet((0x0a00..=0x0aff).collect()));
        assert_eq!(accept_rule(&FAMILIES[0], &Leads::Unlisted), None);
    }

    #[test]
    fn the_rule_checks_the_version_word_then_compares_the_lead_in_network_order() {
        let rule = accept_rule(&FAMILIES[1], &Leads::Compared(vec![0xfd00, 0xfe80])).unwrap();
        assert_eq!(rule[2], Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![0x60, 0, 0, 0] });
        let Expr::Payload { offset, len, .. } = rule[3] else { panic!("no lead load: {rule:?}") };
        assert_eq!((offset, len), (IPV6_DADDR_OFFSET, LEAD_LEN));
        assert_eq!(rule[4], Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![0xfd, 0x00] });
        assert_eq!(rule[5], Expr::Cmp { op: CmpOp::Neq, sreg: NFT_REG_1, data: vec![0xfe, 0x80] });
        assert_eq!(rule.last(), Some(&Expr::verdict(NF_ACCEPT)));
        let v4 = accept_rule(&FAMILIES[0], &Leads::Compared(vec![0xa9fe])).unwrap();
        let Expr::Payload { offset: 0, len: 1, .. } = v4[0] else { panic!("no first-byte load: {v4:?}") };
        assert_eq!(v4[1], Expr::Cmp { op: CmpOp::Eq, sreg: NFT_REG_1, data: vec![IPV4_WITHOUT_OPTIONS] });
    }

    #[test]
    fn every_expression_of_the_common_path_is_one_nf_tables_runs_inline() {
        // payload: 1, 2 or 4 bytes at an offset aligned to its length; cmp: == or != on
        // at most 4 bytes; bitwise: 4 bytes (nft_payload/cmp/bitwise_select_ops).
        let rule = accept_rule(&FAMILIES[0], &Leads::Compared(vec![0xa9fe, 0x6464])).unwrap();
        for e in rule.iter().chain(&next_rule(&FAMILIES[1], &[0x0ec2])) {
            match e {
                Expr::Payload { offset, len, .. } => assert!([1, 2, 4].contains(len) && offset % len == 0, "{e:?}"),
                Expr::Cmp { op, data, .. } => assert!(*op != CmpOp::Gte && data.len() <= 4, "{e:?}"),
                Expr::Bitwise { mask, .. } => assert_eq!(mask.len(), 4, "{e:?}"),
                Expr::Verdict { .. } => {}
                other => panic!("{other:?} is not run inline"),
            }
        }
    }
}
