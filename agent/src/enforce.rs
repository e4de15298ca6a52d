//! Enforcement: putting the guard in the kernel — the pinned programs and the
//! host-side table (shared by `run` and `apply`) — and,
//! in the running agent, the subsystem that keeps it whole — kernel counters into
//! metrics, and every second a check that the pins and the attached cgroup are
//! still there, restoring what it can.

use std::{path::PathBuf, time::Duration};

use anyhow::{anyhow, bail, Result};
use metadata_guard_common::{counters, Hook, Verdict};
use tracing::{debug, error, info, warn};

use crate::{
    cgroup,
    cli::{CookieSource, EnforceArgs, PacketNetnsSource},
    config::{self, Config},
    hostside::{self, HostSide},
    http::Condition,
    loader::{
        self,
        health::Fault,
        origin::{self, Origin},
        pins::{self, AgentLock, PinLayout},
        Backstop, Guard, InstallOptions, InstallReport, LinkAction, Mechanism,
    },
    policy::CompiledPolicy,
    preflight,
    supervise::{Context, Shutdown},
};

/// Why `run` and `apply` stop when a check (or the kernel object's load) fails.
const CANNOT_ENFORCE: &str =
    "this node cannot enforce the block (see the failed checks above); refusing to start half-working";

/// How often counters are published and the pins checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The guard in the kernel, with the node lock held.
pub struct Installed {
    pub config: Config,
    pub policy: CompiledPolicy,
    pub cgroup: PathBuf,
    pub layout: PinLayout,
    pub guard: Guard,
    /// The host-side table, written with the same policy and mode.
    pub host: HostSide,
    pub report: InstallReport,
    pub lock: AgentLock,
}

/// Loads the configuration, checks the node, takes the node lock and installs (or
/// adopts and updates) the pinned enforcement; records `command` as its origin.
pub fn install(args: &EnforceArgs, command: &str) -> Result<Installed> {
    let config = config::load(&args.config).map_err(anyhow::Error::from)?;
    let policy = config.compile_policy().map_err(anyhow::Error::from)?;

    // The kernel object is verified by loading it for real below, not twice.
    let (facts, checks) = preflight::before_load(&preflight::Inputs {
        cgroup: args.cgroup.as_deref(),
        bpffs: &args.pins.bpffs,
        mount_bpffs: args.mount_bpffs,
    });
    if preflight::has_failure(&checks) {
        preflight::print_human(&checks);
        bail!(CANNOT_ENFORCE);
    }
    raise_memlock_limit();
    let cgroup = cgroup::resolve(args.cgroup.as_deref())?;
    pins::ensure_on_bpffs(&args.pins.bpffs, args.mount_bpffs)?;
    let lock = AgentLock::acquire(&args.pins.bpffs)?;
    let layout = PinLayout::new(&args.pins.bpffs);
    let backstop = match args.packet_netns_from {
        PacketNetnsSource::Auto => Backstop::detect(),
        PacketNetnsSource::Helper => Backstop::NetnsHelper,
        PacketNetnsSource::Marks => Backstop::SocketMarks,
    };
    let loaded = loader::load(Some(&layout), backstop).map_err(|e| {
        preflight::print_human(&preflight::object_refused(facts, &args.pins.bpffs, &e));
        debug!("the kernel refused the object: {e:#}");
        anyhow!(CANNOT_ENFORCE)
    })?;

    let cookie_mechanism = match args.netns_cookie_from {
        CookieSource::Auto => None,
        CookieSource::Sockopt => Some(Mechanism::SoNetnsCookie),
        CookieSource::Probe => Some(Mechanism::ProbeProgram),
    };
    let opts =
        InstallOptions { cgroup: &cgroup, host_netns: args.host_netns.as_deref(), pins: &layout, cookie_mechanism };
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
    let mut host = HostSide::open(args.host_netns.as_deref(), &cgroup)?;
    host.set_policy(&hostside::policy(&config)?, config.mode == config::Mode::Audit)?;
    info!(table = hostside::TABLE, "host side: packets entering the node are judged after DNAT");
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

/// The enforcement subsystem of the running agent. Its readiness condition,
/// `enforcement`, holds while every hook is attached to the cgroup and every map
/// pinned. Runs on a thread of its own (`repair` loads and attaches).
pub struct Enforcement {
    condition: Condition,
}

impl Enforcement {
    pub fn new(ctx: &Context) -> Enforcement {
        Enforcement { condition: ctx.readiness.condition("enforcement", "not checked yet") }
    }

    pub async fn run(self, ctx: Context, mut shutdown: Shutdown) -> Result<()> {
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        // What was last reported, so that an outage is logged when it changes, not every second.
        let (mut reported, mut last_error): (Vec<Fault>, Option<String>) = (Vec::new(), None);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                _ = tick.tick() => {}
            }
            let mut guard = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            publish_counters(&guard, &ctx);
            let mut faults = guard.faults(&ctx.cgroup);
            if !faults.is_empty() {
                self.condition.missing(describe(&faults));
                if faults != reported {
                    error!(faults = %describe(&faults), "enforcement in the kernel is incomplete; restoring it");
                }
                let repaired = guard.repair(&ctx.cgroup);
                let before = std::mem::replace(&mut faults, guard.faults(&ctx.cgroup));
                match repaired {
                    Ok(()) if faults.is_empty() => {
                        ctx.metrics.enforcement_restored();
                        info!(was = %describe(&before), "restored: every hook attached to {}, every map pinned", ctx.cgroup.display());
                        last_error = None;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        let why = format!("{e:#}");
                        if last_error.as_deref() != Some(why.as_str()) {
                            warn!("could not restore enforcement yet (retrying every {CHECK_INTERVAL:?}): {why}");
                            last_error = Some(why);
                        }
                    }
                }
            }
            let detached = faults.iter().filter(|f| matches!(f, Fault::LinkUnpinned(_) | Fault::LinkElsewhere { .. }));
            ctx.metrics.set_programs_attached((guard.plan().attachments().count() - detached.count()) as i64);
            if faults.is_empty() {
                self.condition.ready();
            } else {
                self.condition.missing(describe(&faults));
            }
            reported = faults;
        }
    }
}

fn describe(faults: &[Fault]) -> String {
    faults.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

fn publish_counters(guard: &Guard, ctx: &Context) {
    match guard.counters() {
        Ok(values) => {
            for hook in Hook::ALL {
                for verdict in Verdict::ALL {
                    ctx.metrics.set_kernel_verdicts(hook, verdict, values[counters::slot(hook, verdict) as usize]);
                }
            }
            ctx.metrics.set_events_lost(values[counters::EVENTS_LOST as usize]);
        }
        Err(e) => warn!("could not read the kernel counters: {e:#}"),
    }
}

/// `e` with `why` in front when it is the node lock being held by an agent.
pub fn describe_lock_error(e: anyhow::Error, why: &str) -> anyhow::Error {
    if e.downcast_ref::<pins::AlreadyRunning>().is_some() {
        e.context(why.to_string())
    } else {
        e
    }
}
