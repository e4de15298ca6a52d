// SPDX-License-Identifier: Apache-2.0
//! The layouts' sizes, the rules' verdicts, the prefilter and the counter slots.

extern crate std;
use super::*;

fn rule(protocols: u8, port_match: u8, ports: &[u16]) -> PortRule {
    let mut r = PortRule { protocols, port_match, port_count: ports.len() as u8, ..Default::default() };
    r.ports[..ports.len()].copy_from_slice(ports);
    r
}

#[test]
fn every_port_but_dns_is_blocked() {
    let mut rules = DestRules { rule_count: 1, ..Default::default() };
    rules.rules[0] = rule(PROTO_ALL, PORTS_EXCEPT, &[53]);
    assert!(rules.blocks(PROTO_TCP, 80));
    assert!(rules.blocks(PROTO_UDP, 80));
    assert!(rules.blocks(PROTO_OTHER, 0));
    assert!(!rules.blocks(PROTO_UDP, 53));
    assert!(!rules.blocks(PROTO_TCP, 53));
}

#[test]
fn only_listed_ports_and_protocols_are_blocked() {
    let mut rules = DestRules { rule_count: 1, ..Default::default() };
    rules.rules[0] = rule(PROTO_TCP, PORTS_ONLY, &[80, 32526]);
    assert!(rules.blocks(PROTO_TCP, 80));
    assert!(rules.blocks(PROTO_TCP, 32526));
    assert!(!rules.blocks(PROTO_TCP, 443));
    assert!(!rules.blocks(PROTO_UDP, 80));
}

#[test]
fn any_rule_blocking_is_enough_and_unused_slots_are_ignored() {
    let mut rules = DestRules { rule_count: 2, ..Default::default() };
    rules.rules[0] = rule(PROTO_TCP, PORTS_ONLY, &[80]);
    rules.rules[1] = rule(PROTO_UDP, PORTS_ANY, &[]);
    rules.rules[2] = rule(PROTO_ALL, PORTS_ANY, &[]);
    assert!(rules.blocks(PROTO_TCP, 80));
    assert!(rules.blocks(PROTO_UDP, 9));
    assert!(!rules.blocks(PROTO_TCP, 81), "slot 2 is beyond rule_count");
}

#[test]
fn an_unreadable_port_is_blocked_where_any_port_is() {
    let mut rules = DestRules { rule_count: 1, ..Default::default() };
    rules.rules[0] = rule(PROTO_TCP | PROTO_UDP, PORTS_ONLY, &[80]);
    assert!(rules.blocks_some(PROTO_UDP));
    assert!(rules.blocks_some(PROTO_ALL));
    assert!(!rules.blocks_some(PROTO_OTHER));
    rules.rules[0] = rule(PROTO_ALL, PORTS_ONLY, &[]);
    assert!(!rules.blocks_some(PROTO_ALL), "an empty port list blocks nothing");
}

#[test]
fn prefilter_covers_exactly_the_prefixes_leads() {
    let mut f = Prefilter::default();
    f.add(&[169, 254, 169, 254], 32);
    assert!(f.covers(u16::from_be_bytes([169, 254])));
    assert!(!f.covers(u16::from_be_bytes([169, 253])));
    assert!(!f.covers(u16::from_be_bytes([10, 200])));
    f.add(&[10, 0, 0, 0], 8);
    assert!(f.covers(u16::from_be_bytes([10, 0])) && f.covers(u16::from_be_bytes([10, 255])));
    assert!(!f.covers(u16::from_be_bytes([11, 0])));
    let mut all = Prefilter::default();
    all.add(&[0; 16], 0);
    assert!(all.words.iter().all(|&w| w == u64::MAX));
    assert_eq!(prefilter_index(AF_INET6), 1);
    assert_eq!(prefilter_index(AF_INET), 0);
}

#[test]
fn the_second_filter_marks_the_next_16_bits_a_prefix_allows() {
    let next = |a: &[u8]| u16::from_be_bytes([a[2], a[3]]);
    let mut f = Prefilter::default();
    f.add_next(&[169, 254, 169, 254], 32);
    assert!(f.covers(next(&[169, 254, 169, 254])));
    // NodeLocal DNSCache shares the lead, not the next bits.
    assert!(!f.covers(next(&[169, 254, 20, 10])));
    f.add_next(&[100, 100, 0, 0], 20);
    assert!(f.covers(next(&[100, 100, 0, 0])) && f.covers(next(&[100, 100, 15, 255])));
    assert!(!f.covers(next(&[100, 100, 16, 0])));
    // fd00:ec2::254: the next bits are 0x0ec2; a ULA pod range fd00:10:244:: is 0x0010.
    let mut v6 = Prefilter::default();
    v6.add_next(&[0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54], 128);
    assert!(v6.covers(0x0ec2) && !v6.covers(0x0010));
    // Shorter than 16 bits: every value of the next bits is possible.
    let mut wide = Prefilter::default();
    wide.add_next(&[10, 0, 0, 0], 8);
    assert!(wide.words.iter().all(|&w| w == u64::MAX));
    let mut sixteen = Prefilter::default();
    sixteen.add_next(&[10, 1, 0, 0], 16);
    assert!(sixteen.words.iter().all(|&w| w == u64::MAX));
}

#[test]
fn every_hook_round_trips_through_its_number() {
    assert_eq!(Hook::ALL.len(), HOOK_COUNT as usize);
    for (i, h) in Hook::ALL.into_iter().enumerate() {
        assert_eq!(h as usize, i);
        assert_eq!(Hook::from_u8(h as u8), Some(h), "{h:?}");
    }
    assert_eq!(Hook::from_u8(Hook::Host as u8), Some(Hook::Host));
    assert_eq!(Hook::from_u8(HOOK_COUNT as u8), None);
    assert!(Hook::PROGRAMS.iter().all(|h| *h != Hook::Host));
}

#[test]
fn counter_slots_are_distinct_and_in_range() {
    let mut seen = std::collections::BTreeSet::new();
    for h in Hook::PROGRAMS {
        for v in Verdict::ALL {
            let s = counters::slot(h, v);
            assert!(s < counters::EVENTS_LOST);
            assert!(seen.insert(s));
        }
    }
    assert_eq!(core::mem::size_of::<Event>(), 96);
    assert_eq!(core::mem::size_of::<UplinkAllowKey>(), 24);
    assert_eq!(Hook::PROGRAMS.last(), Some(&Hook::Uplink));
    assert_eq!(core::mem::size_of::<DestRules>(), 4 + MAX_RULES * 20);
    assert_eq!(core::mem::size_of::<ConcealSettings>(), 32);
    assert_eq!(core::mem::size_of::<SockKey>(), 20);
    assert_eq!(core::mem::size_of::<ConcealOrigin>(), 40);
}
