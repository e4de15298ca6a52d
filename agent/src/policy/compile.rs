// SPDX-License-Identifier: Apache-2.0
//! From block rules to the values of the kernel's longest-prefix-match tries.
//!
//! An LPM lookup returns only the longest matching prefix, so the value stored for a
//! prefix must answer for every rule that covers it: its own and those of every wider
//! prefix containing it. A /32 under a blocked /16 therefore carries the /16's rule too.

use std::collections::BTreeMap;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use metadata_guard_common::{DestRules, PortRule, MAX_RULES, POLICY_MAX_ENTRIES, PORTS_ANY, PORTS_EXCEPT, PORTS_ONLY};

use super::{distinct_ports, BlockRule, PolicyError, PortMatch};

/// A policy in the kernel's layout: one entry per distinct prefix, sorted by address
/// and then prefix length, so that equal policies compile to equal values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CompiledPolicy {
    pub v4: Vec<(Ipv4Net, DestRules)>,
    pub v6: Vec<(Ipv6Net, DestRules)>,
    /// Rules only the node's own checks apply on top of these (the uplink program and
    /// the host-side table; see `Preset::host_side_rules`), compiled on their own:
    /// a destination is blocked there when either compiled set blocks it.
    pub node_only: Option<Box<CompiledPolicy>>,
}

pub(crate) fn compile(rules: &[BlockRule]) -> Result<CompiledPolicy, PolicyError> {
    let mut own: BTreeMap<IpNet, Vec<PortRule>> = BTreeMap::new();
    for rule in rules {
        rule.validate()?;
        push_distinct(own.entry(trie_prefix(rule.cidr)).or_default(), kernel_rule(rule));
    }

    let mut policy = CompiledPolicy::default();
    for prefix in own.keys() {
        let mut covering = Vec::new();
        for ancestor in std::iter::successors(Some(*prefix), IpNet::supernet) {
            for rule in own.get(&ancestor).into_iter().flatten() {
                push_distinct(&mut covering, *rule);
            }
        }
        if covering.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules { prefix: *prefix, count: covering.len() });
        }
        let mut value = DestRules { rule_count: covering.len() as u32, ..Default::default() };
        value.rules[..covering.len()].copy_from_slice(&covering);
        match prefix {
            IpNet::V4(net) => policy.v4.push((*net, value)),
            IpNet::V6(net) => policy.v6.push((*net, value)),
        }
    }

    for (family, count) in [("IPv4", policy.v4.len()), ("IPv6", policy.v6.len())] {
        if count > POLICY_MAX_ENTRIES as usize {
            return Err(PolicyError::TooManyPrefixes { family, count });
        }
    }
    Ok(policy)
}

/// The kernel judges an IPv4-mapped IPv6 destination (`::ffff:a.b.c.d`) in the IPv4
/// trie, so a rule written for such addresses only takes effect there.
fn trie_prefix(cidr: IpNet) -> IpNet {
    let IpNet::V6(net) = cidr else { return cidr };
    match (net.addr().to_ipv4_mapped(), net.prefix_len().checked_sub(96)) {
        (Some(v4), Some(len)) => Ipv4Net::new(v4, len).map_or(cidr, IpNet::V4),
        _ => cidr,
    }
}

fn kernel_rule(rule: &BlockRule) -> PortRule {
    let (port_match, ports) = match &rule.ports {
        PortMatch::Any => (PORTS_ANY, Vec::new()),
        PortMatch::Only(ports) => (PORTS_ONLY, distinct_ports(ports)),
        PortMatch::Except(ports) => (PORTS_EXCEPT, distinct_ports(ports)),
    };
    // `validate` has bounded the list by MAX_PORTS.
    let mut kernel =
        PortRule { protocols: rule.protocols, port_match, port_count: ports.len() as u8, ..Default::default() };
    kernel.ports[..ports.len()].copy_from_slice(&ports);
    kernel
}

fn push_distinct(rules: &mut Vec<PortRule>, rule: PortRule) {
    if !rules.contains(&rule) {
        rules.push(rule);
    }
}

#[cfg(test)]
impl CompiledPolicy {
    /// Decides an attempt as the kernel does: the longest matching prefix alone
    /// answers, and IPv4-mapped IPv6 destinations are judged as IPv4.
    pub(crate) fn blocks(&self, addr: std::net::IpAddr, proto_bit: u8, port: u16) -> bool {
        use std::net::IpAddr;
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            IpAddr::V4(_) => addr,
        };
        let v4 = self.v4.iter().map(|(net, rules)| (IpNet::V4(*net), rules));
        let v6 = self.v6.iter().map(|(net, rules)| (IpNet::V6(*net), rules));
        v4.chain(v6)
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .is_some_and(|(_, rules)| rules.blocks(proto_bit, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metadata_guard_common::{PROTO_ALL, PROTO_OTHER, PROTO_TCP, PROTO_UDP};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> std::net::IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_narrow_rule_inside_a_wide_block_keeps_the_wide_block() {
        let policy =
            compile(&[BlockRule::all(net("169.254.0.0/16")), BlockRule::only(net("169.254.169.254/32"), &[80])])
                .unwrap();

        let prefixes: Vec<String> = policy.v4.iter().map(|(net, _)| net.to_string()).collect();
        assert_eq!(prefixes, ["169.254.0.0/16", "169.254.169.254/32"]);
        let host = &policy.v4[1].1;
        assert_eq!(host.rule_count, 2, "its own port-80 rule and the inherited /16 rule");
        assert!(host.blocks(PROTO_TCP, 80));
        assert!(host.blocks(PROTO_TCP, 443), "the /16 blocks every port, the /32 cannot reopen them");
        assert!(policy.blocks(ip("169.254.169.254"), PROTO_UDP, 53));
        assert!(policy.blocks(ip("169.254.1.1"), PROTO_OTHER, 0));
        assert!(!policy.blocks(ip("169.253.255.255"), PROTO_TCP, 80));
    }

    #[test]
    fn a_wide_rule_is_not_pushed_down_into_unrelated_prefixes() {
        let policy =
            compile(&[BlockRule::only(net("10.1.0.0/16"), &[22]), BlockRule::all(net("10.2.3.4/32"))]).unwrap();
        assert!(policy.v4.iter().all(|(_, rules)| rules.rule_count == 1));
        assert!(!policy.blocks(ip("10.2.3.5"), PROTO_TCP, 22));
    }

    #[test]
    fn identical_rules_are_stored_once() {
        let imds = BlockRule::except(net("169.254.169.254/32"), &[53]);
        let same_ports_reordered = BlockRule::except(net("169.254.169.254/32"), &[53, 53]);
        let policy = compile(&[imds.clone(), same_ports_reordered, imds]).unwrap();
        assert_eq!(policy.v4.len(), 1);
        assert_eq!(policy.v4[0].1.rule_count, 1);
    }

    #[test]
    fn the_order_of_rules_does_not_change_the_result() {
        let rules = [
            BlockRule::all(net("fd00:ec2::254/128")),
            BlockRule::all(net("10.0.0.0/8")),
            BlockRule::all(net("0.0.0.0/0")),
        ];
        let mut reversed = rules.clone();
        reversed.reverse();
        assert_eq!(compile(&rules).unwrap(), compile(&reversed).unwrap());
        let prefixes: Vec<String> = compile(&rules).unwrap().v4.iter().map(|(net, _)| net.to_string()).collect();
        assert_eq!(prefixes, ["0.0.0.0/0", "10.0.0.0/8"]);
    }

    #[test]
    fn an_ipv4_mapped_rule_lands_in_the_ipv4_trie() {
        let policy = compile(&[BlockRule::all(net("::ffff:169.254.170.2/128"))]).unwrap();
        assert!(policy.v6.is_empty());
        assert_eq!(policy.v4[0].0, "169.254.170.2/32".parse::<Ipv4Net>().unwrap());
        assert!(policy.blocks(ip("169.254.170.2"), PROTO_TCP, 80));
        assert!(policy.blocks(ip("::ffff:169.254.170.2"), PROTO_TCP, 80));
    }

    #[test]
    fn more_covering_rules_than_the_kernel_holds_are_refused() {
        let mut rules: Vec<BlockRule> =
            (1..=MAX_RULES as u16).map(|p| BlockRule::only(net("10.0.0.0/8"), &[p])).collect();
        assert!(compile(&rules).is_ok());
        rules.push(BlockRule::only(net("10.0.0.1/32"), &[9999]));
        let err = compile(&rules).unwrap_err();
        assert_eq!(err, PolicyError::TooManyRules { prefix: net("10.0.0.1/32"), count: MAX_RULES + 1 });
        assert!(err.to_string().contains("merge the rules that overlap 10.0.0.1/32"), "{err}");
    }

    #[test]
    fn more_prefixes_than_the_trie_holds_are_refused() {
        let rules: Vec<BlockRule> = (0..=POLICY_MAX_ENTRIES)
            .map(|i| BlockRule::all(IpNet::V4(Ipv4Net::new(std::net::Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap())))
            .collect();
        let err = compile(&rules).unwrap_err();
        assert_eq!(err, PolicyError::TooManyPrefixes { family: "IPv4", count: POLICY_MAX_ENTRIES as usize + 1 });
    }

    #[test]
    fn an_invalid_rule_fails_the_whole_policy() {
        let rules =
            [BlockRule::all(net("10.0.0.0/8")), BlockRule { protocols: 0, ..BlockRule::all(net("10.0.0.0/8")) }];
        assert_eq!(compile(&rules), Err(PolicyError::NoProtocol { cidr: net("10.0.0.0/8") }));
    }

    #[test]
    fn ports_reach_the_kernel_sorted_with_their_protocols() {
        let rule = BlockRule { protocols: PROTO_TCP, ..BlockRule::only(net("168.63.129.16/32"), &[32526, 80]) };
        let value = compile(&[rule]).unwrap().v4[0].1;
        let kernel = value.rules[0];
        assert_eq!((kernel.protocols, kernel.port_match, kernel.port_count), (PROTO_TCP, PORTS_ONLY, 2));
        assert_eq!(&kernel.ports[..2], &[80, 32526]);
        assert!(!value.blocks(PROTO_UDP, 80));
        assert_eq!(compile(&[BlockRule::all(net("10.0.0.0/8"))]).unwrap().v4[0].1.rules[0].protocols, PROTO_ALL);
    }
}
