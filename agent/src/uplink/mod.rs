//! The uplink enforcement point: the tc egress program `mg_uplink` on every device a
//! packet can leave the node through, whatever datapath brought it there (Cilium's
//! BPF host routing, `bpf_redirect` from a pod's veth, macvlan and ipvlan children,
//! AF_PACKET frames). See `ebpf/src/uplink.rs` for the rule, `choice` for which
//! devices, `loader::uplink` for how the program sits on them, and `subsystem` for
//! how the running agent follows devices as they come and go.

pub mod attribution;
pub mod choice;
mod scan;
pub mod spec_record;
pub mod subsystem;

use std::path::Path;

use anyhow::{Context, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use choice::{Reason, Uplink, UplinkSpec};
pub use scan::{current, Scan};
pub use subsystem::Uplinks;

use crate::{
    loader::{
        pins::PinLayout,
        uplink::{self as tc, TcAttach, UplinkAction, UplinkDevice},
        Guard,
    },
    policy::CompiledPolicy,
};

/// Every prefix the node's policy blocks (the node-only rules' too): what a route
/// must reach for its device to be an uplink.
pub fn blocked_prefixes(policy: &CompiledPolicy) -> Vec<IpNet> {
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
pub fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
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
pub fn enter_netns(netns: &Path) -> Result<()> {
    let file = std::fs::File::open(netns)
        .with_context(|| format!("could not open the host network namespace {}", netns.display()))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("could not enter the host network namespace {}", netns.display()))
}

/// One uplink's outcome at install.
#[derive(Clone, Debug)]
pub struct Guarded {
    pub uplink: Uplink,
    pub action: std::result::Result<UplinkAction, String>,
}

/// Puts the program on every uplink `spec` names now (in the calling thread's
/// namespace); one that fails does not keep the others unguarded.
pub fn guard_all(guard: &mut Guard, uplinks: &[Uplink], how: TcAttach) -> Vec<Guarded> {
    uplinks
        .iter()
        .map(|u| {
            let dev = UplinkDevice { index: u.index, name: u.name.clone() };
            let action = guard.guard_uplink(&dev, how).map_err(|e| format!("{e:#}"));
            Guarded { uplink: u.clone(), action }
        })
        .collect()
}

/// One device in `status`: an uplink the node has now, or a device that runs our
/// program without being one (any more).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkStatus {
    pub name: String,
    pub ifindex: u32,
    /// Why it is an uplink (`choice::Reason`); None: it runs our program but is not
    /// one now (kept: a device never loses the program while the agent runs).
    pub reason: Option<String>,
    /// "tcx" or "clsact" when it runs our program; None when it does not.
    pub attach: Option<String>,
    pub program_id: u32,
    pub program_name: Option<String>,
    /// Ours runs before every other program (tcx) or filter (clsact) on the hook.
    pub first: bool,
}

impl UplinkStatus {
    pub fn guarded(&self) -> bool {
        self.attach.is_some()
    }
}

/// The uplinks and their programs as the kernel has them, read in the calling
/// thread's namespace: the devices `spec` chooses for `policy`, and every other device
/// that runs our program.
pub fn status(layout: &PinLayout, spec: &UplinkSpec, policy: &CompiledPolicy) -> Result<Vec<UplinkStatus>> {
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
pub fn problems(uplinks: &[UplinkStatus]) -> Vec<String> {
    uplinks
        .iter()
        .filter(|u| u.reason.is_some() && !u.guarded())
        .map(|u| format!("uplink {} ({}) does not run the uplink program", u.name, u.reason.as_deref().unwrap_or("")))
        .collect()
}
