// SPDX-License-Identifier: Apache-2.0
//! From the compiled policy to the host-side table's content, as plain data: which
//! destination ranges, for which protocols and ports, lead to the refusal chain.
//!
//! The socket hooks block a destination when *any* rule covering it blocks the
//! protocol and port (see [`DestRules::blocks`](metadata_guard_common::DestRules)).
//! Here each distinct rule shape (protocols, port match) becomes one pair of
//! interval sets (IPv4, IPv6) holding every prefix carrying that shape, so the same
//! union holds: a packet is refused when one shape's set has its destination and the
//! shape blocks its protocol and port.

use std::net::{Ipv4Addr, Ipv6Addr};

use metadata_guard_common::{PortRule, PORTS_EXCEPT, PORTS_ONLY, PROTO_OTHER, PROTO_TCP, PROTO_UDP};

use crate::policy::CompiledPolicy;

/// One rule shape and the destinations it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Shape {
    pub protocols: u8,
    pub ports: Ports,
    /// Disjoint, sorted, inclusive ranges of destination addresses.
    pub v4: Vec<(u32, u32)>,
    pub v6: Vec<(u128, u128)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Ports {
    Any,
    Only(Vec<u16>),
    Except(Vec<u16>),
}

impl Ports {
    fn of(rule: &PortRule) -> Ports {
        let listed = rule.ports[..rule.port_count as usize].to_vec();
        match rule.port_match {
            PORTS_ONLY => Ports::Only(listed),
            PORTS_EXCEPT => Ports::Except(listed),
            _ => Ports::Any,
        }
    }

    /// Whether the shape blocks `port` (host byte order).
    pub(crate) fn blocks(&self, port: u16) -> bool {
        match self {
            Ports::Any => true,
            Ports::Only(p) => p.contains(&port),
            Ports::Except(p) => !p.contains(&port),
        }
    }
}

impl Shape {
    /// Protocols other than TCP and UDP have no port here (as in the packet
    /// backstop): they are blocked when the shape blocks port 0.
    pub(crate) fn blocks_other(&self) -> bool {
        self.protocols & PROTO_OTHER != 0 && self.ports.blocks(0)
    }

    pub(crate) fn port_protocols(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.protocols & PROTO_TCP != 0 {
            out.push(libc::IPPROTO_TCP as u8);
        }
        if self.protocols & PROTO_UDP != 0 {
            out.push(libc::IPPROTO_UDP as u8);
        }
        out
    }
}

/// The shapes of a compiled policy, in a stable order.
pub(crate) fn shapes(policy: &CompiledPolicy) -> Vec<Shape> {
    let mut out: Vec<Shape> = Vec::new();
    let mut shape_of = |rule: &PortRule| -> usize {
        let ports = Ports::of(rule);
        if let Some(i) = out.iter().position(|s| s.protocols == rule.protocols && s.ports == ports) {
            return i;
        }
        out.push(Shape { protocols: rule.protocols, ports, v4: Vec::new(), v6: Vec::new() });
        out.len() - 1
    };
    let mut v4: Vec<Vec<(u32, u32)>> = Vec::new();
    let mut v6: Vec<Vec<(u128, u128)>> = Vec::new();
    for (net, rules) in &policy.v4 {
        for rule in &rules.rules[..rules.rule_count as usize] {
            let i = shape_of(rule);
            v4.resize(v4.len().max(i + 1), Vec::new());
            v4[i].push((u32::from(net.network()), u32::from(net.broadcast())));
        }
    }
    for (net, rules) in &policy.v6 {
        for rule in &rules.rules[..rules.rule_count as usize] {
            let i = shape_of(rule);
            v6.resize(v6.len().max(i + 1), Vec::new());
            v6[i].push((u128::from(net.network()), u128::from(net.broadcast())));
        }
    }
    for (i, shape) in out.iter_mut().enumerate() {
        shape.v4 = merge(v4.get(i).cloned().unwrap_or_default());
        shape.v6 = merge(v6.get(i).cloned().unwrap_or_default());
    }
    out
}

/// Every shape's destinations as one list of disjoint ranges per family: the
/// prefilter that sends a packet on to the shapes' rules only when some shape
/// covers its destination.
pub(super) fn covered(shapes: &[Shape]) -> Covered {
    let v4 = shapes.iter().flat_map(|s| s.v4.iter().copied()).collect();
    let v6 = shapes.iter().flat_map(|s| s.v6.iter().copied()).collect();
    Covered { v4: merge(v4), v6: merge(v6) }
}

/// Disjoint, sorted, inclusive ranges of destination addresses, per family.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Covered {
    pub v4: Vec<(u32, u32)>,
    pub v6: Vec<(u128, u128)>,
}

/// The most leads a prefilter set holds. Destinations spread wider (a prefix shorter
/// than /4, or thousands of prefixes in different /16s) leave that family without a
/// lead prefilter: its packets go to the interval check in `judge`.
const MAX_LEADS: usize = 4096;

impl Covered {
    /// The first 16 bits of every covered IPv4 address (as the socket hooks'
    /// `Prefilter`); `None` beyond [`MAX_LEADS`].
    pub(super) fn leads_v4(&self) -> Option<Vec<u16>> {
        leads(self.v4.iter().map(|&(a, b)| ((a >> 16) as u16, (b >> 16) as u16)))
    }

    /// The same for IPv6.
    pub(super) fn leads_v6(&self) -> Option<Vec<u16>> {
        leads(self.v6.iter().map(|&(a, b)| ((a >> 112) as u16, (b >> 112) as u16)))
    }

    /// Every value of the next 16 bits (bits 16 to 31) that a covered IPv4 address
    /// has (as the socket hooks' second `Prefilter`), sorted; `None` when there are
    /// more than `max`.
    pub(super) fn nexts_v4(&self, max: usize) -> Option<Vec<u16>> {
        nexts(self.v4.iter().map(|&(a, b)| (a, b)), max)
    }

    /// The same for IPv6.
    pub(super) fn nexts_v6(&self, max: usize) -> Option<Vec<u16>> {
        nexts(self.v6.iter().map(|&(a, b)| ((a >> 96) as u32, (b >> 96) as u32)), max)
    }
}

/// The low 16 bits of every value in the ranges (of an address's first 32 bits).
fn nexts(ranges: impl Iterator<Item = (u32, u32)>, max: usize) -> Option<Vec<u16>> {
    let mut out = std::collections::BTreeSet::new();
    for (first, last) in ranges {
        if last - first >= u32::from(u16::MAX) {
            return None; // every value
        }
        let (lo, hi) = (first as u16, last as u16);
        // A range across a boundary of the first 16 bits wraps around.
        let pieces = if lo <= hi { [(lo, hi), (1, 0)] } else { [(lo, u16::MAX), (0, hi)] };
        for (from, to) in pieces.into_iter().filter(|(from, to)| from <= to) {
            if out.len() + usize::from(to - from) >= max {
                return None;
            }
            out.extend(from..=to);
        }
    }
    Some(out.into_iter().collect())
}

fn leads(ranges: impl Iterator<Item = (u16, u16)>) -> Option<Vec<u16>> {
    let mut out: Vec<u16> = Vec::new();
    for (first, last) in ranges {
        if out.len() + usize::from(last - first) >= MAX_LEADS {
            return None;
        }
        // Sorted, disjoint ranges: only the previous range's last lead can repeat.
        let from = if out.last() == Some(&first) { first.checked_add(1) } else { Some(first) };
        if let Some(from) = from.filter(|f| *f <= last) {
            out.extend(from..=last);
        }
    }
    Some(out)
}

/// Sorts and joins overlapping or adjacent ranges: an interval set must not hold
/// overlapping ones, and a wider prefix's rule also covers the narrower prefixes
/// that the compiled policy lists separately.
fn merge<T: Copy + Ord + num::Bounded>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort();
    let mut out: Vec<(T, T)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if last.1 == T::MAX || last.1.succ() >= start => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

mod num {
    pub(super) trait Bounded {
        const MAX: Self;
        fn succ(self) -> Self;
    }
    impl Bounded for u32 {
        const MAX: u32 = u32::MAX;
        fn succ(self) -> u32 {
            self + 1
        }
    }
    impl Bounded for u128 {
        const MAX: u128 = u128::MAX;
        fn succ(self) -> u128 {
            self + 1
        }
    }
}

/// A range as interval-set keys: the start, and the first address after it (no end
/// element when the range reaches the top of the address space).
pub(super) fn interval_keys_v4((start, end): (u32, u32)) -> (Vec<u8>, Option<Vec<u8>>) {
    (Ipv4Addr::from(start).octets().to_vec(), end.checked_add(1).map(|e| Ipv4Addr::from(e).octets().to_vec()))
}

pub(super) fn interval_keys_v6((start, end): (u128, u128)) -> (Vec<u8>, Option<Vec<u8>>) {
    (Ipv6Addr::from(start).octets().to_vec(), end.checked_add(1).map(|e| Ipv6Addr::from(e).octets().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, BlockRule};

    fn rules(list: &[BlockRule]) -> Vec<Shape> {
        shapes(&compile(list).unwrap())
    }

    #[test]
    fn the_prefilter_covers_every_shape_once_with_overlaps_joined() {
        let s = rules(&[
            BlockRule::except("169.254.169.254/32".parse().unwrap(), &[53]),
            BlockRule::all("169.254.0.0/16".parse().unwrap()),
            BlockRule::all("100.100.100.200/32".parse().unwrap()),
            BlockRule::except("fd00:ec2::254/128".parse().unwrap(), &[53]),
        ]);
        let Covered { v4, v6 } = covered(&s);
        let a = |t: &str| u32::from(t.parse::<Ipv4Addr>().unwrap());
        assert_eq!(v4, [(a("100.100.100.200"), a("100.100.100.200")), (a("169.254.0.0"), a("169.254.255.255"))]);
        let fd = u128::from("fd00:ec2::254".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6, [(fd, fd)]);
    }

    #[test]
    fn leads_are_the_first_16_bits_of_every_covered_address_once() {
        let s = rules(&[
            BlockRule::all("169.254.169.254/32".parse().unwrap()),
            BlockRule::all("169.254.0.0/16".parse().unwrap()),
            BlockRule::all("169.255.1.0/24".parse().unwrap()),
            BlockRule::all("100.64.0.0/10".parse().unwrap()),
            BlockRule::all("fd00:ec2::254/128".parse().unwrap()),
        ]);
        let c = covered(&s);
        let mut want: Vec<u16> = (0x6440..=0x647f).collect();
        want.extend([0xa9fe, 0xa9ff]);
        assert_eq!(c.leads_v4(), Some(want));
        assert_eq!(c.leads_v6(), Some(vec![0xfd00]));
    }

    #[test]
    fn the_next_16_bits_of_narrow_prefixes_are_listed_wide_ones_are_not() {
        let s = rules(&[
            BlockRule::all("169.254.169.254/32".parse().unwrap()),
            BlockRule::all("100.100.96.0/20".parse().unwrap()),
            BlockRule::all("fd00:ec2::254/128".parse().unwrap()),
            BlockRule::all("fe80::a9fe:a9fe/128".parse().unwrap()),
        ]);
        let c = covered(&s);
        let mut want: Vec<u16> = (0x6000..=0x6fff).collect();
        want.push(0xa9fe);
        assert_eq!(c.nexts_v4(1 << 16), Some(want));
        assert_eq!(c.nexts_v4(16), None, "a /20 has 4096 values");
        assert_eq!(c.nexts_v6(16), Some(vec![0x0000, 0x0ec2]));
        let wide = covered(&rules(&[BlockRule::all("10.1.0.0/16".parse().unwrap())]));
        assert_eq!(wide.nexts_v4(1 << 16), None);
        let across = covered(&rules(&[
            BlockRule::all("10.1.255.255/32".parse().unwrap()),
            BlockRule::all("10.2.0.0/32".parse().unwrap()),
        ]));
        assert_eq!(across.nexts_v4(16), Some(vec![0x0000, 0xffff]), "a range across a lead boundary wraps");
    }

    #[test]
    fn a_prefix_too_wide_for_a_lead_set_leaves_the_family_without_one() {
        let c = covered(&rules(&[BlockRule::all("0.0.0.0/0".parse().unwrap())]));
        assert_eq!(c.leads_v4(), None);
        assert_eq!(c.leads_v6(), Some(vec![]));
    }

    #[test]
    fn one_shape_per_distinct_rule_and_wider_prefixes_absorb_narrower_ones() {
        let s = rules(&[
            BlockRule::except("169.254.169.254/32".parse().unwrap(), &[53]),
            BlockRule::all("169.254.0.0/16".parse().unwrap()),
            BlockRule::except("fd00:ec2::254/128".parse().unwrap(), &[53]),
        ]);
        assert_eq!(s.len(), 2);
        let except = s.iter().find(|s| s.ports == Ports::Except(vec![53])).unwrap();
        assert_eq!(except.v4, vec![(0xa9fe_a9fe, 0xa9fe_a9fe)]);
        assert_eq!(except.v6.len(), 1);
        let all = s.iter().find(|s| s.ports == Ports::Any).unwrap();
        assert_eq!(all.v4, vec![(0xa9fe_0000, 0xa9fe_ffff)], "the /32 under the /16 is one range");
        assert!(all.blocks_other() && except.blocks_other());
    }

    #[test]
    fn adjacent_ranges_join_and_the_top_of_the_space_has_no_end_key() {
        let s = rules(&[
            BlockRule::all("10.0.0.0/25".parse().unwrap()),
            BlockRule::all("10.0.0.128/25".parse().unwrap()),
            BlockRule::all("255.255.255.255/32".parse().unwrap()),
        ]);
        assert_eq!(s[0].v4, vec![(0x0a00_0000, 0x0a00_00ff), (u32::MAX, u32::MAX)]);
        assert_eq!(interval_keys_v4(s[0].v4[1]).1, None);
        assert_eq!(interval_keys_v4(s[0].v4[0]).1, Some(vec![10, 0, 1, 0]));
    }

    #[test]
    fn only_listed_ports_leave_other_protocols_alone() {
        let s = rules(&[BlockRule::only("168.63.129.16/32".parse().unwrap(), &[80, 32526])]);
        assert!(!s[0].blocks_other());
        assert_eq!(s[0].port_protocols(), vec![6, 17]);
        assert!(s[0].ports.blocks(80) && !s[0].ports.blocks(53));
    }
}
