//! The host-side table under the running agent's health check: deleted by hand
//! (`nft delete table inet metadata_guard`, a firewall manager flushing the ruleset),
//! it turns /readyz 503 and `status` says so until the agent has put it back.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use metadata_guard::hostside::{self, Removal};
use metadata_guard_tests::world::IMDS_V4;

use crate::{
    harness::{budget, Ctx},
    health::{metric, wait_readyz, NOTICE},
    hostside::{host_status, syn_over_af_packet},
};

pub(crate) const SCENARIOS: [crate::Scenario; 1] = [(
    "health: the host-side table deleted by hand turns /readyz 503 and status says so until the agent restores it",
    table_deleted,
)];

/// How often the scenario deletes the table while it wants it gone: much more often
/// than the agent checks (every second), so the agent finds it missing at every check.
const DELETE_EVERY: Duration = Duration::from_millis(20);

fn table_deleted(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    ensure!(host_status(ctx)?.installed, "no table to start with: {:?}", host_status(ctx)?);
    let restores_before = metric(ctx.agent()?, "metadata_guard_enforcement_restores_total")?;

    let netns = ctx.node.node_netns();
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = {
        let (stop, netns) = (stop.clone(), netns.clone());
        std::thread::spawn(move || -> Result<u32> {
            let mut deleted = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Removal::Removed = hostside::uninstall(Some(&netns))? {
                    deleted += 1;
                }
                std::thread::sleep(DELETE_EVERY);
            }
            Ok(deleted)
        })
    };
    let outage = observe_outage(ctx);
    stop.store(true, Ordering::Relaxed);
    let deleted = deleter.join().map_err(|_| anyhow::anyhow!("the deleting thread panicked"))??;
    outage?;
    ensure!(deleted >= 2, "the agent never put the table back while it was being deleted ({deleted} deletions)");

    let agent = ctx.agent()?;
    wait_readyz(agent, 200, NOTICE)?;
    ensure!(
        metric(agent, "metadata_guard_enforcement_restores_total")? > restores_before,
        "no restore counted in metadata_guard_enforcement_restores_total"
    );
    let status = ctx.status()?;
    ensure!(status.enforcing && status.problems.is_empty(), "not whole after the restore: {status:?}");
    let host = host_status(ctx)?;
    ensure!(host.installed && host.mode.as_deref() == Some("enforce"), "the table is not back as it was: {host:?}");
    let (arrived, answered) = syn_over_af_packet(ctx, IMDS_V4, 44100)?;
    ensure!(arrived == 0 && !answered, "the restored table let a SYN through: arrived {arrived}, answered {answered}");
    Ok(())
}

/// While the table keeps being deleted: /readyz names the host side, `status` is not
/// enforcing and says why.
fn observe_outage(ctx: &Ctx) -> Result<()> {
    let body = wait_readyz(ctx.agent()?, 503, NOTICE)?;
    ensure!(
        body.contains("host side") && body.contains("metadata_guard"),
        "/readyz does not say what is missing: {body}"
    );
    let deadline = Instant::now() + budget(NOTICE);
    loop {
        let status = ctx.status()?;
        if !status.enforcing && status.problems.iter().any(|p| p.contains("host-side table")) {
            let (ok, text, err) = metadata_guard_tests::agent::oneshot(
                &ctx.agent_bin,
                &["status", "--bpffs", &ctx.node.bpffs.display().to_string()],
            )?;
            ensure!(ok, "status failed: {err}");
            if text.contains("NOT enforcing") && text.contains("no table") {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "status never said the table is missing: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
