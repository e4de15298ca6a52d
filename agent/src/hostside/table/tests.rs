// SPDX-License-Identifier: Apache-2.0
use std::net::{Ipv4Addr, Ipv6Addr};

use metadata_guard_netfilter::attr::Attrs;

use super::*;

/// The keys added to `set` by a batch.
fn keys_of(batch: Batch, set: &str) -> Vec<Vec<u8>> {
    let elements = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM;
    let mut out = Vec::new();
    for m in batch.finish().iter().filter(|m| m.kind == elements) {
        let attrs = Attrs::new(&m.body[4..]);
        if attrs.find(2).map(|a| a.str()).as_deref() != Some(set) {
            continue;
        }
        for e in attrs.find(NFTA_SET_ELEM_LIST_ELEMENTS).unwrap().nested() {
            let key = e.nested().find(NFTA_SET_ELEM_KEY).unwrap().nested().find(NFTA_DATA_VALUE).unwrap();
            out.push(key.value.to_vec());
        }
    }
    out
}

#[test]
fn pods_behind_a_bridge_are_keyed_by_bridge_then_source_address() {
    let bridge = 9u32;
    let content = Content {
        shapes: Vec::new(),
        audit: false,
        allowed: Allowed {
            interfaces: vec![4],
            v4: vec![(bridge, Ipv4Addr::new(10, 210, 1, 2))],
            v6: vec![(bridge, Ipv6Addr::new(0xfd43, 1, 0, 0, 0, 0, 0, 2))],
        },
        counters: Default::default(),
        conceal: None,
    };
    assert_eq!(keys_of(replace(&content, 0), "allow_if"), vec![4u32.to_ne_bytes().to_vec()]);
    let v4 = keys_of(replace(&content, 0), ALLOW_SRC4);
    assert_eq!(v4, vec![[&bridge.to_ne_bytes()[..], &[10, 210, 1, 2]].concat()]);
    let v6 = keys_of(replace(&content, 0), ALLOW_SRC6);
    assert_eq!(v6.len(), 1);
    assert_eq!(v6[0].len(), 4 + 16, "an ifindex register, then the address");
    assert_eq!(v6[0][..4], bridge.to_ne_bytes());
}

#[test]
fn concatenated_key_types_read_as_nft_prints_them() {
    // nft(8): `ifindex . ipv4_addr` is type 20 << 6 | 7.
    assert_eq!(concat_type(&[TYPE_IFINDEX, TYPE_IPADDR]), (20 << 6) | 7);
}

#[test]
fn the_prefilter_compares_each_blocked_lead_once_in_network_order_and_every_range_joined() {
    let shapes = crate::hostside::ruleset::shapes(
        &crate::policy::compile(&[
            crate::policy::BlockRule::all("169.254.169.254/32".parse().unwrap()),
            crate::policy::BlockRule::except("169.254.0.0/16".parse().unwrap(), &[53]),
            crate::policy::BlockRule::all("fd00:ec2::254/128".parse().unwrap()),
        ])
        .unwrap(),
    );
    let content =
        Content { shapes, audit: false, allowed: Allowed::default(), counters: Default::default(), conceal: None };
    // Few leads: compared in the rule, no lead set. Then the next 16 bits, where few
    // values are covered: not for IPv4 (the /16), for IPv6 (fd00:ec2::254's 0x0ec2).
    assert!(keys_of(replace(&content, 0), prefilter::LEAD4).is_empty());
    let compared = lead_compares(replace(&content, 0), "input");
    assert_eq!(compared, vec![vec![vec![169, 254]], vec![vec![0xfd, 0x00]], vec![vec![0x0e, 0xc2]]]);
    // One interval: the /16 holds the /32 (start, and the first address after it).
    assert_eq!(keys_of(replace(&content, 0), prefilter::ANY4), vec![vec![169, 254, 0, 0], vec![169, 255, 0, 0]]);
}

#[test]
fn more_leads_than_the_rule_compares_go_to_a_set() {
    let blocked: Vec<_> = (0..=prefilter::MAX_LEAD_COMPARES as u8)
        .map(|i| crate::policy::BlockRule::all(format!("10.{i}.0.1/32").parse().unwrap()))
        .collect();
    let shapes = crate::hostside::ruleset::shapes(&crate::policy::compile(&blocked).unwrap());
    let content =
        Content { shapes, audit: false, allowed: Allowed::default(), counters: Default::default(), conceal: None };
    let leads = keys_of(replace(&content, 0), prefilter::LEAD4);
    assert_eq!(leads.len(), prefilter::MAX_LEAD_COMPARES + 1);
    assert_eq!(leads[0], vec![10, 0]);
    let compared = lead_compares(replace(&content, 0), "input");
    assert_eq!(compared[0], Vec::<Vec<u8>>::new(), "the v4 lead rule looks the lead up in the set");
    assert_eq!(compared[2], vec![vec![0, 1]], "every /32 ends in .0.1: one value of the next 16 bits");
}

#[test]
fn a_destination_sharing_a_blocked_lead_meets_a_second_rule_in_every_base_chain() {
    let blocked = ["169.254.169.254/32", "169.254.42.42/32", "fd00:ec2::254/128"];
    let rules: Vec<_> = blocked.iter().map(|n| crate::policy::BlockRule::all(n.parse().unwrap())).collect();
    let shapes = crate::hostside::ruleset::shapes(&crate::policy::compile(&rules).unwrap());
    let content =
        Content { shapes, audit: false, allowed: Allowed::default(), counters: Default::default(), conceal: None };
    for chain in ["input", "forward", "output"] {
        let compared = lead_compares(replace(&content, 0), chain);
        assert_eq!(compared.len(), 4, "{chain}: two lead rules, two next rules");
        assert_eq!(compared[2], vec![vec![42, 42], vec![169, 254]], "{chain}: the v4 next bits, sorted");
        assert_eq!(compared[3], vec![vec![0x0e, 0xc2]], "{chain}");
    }
}

/// Per prefilter rule of `chain` (those that start with the version test, a load of
/// the header's first bytes), the values its `!=` compares hold.
fn lead_compares(batch: Batch, chain: &str) -> Vec<Vec<Vec<u8>>> {
    let rules = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE;
    let mut out = Vec::new();
    for m in batch.finish().iter().filter(|m| m.kind == rules) {
        let attrs = Attrs::new(&m.body[4..]);
        if attrs.find(NFTA_RULE_CHAIN).map(|a| a.str()).as_deref() != Some(chain) {
            continue;
        }
        let mut neq = Vec::new();
        let mut tests_version = false;
        for e in attrs.find(NFTA_RULE_EXPRESSIONS).unwrap().nested() {
            let e = e.nested();
            let name = e.find(NFTA_EXPR_NAME).unwrap().str();
            let data = e.find(NFTA_EXPR_DATA).map(|d| d.nested());
            match (name.as_str(), data) {
                // NFTA_CMP_OP (2) is NFT_CMP_NEQ (1); NFTA_CMP_DATA (3) holds the value.
                ("cmp", Some(d)) if d.find(2).map(|o| o.value.to_vec()) == Some(1u32.to_be_bytes().to_vec()) => {
                    neq.push(d.find(3).unwrap().nested().find(NFTA_DATA_VALUE).unwrap().value.to_vec());
                }
                // NFTA_PAYLOAD_OFFSET (3) of 0: the IP header's first byte or word.
                ("payload", Some(d)) if neq.is_empty() && d.find(3).map(|o| o.value.to_vec()) == Some(vec![0; 4]) => {
                    tests_version = true;
                }
                _ => {}
            }
        }
        if tests_version {
            out.push(neq);
        }
    }
    out
}

#[test]
fn in_conceal_mode_the_proxys_connections_are_untracked_before_any_nat() {
    let mut content = Content {
        shapes: Vec::new(),
        audit: false,
        allowed: Allowed::default(),
        counters: Default::default(),
        conceal: None,
    };
    let chains = |content: &Content| -> Vec<(String, Option<i32>)> {
        let kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWCHAIN;
        let batch = replace(content, 0).finish();
        batch
            .iter()
            .filter(|m| m.kind == kind)
            .map(|m| {
                let attrs = Attrs::new(&m.body[4..]);
                let name = attrs.find(NFTA_CHAIN_NAME).unwrap().str();
                let priority = attrs.find(NFTA_CHAIN_HOOK).and_then(|h| {
                    h.nested().find(NFTA_HOOK_PRIORITY).map(|p| i32::from_be_bytes(p.value.try_into().unwrap()))
                });
                (name, priority)
            })
            .collect()
    };
    assert!(chains(&content).iter().all(|(n, _)| !n.starts_with("conceal")));
    content.conceal = Some("10.200.0.1:8775".parse().unwrap());
    let all = chains(&content);
    for name in ["conceal_pre", "conceal_out"] {
        assert!(all.contains(&(name.to_string(), Some(-300))), "{name} at raw priority: {all:?}");
    }
    let rules = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE;
    let batch = replace(&content, 0).finish();
    let notracks = batch
        .iter()
        .filter(|m| m.kind == rules && m.body.windows(8).any(|w| w == b"notrack\0"))
        .filter(|m| {
            m.body.windows(4).any(|w| w == [10, 200, 0, 1]) && m.body.windows(2).any(|w| w == 8775u16.to_be_bytes())
        })
        .count();
    assert_eq!(notracks, 3, "to the proxy (prerouting, output) and from it (output)");
}

/// Every message of a whole replacement (every preset's shapes, allowlisted pods of
/// both kinds, the ownership flags, audit and enforce) is read back by an independent
/// decoder (`netlink-packet-netfilter`) and written again to the very same bytes.
#[test]
fn every_message_of_a_replacement_decodes_with_an_independent_decoder() {
    use metadata_guard_netfilter::socket::{put_header, NLM_F_REQUEST};
    use netlink_packet_core::NetlinkMessage;
    use netlink_packet_netfilter::NetfilterMessage;

    let mut rules: Vec<_> = crate::policy::Preset::ALL.iter().flat_map(|p| p.rules()).collect();
    rules.extend(crate::policy::Preset::GkeWorkloadIdentity.host_side_rules());
    let shapes = crate::hostside::ruleset::shapes(&crate::policy::compile(&rules).unwrap());
    for audit in [false, true] {
        let content = Content {
            shapes: shapes.clone(),
            audit,
            allowed: Allowed {
                interfaces: vec![4, 5],
                v4: vec![(9, Ipv4Addr::new(10, 210, 1, 2))],
                v6: vec![(9, Ipv6Addr::new(0xfd43, 1, 0, 0, 0, 0, 0, 2))],
            },
            counters: [(1, 2), (3, 4), (5, 6)],
            conceal: Some("10.200.0.1:8775".parse().unwrap()),
        };
        let messages = replace(&content, crate::hostside::ownership::PROTECTED).finish();
        assert!(messages.len() > 30, "a whole table: {} messages", messages.len());
        for m in messages.iter().filter(|m| wants_ack(m)) {
            let mut wire = Vec::new();
            put_header(&mut wire, m.kind, NLM_F_REQUEST | m.flags, 1, m.body.len());
            wire.extend_from_slice(&m.body);
            let decoded = NetlinkMessage::<NetfilterMessage>::deserialize(&wire)
                .unwrap_or_else(|e| panic!("message {:#06x} does not decode: {e:?}", m.kind));
            let mut again = vec![0; decoded.buffer_len()];
            decoded.serialize(&mut again);
            assert_eq!(again, wire, "message {:#06x} re-encodes differently: {decoded:?}", m.kind);
        }
    }
}
