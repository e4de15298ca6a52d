// SPDX-License-Identifier: Apache-2.0
//! The host side in the running agent: keeps the table equal to the policy in force,
//! restores it when it is deleted from the kernel (`nft delete table`, a firewall
//! reload that flushes every table), publishes its counters and turns its NFLOG
//! refusals into attempts for the audit pipeline. A table put to sleep by hand
//! (`flags dormant`) is reported, not woken: see [`super::dormant_problem`].
//!
//! The allowlist is not followed here but by the `allowlist` subsystem itself, which
//! opens the host side for a new pod before the socket hooks let it through and
//! closes it after them (see [`crate::allowlist::AllowlistSync`]).

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Result};
use metadata_guard_common::{Hook, Verdict};
use tracing::{error, info, warn};

use super::{HostTable, Reading, RefusalReader, TABLE};
use crate::supervise::{Condition, Context, Shutdown};

/// How often the table's presence is checked and its counters published; the same
/// as the socket hooks' health check.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The `host side` subsystem. Its readiness condition holds while the table is in the
/// kernel, awake, with the policy in force.
pub(crate) struct HostSide {
    /// The table, shared with the `allowlist` subsystem.
    host: Arc<Mutex<HostTable>>,
    condition: Condition,
    refusals: RefusalReader,
}

impl HostSide {
    /// Binds the table's NFLOG group in `host_netns` (one agent per node holds it).
    pub(crate) fn new(ctx: &Context, host: Arc<Mutex<HostTable>>, host_netns: Option<&Path>) -> Result<HostSide> {
        let refusals = RefusalReader::open(host_netns, &ctx.cgroup)?;
        Ok(HostSide { host, condition: ctx.readiness.condition("host side", "not checked yet"), refusals })
    }

    pub(crate) async fn run(mut self, ctx: Context, mut shutdown: Shutdown) -> Result<()> {
        let mut policy = ctx.policy.clone();
        policy.mark_changed();
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        let mut batch = Vec::new();
        // The policy not yet in the table (a failed write is retried every tick), and
        // what was last reported, so that an outage is logged when it changes.
        let (mut pending, mut last_error) = (false, None::<String>);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                Ok(()) = policy.changed() => { policy.borrow_and_update(); pending = true; }
                read = self.refusals.read(&mut batch) => {
                    read?;
                    for attempt in batch.drain(..) {
                        if ctx.attempts.send(attempt).await.is_err() {
                            // The pipeline is gone: the agent is stopping.
                            return Ok(());
                        }
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            let mut host = self.host.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let outcome = check(&mut host, &ctx, &mut pending);
            drop(host);
            match outcome {
                Ok(Health::Whole) => {
                    last_error = None;
                    self.condition.ready();
                }
                // Ready again only once a later check finds it still there: something
                // that keeps deleting it (a firewall manager flushing the ruleset) shows
                // as an outage, not as a blip between two checks.
                Ok(Health::Restored) => {
                    last_error = None;
                    self.condition.missing(format!(
                        "the table `inet {TABLE}` was deleted from the host network namespace; restored, checking that it stays"
                    ));
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    if last_error.as_deref() != Some(why.as_str()) {
                        error!("host side: {why} (retrying every {CHECK_INTERVAL:?})");
                        last_error = Some(why.clone());
                    }
                    self.condition.missing(why);
                }
            }
        }
    }
}

enum Health {
    Whole,
    Restored,
}

/// One round: the policy in force written, the table present (restored when not),
/// its counters published.
fn check(host: &mut HostTable, ctx: &Context, pending: &mut bool) -> Result<Health> {
    if *pending {
        let in_force = ctx.policy.borrow().clone();
        let policy = super::policy(&in_force.config)?;
        host.set_conceal(super::conceal_target(&in_force.config));
        host.set_policy(&policy, in_force.config.mode == crate::config::Mode::Audit)?;
        *pending = false;
    }
    match host.read() {
        Ok(Some(Reading { counters: c, dormant })) => {
            ctx.metrics.set_kernel_verdicts(Hook::Host, Verdict::Blocked, c.blocked);
            ctx.metrics.set_kernel_verdicts(Hook::Host, Verdict::Audited, c.audited);
            ctx.metrics.set_kernel_verdicts(Hook::Host, Verdict::Exempt, c.exempt);
            // A table that is there can still judge nothing.
            if dormant {
                bail!(super::dormant_problem());
            }
        }
        Ok(None) => {
            warn!("the host-side table `inet {TABLE}` is gone from the host network namespace; restoring it");
            let restored = host.restore().map_err(|e| {
                e.context(format!("the table `inet {TABLE}` is missing from the host network namespace"))
            })?;
            if restored {
                ctx.metrics.enforcement_restored();
                info!("restored the host-side table `inet {TABLE}`: packets entering the node are judged again");
                return Ok(Health::Restored);
            }
        }
        Err(e) => warn!("could not read the host-side counters: {}", e.explained()),
    }
    Ok(Health::Whole)
}
