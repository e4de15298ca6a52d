// SPDX-License-Identifier: Apache-2.0
//! Supervision: the running agent is a set of named subsystems, none of which may die
//! silently.
//!
//! # The subsystem interface
//!
//! A subsystem is a value with one method,
//!
//! ```text
//! async fn run(self, ctx: Context, shutdown: Shutdown) -> anyhow::Result<()>
//! ```
//!
//! handed to [`Supervisor::spawn`] (runs on the shared async workers: for work that
//! only waits) or [`Supervisor::spawn_on_thread`] (a thread of its own with a
//! single-threaded runtime: for subsystems that walk the file system, write files or
//! otherwise block). It owns its task, its timers and its state, and talks to the
//! rest only through the [`Context`]:
//!
//! - `ctx.policy`: the configuration and compiled policy in force (a `watch`; a new
//!   value after every successful reload),
//! - `ctx.attempts`: where refused attempts go to become audit records and metrics,
//! - `ctx.readiness`: [`Readiness::condition`] registers a named
//!   condition that keeps `/readyz` at 503 until the subsystem sets it. Register it
//!   in the subsystem's constructor, which `run.rs` calls before the supervisor
//!   starts anything, so that `/readyz` never answers 200 before every subsystem has
//!   had its say,
//! - `ctx.metrics`, `ctx.guard` (the pinned kernel guard, behind a mutex).
//!
//! What only some subsystems share is handed to their constructors instead: the
//! host-side nf_tables table (`HostSide` and `AllowlistSync`, behind a mutex of its
//! own; never hold it and `ctx.guard` at once).
//!
//! It returns only when `shutdown` fires (then `Ok`) or when it cannot go on (then
//! `Err` with what failed). Anything else — an early `Ok`, an error, a panic — makes
//! the supervisor log which subsystem ended and why and exit non-zero: the kubelet
//! restarts the agent, and enforcement stays pinned meanwhile. A subsystem that can
//! recover by itself does not return; it clears its readiness condition (saying what
//! is missing) until it has recovered.
//!
//! Plugging a new subsystem in is two lines in `commands/run.rs`, next to the others
//! (the host side, for one, is plugged in so):
//!
//! ```text
//! let hostside = HostSide::new(&ctx, host.clone(), req.host_netns.as_deref())?; // registers its condition
//! let (c, s) = (ctx.clone(), supervisor.shutdown());
//! supervisor.spawn_on_thread("host side", move || hostside.run(c, s));
//! ```
//!
//! An enforcement point follows `ctx.policy` with `changed().await` and puts each new
//! policy in force itself (the configuration subsystem only publishes it), and sends
//! what it refuses as [`Attempt`]s into `ctx.attempts` (with `hook`/`verdict` as the
//! audit trail should name them), which the event pipeline audits like the kernel's
//! own.

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{anyhow, Result};
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};
use tracing::{error, info};

pub(crate) use self::readiness::{Condition, Readiness};
use crate::{attempt::Attempt, config::Config, loader::Guard, metrics::Metrics, policy::CompiledPolicy};

mod readiness;

/// How long subsystems get to finish (flush the audit trail) after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Attempts queued for the audit pipeline; beyond it senders wait.
pub(crate) const ATTEMPT_QUEUE: usize = 4096;

/// The configuration in force and the policy compiled from it.
pub(crate) struct InForce {
    pub config: Config,
    pub policy: CompiledPolicy,
}

/// What subsystems share; cheap to clone.
#[derive(Clone)]
pub(crate) struct Context {
    pub policy: watch::Receiver<Arc<InForce>>,
    pub attempts: mpsc::Sender<Attempt>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    pub guard: Arc<Mutex<Guard>>,
    /// The cgroup v2 directory enforcement is attached to.
    pub cgroup: PathBuf,
}

/// Fires once, when the agent is asked to stop.
#[derive(Clone)]
pub(crate) struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Completes when shutdown has begun.
    pub(crate) async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// The signals the agent reacts to, registered before anything is loaded so that a
/// signal during start-up is queued rather than killing the process.
pub(crate) struct Signals {
    /// Taken by the configuration subsystem.
    pub hangup: Option<Signal>,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Completes on SIGTERM or SIGINT.
    pub(crate) async fn stop_requested(&mut self) {
        let name = tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        };
        info!(signal = name, "shutting down");
    }

    pub(crate) fn install() -> Result<Signals> {
        let watch = |kind: SignalKind, name: &str| signal(kind).map_err(|e| anyhow!("could not watch {name}: {e}"));
        Ok(Signals {
            hangup: Some(watch(SignalKind::hangup(), "SIGHUP")?),
            terminate: watch(SignalKind::terminate(), "SIGTERM")?,
            interrupt: watch(SignalKind::interrupt(), "SIGINT")?,
        })
    }
}

pub(crate) struct Supervisor {
    tasks: JoinSet<Result<()>>,
    /// The subsystems still running, by task.
    names: HashMap<tokio::task::Id, &'static str>,
    stop: watch::Sender<bool>,
    /// How long subsystems get to stop ([`SHUTDOWN_GRACE`]).
    grace: Duration,
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

impl Supervisor {
    pub(crate) fn new() -> Supervisor {
        Supervisor {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            stop: watch::channel(false).0,
            grace: SHUTDOWN_GRACE,
        }
    }

    pub(crate) fn shutdown(&self) -> Shutdown {
        Shutdown(self.stop.subscribe())
    }

    /// Runs a subsystem on the shared async workers.
    pub(crate) fn spawn(&mut self, name: &'static str, task: impl Future<Output = Result<()>> + Send + 'static) {
        let id = self.tasks.spawn(task).id();
        self.names.insert(id, name);
    }

    /// Runs a subsystem on a thread of its own, so its blocking file-system work never
    /// holds up the async workers (HTTP probes, signals). `make` builds the task on
    /// that thread, so what it registers with the runtime (fds, timers) lives there.
    pub(crate) fn spawn_on_thread<F, Fut>(&mut self, name: &'static str, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + 'static,
    {
        let (done_tx, done_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new().name(format!("mg-{name}")).spawn(move || {
            let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(make()),
                Err(e) => Err(anyhow!("could not start its runtime: {e}")),
            };
            let _ = done_tx.send(result);
        });
        let id = self
            .tasks
            .spawn(async move {
                match spawned {
                    Ok(_) => done_rx.await.unwrap_or_else(|_| Err(anyhow!("its thread panicked"))),
                    Err(e) => Err(anyhow!("could not start its thread: {e}")),
                }
            })
            .id();
        self.names.insert(id, name);
    }

    /// Waits for `stop` (then stops every subsystem and returns `Ok`) or for a
    /// subsystem to end on its own (then stops the others and returns why, so the
    /// agent exits non-zero). A subsystem that does not stop within the grace period
    /// is an error too, naming it.
    pub(crate) async fn supervise(mut self, stop: impl Future<Output = ()>) -> Result<()> {
        let ended = tokio::select! {
            () = stop => None,
            Some(joined) = self.tasks.join_next_with_id() => Some(self.describe(joined)),
        };
        if let Some((name, result)) = &ended {
            match result {
                Ok(()) => error!(subsystem = name, "stopped unexpectedly; stopping the others"),
                Err(e) => error!(subsystem = name, "failed: {e:#}; stopping the others"),
            }
        }
        let _ = self.stop.send(true);
        let grace = self.grace;
        let drained = tokio::time::timeout(grace, async {
            while let Some(joined) = self.tasks.join_next_with_id().await {
                let (name, result) = self.describe(joined);
                if let Err(e) = result {
                    error!(subsystem = name, "failed while stopping: {e:#}");
                }
            }
        })
        .await;
        let hung = drained.is_err().then(|| {
            let mut names: Vec<&str> = self.names.values().copied().collect();
            names.sort_unstable();
            let names = names.join(", ");
            error!(subsystems = names, "did not stop within {grace:?}; exiting anyway");
            anyhow!("subsystems that did not stop within {grace:?}: {names}")
        });
        match ended {
            None => hung.map_or(Ok(()), Err),
            Some((name, Ok(()))) => {
                Err(anyhow!("the {name} subsystem stopped unexpectedly; exiting so that it restarts"))
            }
            Some((name, Err(e))) => Err(e.context(format!("the {name} subsystem failed; exiting so that it restarts"))),
        }
    }
}

impl Supervisor {
    /// The name of a subsystem that ended (no longer counted as running) and how it ended.
    fn describe(
        &mut self,
        joined: Result<(tokio::task::Id, Result<()>), tokio::task::JoinError>,
    ) -> (&'static str, Result<()>) {
        match joined {
            Ok((id, result)) => (self.names.remove(&id).unwrap_or("unnamed"), result),
            Err(e) => (self.names.remove(&e.id()).unwrap_or("unnamed"), Err(anyhow!("it panicked: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never() -> std::future::Pending<()> {
        std::future::pending()
    }

    #[tokio::test]
    async fn a_failing_subsystem_ends_the_agent_and_is_named() {
        let mut supervisor = Supervisor::new();
        let mut shutdown = supervisor.shutdown();
        supervisor.spawn("steady", async move {
            shutdown.wait().await;
            Ok(())
        });
        supervisor.spawn("events", async { Err(anyhow!("the ring buffer read failed")) });
        let e = supervisor.supervise(never()).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("the events subsystem failed") && text.contains("ring buffer read failed"), "{text}");
    }

    #[tokio::test]
    async fn one_that_returns_or_panics_is_a_failure_too() {
        let mut supervisor = Supervisor::new();
        supervisor.spawn("allowlist", async { Ok(()) });
        let e = supervisor.supervise(never()).await.unwrap_err();
        assert!(format!("{e:#}").contains("the allowlist subsystem stopped unexpectedly"), "{e:#}");

        let mut supervisor = Supervisor::new();
        supervisor.spawn_on_thread("enforcement", || async { panic!("boom") });
        let e = supervisor.supervise(never()).await.unwrap_err();
        assert!(format!("{e:#}").contains("the enforcement subsystem failed"), "{e:#}");
    }

    #[tokio::test]
    async fn stop_shuts_every_subsystem_down_cleanly() {
        let mut supervisor = Supervisor::new();
        for name in ["a", "b"] {
            let mut shutdown = supervisor.shutdown();
            supervisor.spawn_on_thread(name, move || async move {
                shutdown.wait().await;
                Ok(())
            });
        }
        supervisor.supervise(async {}).await.unwrap();
    }

    #[tokio::test]
    async fn one_that_does_not_stop_in_time_is_an_error_naming_it() {
        let mut supervisor = Supervisor::new();
        supervisor.grace = Duration::from_millis(200);
        let mut shutdown = supervisor.shutdown();
        supervisor.spawn("steady", async move {
            shutdown.wait().await;
            Ok(())
        });
        // Ignores shutdown: never returns.
        supervisor.spawn("events", std::future::pending());
        let e = supervisor.supervise(async {}).await.unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains("did not stop within") && text.contains("events") && !text.contains("steady"), "{text}");
    }
}
