// SPDX-License-Identifier: Apache-2.0
//! The enforcement subsystem of the running agent (`enforcement`): puts each new
//! policy in force in the kernel guard, publishes the kernel's counters into metrics
//! and, every second, checks that the pins and the attached cgroup are still there,
//! restoring what it can.

use std::time::Duration;

use anyhow::Result;
use metadata_guard_common::{counters, Hook, Verdict};
use tracing::{error, info, warn};

use crate::{
    loader::{health::Fault, Guard},
    supervise::{Condition, Context, Shutdown},
};

/// How often counters are published and the pins checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The enforcement subsystem of the running agent: the kernel guard's enforcement
/// point. Puts each policy `ctx.policy` publishes in force in the kernel's maps
/// (retrying every second when that fails). Its readiness condition,
/// `enforcement`, holds while every hook is attached to the cgroup, every map pinned
/// and the policy in force written. Runs on a thread of its own (`repair` loads and
/// attaches).
pub(crate) struct Enforcement {
    condition: Condition,
}

impl Enforcement {
    pub(crate) fn new(ctx: &Context) -> Enforcement {
        Enforcement { condition: ctx.readiness.condition("enforcement", "not checked yet") }
    }

    pub(crate) async fn run(self, ctx: Context, mut shutdown: Shutdown) -> Result<()> {
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        // What was last reported, so that an outage is logged when it changes, not every second.
        let (mut reported, mut last_error): (Vec<Fault>, Option<String>) = (Vec::new(), None);
        let mut policy = ctx.policy.clone();
        // `install` put the first policy in force; each later one is applied here.
        policy.borrow_and_update();
        // A published policy not yet in the maps, and why the last write failed.
        let (mut pending, mut policy_error) = (false, None::<String>);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                Ok(()) = policy.changed() => pending = true,
                _ = tick.tick() => {}
            }
            let mut guard = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if pending {
                let in_force = policy.borrow_and_update().clone();
                // Also attaches conceal_ops before a switch to conceal mode and detaches it
                // after one away (the conceal subsystem writes the redirect itself: either
                // order is safe).
                match guard.apply(&in_force.policy, in_force.config.mode.as_kernel(), &ctx.cgroup) {
                    Ok(()) => {
                        pending = false;
                        if policy_error.take().is_some() {
                            info!("the policy in force is written in the kernel again");
                        }
                    }
                    Err(e) => {
                        let why = format!("the policy in force is not written in the kernel: {e:#}");
                        if policy_error.as_deref() != Some(why.as_str()) {
                            error!("{why} (retrying every {CHECK_INTERVAL:?})");
                        }
                        policy_error = Some(why);
                    }
                }
            }
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
            // The host side is judged by its own subsystem's condition, `host side`.
            let problems = faults.iter().map(ToString::to_string).chain(policy_error.clone());
            let verdict = super::enforcing(true, problems.collect(), None);
            if verdict.enforcing {
                self.condition.ready();
            } else {
                self.condition.missing(verdict.problems.join("; "));
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
            for hook in Hook::PROGRAMS {
                for verdict in Verdict::ALL {
                    ctx.metrics.set_kernel_verdicts(hook, verdict, values[counters::slot(hook, verdict) as usize]);
                }
            }
            ctx.metrics.set_events_lost(values[counters::EVENTS_LOST as usize]);
        }
        Err(e) => warn!("could not read the kernel counters: {e:#}"),
    }
}
