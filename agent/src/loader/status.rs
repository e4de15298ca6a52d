//! `metadata-guard status`: what is in the kernel, read from the pins alone, so it
//! answers the same whether an agent runs, crashed, or was never restarted.

use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData};
use metadata_guard_common::{
    counters, map_names, DestRules, Hook, Ipv4Key, Ipv6Key, Settings, Verdict, MODE_AUDIT, MODE_CONCEAL, PORTS_EXCEPT,
    PORTS_ONLY, PROTO_ALL, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
};
use serde::Serialize;

use super::{bpf_sys, pins::AgentLock, pins::PinLayout, policy_maps, read_counters, ATTACHMENTS};

#[derive(Serialize)]
pub struct Status {
    pub bpffs: String,
    pub abi_version: u32,
    /// Any link of this version is pinned.
    pub installed: bool,
    pub agent_running: bool,
    pub mode: Option<&'static str>,
    pub host_netns_cookie: Option<u64>,
    pub programs: Vec<ProgramStatus>,
    pub destinations: Vec<String>,
    pub counters: Vec<CounterStatus>,
    pub events_lost: u64,
    /// Cgroup ids of allowlisted pods' containers, as the kernel has them.
    pub allowlisted_cgroups: Vec<u64>,
    /// Pin directories of other layout versions (normally none).
    pub other_versions: Vec<String>,
}

#[derive(Serialize)]
pub struct ProgramStatus {
    pub hook: &'static str,
    pub link_id: u32,
    pub program_id: u32,
    pub program_name: String,
    pub program_tag: String,
    pub cgroup_id: u64,
}

#[derive(Serialize)]
pub struct CounterStatus {
    pub hook: &'static str,
    pub verdict: &'static str,
    pub count: u64,
}

pub fn read(root: &Path) -> Result<Status> {
    let layout = PinLayout::new(root);
    let mut status = Status {
        bpffs: root.display().to_string(),
        abi_version: metadata_guard_common::ABI_VERSION,
        installed: false,
        agent_running: AgentLock::is_held(root),
        mode: None,
        host_netns_cookie: None,
        programs: Vec::new(),
        destinations: Vec::new(),
        counters: Vec::new(),
        events_lost: 0,
        allowlisted_cgroups: Vec::new(),
        other_versions: layout.other_versions().iter().map(|p| p.display().to_string()).collect(),
    };
    for attachment in &ATTACHMENTS {
        let pin = layout.link(attachment.pin);
        let Ok(link) = bpf_sys::obj_get(&pin) else { continue };
        use std::os::fd::AsFd;
        let info = bpf_sys::link_info(link.as_fd()).with_context(|| format!("could not inspect {}", pin.display()))?;
        let prog = bpf_sys::prog_fd_by_id(info.prog_id).and_then(|fd| bpf_sys::prog_info(fd.as_fd()));
        let prog = prog.with_context(|| format!("could not inspect the program of {}", pin.display()))?;
        status.programs.push(ProgramStatus {
            hook: attachment.pin,
            link_id: info.id,
            program_id: info.prog_id,
            program_name: prog.name,
            program_tag: prog.tag.iter().map(|b| format!("{b:02x}")).collect(),
            cgroup_id: info.cgroup_id,
        });
    }
    status.installed = !status.programs.is_empty();
    if !layout.map(map_names::SETTINGS).exists() {
        return Ok(status);
    }
    let open = |name: &str| -> Result<Map> {
        let data = MapData::from_pin(layout.map(name)).with_context(|| format!("could not open pinned map {name}"))?;
        Ok(Map::from_map_data(data)?)
    };
    let settings_map = open(map_names::SETTINGS)?;
    let settings: Settings = Array::<_, Settings>::try_from(&settings_map)?.get(&0, 0)?;
    status.mode = Some(match settings.mode {
        MODE_AUDIT => "audit",
        MODE_CONCEAL => "conceal",
        _ => "enforce",
    });
    status.host_netns_cookie = Some(settings.host_netns_cookie);
    let (v4_name, v6_name) = policy_maps::pair(settings.active_policy);
    let v4_map = open(v4_name)?;
    for entry in LpmTrie::<_, Ipv4Key, DestRules>::try_from(&v4_map)?.iter() {
        let (key, rules): (Key<Ipv4Key>, DestRules) = entry?;
        status.destinations.push(describe(IpAddr::from(key.data()), key.prefix_len(), &rules));
    }
    let v6_map = open(v6_name)?;
    for entry in LpmTrie::<_, Ipv6Key, DestRules>::try_from(&v6_map)?.iter() {
        let (key, rules): (Key<Ipv6Key>, DestRules) = entry?;
        status.destinations.push(describe(IpAddr::from(key.data()), key.prefix_len(), &rules));
    }
    let values = read_counters(&open(map_names::COUNTERS)?)?;
    for hook in Hook::ALL {
        for verdict in Verdict::ALL {
            let count = values[counters::slot(hook, verdict) as usize];
            status.counters.push(CounterStatus { hook: hook.name(), verdict: verdict.name(), count });
        }
    }
    status.events_lost = values[counters::EVENTS_LOST as usize];
    let allow_map = open(map_names::ALLOWED_CGROUPS)?;
    let allowed: HashMap<_, u64, u8> = HashMap::try_from(&allow_map)?;
    status.allowlisted_cgroups = allowed.keys().collect::<Result<_, _>>()?;
    status.allowlisted_cgroups.sort_unstable();
    Ok(status)
}

/// One line per destination prefix, e.g. `169.254.169.254/32: tcp,udp,other ports except 53`.
fn describe(addr: IpAddr, prefix_len: u32, rules: &DestRules) -> String {
    let parts: Vec<String> = rules.rules[..(rules.rule_count as usize).min(rules.rules.len())]
        .iter()
        .map(|r| {
            let protos = if r.protocols == PROTO_ALL {
                "all protocols".to_string()
            } else {
                [(PROTO_TCP, "tcp"), (PROTO_UDP, "udp"), (PROTO_OTHER, "other")]
                    .iter()
                    .filter(|(bit, _)| r.protocols & bit != 0)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let ports: Vec<String> = r.ports[..r.port_count as usize].iter().map(u16::to_string).collect();
            match r.port_match {
                PORTS_ONLY => format!("{protos} ports {}", ports.join(",")),
                PORTS_EXCEPT => format!("{protos} ports except {}", ports.join(",")),
                _ => format!("{protos} all ports"),
            }
        })
        .collect();
    format!("{addr}/{prefix_len}: {}", parts.join("; "))
}

pub fn print_human(s: &Status) {
    println!("bpffs:          {} (layout v{})", s.bpffs, s.abi_version);
    println!("installed:      {}", if s.installed { "yes" } else { "no" });
    println!("agent running:  {}", if s.agent_running { "yes" } else { "no" });
    if let Some(mode) = s.mode {
        println!("mode:           {mode}");
    }
    for p in &s.programs {
        println!(
            "program:        {:<9} link {} prog {} ({}, tag {}) on cgroup {}",
            p.hook, p.link_id, p.program_id, p.program_name, p.program_tag, p.cgroup_id
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
    for v in &s.other_versions {
        println!("other layout:   {v} (removed when an agent of this version starts)");
    }
}
