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
fn counter_slots_are_distinct_and_in_range() {
    let mut seen = std::collections::BTreeSet::new();
    for h in Hook::ALL {
        for v in Verdict::ALL {
            let s = counters::slot(h, v);
            assert!(s < counters::EVENTS_LOST);
            assert!(seen.insert(s));
        }
    }
    assert_eq!(core::mem::size_of::<Event>(), 72);
    assert_eq!(core::mem::size_of::<DestRules>(), 4 + MAX_RULES * 20);
    assert_eq!(core::mem::size_of::<ConcealSettings>(), 32);
    assert_eq!(core::mem::size_of::<SockKey>(), 20);
    assert_eq!(core::mem::size_of::<ConcealOrigin>(), 40);
}
