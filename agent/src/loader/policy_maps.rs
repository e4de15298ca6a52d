//! Writing a policy into the kernel all at once.
//!
//! The kernel reads one of two trie pairs, chosen by `Settings::active_policy`. A new
//! policy is written into the idle pair, then one write of `MG_SETTINGS` flips to it:
//! a hook sees the whole old policy or the whole new one, never a mix or an empty one.
//! The prefilters (`MG_PREFILTER`, one per family) must cover the policy in force at
//! every moment: they get old ∪ new before the flip and new after it.

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
    let (filter4, filter6) = prefilters(policy);
    let new_filters = [(AF_INET, filter4), (AF_INET6, filter6)];
    for (family, new) in &new_filters {
        let mut both = prefilter_map(ebpf)?.get(&prefilter_index(*family), 0).context("could not read a prefilter")?;
        both.union(new);
        write_prefilter(ebpf, *family, &both)?;
    }
    let idle = 1 - (current.active_policy & 1);
    let (v4_name, v6_name) = pair(idle);

    let mut v4: LpmTrie<&mut MapData, Ipv4Key, DestRules> =
        LpmTrie::try_from(ebpf.map_mut(v4_name).context("no v4 policy map")?)?;
    clear(&mut v4).with_context(|| format!("could not clear {v4_name}"))?;
    for (net, rules) in &policy.v4 {
        v4.insert(&Key::new(u32::from(net.prefix_len()), net.network().octets()), rules, 0)
            .with_context(|| format!("could not write {net} into {v4_name}"))?;
    }
    let mut v6: LpmTrie<&mut MapData, Ipv6Key, DestRules> =
        LpmTrie::try_from(ebpf.map_mut(v6_name).context("no v6 policy map")?)?;
    clear(&mut v6).with_context(|| format!("could not clear {v6_name}"))?;
    for (net, rules) in &policy.v6 {
        v6.insert(&Key::new(u32::from(net.prefix_len()), net.network().octets()), rules, 0)
            .with_context(|| format!("could not write {net} into {v6_name}"))?;
    }

    let new = Settings { host_netns_cookie, mode, active_policy: idle };
    settings(ebpf)?.set(0, new, 0).context("could not switch the kernel to the new policy")?;
    for (family, new) in &new_filters {
        write_prefilter(ebpf, *family, new)?;
    }
    Ok(())
}

fn prefilter_map(ebpf: &mut Ebpf) -> Result<Array<&mut MapData, Prefilter>> {
    Ok(Array::try_from(ebpf.map_mut(map_names::PREFILTER).context("no prefilter map")?)?)
}

fn write_prefilter(ebpf: &mut Ebpf, family: u8, filter: &Prefilter) -> Result<()> {
    prefilter_map(ebpf)?
        .set(prefilter_index(family), filter, 0)
        .with_context(|| format!("could not write the prefilter of address family {family}"))
}

/// The (v4, v6) prefilters: every prefix of the policy marks the leads it covers.
pub(super) fn prefilters(policy: &CompiledPolicy) -> (Box<Prefilter>, Box<Prefilter>) {
    let mut v4 = Box::<Prefilter>::default();
    for (net, _) in &policy.v4 {
        v4.add(&net.network().octets(), net.prefix_len());
    }
    let mut v6 = Box::<Prefilter>::default();
    for (net, _) in &policy.v6 {
        v6.add(&net.network().octets(), net.prefix_len());
    }
    (v4, v6)
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

    fn lead(ip: std::net::IpAddr) -> u16 {
        match ip {
            std::net::IpAddr::V4(a) => u16::from_be_bytes([a.octets()[0], a.octets()[1]]),
            std::net::IpAddr::V6(a) => u16::from_be_bytes([a.octets()[0], a.octets()[1]]),
        }
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
        let (v4, v6) = prefilters(&policy);
        for (net, _) in &policy.v4 {
            for ip in [net.network(), net.broadcast()] {
                assert!(v4.covers(lead(ip.into())), "{ip} of {net} is not covered");
            }
        }
        assert!(v6.covers(lead("fd00:ec2::254".parse().unwrap())));
        for outside in ["169.253.1.1", "12.0.0.1", "192.168.1.1"] {
            assert!(!v4.covers(lead(outside.parse().unwrap())), "{outside} is covered");
        }
        assert!(!v6.covers(lead("fd42:1::2".parse().unwrap())));
        assert!(v4.covers(lead("11.255.0.1".parse().unwrap())), "a /7 covers 10.0.0.0–11.255.255.255");
    }
}
