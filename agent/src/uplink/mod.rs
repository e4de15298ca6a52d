// SPDX-License-Identifier: Apache-2.0
//! The uplink enforcement point: the tc egress program `mg_uplink` on every device a
//! packet can leave the node through, whatever datapath brought it there (Cilium's
//! BPF host routing, `bpf_redirect` from a pod's veth, macvlan and ipvlan children,
//! AF_PACKET frames). See `ebpf/src/uplink.rs` for the rule, `choice` for which
//! devices, `loader::uplink` for how the program sits on them, and `subsystem` for
//! how the running agent follows devices as they come and go.

pub(crate) mod attribution;
pub(crate) mod choice;
mod scan;
pub(crate) mod subsystem;

use std::{collections::BTreeSet, path::Path};

use metadata_guard_common::{UplinkAllowKey, AF_INET, AF_INET6};

use anyhow::{Context, Result};
use ipnet::IpNet;

pub(crate) use choice::{Uplink, UplinkSpec};
pub(crate) use scan::{current, Scan};
pub(crate) use subsystem::Uplinks;

use crate::{
    loader::{
        pins::PinLayout,
        uplink::{TcAttach, UplinkAction, UplinkDevice},
        uplink_state::{self as tc, UplinkStatus},
        Guard,
    },
    policy::CompiledPolicy,
};

/// Every prefix the node's policy blocks (the node-only rules' too): what a route
/// must reach for its device to be an uplink.
pub(crate) fn blocked_prefixes(policy: &CompiledPolicy) -> Vec<IpNet> {
    let mut out = Vec::new();
    for part in std::iter::once(policy).chain(policy.node_only.as_deref()) {
        out.extend(part.v4.iter().map(|(net, _)| IpNet::V4(*net)));
        out.extend(part.v6.iter().map(|(net, _)| IpNet::V6(*net)));
    }
    out
}

/// Runs `f` on a thread that entered the network namespace at `netns` (the host's,
/// from `--host-netns`): device names, ifindexes, netlink sockets and tcx links are
/// all of the calling thread's namespace. `None` runs it here.
pub(crate) fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(netns) = netns else { return f() };
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_netns(netns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread working in {} panicked", netns.display()))?
    })
}

/// Moves the calling thread into the network namespace at `netns`.
pub(crate) fn enter_netns(netns: &Path) -> Result<()> {
    let file = std::fs::File::open(netns)
        .with_context(|| format!("could not open the host network namespace {}", netns.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("could not enter the host network namespace {}", netns.display()))
}

/// One uplink's outcome at install.
#[derive(Clone, Debug)]
pub(crate) struct Guarded {
    pub uplink: Uplink,
    pub action: std::result::Result<UplinkAction, String>,
}

/// Puts the program on every uplink `spec` names now (in the calling thread's
/// namespace); one that fails does not keep the others unguarded.
pub(crate) fn guard_all(guard: &mut Guard, uplinks: &[Uplink], how: TcAttach) -> Vec<Guarded> {
    uplinks
        .iter()
        .map(|u| {
            let dev = UplinkDevice { index: u.index, name: u.name.clone() };
            let action = guard.guard_uplink(&dev, how).map_err(|e| format!("{e:#}"));
            Guarded { uplink: u.clone(), action }
        })
        .collect()
}

/// The uplinks and their programs as the kernel has them, read in the calling
/// thread's namespace: the devices `spec` chooses for `policy`, and every other device
/// that runs our program.
pub(crate) fn status(layout: &PinLayout, spec: &UplinkSpec, policy: &CompiledPolicy) -> Result<Vec<UplinkStatus>> {
    let Scan { devices, uplinks } = current(spec, policy)?;
    let mut out = Vec::new();
    for u in &uplinks {
        let hook = tc::uplink_hook(layout, u.index)?;
        out.push(UplinkStatus {
            name: u.name.clone(),
            ifindex: u.index,
            reason: Some(u.reason.to_string()),
            attach: hook.attach,
            program_id: hook.program_id,
            program_name: hook.program_name,
            first: hook.first,
        });
    }
    for (index, _) in tc::guarded(layout)? {
        if out.iter().any(|s| s.ifindex == index) {
            continue;
        }
        let Some(dev) = devices.iter().find(|d| d.index == index) else { continue };
        let hook = tc::uplink_hook(layout, index)?;
        out.push(UplinkStatus {
            name: dev.name.clone(),
            ifindex: index,
            reason: None,
            attach: hook.attach,
            program_id: hook.program_id,
            program_name: hook.program_name,
            first: hook.first,
        });
    }
    Ok(out)
}

/// What keeps the uplinks from enforcing, for `status` and `/readyz`: an uplink
/// without our program.
pub(crate) fn problems(uplinks: &[UplinkStatus]) -> Vec<String> {
    uplinks
        .iter()
        .filter(|u| u.reason.is_some() && !u.guarded())
        .map(|u| format!("uplink {} ({}) does not run the uplink program", u.name, u.reason.as_deref().unwrap_or("")))
        .collect()
}

/// Puts the program on every uplink `spec` chooses now (in `host_netns`) and records
/// the choice for `status`: what `run` and `apply` do at start. An uplink that cannot
/// get it is logged and reported, not fatal: the other enforcement points stand, and
/// the running agent's `uplinks` subsystem retries (its readiness says what is missing).
pub(crate) fn install(
    guard: &mut Guard,
    host_netns: Option<&Path>,
    spec: &UplinkSpec,
    how: TcAttach,
    policy: &CompiledPolicy,
) -> Result<()> {
    tc::record_spec(guard.pins(), &spec.to_string())?;
    if *spec == UplinkSpec::None {
        tracing::warn!("--uplinks none: packets that leave the node without passing its netfilter are not judged");
        return Ok(());
    }
    let guarded = in_netns(host_netns, || {
        let scan = current(spec, policy)?;
        Ok(guard_all(guard, &scan.uplinks, how))
    })?;
    for g in &guarded {
        match &g.action {
            Ok(action) => tracing::info!(
                uplink = %g.uplink.name,
                ifindex = g.uplink.index,
                reason = %g.uplink.reason,
                how = how.name(),
                ?action,
                "uplink guarded: packets leaving through it are judged"
            ),
            Err(e) => tracing::error!(uplink = %g.uplink.name, "the uplink program is not on this uplink: {e}"),
        }
    }
    Ok(())
}

/// Removes our program from every device of the calling thread's namespace (tcx
/// pins under `layout` and our cls_bpf filters); the names of the devices it was on.
pub(crate) fn remove_all(layout: &PinLayout) -> Result<Vec<String>> {
    let mut sock =
        metadata_guard_netfilter::NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
    let devices =
        metadata_guard_netfilter::devices::devices(&mut sock).context("could not list the network devices")?;
    let mut removed = Vec::new();
    for dev in devices {
        if tc::remove_uplink(layout, dev.index)? {
            removed.push(dev.name);
        }
    }
    Ok(removed)
}

/// The keys of `MG_UPLINK_ALLOW` for the allowlisted pods' entries into the node (the
/// host side's view of them: their own interfaces, and source addresses behind a bridge).
pub(crate) fn allow_keys(allowed: &crate::hostside::Allowed) -> BTreeSet<UplinkAllowKey> {
    let mut keys = BTreeSet::new();
    for ifindex in &allowed.interfaces {
        keys.insert(UplinkAllowKey { ifindex: *ifindex, ..UplinkAllowKey::default() });
    }
    for (ifindex, addr) in &allowed.v4 {
        let mut key = UplinkAllowKey { ifindex: *ifindex, family: AF_INET, ..UplinkAllowKey::default() };
        key.addr[..4].copy_from_slice(&addr.octets());
        keys.insert(key);
    }
    for (ifindex, addr) in &allowed.v6 {
        keys.insert(UplinkAllowKey { ifindex: *ifindex, family: AF_INET6, _pad: [0; 3], addr: addr.octets() });
    }
    keys
}

/// The uplinks as `status` shows them, read in `host_netns` under the pins at `bpffs`
/// with the recorded `--uplinks` choice (`auto` when none was recorded).
pub(crate) fn read(bpffs: &Path, host_netns: Option<&Path>, choice: Option<&str>) -> Result<Vec<UplinkStatus>> {
    let spec = choice.and_then(|c| UplinkSpec::parse(c).ok()).unwrap_or(UplinkSpec::Auto);
    let layout = PinLayout::new(bpffs);
    let policy = crate::loader::status::pinned_policy(&layout)?;
    in_netns(host_netns, || status(&layout, &spec, &policy))
}

/// The uplinks, for humans.
pub(crate) fn print_status(uplinks: &[UplinkStatus], choice: Option<&str>) {
    println!("uplinks (--uplinks {}):", choice.unwrap_or("auto"));
    if uplinks.is_empty() {
        println!("  none");
    }
    for u in uplinks {
        let how = match &u.attach {
            Some(how) => format!("{how}, program {}{}", u.program_id, if u.first { ", first" } else { ", NOT first" }),
            None => "NO PROGRAM".to_string(),
        };
        let why = u.reason.as_deref().unwrap_or("not an uplink now");
        println!("  {} (ifindex {}): {how} — {why}", u.name, u.ifindex);
    }
}

/// `check`: whether this kernel and this node's datapath support the uplink point —
/// how the program would sit on a device (tcx or clsact), how it would know a host
/// socket (the kernel's netns cookie or the marks), and which devices are uplinks
/// now (under the default policy). `ok` false when tc programs cannot be loaded or
/// the devices cannot be read.
pub(crate) fn check(host_netns: Option<&Path>) -> (bool, String) {
    use aya::{programs::ProgramType, sys::is_program_supported};
    match is_program_supported(ProgramType::SchedClassifier) {
        Ok(true) => {}
        Ok(false) => return (false, "this kernel has no tc (sched_cls) BPF programs".into()),
        Err(e) => return (false, format!("could not probe for tc (sched_cls) BPF programs: {e}")),
    }
    let how = TcAttach::detect();
    let backstop = crate::loader::Backstop::detect();
    let policy = match crate::policy::compile(&crate::policy::Preset::Default.rules()) {
        Ok(p) => p,
        Err(e) => return (false, format!("the default policy does not compile: {e}")),
    };
    match in_netns(host_netns, || current(&UplinkSpec::Auto, &policy)) {
        Ok(scan) => {
            let names: Vec<String> = scan.uplinks.iter().map(|u| format!("{} ({})", u.name, u.reason)).collect();
            let host_socket = match backstop {
                crate::loader::Backstop::NetnsHelper => "the kernel's netns cookie of each packet's socket",
                crate::loader::Backstop::SocketMarks => "host sockets marked at creation",
            };
            let devices = if names.is_empty() { "none found".to_string() } else { names.join(", ") };
            (true, format!("{} attach; host sockets known by {host_socket}; uplinks now: {devices}", how.name()))
        }
        Err(e) => (false, format!("could not read the host's devices and routes: {e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlisted_entries_become_whole_interface_and_address_keys() {
        let allowed = crate::hostside::Allowed {
            interfaces: vec![7],
            v4: vec![(3, "10.244.0.9".parse().unwrap())],
            v6: vec![(3, "fd00:10:244::9".parse().unwrap())],
        };
        let keys: Vec<UplinkAllowKey> = allow_keys(&allowed).into_iter().collect();
        assert_eq!(keys.len(), 3);
        assert!(keys.contains(&UplinkAllowKey { ifindex: 7, ..UplinkAllowKey::default() }));
        let v4 = keys.iter().find(|k| k.family == AF_INET).unwrap();
        assert_eq!((v4.ifindex, &v4.addr[..4], &v4.addr[4..]), (3, &[10, 244, 0, 9][..], &[0u8; 12][..]));
        let v6 = keys.iter().find(|k| k.family == AF_INET6).unwrap();
        assert_eq!(std::net::Ipv6Addr::from(v6.addr), "fd00:10:244::9".parse::<std::net::Ipv6Addr>().unwrap());
    }
}
