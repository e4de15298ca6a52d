// SPDX-License-Identifier: Apache-2.0
//! The event → audit subsystem. It runs on a thread of its own: naming a pod walks
//! the cgroup tree and reads the kubelet's log directories, and records go to stdout
//! or a file, all of which block.

use std::time::Instant;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use metadata_guard_common::counters;
use tokio::{sync::mpsc, time::Duration};
use tracing::{info, warn};

use super::EventReader;
use crate::{
    attempt::Attempt,
    audit::Auditor,
    pod_identity::PodResolver,
    supervise::{Condition, Context, Shutdown},
    uplink::attribution::UplinkPods,
};

/// How often audit windows are flushed.
const AUDIT_TICK: Duration = Duration::from_millis(200);
/// How often vanished cgroups are dropped from the identity cache.
const IDENTITY_SWEEP: Duration = Duration::from_secs(30);
/// Events handled per wake-up, so a storm cannot starve the audit ticks.
const EVENT_BATCH: usize = 4096;

pub(crate) struct Pipeline {
    /// Taken by `run`, to be registered with the runtime of the thread it runs on.
    ring: Option<RingBuf<MapData>>,
    attempts: mpsc::Receiver<Attempt>,
    resolver: PodResolver,
    auditor: Auditor,
    reading: Condition,
    trail: Condition,
    /// Names the pod of an uplink refusal whose packet carried no socket.
    uplink_pods: Option<UplinkPods>,
}

impl Pipeline {
    /// Opens the audit sink now, so that a sink that cannot be opened stops the start.
    pub(crate) fn new(ring: RingBuf<MapData>, attempts: mpsc::Receiver<Attempt>, ctx: &Context) -> Result<Pipeline> {
        let in_force = ctx.policy.borrow().clone();
        let config = &in_force.config;
        let resolver =
            PodResolver::new(ctx.cgroup.clone(), config.pod_logs_dir.clone(), config.container_logs_dir.clone());
        let auditor = Auditor::new(&config.audit, config.node_name.clone(), config.mode.name())
            .context("could not open the audit log")?;
        let reading = ctx.readiness.condition("event reader", "not started");
        let trail = ctx.readiness.condition("audit trail", "not started");
        Ok(Pipeline { ring: Some(ring), attempts, resolver, auditor, reading, trail, uplink_pods: None })
    }

    /// Names the pods of uplink refusals by the interface their packets entered through.
    pub(crate) fn with_uplink_pods(mut self, pods: UplinkPods) -> Pipeline {
        self.uplink_pods = Some(pods);
        self
    }

    /// Runs until shutdown; fails when the ring buffer cannot be read. While audit
    /// records cannot be written, the `audit trail` readiness condition says why.
    pub(crate) async fn run(mut self, ctx: Context, mut shutdown: Shutdown) -> Result<()> {
        let (reading, trail) = (self.reading.clone(), self.trail.clone());
        let mut reader = EventReader::new(self.ring.take().context("the pipeline already ran")?)?;
        let mut policy = ctx.policy.clone();
        let mut batch = Vec::with_capacity(EVENT_BATCH);
        let mut tick = tokio::time::interval(AUDIT_TICK);
        let mut last_sweep = Instant::now();
        let mut lost_seen = lost_events(&ctx).unwrap_or(0);
        reading.ready();
        trail.ready();
        loop {
            tokio::select! {
                read = reader.read(&mut batch, EVENT_BATCH) => {
                    if let Err(e) = read {
                        reading.missing(format!("{e:#}"));
                        return Err(e);
                    }
                    let now = Instant::now();
                    for attempt in batch.drain(..) {
                        self.account(&ctx, &attempt, now);
                    }
                    self.report_trail(&trail);
                }
                Some(attempt) = self.attempts.recv() => {
                    self.account(&ctx, &attempt, Instant::now());
                    self.report_trail(&trail);
                }
                _ = tick.tick() => {
                    if let Some(lost) = lost_events(&ctx) {
                        if lost > lost_seen {
                            self.auditor.report_lost(lost - lost_seen);
                        }
                        lost_seen = lost;
                    }
                    self.auditor.tick(Instant::now());
                    if last_sweep.elapsed() >= IDENTITY_SWEEP {
                        self.resolver.forget_vanished();
                        last_sweep = Instant::now();
                    }
                    ctx.metrics.set_identity_cache(self.resolver.cache_len());
                    ctx.metrics.set_audit_stats(&self.auditor.stats());
                    self.report_trail(&trail);
                }
                Ok(()) = policy.changed() => {
                    let mode = policy.borrow_and_update().config.mode;
                    self.auditor.set_mode(mode.name());
                }
                _ = shutdown.wait() => {
                    let now = Instant::now();
                    loop {
                        reader.drain(&mut batch, EVENT_BATCH);
                        if batch.is_empty() {
                            break;
                        }
                        for attempt in batch.drain(..) {
                            self.account(&ctx, &attempt, now);
                        }
                    }
                    while let Ok(attempt) = self.attempts.try_recv() {
                        self.account(&ctx, &attempt, now);
                    }
                    self.auditor.flush_all();
                    ctx.metrics.set_audit_stats(&self.auditor.stats());
                    return Ok(());
                }
            }
        }
    }

    fn account(&mut self, ctx: &Context, attempt: &Attempt, now: Instant) {
        let mut named;
        let attempt = match &mut self.uplink_pods {
            Some(pods) if attempt.hook == crate::attempt::Hook::Uplink && attempt.ingress_ifindex != 0 => {
                named = attempt.clone();
                pods.attribute(&mut named);
                &named
            }
            _ => attempt,
        };
        let workload = self.resolver.resolve(attempt.cgroup_id);
        ctx.metrics.attempt(attempt, &workload);
        self.auditor.record(attempt, &workload, now);
    }

    /// Readiness follows the sink: records that cannot be written are counted, but an
    /// agent whose trail is broken must not look healthy.
    fn report_trail(&self, trail: &Condition) {
        match (self.auditor.failing(), trail.is_ready()) {
            (Some(why), _) => trail.missing(format!("audit records cannot be written: {why}")),
            (None, false) => {
                info!("audit trail restored");
                trail.ready();
            }
            (None, true) => {}
        }
    }
}

/// Events the kernel could not queue, from its counters.
fn lost_events(ctx: &Context) -> Option<u64> {
    let guard = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match guard.counters() {
        Ok(values) => Some(values[counters::EVENTS_LOST as usize]),
        Err(e) => {
            warn!("could not read the kernel's lost-event counter: {e:#}");
            None
        }
    }
}
