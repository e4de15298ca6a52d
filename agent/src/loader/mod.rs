// SPDX-License-Identifier: Apache-2.0
//! The kernel guard in the kernel: the code that holds the cgroup programs' BPF
//! objects. It loads the kernel object, fills its maps, attaches its programs to the
//! cgroup and keeps all of it pinned so enforcement outlives the agent; and, for the
//! commands around that, finds what a pin root holds ([`health`]'s faults and repair,
//! [`status`] and [`status_conceal`] for `status`, [`uninstall`], [`origin`]: who
//! installed it). Elsewhere BPF is touched only read-only: the event reader takes the
//! ring buffer from [`Guard::take_events`], and `preflight` loads the object once to
//! check that the kernel accepts it ([`verify_object`]). The host-side table is
//! nf_tables, not BPF: see `hostside`.
//!
//! Start-up never leaves a gap: maps are reused from their pins and refreshed in
//! place, a pinned link keeps running its program until `BPF_LINK_UPDATE` swaps in
//! ours in one step, and links of another layout version are removed only after ours
//! are attached.
//!
//! Nothing here needs CAP_SYS_ADMIN: what a pinned link runs is learned from the
//! program pinned beside it (compared by id with the link's, then by tag with ours),
//! never by opening a program by id.

mod backstop;
mod bpf_sys;
mod conceal_maps;
pub(crate) mod health;
mod links;
pub(crate) mod netns_cookie;
mod object;
pub(crate) mod origin;
pub(crate) mod pins;
mod policy_maps;
mod programs;
mod refused;
pub(crate) mod status;
pub(crate) mod status_conceal;
pub(crate) mod uplink;
pub(crate) mod uplink_state;

use std::{
    collections::BTreeSet,
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    Ebpf,
};
pub(crate) use backstop::Backstop;
pub(crate) use conceal_maps::{sock_addr, sock_key, ConcealPeers};
pub(crate) use links::pinned_hook;
use metadata_guard_common::{counters, map_names, ALLOWED_CGROUPS_MAX_ENTRIES, MODE_CONCEAL};
pub(crate) use netns_cookie::Mechanism;
use pins::PinLayout;

use crate::policy::CompiledPolicy;

/// The kernel object, built by `cargo xtask build-ebpf` and embedded by build.rs.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/metadata-guard.bpf.o"));

/// Maps that are pinned: all but the start-up probe's scratch map.
pub(crate) const PINNED_MAPS: [&str; 21] = [
    map_names::SETTINGS,
    map_names::PREFILTER,
    map_names::PREFILTER2,
    map_names::COUNTERS,
    map_names::POLICY4_A,
    map_names::POLICY4_B,
    map_names::POLICY6_A,
    map_names::POLICY6_B,
    map_names::EVENTS,
    map_names::ALLOWED_CGROUPS,
    // Losing it would unmark every live socket: pinned like the rest (created with
    // either backstop, so that switching between them keeps one map layout).
    map_names::SOCK_MARK,
    // Conceal mode (conceal_maps.rs): a restarted agent's proxy reads the records the
    // kernel kept writing meanwhile.
    map_names::CONCEAL,
    map_names::CONCEAL_ENDPOINTS,
    map_names::CONCEAL_PENDING,
    map_names::CONCEAL_PEERS,
    map_names::CONCEAL_COUNTERS,
    // The uplink's (uplink.rs): its allowlist and the host side's extra rules.
    map_names::UPLINK_ALLOW,
    map_names::UPLINK4_A,
    map_names::UPLINK4_B,
    map_names::UPLINK6_A,
    map_names::UPLINK6_B,
];

pub(crate) use object::{load, verify_object, Loaded};
pub(crate) use programs::Plan;
pub use programs::ATTACHMENTS;
pub(crate) use refused::ObjectRefused;

pub(crate) struct InstallOptions<'a> {
    pub cgroup: &'a Path,
    pub host_netns: Option<&'a Path>,
    pub pins: &'a PinLayout,
    /// Force a mechanism for the host netns cookie (None: the best this kernel has).
    pub cookie_mechanism: Option<Mechanism>,
}

/// What happened to each hook's link at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkAction {
    /// No link was pinned: attached a new one.
    Attached,
    /// A pinned link already ran identical code: kept as is.
    Kept,
    /// A pinned link ran other code: swapped atomically to ours.
    Replaced,
    /// A pinned link was on another cgroup: attached ours, then dropped it.
    Moved,
}

pub(crate) struct InstallReport {
    pub cgroup_id: u64,
    pub host_netns_cookie: u64,
    pub cookie_mechanism: Mechanism,
    pub links: Vec<(&'static str, LinkAction)>,
    /// Pinned links this plan does not use (`conceal_ops` outside conceal mode,
    /// `sock_create` where the backstop asks the kernel), detached.
    pub detached: Vec<&'static str>,
    pub backstop: Backstop,
    pub removed_versions: Vec<PathBuf>,
}

/// The guard as loaded in the kernel.
pub(crate) struct Guard {
    ebpf: Ebpf,
    pins: PinLayout,
    host_netns_cookie: u64,
    /// The mode in force and the backstop: which attachments are kept ([`Plan`]).
    plan: Plan,
    /// The event ring buffer once the reader took it, to pin it again (`repair`).
    events: Option<MapData>,
}

impl Guard {
    /// Fills and attaches (or adopts) the loaded guard. `policy` and `mode` are in
    /// force before any program is attached.
    pub(crate) fn install(
        loaded: Loaded,
        opts: &InstallOptions<'_>,
        policy: &CompiledPolicy,
        mode: u32,
    ) -> Result<(Guard, InstallReport)> {
        let pins = opts.pins;
        for dir in [pins.links_dir(), pins.programs_dir()] {
            fs::create_dir_all(&dir).with_context(|| format!("could not create pin directory {}", dir.display()))?;
        }
        let (mut ebpf, backstop) = (loaded.ebpf, loaded.backstop);
        let cgroup_id = crate::cgroup::id(opts.cgroup)?;

        let sockopt = match opts.cookie_mechanism {
            Some(Mechanism::ProbeProgram) => None,
            _ => netns_cookie::via_sockopt(opts.host_netns)?,
        };
        let (host_netns_cookie, cookie_mechanism) = match (sockopt, opts.cookie_mechanism) {
            (Some(cookie), _) => (cookie, Mechanism::SoNetnsCookie),
            (None, Some(Mechanism::SoNetnsCookie)) => {
                bail!("--netns-cookie-from sockopt: this kernel has no SO_NETNS_COOKIE (it arrived in 5.14); use auto")
            }
            (None, _) => (netns_cookie::via_probe(&mut ebpf, opts.cgroup, opts.host_netns)?, Mechanism::ProbeProgram),
        };
        let plan = Plan { mode, backstop };
        let mut guard = Guard { ebpf, pins: pins.clone(), host_netns_cookie, plan, events: None };
        guard.write_maps(policy, mode)?;

        let cgroup_dir =
            File::open(opts.cgroup).with_context(|| format!("could not open cgroup {}", opts.cgroup.display()))?;
        let mut links = Vec::new();
        // Every program was loaded (verified) whatever the mode (`load`): conceal mode
        // can be switched on by a reload.
        // The backstop's egress link is swapped before `sock_create` goes: a pinned
        // `mg_egress` reads marks until `mg_egress_netns` replaces it.
        for attachment in plan.attachments() {
            let action = guard.link_program(attachment, &cgroup_dir, cgroup_id)?;
            links.push((attachment.pin, action));
        }
        let mut detached = Vec::new();
        for attachment in plan.unused() {
            if guard.unlink(attachment)? {
                detached.push(attachment.pin);
            }
        }
        let mut removed_versions = Vec::new();
        for old in pins.other_versions() {
            remove_pins(&old)
                .with_context(|| format!("could not remove the old version's pins in {}", old.display()))?;
            removed_versions.push(old);
        }
        let report = InstallReport {
            cgroup_id,
            host_netns_cookie,
            cookie_mechanism,
            links,
            detached,
            backstop,
            removed_versions,
        };
        Ok((guard, report))
    }

    /// Puts a new policy and mode in force, all at once (see `policy_maps`), and makes
    /// the attachments on `cgroup` those of the mode. `conceal_ops` records every
    /// redirected connection for the proxy, so it is attached before a mode that can
    /// redirect is written, and detached only after the mode no longer redirects.
    pub(crate) fn apply(&mut self, policy: &CompiledPolicy, mode: u32, cgroup: &Path) -> Result<()> {
        if mode == MODE_CONCEAL {
            self.link_mode(mode, cgroup)?;
        }
        self.write_maps(policy, mode)?;
        if mode != MODE_CONCEAL {
            // The new mode is in force already; a sock_ops program left attached only
            // idles (it checks the mode first), so this is no reason to report failure.
            if let Err(e) = self.link_mode(mode, cgroup) {
                tracing::warn!("could not detach conceal mode's sock_ops program (it idles meanwhile): {e:#}");
            }
        }
        Ok(())
    }

    fn write_maps(&mut self, policy: &CompiledPolicy, mode: u32) -> Result<()> {
        policy_maps::apply(&mut self.ebpf, policy, mode, self.host_netns_cookie)
            .context("could not write the policy into the kernel maps")?;
        self.plan.mode = mode;
        Ok(())
    }

    /// Attaches the mode-dependent programs `mode` needs and detaches the others; the
    /// rest stay as they are (the health check restores them).
    fn link_mode(&mut self, mode: u32, cgroup: &Path) -> Result<()> {
        let cgroup_id = crate::cgroup::id(cgroup)?;
        let cgroup_dir = File::open(cgroup).with_context(|| format!("could not open cgroup {}", cgroup.display()))?;
        let plan = Plan { mode, ..self.plan };
        for a in ATTACHMENTS.iter().filter(|a| a.depends_on_mode()) {
            if plan.needs(a) {
                self.link_program(a, &cgroup_dir, cgroup_id)?;
            } else {
                self.unlink(a)?;
            }
        }
        Ok(())
    }

    /// Where this guard's pins live.
    pub(crate) fn pins(&self) -> &PinLayout {
        &self.pins
    }

    /// The mode in force and the backstop: what is attached.
    pub(crate) fn plan(&self) -> Plan {
        self.plan
    }

    /// Makes the kernel's allowlist exactly `wanted`; returns (added, removed).
    pub(crate) fn sync_allowed(&mut self, wanted: &BTreeSet<u64>) -> Result<(usize, usize)> {
        let map = self.ebpf.map_mut(map_names::ALLOWED_CGROUPS).context("no allowlist map")?;
        let mut allowed: HashMap<&mut MapData, u64, u8> = HashMap::try_from(map)?;
        let present: BTreeSet<u64> = allowed.keys().collect::<Result<_, _>>()?;
        let mut removed = 0;
        for stale in present.difference(wanted) {
            allowed.remove(stale).with_context(|| format!("could not remove cgroup {stale} from the allowlist"))?;
            removed += 1;
        }
        let mut added = 0;
        for new in wanted.difference(&present) {
            allowed.insert(new, 1, 0).with_context(|| {
                format!(
                    "could not allow cgroup {new}; the allowlist holds at most {ALLOWED_CGROUPS_MAX_ENTRIES} cgroups"
                )
            })?;
            added += 1;
        }
        Ok((added, removed))
    }

    /// The kernel's verdict counters, summed over CPUs, indexed by counter slot.
    pub(crate) fn counters(&self) -> Result<Vec<u64>> {
        read_counters(self.ebpf.map(map_names::COUNTERS).context("no counters map")?)
    }

    /// The event ring buffer, for the event reader (can be taken once).
    pub(crate) fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(map_names::EVENTS).context("the event ring buffer was already taken")?;
        self.events = Some(health::second_handle(&map)?);
        Ok(RingBuf::try_from(map)?)
    }
}

pub(crate) fn read_counters(map: &aya::maps::Map) -> Result<Vec<u64>> {
    let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
    (0..counters::SLOTS)
        .map(|slot| Ok(array.get(&slot, 0).with_context(|| format!("could not read counter {slot}"))?.iter().sum()))
        .collect()
}

/// Removes one version directory's link pins (detaching them), then its map pins.
pub(crate) fn remove_pins(dir: &Path) -> Result<()> {
    // Links first: removing their pins detaches them.
    for sub in ["links", "programs", "maps"] {
        let sub = dir.join(sub);
        let Ok(entries) = fs::read_dir(&sub) else { continue };
        for entry in entries {
            let path = entry?.path();
            // Detached before unpinned: the unpin alone lets the hook run on until
            // bpffs frees the inode, after an RCU grace period.
            let link = if sub.ends_with("links") { bpf_sys::obj_get(&path).ok() } else { None };
            if let Some(link) = link {
                if let Err(e) = bpf_sys::link_detach(link.as_fd()) {
                    tracing::debug!("could not detach {} before unpinning it: {e}", path.display());
                }
            }
            fs::remove_file(&path).with_context(|| format!("could not remove pin {}", path.display()))?;
        }
        fs::remove_dir(&sub).with_context(|| format!("could not remove {}", sub.display()))?;
    }
    uplink_state::clear_spec(dir)
        .with_context(|| format!("could not remove the uplink choice in {}", dir.display()))?;
    for record in [origin::INSTALLED_BY, origin::UPDATED_BY] {
        let record = dir.join(record);
        origin::clear(&record).with_context(|| format!("could not remove {}", record.display()))?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("could not remove {}", dir.display())),
    }
}

/// `metadata-guard uninstall`: every version's pins under `root`. Idempotent.
pub(crate) fn uninstall(root: &Path) -> Result<Vec<PathBuf>> {
    if pins::AgentLock::is_held(root) {
        bail!(
            "an agent is running on {} and would keep enforcing with nothing pinned; stop it first \
             (delete the DaemonSet, or SIGTERM it) and run uninstall again",
            root.display()
        );
    }
    let layout = PinLayout::new(root);
    let mut removed = Vec::new();
    for dir in layout.other_versions().into_iter().chain([layout.dir.clone()]) {
        if dir.exists() {
            remove_pins(&dir)?;
            removed.push(dir);
        }
    }
    pins::remove_root_if_empty(root)?;
    Ok(removed)
}
