// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard status`: what is in the kernel, read from the pins alone, so it
//! answers the same whether an agent runs, crashed, or was never restarted.

use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData};
use metadata_guard_common::{
    counters, map_names, DestRules, Hook, Ipv4Key, Ipv6Key, Settings, Verdict, MODE_AUDIT, MODE_CONCEAL, MODE_ENFORCE,
    PORTS_EXCEPT, PORTS_ONLY,
};
use serde::{Deserialize, Serialize};

use crate::policy::{BlockRule, PortMatch};

use super::{
    origin::{self, Origin},
    pins::AgentLock,
    pins::PinLayout,
    policy_maps, read_counters,
    status_conceal::{self, ConcealStatus},
    uplink_state::UplinkStatus,
    Backstop, Plan, ATTACHMENTS, PINNED_MAPS,
};

/// What `metadata-guard status --json` prints; the scenarios read it through this type.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub bpffs: String,
    pub abi_version: u32,
    /// Any link of this version is pinned.
    pub installed: bool,
    /// The guard enforces (see `enforce::enforcing`): the kernel guard whole and the
    /// host-side table in force. Set by `status` and `apply`, false as read here.
    #[serde(default)] // absent from older agents' status
    pub enforcing: bool,
    /// What keeps it from enforcing fully (empty when `enforcing`).
    #[serde(default)] // absent from older agents' status
    pub problems: Vec<String>,
    /// The command and version that started this enforcement (`apply` at boot, or `run`).
    #[serde(default)] // absent from older agents' status
    pub installed_by: Option<Origin>,
    /// The command and version that last installed or adopted it.
    #[serde(default)] // absent from older agents' status
    pub updated_by: Option<Origin>,
    pub agent_running: bool,
    pub mode: Option<String>,
    pub host_netns_cookie: Option<u64>,
    /// How the packet backstop knows a host socket (`Backstop::name`), read from the
    /// egress program the link runs; None when it is not pinned.
    #[serde(default)] // absent from older agents' status
    pub packet_netns_from: Option<String>,
    pub programs: Vec<ProgramStatus>,
    pub destinations: Vec<String>,
    pub counters: Vec<CounterStatus>,
    pub events_lost: u64,
    /// Cgroup ids of allowlisted pods' containers, as the kernel has them.
    pub allowlisted_cgroups: Vec<u64>,
    /// Pin directories of other layout versions (normally none).
    pub other_versions: Vec<String>,
    /// Conceal mode's redirect and counters (None: its maps are not pinned).
    #[serde(default)] // absent from older agents' status
    pub conceal: Option<ConcealStatus>,
    /// The `--uplinks` choice in force (`auto`, `none` or a list), as recorded.
    #[serde(default)] // absent from older agents' status
    pub uplink_choice: Option<String>,
    /// The node's uplinks and the devices that run the uplink program (filled by the
    /// `status` command, which reads them in the host network namespace).
    #[serde(default)] // absent from older agents' status
    pub uplinks: Vec<UplinkStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgramStatus {
    pub hook: String,
    pub link_id: u32,
    pub program_id: u32,
    pub program_name: String,
    pub program_tag: String,
    /// 0 when the cgroup it was attached to no longer exists (the link is detached).
    pub cgroup_id: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CounterStatus {
    pub hook: String,
    pub verdict: String,
    pub count: u64,
}

pub(crate) fn read(root: &Path) -> Result<Status> {
    let layout = PinLayout::new(root);
    let mut status = Status {
        bpffs: root.display().to_string(),
        abi_version: metadata_guard_common::ABI_VERSION,
        installed: false,
        enforcing: false,
        problems: Vec::new(),
        installed_by: origin::read(&layout, origin::INSTALLED_BY),
        updated_by: origin::read(&layout, origin::UPDATED_BY),
        agent_running: AgentLock::is_held(root),
        mode: None,
        host_netns_cookie: None,
        packet_netns_from: None,
        programs: Vec::new(),
        destinations: Vec::new(),
        counters: Vec::new(),
        events_lost: 0,
        allowlisted_cgroups: Vec::new(),
        other_versions: layout.other_versions().iter().map(|p| p.display().to_string()).collect(),
        conceal: None,
        uplink_choice: super::uplink_state::recorded_spec(&layout),
        uplinks: Vec::new(),
    };
    let mut missing = Vec::new();
    // The attachments the pinned mode and backstop use are expected; the others are
    // listed when pinned.
    let backstop = pinned_backstop(&layout);
    status.packet_netns_from = backstop.map(|b| b.name().to_string());
    let plan = Plan { mode: pinned_mode(&layout), backstop: backstop.unwrap_or(Backstop::SocketMarks) };
    for attachment in &ATTACHMENTS {
        let hook = match super::pinned_hook(&layout, attachment.pin) {
            Ok(Some(hook)) => hook,
            Ok(None) if !plan.needs(attachment) => continue,
            Ok(None) => {
                missing.push(format!("link {} is not pinned (detached)", attachment.pin));
                continue;
            }
            Err(e) => {
                missing.push(format!("link {} cannot be read: {e:#}", attachment.pin));
                continue;
            }
        };
        let (program_name, program_tag) = hook.program.unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        status.programs.push(ProgramStatus {
            hook: attachment.pin.to_string(),
            link_id: hook.link_id,
            program_id: hook.program_id,
            program_name,
            program_tag,
            cgroup_id: hook.cgroup_id,
        });
    }
    status.installed = !status.programs.is_empty();
    if !status.installed && !layout.dir.exists() {
        return Ok(status);
    }
    status.problems = missing;
    for p in status.programs.iter().filter(|p| p.cgroup_id == 0) {
        status.problems.push(format!("link {} is detached: the cgroup it was attached to no longer exists", p.hook));
    }
    let cgroups: std::collections::BTreeSet<u64> = status.programs.iter().map(|p| p.cgroup_id).collect();
    if cgroups.len() > 1 {
        status.problems.push(format!("the links are on different cgroups: {cgroups:?}"));
    }
    for name in PINNED_MAPS {
        if !layout.map(name).exists() {
            status.problems.push(format!("map {name} is not pinned"));
        }
    }
    if !layout.map(map_names::SETTINGS).exists() {
        return Ok(status);
    }
    let open = |name: &str| -> Result<Map> {
        let data = MapData::from_pin(layout.map(name)).with_context(|| format!("could not open pinned map {name}"))?;
        Ok(Map::from_map_data(data)?)
    };
    let settings_map = open(map_names::SETTINGS)?;
    let settings: Settings = Array::<_, Settings>::try_from(&settings_map)?.get(&0, 0)?;
    status.mode = Some(
        match settings.mode {
            MODE_AUDIT => "audit",
            MODE_CONCEAL => "conceal",
            _ => "enforce",
        }
        .to_string(),
    );
    status.host_netns_cookie = Some(settings.host_netns_cookie);
    let (v4_name, v6_name) = policy_maps::pair(settings.active_policy);
    let v4_map = open(v4_name)?;
    for entry in &LpmTrie::<_, Ipv4Key, DestRules>::try_from(&v4_map)? {
        let (key, rules): (Key<Ipv4Key>, DestRules) = entry?;
        status.destinations.push(describe(IpAddr::from(key.data()), key.prefix_len(), &rules));
    }
    let v6_map = open(v6_name)?;
    for entry in &LpmTrie::<_, Ipv6Key, DestRules>::try_from(&v6_map)? {
        let (key, rules): (Key<Ipv6Key>, DestRules) = entry?;
        status.destinations.push(describe(IpAddr::from(key.data()), key.prefix_len(), &rules));
    }
    let values = read_counters(&open(map_names::COUNTERS)?)?;
    for hook in Hook::PROGRAMS {
        for verdict in Verdict::ALL {
            let count = values[counters::slot(hook, verdict) as usize];
            status.counters.push(CounterStatus { hook: hook.name().into(), verdict: verdict.name().into(), count });
        }
    }
    status.events_lost = values[counters::EVENTS_LOST as usize];
    let allow_map = open(map_names::ALLOWED_CGROUPS)?;
    let allowed: HashMap<_, u64, u8> = HashMap::try_from(&allow_map)?;
    status.allowlisted_cgroups = allowed.keys().collect::<Result<_, _>>()?;
    status.allowlisted_cgroups.sort_unstable();
    if layout.map(map_names::CONCEAL).exists() {
        status.conceal = Some(status_conceal::read(open)?);
    }
    Ok(status)
}

/// The policy in force as the pinned tries hold it (its node-only part too): what
/// decides which devices are uplinks, for `status`.
pub(crate) fn pinned_policy(layout: &PinLayout) -> Result<crate::policy::CompiledPolicy> {
    use ipnet::{Ipv4Net, Ipv6Net};
    let open = |name: &str| -> Result<Map> {
        let data = MapData::from_pin(layout.map(name)).with_context(|| format!("could not open pinned map {name}"))?;
        Ok(Map::from_map_data(data)?)
    };
    let settings: Settings = Array::<_, Settings>::try_from(&open(map_names::SETTINGS)?)?.get(&0, 0)?;
    let read = |(v4_name, v6_name): (&str, &str)| -> Result<crate::policy::CompiledPolicy> {
        let mut policy = crate::policy::CompiledPolicy::default();
        for entry in &LpmTrie::<_, Ipv4Key, DestRules>::try_from(&open(v4_name)?)? {
            let (key, rules) = entry?;
            policy.v4.push((Ipv4Net::new(key.data().into(), key.prefix_len() as u8)?, rules));
        }
        for entry in &LpmTrie::<_, Ipv6Key, DestRules>::try_from(&open(v6_name)?)? {
            let (key, rules) = entry?;
            policy.v6.push((Ipv6Net::new(key.data().into(), key.prefix_len() as u8)?, rules));
        }
        Ok(policy)
    };
    let mut policy = read(policy_maps::pair(settings.active_policy))?;
    policy.node_only = Some(Box::new(read(policy_maps::node_pair(settings.active_policy))?));
    Ok(policy)
}

/// The backstop of the egress program pinned beside its link; None when unknown.
fn pinned_backstop(layout: &PinLayout) -> Option<Backstop> {
    let hook = super::pinned_hook(layout, "egress").ok()??;
    hook.program.map(|(name, _)| Backstop::of_egress_program(&name))
}

/// The mode the pinned settings hold; enforce's when they cannot be read (the
/// attachments every mode uses), which `read` reports on its own.
fn pinned_mode(layout: &PinLayout) -> u32 {
    let settings = MapData::from_pin(layout.map(map_names::SETTINGS)).ok().map(Map::from_map_data);
    let Some(Ok(map)) = settings else { return MODE_ENFORCE };
    Array::<_, Settings>::try_from(&map).and_then(|a| a.get(&0, 0)).map_or(MODE_ENFORCE, |s| s.mode)
}

/// One line per destination prefix, its rules written as `metadata-guard presets` and
/// the configuration write them (e.g. `169.254.169.254/32 except ports 53`), `; ` apart.
fn describe(addr: IpAddr, prefix_len: u32, rules: &DestRules) -> String {
    let Ok(cidr) = ipnet::IpNet::new(addr, prefix_len as u8) else {
        return format!("{addr}/{prefix_len}: (invalid prefix length)");
    };
    rules.rules[..(rules.rule_count as usize).min(rules.rules.len())]
        .iter()
        .map(|r| {
            let listed = r.ports[..(r.port_count as usize).min(r.ports.len())].to_vec();
            let ports = match r.port_match {
                PORTS_ONLY => PortMatch::Only(listed),
                PORTS_EXCEPT => PortMatch::Except(listed),
                _ => PortMatch::Any,
            };
            BlockRule { cidr, protocols: r.protocols, ports }.to_string()
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn print_human(s: &Status) {
    println!("bpffs:          {} (layout v{})", s.bpffs, s.abi_version);
    let installed = match (s.installed, s.enforcing) {
        (false, _) => "no".to_string(),
        (true, true) => "yes, enforcing".to_string(),
        (true, false) => "yes, but NOT enforcing fully (see problems)".to_string(),
    };
    println!("installed:      {installed}");
    if let Some(by) = &s.installed_by {
        println!("installed by:   {by}{}", if by.command == "apply" { " (at boot, before any agent)" } else { "" });
    }
    if let Some(by) = &s.updated_by {
        println!("updated by:     {by}");
    }
    for problem in &s.problems {
        println!("problem:        {problem}");
    }
    println!("agent running:  {}", if s.agent_running { "yes" } else { "no" });
    if let Some(mode) = &s.mode {
        println!("mode:           {mode}");
    }
    if let Some(from) = &s.packet_netns_from {
        let how = if from == Backstop::NetnsHelper.name() { Backstop::NetnsHelper } else { Backstop::SocketMarks };
        println!("packets judged: by socket namespace, from {}", how.describe());
    }
    for p in &s.programs {
        let place = match p.cgroup_id {
            0 => "detached: its cgroup no longer exists".to_string(),
            id => format!("on cgroup {id}"),
        };
        println!(
            "program:        {:<9} link {} prog {} ({}, tag {}) {place}",
            p.hook, p.link_id, p.program_id, p.program_name, p.program_tag
        );
    }
    for d in &s.destinations {
        println!("blocked:        {d}");
    }
    for c in s.counters.iter().filter(|c| c.count > 0) {
        println!("count:          {:<9} {:<8} {}", c.hook, c.verdict, c.count);
    }
    println!("events lost:    {}", s.events_lost);
    if !s.allowlisted_cgroups.is_empty() {
        println!("allowlisted:    {} cgroups", s.allowlisted_cgroups.len());
    }
    if let Some(c) = s.conceal.as_ref().filter(|c| c.proxy.is_some() || s.mode.as_deref() == Some("conceal")) {
        status_conceal::print_human(c);
    }
    for v in &s.other_versions {
        println!("other layout:   {v} (removed when an agent of this version starts)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{compile, Preset};

    #[test]
    fn status_writes_each_rule_as_presets_does() {
        for preset in Preset::ALL {
            let rules = preset.rules();
            let policy = compile(&rules).unwrap();
            let mut from_kernel: Vec<String> = policy
                .v4
                .iter()
                .map(|(net, r)| describe(IpAddr::V4(net.addr()), u32::from(net.prefix_len()), r))
                .chain(
                    policy.v6.iter().map(|(net, r)| describe(IpAddr::V6(net.addr()), u32::from(net.prefix_len()), r)),
                )
                .collect();
            let mut listed: Vec<String> = rules.iter().map(ToString::to_string).collect();
            from_kernel.sort();
            listed.sort();
            assert_eq!(from_kernel, listed, "preset {preset}");
        }
    }
}
