// SPDX-License-Identifier: Apache-2.0
//! Putting the guard in the kernel — the pinned programs and the host-side table —
//! for `run` and `apply`: configuration, preflight checks, the node lock, load,
//! attach, pin, the table written with the same policy and mode, and the uplink
//! program on every uplink.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use tracing::{debug, info, warn};

use crate::{
    cgroup,
    config::{self, Config, ConfigArgs},
    hostside::{self, HostTable},
    loader::{
        self,
        origin::{self, Origin},
        pins::{self, AgentLock, AlreadyRunning, PinLayout},
        uplink::TcAttach,
        Backstop, Guard, InstallOptions, InstallReport, LinkAction, Mechanism,
    },
    policy::CompiledPolicy,
    preflight,
    uplink::{self, UplinkSpec},
};

/// Why `run` and `apply` stop when a check (or the kernel object's load) fails.
const CANNOT_ENFORCE: &str =
    "this node cannot enforce the block (see the failed checks above); refusing to start half-working";

/// What to install and where (`run` and `apply`; the command line builds it).
pub(crate) struct Request {
    pub config: ConfigArgs,
    /// The bpffs directory for the pinned links and maps.
    pub bpffs: PathBuf,
    /// The cgroup v2 directory to attach to (None: detected).
    pub cgroup: Option<PathBuf>,
    /// The network namespace whose sockets are the host's (None: the agent's own).
    pub host_netns: Option<PathBuf>,
    /// How to learn the host namespace's cookie (None: what the kernel has).
    pub netns_cookie_from: Option<Mechanism>,
    /// How the packet backstop tells a host socket's packet from a pod's (None: detected).
    pub packet_netns_from: Option<Backstop>,
    /// Mount bpffs on the parent of `bpffs` when it is missing.
    pub mount_bpffs: bool,
    /// Which devices get the uplink program.
    pub uplinks: UplinkSpec,
    /// How the uplink program sits on them.
    pub uplink_attach: TcAttach,
}

/// Why [`install`] failed, where its callers tell the cases apart.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstallError {
    /// Another agent holds the node lock (and owns the enforcement).
    #[error(transparent)]
    AlreadyRunning(#[from] AlreadyRunning),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The guard in the kernel, with the node lock held.
pub(crate) struct Installed {
    pub config: Config,
    pub policy: CompiledPolicy,
    pub cgroup: PathBuf,
    pub layout: PinLayout,
    pub guard: Guard,
    /// The host-side table, written with the same policy and mode.
    pub host: HostTable,
    pub report: InstallReport,
    pub lock: AgentLock,
}

/// Loads the configuration, checks the node, takes the node lock and installs (or
/// adopts and updates) the pinned enforcement; records `command` as its origin.
pub(crate) fn install(req: &Request, command: &str) -> Result<Installed, InstallError> {
    let config = config::load(&req.config).map_err(anyhow::Error::from)?;
    let policy = config.compile_policy().map_err(anyhow::Error::from)?;

    // The kernel object is verified by loading it for real below, not twice.
    let (facts, checks) = preflight::before_load(&preflight::Inputs {
        cgroup: req.cgroup.as_deref(),
        bpffs: &req.bpffs,
        mount_bpffs: req.mount_bpffs,
    });
    if preflight::has_failure(&checks) {
        preflight::print_human(&checks);
        return Err(anyhow!(CANNOT_ENFORCE).into());
    }
    raise_memlock_limit();
    let cgroup = cgroup::resolve(req.cgroup.as_deref())?;
    pins::ensure_on_bpffs(&req.bpffs, req.mount_bpffs)?;
    let lock = AgentLock::acquire(&req.bpffs)??;
    let layout = PinLayout::new(&req.bpffs);
    let backstop = req.packet_netns_from.unwrap_or_else(Backstop::detect);
    let loaded = loader::load(Some(&layout), backstop).map_err(|e| {
        preflight::print_human(&preflight::object_refused(facts, &req.bpffs, &e));
        debug!("the kernel refused the object: {e:#}");
        anyhow!(CANNOT_ENFORCE)
    })?;

    let opts = InstallOptions {
        cgroup: &cgroup,
        host_netns: req.host_netns.as_deref(),
        pins: &layout,
        cookie_mechanism: req.netns_cookie_from,
    };
    let previous = origin::installer(&layout);
    let (guard, report) = Guard::install(loaded, &opts, &policy, config.mode.as_kernel())?;
    let started = report.links.iter().all(|(_, action)| *action == LinkAction::Attached);
    origin::record(&layout, &Origin::this(command), previous, started)?;
    info!(
        cgroup = %cgroup.display(),
        cgroup_id = report.cgroup_id,
        mode = config.mode.name(),
        destinations = policy.v4.len() + policy.v6.len(),
        host_netns_cookie = report.host_netns_cookie,
        netns_cookie_from = report.cookie_mechanism.describe(),
        packet_netns_from = report.backstop.describe(),
        links = ?report.links,
        pins = %layout.dir.display(),
        "attached: pods are blocked from the metadata service"
    );
    for hook in &report.detached {
        info!(hook, mode = config.mode.name(), "detached a pinned link this mode does not use");
    }
    for old in &report.removed_versions {
        info!(path = %old.display(), "removed the pins of another layout version after attaching ours");
    }
    // The second enforcement point: packets entering the host, by final destination.
    let mut host = HostTable::open(req.host_netns.as_deref(), &cgroup).map_err(anyhow::Error::from)?;
    host.set_conceal(hostside::conceal_target(&config));
    host.set_policy(&hostside::policy(&config)?, config.mode == config::Mode::Audit)?;
    info!(table = hostside::TABLE, "host side: packets entering the node are judged after DNAT");
    // The third: every packet leaving the node, on its uplinks.
    let mut guard = guard;
    uplink::install(&mut guard, req.host_netns.as_deref(), &req.uplinks, req.uplink_attach, &policy)?;
    Ok(Installed { config, policy, cgroup, layout, guard, host, report, lock })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK, whose default is tiny.
fn raise_memlock_limit() {
    use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        if preflight::kernel_version() < (5, 11) {
            warn!("could not raise RLIMIT_MEMLOCK ({e}); this kernel charges BPF maps to it, so loading may fail");
        }
    }
}
