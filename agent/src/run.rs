//! `metadata-guard run`: installs the guard, then wires the subsystems together and
//! hands them to the supervisor. Each subsystem owns its task (see `supervise`):
//!
//! | name | what it owns | readiness condition |
//! |---|---|---|
//! | `http` | /metrics, /healthz, /readyz | — |
//! | `enforcement` | pins and links whole, counters | `enforcement` |
//! | `events` | ring buffer → pod identity → audit trail, metrics | `event reader`, `audit trail` |
//! | `allowlist` | the kernel's pod allowlist | `allowlist` |
//! | `config watch` | reloads, the policy in force | — |
//! | `conceal` | conceal mode's proxy and the kernel's redirect to it | `conceal` |
//! | `host side` | the host-side table whole and in force, counters, NFLOG refusals | `host side` |

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use tokio::sync::{mpsc, watch};
use tracing::info;

use crate::{
    allowlist::AllowlistSync,
    cli::RunArgs,
    conceal::service::Conceal,
    config_watch::ConfigWatch,
    enforce::{self, Enforcement},
    events,
    hostside::Hostside,
    http::{self, Readiness},
    loader,
    metrics::Metrics,
    supervise::{Context, InForce, Signals, Supervisor, ATTEMPT_QUEUE},
};

pub async fn run(args: RunArgs, mut signals: Signals) -> Result<()> {
    let enforce::Installed { config, policy, cgroup, layout, mut guard, host, report, lock: _lock } =
        enforce::install(&args.enforce, "run")?;

    let metrics = Arc::new(Metrics::new());
    metrics.set_programs_attached(report.links.len() as i64);
    metrics.set_policy(&policy, config.mode);
    let readiness = Arc::new(Readiness::default());
    let listener = http::bind(config.metrics_addr).await?;
    info!(addr = %config.metrics_addr, "serving /metrics, /healthz and /readyz");

    let ring = guard.take_events()?;
    let (policy_tx, policy_rx) = watch::channel(Arc::new(InForce { config, policy }));
    let (allowed_tx, allowed_rx) = watch::channel(Arc::new(BTreeSet::new()));
    let (attempts_tx, attempts_rx) = mpsc::channel(ATTEMPT_QUEUE);
    let ctx = Context {
        policy: policy_rx,
        allowed: allowed_rx,
        attempts: attempts_tx,
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        guard: Arc::new(Mutex::new(guard)),
        host: Arc::new(Mutex::new(host)),
        cgroup,
    };
    // Every subsystem is built (and registers its readiness condition) before any runs.
    let enforcement = Enforcement::new(&ctx);
    let pipeline = events::Pipeline::new(ring, attempts_rx, &ctx)?;
    let allowlist = AllowlistSync::new(&ctx, allowed_tx);
    let conceal = Conceal::new(&ctx, args.enforce.host_netns.clone());
    let hostside = Hostside::new(&ctx, args.enforce.host_netns.as_deref())?;
    let hangup = signals.hangup.take().context("SIGHUP is already watched")?;
    let config_watch = ConfigWatch { args: args.enforce.config.clone(), hangup, publish: policy_tx };
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
    supervisor.spawn("config watch", config_watch.run(ctx.clone(), supervisor.shutdown()));
    supervisor.spawn("http", server.run(supervisor.shutdown()));

    let outcome = supervisor.supervise(signals.stop_requested()).await;
    if args.detach_on_exit {
        loader::remove_pins(&layout.dir).context("could not remove the guard from the kernel")?;
        loader::pins::remove_root_if_empty(&layout.root)?;
        ctx.host.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove()?;
        info!("detached (--detach-on-exit): pods can reach the metadata service again");
    } else {
        info!(pins = %layout.dir.display(), "exiting; enforcement stays pinned in the kernel");
    }
    outcome
}
