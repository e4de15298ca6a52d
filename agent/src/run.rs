//! `metadata-guard run`: the agent's life, from checks to a clean exit.
//!
//! One task owns the kernel guard (policy reloads, counters); another turns events
//! into audit records and metrics; a third serves /metrics, /healthz and /readyz.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use metadata_guard_common::{counters, Hook, Verdict};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    allowlist,
    audit::Auditor,
    cgroup,
    cli::{CookieSource, RunArgs},
    config::{self, Config},
    events::EventReader,
    hostside::{HostSide, RefusalReader},
    kubepods_watch::KubepodsWatch,
    loader::{pins, Guard, InstallOptions, Mechanism},
    metrics::Metrics,
    pod_identity::PodResolver,
    preflight, probes,
};

/// How often the kernel counters are copied into metrics and the config file is checked.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often audit windows are flushed.
const AUDIT_TICK: Duration = Duration::from_millis(200);
/// How often vanished cgroups are dropped from the identity cache.
const IDENTITY_SWEEP: Duration = Duration::from_secs(30);
/// How often the pod allowlist is recomputed even without a cgroup event (names that
/// the kubelet wrote after the cgroup appeared, missed events).
const ALLOWLIST_RESYNC: Duration = Duration::from_secs(2);
/// Events handled per wake-up, so a storm cannot starve the audit ticks.
const EVENT_BATCH: usize = 4096;

pub async fn run(args: RunArgs) -> Result<()> {
    let config = config::load(&args.config).map_err(anyhow::Error::from)?;
    let policy = config.compile_policy().map_err(anyhow::Error::from)?;

    let checks = preflight::run(&preflight::Inputs { cgroup: args.cgroup.as_deref(), bpffs: &args.pins.bpffs });
    if preflight::has_failure(&checks) {
        preflight::print_human(&checks);
        bail!("this node cannot enforce the block (see the failed checks above); refusing to start half-working");
    }
    raise_memlock_limit();
    let cgroup = cgroup::resolve(args.cgroup.as_deref())?;
    pins::ensure_on_bpffs(&args.pins.bpffs, args.mount_bpffs)?;
    let _lock = pins::AgentLock::acquire(&args.pins.bpffs)?;
    let layout = pins::PinLayout::new(&args.pins.bpffs);

    let cookie_mechanism = match args.netns_cookie_from {
        CookieSource::Auto => None,
        CookieSource::Sockopt => Some(Mechanism::SoNetnsCookie),
        CookieSource::Probe => Some(Mechanism::ProbeProgram),
    };
    let opts =
        InstallOptions { cgroup: &cgroup, host_netns: args.host_netns.as_deref(), pins: &layout, cookie_mechanism };
    let (mut guard, report) = Guard::install(&opts, &policy, config.mode.as_kernel())?;
    info!(
        cgroup = %cgroup.display(),
        cgroup_id = report.cgroup_id,
        mode = config.mode.name(),
        destinations = policy.v4.len() + policy.v6.len(),
        host_netns_cookie = report.host_netns_cookie,
        netns_cookie_from = report.cookie_mechanism.describe(),
        links = ?report.links,
        pins = %layout.dir.display(),
        "attached: pods are blocked from the metadata service"
    );
    // The second enforcement point: packets entering the host, by final destination.
    let mut host = HostSide::open(args.host_netns.as_deref(), &cgroup)?;
    host.set_policy(&crate::hostside::policy(&config)?, config.mode == config::Mode::Audit)?;
    info!(table = crate::hostside::TABLE, "host side: packets entering the node are judged after DNAT");
    for old in &report.removed_versions {
        info!(path = %old.display(), "removed the pins of another layout version after attaching ours");
    }

    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(probes::Readiness::default());
    metrics.set_programs_attached(report.links.len() as i64);
    metrics.set_policy(&policy, config.mode);
    readiness.set_attached(true);
    readiness.set_policy_loaded(true);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let listener = probes::bind(config.metrics_addr).await?;
    info!(addr = %config.metrics_addr, "serving /metrics, /healthz and /readyz");
    let server =
        tokio::spawn(probes::serve(listener, metrics.clone(), readiness.clone(), wait_for(shutdown_rx.clone())));

    let lost_total = Arc::new(AtomicU64::new(0));
    let (mode_tx, mode_rx) = watch::channel(config.mode);
    let pipeline = EventPipeline {
        reader: EventReader::new(guard.take_events()?)?,
        resolver: PodResolver::new(cgroup.clone(), config.pod_logs_dir.clone(), config.container_logs_dir.clone()),
        auditor: Auditor::new(&config.audit, config.node_name.clone(), config.mode.name())
            .context("could not open the audit log")?,
        metrics: metrics.clone(),
        lost_total: lost_total.clone(),
        refusals: RefusalReader::open(args.host_netns.as_deref(), &cgroup)?,
    };
    let events = tokio::spawn(pipeline.run(mode_rx, shutdown_rx.clone()));

    let mut allowlist = Allowlist::new(&cgroup, &config);
    allowlist.sync(&config, &mut guard, &mut host);

    let mut config = config;
    let mut sighup = signal(SignalKind::hangup()).context("could not watch SIGHUP")?;
    let mut sigterm = signal(SignalKind::terminate()).context("could not watch SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("could not watch SIGINT")?;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut resync = tokio::time::interval(ALLOWLIST_RESYNC);
    let mut seen_file = config_fingerprint(&args.config);
    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                info!("SIGHUP: reloading the configuration");
                reload(&args, &mut config, &mut guard, &mut host, &metrics, &mode_tx);
                seen_file = config_fingerprint(&args.config);
                allowlist.sync(&config, &mut guard, &mut host);
            }
            changed = allowlist.changed() => {
                if let Err(e) = changed {
                    warn!("watching the kubepods cgroups failed, the allowlist now follows every {ALLOWLIST_RESYNC:?}: {e:#}");
                    allowlist.watch = None;
                }
                allowlist.sync(&config, &mut guard, &mut host);
            }
            _ = resync.tick(), if !config.allow_pods.is_empty() => allowlist.sync(&config, &mut guard, &mut host),
            _ = poll.tick() => {
                publish_counters(&guard, &mut host, &metrics, &lost_total);
                let now = config_fingerprint(&args.config);
                if now != seen_file {
                    info!("the configuration file changed: reloading");
                    seen_file = now;
                    reload(&args, &mut config, &mut guard, &mut host, &metrics, &mode_tx);
                    allowlist.sync(&config, &mut guard, &mut host);
                }
            }
        }
    };
    info!(signal = signal_name, "shutting down");
    readiness.set_attached(false);
    let _ = shutdown_tx.send(true);
    if let Ok(Err(e)) = events.await {
        error!("the event pipeline failed: {e:#}");
    }
    let _ = server.await;
    if args.detach_on_exit {
        guard.detach().context("could not remove the guard from the kernel")?;
        host.remove()?;
        info!("detached (--detach-on-exit): pods can reach the metadata service again");
    } else {
        info!(pins = %layout.dir.display(), "exiting; enforcement stays pinned in the kernel");
    }
    Ok(())
}

/// Applies a new configuration, or keeps the old one in force when it is invalid.
fn reload(
    args: &RunArgs,
    current: &mut Config,
    guard: &mut Guard,
    host: &mut HostSide,
    metrics: &Metrics,
    mode_tx: &watch::Sender<config::Mode>,
) {
    let attempt = config::load(&args.config)
        .map_err(anyhow::Error::from)
        .and_then(|c| Ok((c.compile_policy().map_err(anyhow::Error::from)?, c)))
        .and_then(|(policy, c)| {
            guard.apply(&policy, c.mode.as_kernel())?;
            host.set_policy(&crate::hostside::policy(&c)?, c.mode == config::Mode::Audit)?;
            Ok((policy, c))
        });
    match attempt {
        Ok((policy, new)) => {
            if new.metrics_addr != current.metrics_addr
                || new.audit != current.audit
                || new.node_name != current.node_name
            {
                warn!("changes to metrics_addr, audit or node_name take effect when the agent restarts");
            }
            metrics.set_policy(&policy, new.mode);
            metrics.config_reloaded(true);
            let _ = mode_tx.send(new.mode);
            info!(mode = new.mode.name(), destinations = policy.v4.len() + policy.v6.len(), "new policy in force");
            *current = new;
        }
        Err(e) => {
            metrics.config_reloaded(false);
            error!("the new configuration was not applied; the previous policy stays in force: {e:#}");
        }
    }
}

/// Identifies the file's content version; a ConfigMap update swaps a symlink, which
/// changes the canonical path even when size and mtime happen to match.
fn config_fingerprint(args: &config::ConfigArgs) -> Option<(PathBuf, SystemTime, u64)> {
    let path = args.config.as_deref()?;
    let real = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    Some((real, meta.modified().ok()?, meta.len()))
}

fn publish_counters(guard: &Guard, host: &mut HostSide, metrics: &Metrics, lost_total: &AtomicU64) {
    match host.counters() {
        Ok(Some(c)) => {
            metrics.set_kernel_verdicts(Hook::Host, Verdict::Blocked, c.blocked);
            metrics.set_kernel_verdicts(Hook::Host, Verdict::Audited, c.audited);
            metrics.set_kernel_verdicts(Hook::Host, Verdict::Exempt, c.exempt);
        }
        Ok(None) => warn!("the host-side table is gone from the kernel; it is rebuilt on the next policy change"),
        Err(e) => warn!("could not read the host-side counters: {e:#}"),
    }
    match guard.counters() {
        Ok(values) => {
            for hook in Hook::ALL {
                for verdict in Verdict::ALL {
                    metrics.set_kernel_verdicts(hook, verdict, values[counters::slot(hook, verdict) as usize]);
                }
            }
            let lost = values[counters::EVENTS_LOST as usize];
            metrics.set_events_lost(lost);
            lost_total.store(lost, Ordering::Relaxed);
        }
        Err(e) => warn!("could not read the kernel counters: {e:#}"),
    }
}

/// Keeps the kernel's pod allowlist equal to the allow rules applied to the pods on
/// this node: at start, on every kubepods cgroup change, and every few seconds.
struct Allowlist {
    resolver: PodResolver,
    watch: Option<KubepodsWatch>,
}

impl Allowlist {
    fn new(cgroup: &std::path::Path, config: &Config) -> Allowlist {
        let resolver =
            PodResolver::new(cgroup.to_path_buf(), config.pod_logs_dir.clone(), config.container_logs_dir.clone());
        let watch = KubepodsWatch::new(cgroup)
            .map_err(|e| {
                warn!("cannot watch the kubepods cgroups, the allowlist follows every {ALLOWLIST_RESYNC:?}: {e:#}")
            })
            .ok();
        Allowlist { resolver, watch }
    }

    async fn changed(&mut self) -> Result<()> {
        match &mut self.watch {
            Some(w) => w.changed().await,
            None => std::future::pending().await,
        }
    }

    fn sync(&mut self, config: &Config, guard: &mut Guard, host: &mut HostSide) {
        let wanted = if config.allow_pods.is_empty() {
            Default::default()
        } else {
            allowlist::allowed_cgroups(&config.allow_pods, &self.resolver.rescan_pods())
        };
        self.resolver.forget_vanished();
        // The host side first: a pod the socket hooks let through must find the node
        // open too, and one they refuse again is refused in the node a moment earlier.
        if let Err(e) = host.set_allowed(&wanted) {
            error!("could not update the host side's pod allowlist: {e:#}");
        }
        match guard.sync_allowed(&wanted) {
            Ok((0, 0)) => {}
            Ok((added, removed)) => info!(added, removed, allowed = wanted.len(), "pod allowlist updated"),
            Err(e) => error!("could not update the pod allowlist in the kernel: {e:#}"),
        }
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
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

struct EventPipeline {
    reader: EventReader,
    resolver: PodResolver,
    auditor: Auditor,
    metrics: Arc<Metrics>,
    lost_total: Arc<AtomicU64>,
    refusals: RefusalReader,
}

impl EventPipeline {
    async fn run(mut self, mut mode: watch::Receiver<config::Mode>, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        let mut host_batch = Vec::new();
        let mut tick = tokio::time::interval(AUDIT_TICK);
        let mut last_sweep = Instant::now();
        let mut lost_seen = self.lost_total.load(Ordering::Relaxed);
        loop {
            tokio::select! {
                read = self.reader.read(&mut batch, EVENT_BATCH) => {
                    read?;
                    let now = Instant::now();
                    for attempt in batch.drain(..) {
                        let workload = self.resolver.resolve(attempt.cgroup_id);
                        self.metrics.attempt(&attempt, &workload);
                        self.auditor.record(&attempt, &workload, now);
                    }
                }
                read = self.refusals.read(&mut host_batch) => {
                    read?;
                    let now = Instant::now();
                    for attempt in host_batch.drain(..) {
                        let workload = self.resolver.resolve(attempt.cgroup_id);
                        self.metrics.attempt(&attempt, &workload);
                        self.auditor.record(&attempt, &workload, now);
                    }
                }
                _ = tick.tick() => {
                    let lost = self.lost_total.load(Ordering::Relaxed);
                    if lost > lost_seen {
                        self.auditor.report_lost(lost - lost_seen);
                        lost_seen = lost;
                    }
                    self.auditor.tick(Instant::now());
                    self.publish_audit_stats();
                    if last_sweep.elapsed() >= IDENTITY_SWEEP {
                        self.resolver.forget_vanished();
                        last_sweep = Instant::now();
                    }
                    self.metrics.set_identity_cache(self.resolver.cache_len());
                }
                Ok(()) = mode.changed() => {
                    let m = *mode.borrow_and_update();
                    self.auditor.set_mode(m.name());
                }
                _ = shutdown.changed() => {
                    self.auditor.flush_all();
                    self.publish_audit_stats();
                    return Ok(());
                }
            }
        }
    }

    fn publish_audit_stats(&self) {
        self.metrics.set_audit_stats(&self.auditor.stats());
    }
}
