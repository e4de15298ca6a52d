// SPDX-License-Identifier: Apache-2.0
//! Writing a policy into the kernel all at once.
//!
//! The kernel reads one of two trie pairs, chosen by `Settings::active_policy`. A new
//! policy is written into the idle pair, then one write of `MG_SETTINGS` flips to it:
//! a hook sees the whole old policy or the whole new one, never a mix or an empty one.
//! The prefilters (`MG_PREFILTER` and `MG_PREFILTER2`, one per family each) must cover
//! the policy in force at every moment: they get old ∪ new before the flip and new
//! after it.

use anyhow::{Context, Result};
use aya::{
    maps::{lpm_trie::Key, Array, LpmTrie, MapData},
    Ebpf,
};
use metadata_guard_common::{
    map_names, prefilter_index, DestRules, Ipv4Key, Ipv6Key, Prefilter, Settings, AF_INET, AF_INET6,
};

use crate::policy::CompiledPolicy;

pub(super) fn apply(ebpf: &mut Ebpf, policy: &CompiledPolicy, mode: u32, host_netns_cookie: u64) -> Result<()> {
    let current: Settings = settings(ebpf)?.get(&0, 0).context("could not read the guard's settings")?;
    let new_filters = prefilters(policy);
    for (map, family, new) in &new_filters {
        let mut both =
            prefilter_map(ebpf, map)?.get(&prefilter_index(*family), 0).context("could not read a prefilter")?;
        both.union(new);
        write_prefilter(ebpf, map, *family, &both)?;
    }
    let idle = 1 - (current.active_policy & 1);
    let (v4_name, v6_name) = pair(idle);

    write_tries(ebpf, policy, v4_name, v6_name)?;
    let (v4_node, v6_node) = node_pair(idle);
    write_tries(ebpf, policy.node_only.as_deref().unwrap_or(&CompiledPolicy::default()), v4_node, v6_node)?;

    let new = Settings { host_netns_cookie, mode, active_policy: idle };
    settings(ebpf)?.set(0, new, 0).context("could not switch the kernel to the new policy")?;
    for (map, family, new) in &new_filters {
        write_prefilter(ebpf, map, *family, new)?;
    }
    Ok(())
}

/// Makes the tries `v4_name` and `v6_name` hold exactly `policy` (not its node-only part).
fn write_tries(ebpf: &mut Ebpf, policy: &CompiledPolicy, v4_name: &str, v6_name: &str) -> Result<()> {
    rewrite::<Ipv4Key>(
        ebpf,
        v4_name,
        policy.v4.iter().map(|(net, r)| (net, net.prefix_len(), net.network().octets(), r)),
    )?;
    rewrite::<Ipv6Key>(
        ebpf,
        v6_name,
        policy.v6.iter().map(|(net, r)| (net, net.prefix_len(), net.network().octets(), r)),
    )?;
    Ok(())
}

fn prefilter_map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<Array<&'a mut MapData, Prefilter>> {
    Ok(Array::try_from(ebpf.map_mut(name).with_context(|| format!("no prefilter map {name}"))?)?)
}

fn write_prefilter(ebpf: &mut Ebpf, map: &str, family: u8, filter: &Prefilter) -> Result<()> {
    prefilter_map(ebpf, map)?
        .set(prefilter_index(family), filter, 0)
        .with_context(|| format!("could not write {map} of address family {family}"))
}

/// Every prefilter of the policy, as (map, family, filter): each prefix marks the
/// leads it covers in `MG_PREFILTER`, and the values of the next 16 bits it allows in
/// `MG_PREFILTER2`.
pub(super) fn prefilters(policy: &CompiledPolicy) -> [(&'static str, u8, Box<Prefilter>); 4] {
    let (mut lead4, mut next4) = (Box::<Prefilter>::default(), Box::<Prefilter>::default());
    let (mut lead6, mut next6) = (Box::<Prefilter>::default(), Box::<Prefilter>::default());
    // The node-only rules pass the same prefilters (the uplink asks them first).
    for part in std::iter::once(policy).chain(policy.node_only.as_deref()) {
        for (net, _) in &part.v4 {
            lead4.add(&net.network().octets(), net.prefix_len());
            next4.add_next(&net.network().octets(), net.prefix_len());
        }
        for (net, _) in &part.v6 {
            lead6.add(&net.network().octets(), net.prefix_len());
            next6.add_next(&net.network().octets(), net.prefix_len());
        }
    }
    [
        (map_names::PREFILTER, AF_INET, lead4),
        (map_names::PREFILTER, AF_INET6, lead6),
        (map_names::PREFILTER2, AF_INET, next4),
        (map_names::PREFILTER2, AF_INET6, next6),
    ]
}

fn settings(ebpf: &mut Ebpf) -> Result<Array<&mut MapData, Settings>> {
    Ok(Array::try_from(ebpf.map_mut(map_names::SETTINGS).context("no settings map")?)?)
}

/// The (v4, v6) map names of policy pair `index`.
pub(super) fn pair(index: u32) -> (&'static str, &'static str) {
    if index == 0 {
        (map_names::POLICY4_A, map_names::POLICY6_A)
    } else {
        (map_names::POLICY4_B, map_names::POLICY6_B)
    }
}

/// Empties policy trie `name` and writes `entries` into it: each prefix, its length,
/// its network's address (the key's data) and its rules.
fn rewrite<'r, K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    entries: impl Iterator<Item = (impl std::fmt::Display, u8, K, &'r DestRules)>,
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, K, DestRules> =
        LpmTrie::try_from(ebpf.map_mut(name).with_context(|| format!("no policy map {name}"))?)?;
    clear(&mut trie).with_context(|| format!("could not clear {name}"))?;
    for (net, len, address, rules) in entries {
        trie.insert(&Key::new(u32::from(len), address), rules, 0)
            .with_context(|| format!("could not write {net} into {name}"))?;
    }
    Ok(())
}

/// The (v4, v6) names of the node-only tries of pair `index`.
pub(super) fn node_pair(index: u32) -> (&'static str, &'static str) {
    if index == 0 {
        (map_names::UPLINK4_A, map_names::UPLINK6_A)
    } else {
        (map_names::UPLINK4_B, map_names::UPLINK6_B)
    }
}

fn clear<K: aya::Pod>(trie: &mut LpmTrie<&mut MapData, K, DestRules>) -> Result<()> {
    let keys: Vec<Key<K>> = trie.keys().collect::<Result<_, _>>()?;
    for key in keys {
        trie.remove(&key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, BlockRule};

    fn bits_at(ip: std::net::IpAddr, i: usize) -> u16 {
        match ip {
            std::net::IpAddr::V4(a) => u16::from_be_bytes([a.octets()[i], a.octets()[i + 1]]),
            std::net::IpAddr::V6(a) => u16::from_be_bytes([a.octets()[i], a.octets()[i + 1]]),
        }
    }

    fn lead(ip: std::net::IpAddr) -> u16 {
        bits_at(ip, 0)
    }

    fn next(ip: std::net::IpAddr) -> u16 {
        bits_at(ip, 2)
    }

    #[test]
    fn the_prefilters_cover_every_blocked_address_and_little_else() {
        let rules = [
            BlockRule::all("169.254.169.254/32".parse().unwrap()),
            BlockRule::only("168.63.129.16/32".parse().unwrap(), &[80]),
            BlockRule::all("10.0.0.0/7".parse().unwrap()),
            BlockRule::all("fd00:ec2::254/128".parse().unwrap()),
        ];
        let policy = compile(&rules).unwrap();
        let [(_, _, v4), (_, _, v6), (_, _, next4), (_, _, next6)] = prefilters(&policy);
        for (net, _) in &policy.v4 {
            for ip in [net.network(), net.broadcast()] {
                assert!(v4.covers(lead(ip.into())), "{ip} of {net} is not covered");
                assert!(next4.covers(next(ip.into())), "{ip} of {net}: its next bits are not covered");
            }
        }
        assert!(v6.covers(lead("fd00:ec2::254".parse().unwrap())));
        assert!(next6.covers(next("fd00:ec2::254".parse().unwrap())));
        for outside in ["169.253.1.1", "12.0.0.1", "192.168.1.1"] {
            assert!(!v4.covers(lead(outside.parse().unwrap())), "{outside} is covered");
        }
        assert!(!v6.covers(lead("fd42:1::2".parse().unwrap())));
        assert!(!next6.covers(next("fd00:10:244::2".parse().unwrap())), "a ULA pod address shares only the lead");
        assert!(v4.covers(lead("11.255.0.1".parse().unwrap())), "a /7 covers 10.0.0.0–11.255.255.255");
    }

    #[test]
    fn a_wide_prefix_leaves_the_second_filter_open() {
        let policy = compile(&[BlockRule::all("10.0.0.0/7".parse().unwrap())]).unwrap();
        let [_, _, (map, _, next4), (_, _, next6)] = prefilters(&policy);
        assert_eq!(map, map_names::PREFILTER2);
        assert!(next4.covers(next("10.1.2.3".parse().unwrap())) && next4.covers(0xffff));
        assert!(!next6.covers(0), "no v6 prefix: nothing marked");
    }

    #[test]
    fn only_narrow_prefixes_close_the_second_filter() {
        // The default preset's IPv4 addresses: NodeLocal DNSCache's address shares
        // 169.254.169.254's lead but not its next bits.
        let rules: Vec<_> = ["169.254.169.254/32", "169.254.42.42/32", "168.63.129.16/32", "100.100.100.200/32"]
            .iter()
            .map(|n| BlockRule::all(n.parse().unwrap()))
            .collect();
        let [(_, _, v4), _, (_, _, next4), _] = prefilters(&compile(&rules).unwrap());
        let dns: std::net::IpAddr = "169.254.20.10".parse().unwrap();
        assert!(v4.covers(lead(dns)) && !next4.covers(next(dns)));
    }
}
