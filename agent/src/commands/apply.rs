// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard apply`: the enforcement `run` would put in the kernel (the pinned
//! programs and the host-side table), installed
//! (or adopted and updated) once, verified, printed — then exit. Meant for the node's
//! boot, before the container runtime and kubelet, so that pods are refused from
//! their first second; the DaemonSet's agent adopts it later without a gap.
//!
//! Exits non-zero, saying why, when it cannot enforce (so a boot unit fails
//! visibly), and refuses to touch anything while an agent runs: that agent owns the
//! enforcement and follows its own configuration.

use anyhow::{bail, Context, Result};

use crate::{
    config::Mode,
    enforce::{self, InstallError},
    hostside,
    loader::{origin, status},
    uplink,
};

pub(crate) fn apply(req: &enforce::Request) -> Result<()> {
    let mut installed = enforce::install(req, "apply").map_err(|e| match e {
        InstallError::AlreadyRunning(held) => anyhow::Error::new(held).context(
            "apply changed nothing: an agent already runs on this node and keeps its own configuration in force \
             (see `metadata-guard status`)",
        ),
        InstallError::Failed(e) => e,
    })?;
    // No proxy runs before the agent: a redirect left in the pins by an agent that
    // died would send pods to a port nobody answers. Off, the kernel refuses pods'
    // metadata connections (EPERM) in conceal mode too, until the agent's proxy listens.
    installed.guard.set_conceal(None, &[]).context("could not turn the kernel's redirect to the conceal proxy off")?;
    if installed.config.mode == Mode::Conceal {
        println!(
            "metadata-guard apply: conceal mode: pods' metadata HTTP connections are refused (EPERM) until the \
             agent's proxy listens{}; the agent then sends them to it",
            installed.config.conceal.addr.map(|a| format!(" on {a}")).unwrap_or_default()
        );
    }
    let faults = installed.guard.faults(&installed.cgroup);
    let host_side = hostside::status(req.host_netns.as_deref())?;
    let verdict = enforce::enforcing(true, faults.iter().map(ToString::to_string).collect(), Some(&host_side));
    if !verdict.enforcing {
        let what = verdict.problems.join("; ");
        bail!("the enforcement is not whole after installing it: {what}; see `metadata-guard check`");
    }
    let mut in_force = status::read(&installed.layout.root)?;
    let problems = std::mem::take(&mut in_force.problems);
    in_force.uplinks =
        uplink::read(&installed.layout.root, req.host_netns.as_deref(), in_force.uplink_choice.as_deref())?;
    let missing = uplink::problems(&in_force.uplinks);
    if !missing.is_empty() {
        bail!("the enforcement is not whole after installing it: {}; see `metadata-guard check`", missing.join("; "));
    }
    let read = enforce::enforcing(in_force.installed, problems, Some(&host_side));
    (in_force.enforcing, in_force.problems) = (read.enforcing, read.problems);
    let expected = installed.policy.v4.len() + installed.policy.v6.len();
    if in_force.destinations.len() != expected {
        bail!(
            "the kernel holds {} blocked destinations where the policy has {expected}; the policy was not loaded",
            in_force.destinations.len()
        );
    }
    if in_force.mode.as_deref() != Some(installed.config.mode.name()) {
        bail!("the kernel's mode is {:?} where the configuration says {}", in_force.mode, installed.config.mode.name());
    }
    // The host side has two modes: in conceal mode it refuses as in enforce mode.
    let host_mode = if installed.config.mode == Mode::Audit { "audit" } else { "enforce" };
    if host_side.mode.as_deref() != Some(host_mode) {
        bail!(
            "the host-side table `{}` is not in force after writing it ({host_side:?}); see `metadata-guard check`",
            host_side.table
        );
    }
    println!(
        "metadata-guard apply: enforcement in force on {} ({} by apply {}):",
        installed.cgroup.display(),
        if installed.report.links.iter().all(|(_, a)| *a == crate::loader::LinkAction::Attached) {
            "installed"
        } else {
            "adopted and updated"
        },
        origin::Origin::this("apply").version
    );
    status::print_human(&in_force);
    uplink::print_status(&in_force.uplinks, in_force.uplink_choice.as_deref());
    hostside::print_status(&host_side);
    Ok(())
}
