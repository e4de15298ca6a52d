// SPDX-License-Identifier: Apache-2.0
//! The configuration subsystem: reloads on SIGHUP and when the file changes (a
//! ConfigMap update swaps a symlink; checked every second) and publishes the new
//! policy on `ctx.policy`, the one road to every enforcement point: each (the kernel
//! guard's `enforcement` subsystem, the `host side`, `conceal`, `allowlist`) puts it
//! in force itself. An invalid file keeps the previous policy in force.

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use anyhow::Result;
use tokio::{signal::unix::Signal, sync::watch, time::Duration};
use tracing::{error, info, warn};

use crate::{
    config::{self, ConfigArgs},
    supervise::{Context, InForce, Shutdown},
};

const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) struct ConfigWatch {
    pub args: ConfigArgs,
    pub hangup: Signal,
    pub publish: watch::Sender<Arc<InForce>>,
}

impl ConfigWatch {
    pub(crate) async fn run(mut self, ctx: Context, mut shutdown: Shutdown) -> Result<()> {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        let mut seen = fingerprint(self.args.clone()).await;
        loop {
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                _ = self.hangup.recv() => info!("SIGHUP: reloading the configuration"),
                _ = poll.tick() => {
                    let now = fingerprint(self.args.clone()).await;
                    if now == seen {
                        continue;
                    }
                    info!("the configuration file changed: reloading");
                }
            }
            seen = fingerprint(self.args.clone()).await;
            self.reload(&ctx).await;
        }
    }

    async fn reload(&self, ctx: &Context) {
        let args = self.args.clone();
        // Reading the file blocks: off the async workers.
        let attempt = tokio::task::spawn_blocking(move || -> Result<InForce> {
            let config = config::load(&args)?;
            Ok(InForce { policy: config.compile_policy()?, config })
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("reloading the configuration panicked: {e}")));
        match attempt {
            Ok(new) => {
                let current = self.publish.borrow().clone();
                let (old, c) = (&current.config, &new.config);
                if c.metrics_addr != old.metrics_addr || c.audit != old.audit || c.node_name != old.node_name {
                    warn!("changes to metrics_addr, audit or node_name take effect when the agent restarts");
                }
                ctx.metrics.set_policy(&new.policy, c.mode);
                ctx.metrics.config_reloaded(true);
                info!(
                    mode = c.mode.name(),
                    destinations = new.policy.v4.len() + new.policy.v6.len(),
                    "new policy in force"
                );
                self.publish.send_replace(Arc::new(new));
            }
            Err(e) => {
                ctx.metrics.config_reloaded(false);
                error!("the new configuration was not applied; the previous policy stays in force: {e:#}");
            }
        }
    }
}

/// Identifies the file's content version; a ConfigMap update swaps a symlink, which
/// changes the canonical path even when size and mtime happen to match.
async fn fingerprint(args: ConfigArgs) -> Option<(PathBuf, SystemTime, u64)> {
    tokio::task::spawn_blocking(move || {
        let real = std::fs::canonicalize(args.config.as_deref()?).ok()?;
        let meta = std::fs::metadata(&real).ok()?;
        Some((real, meta.modified().ok()?, meta.len()))
    })
    .await
    .ok()
    .flatten()
}
