// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard run`: installs the guard, then wires the subsystems together and
//! hands them to the supervisor; no subsystem's logic lives here. Each subsystem owns its task (see `supervise`):
//!
//! | name | what it owns | readiness condition |
//! |---|---|---|
//! | `http` | /metrics, /healthz, /readyz | — |
//! | `enforcement` | the policy in force in the kernel guard's maps, pins and links whole, counters | `enforcement` |
//! | `events` | ring buffer → pod identity → audit trail, metrics | `event reader`, `audit trail` |
//! | `allowlist` | the kernel's pod allowlist | `allowlist` |
//! | `config watch` | reloads; publishes the policy in force (`ctx.policy`) | — |
//! | `conceal` | conceal mode's proxy and the kernel's redirect to it | `conceal` |
//! | `host side` | the host-side table whole and in force, counters, NFLOG refusals | `host side` |
//! | `uplinks` | the uplink program on every uplink, as devices come and go | `uplinks` |

use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::{
    allowlist::AllowlistSync,
    conceal::service::Conceal,
    config_watch::ConfigWatch,
    enforce::{self, Enforcement},
    events,
    hostside::HostSide,
    http, loader,
    metrics::Metrics,
    supervise::{Context, InForce, Readiness, Signals, Supervisor, ATTEMPT_QUEUE},
    uplink::{self, attribution::UplinkPods, Uplinks},
};

/// Runs the agent until SIGTERM or SIGINT (`Ok`) or until a subsystem fails; with
/// `detach_on_exit`, removes the enforcement on the way out.
pub(crate) fn run(req: enforce::Request, detach_on_exit: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        // First, so that a signal during start-up is queued, not fatal.
        let signals = Signals::install()?;
        wire(req, detach_on_exit, signals).await
    })
}

async fn wire(req: enforce::Request, detach_on_exit: bool, mut signals: Signals) -> Result<()> {
    let enforce::Installed { config, policy, cgroup, layout, mut guard, host, report, lock: _lock } =
        enforce::install(&req, "run")?;

    let metrics = Arc::new(Metrics::new());
    metrics.set_programs_attached(report.links.len() as i64);
    metrics.set_policy(&policy, config.mode);
    let readiness = Arc::new(Readiness::default());
    let listener = http::bind(config.metrics_addr).await?;
    info!(addr = %config.metrics_addr, "serving /metrics, /healthz and /readyz");

    let ring = guard.take_events()?;
    let (policy_tx, policy_rx) = watch::channel(Arc::new(InForce { config, policy }));
    let (attempts_tx, attempts_rx) = mpsc::channel(ATTEMPT_QUEUE);
    let ctx = Context {
        policy: policy_rx,
        attempts: attempts_tx,
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        guard: Arc::new(Mutex::new(guard)),
        cgroup,
    };
    // Every subsystem is built (and registers its readiness condition) before any runs.
    let enforcement = Enforcement::new(&ctx);
    let pipeline = events::Pipeline::new(ring, attempts_rx, &ctx)?
        .with_uplink_pods(UplinkPods::open(req.host_netns.as_deref(), &ctx.cgroup)?);
    let host = Arc::new(Mutex::new(host));
    let allowlist = AllowlistSync::new(&ctx, host.clone());
    let conceal = Conceal::new(&ctx, req.host_netns.clone());
    let hostside = HostSide::new(&ctx, host.clone(), req.host_netns.as_deref())?;
    let uplinks = Uplinks::new(&ctx, req.uplinks.clone(), req.uplink_attach, req.host_netns.clone());
    let hangup = signals.hangup.take().context("SIGHUP is already watched")?;
    let config_watch = ConfigWatch { args: req.config.clone(), hangup, publish: policy_tx };
    let server = http::Server { listener, metrics, readiness };

    let mut supervisor = Supervisor::new();
    let (c, s) = (ctx.clone(), supervisor.shutdown());
    supervisor.spawn_on_thread("enforcement", move || enforcement.run(c, s));
    let (c, s) = (ctx.clone(), supervisor.shutdown());
    supervisor.spawn_on_thread("events", move || pipeline.run(c, s));
    let (c, s) = (ctx.clone(), supervisor.shutdown());
    supervisor.spawn_on_thread("allowlist", move || allowlist.run(c, s));
    let (c, s) = (ctx.clone(), supervisor.shutdown());
    supervisor.spawn_on_thread("conceal", move || conceal.run(c, s));
    let (c, s) = (ctx.clone(), supervisor.shutdown());
    supervisor.spawn_on_thread("host side", move || hostside.run(c, s));
    let (c, s) = (ctx.clone(), supervisor.shutdown());
    supervisor.spawn_on_thread("uplinks", move || uplinks.run(c, s));
    supervisor.spawn("config watch", config_watch.run(ctx.clone(), supervisor.shutdown()));
    supervisor.spawn("http", server.run(supervisor.shutdown()));

    let outcome = supervisor.supervise(signals.stop_requested()).await;
    if detach_on_exit {
        let removed = uplink::in_netns(req.host_netns.as_deref(), || uplink::remove_all(&layout));
        removed.context("could not remove the uplink program")?;
        loader::remove_pins(&layout.dir).context("could not remove the guard from the kernel")?;
        loader::pins::remove_root_if_empty(&layout.root)?;
        host.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove()?;
        info!("detached (--detach-on-exit): pods can reach the metadata service again");
    } else {
        info!(pins = %layout.dir.display(), "exiting; enforcement stays pinned in the kernel");
    }
    outcome
}
