// SPDX-License-Identifier: Apache-2.0
//! The uplinks in the running agent: every uplink runs the program, including the
//! devices that appear while the agent runs (the AWS VPC CNI attaches ENIs at run
//! time). An rtnetlink subscription (links, routes, tc) wakes the subsystem within
//! milliseconds of a change; each wake-up rescans the devices and routes and puts the
//! program on any uplink that lacks it (a new device, a device that gained a route to
//! a blocked destination, a filter someone deleted with its clsact qdisc). A check
//! every second catches what no notification announced.
//!
//! Between a device's appearance and the program on it (the time of one netlink
//! round trip and an attach) the socket hooks and the packet backstop still judge
//! every socket of every pod, and the host-side table everything that passes the
//! node's netfilter; only a frame that bypasses both (AF_PACKET, a tc redirect) onto
//! a device no route to a blocked destination leads through yet could pass.
//!
//! A device keeps the program while the agent runs even when it stops being an
//! uplink (a route removed): a program that only refuses pods' packets to blocked
//! destinations does no harm there, and taking it off and on as routes flap would.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use metadata_guard_netfilter::{devices, NlSocket};
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use super::{enter_netns, guard_all, scan::scan_with, UplinkSpec};
use crate::{
    loader::uplink::{TcAttach, UplinkAction},
    supervise::{Condition, Context, Shutdown},
};

/// How often the uplinks are checked without a notification.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// `RTNLGRP_TC`: qdisc and filter changes (a clsact qdisc deleted with our filter).
const RTNLGRP_TC: u32 = 4;

/// The `uplinks` subsystem. Its readiness condition holds while every uplink runs
/// the program.
pub(crate) struct Uplinks {
    condition: Condition,
    spec: UplinkSpec,
    how: TcAttach,
    host_netns: Option<PathBuf>,
}

impl Uplinks {
    pub(crate) fn new(ctx: &Context, spec: UplinkSpec, how: TcAttach, host_netns: Option<PathBuf>) -> Uplinks {
        Uplinks { condition: ctx.readiness.condition("uplinks", "not checked yet"), spec, how, host_netns }
    }

    /// Runs on a thread of its own (`spawn_on_thread`), which it moves into the host's
    /// network namespace first: device names, netlink and tcx links are all of it.
    pub(crate) async fn run(self, ctx: Context, mut shutdown: Shutdown) -> Result<()> {
        if let Some(netns) = &self.host_netns {
            enter_netns(netns)?;
        }
        {
            let guard = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            crate::loader::uplink_state::record_spec(guard.pins(), &self.spec.to_string())?;
        }
        if self.spec == UplinkSpec::None {
            self.condition.ready();
            shutdown.wait().await;
            return Ok(());
        }
        let watch = subscribe().context("could not subscribe to the host's link and route changes")?;
        let mut sock = NlSocket::open(libc::NETLINK_ROUTE).context("could not open a netlink socket")?;
        let mut policy = ctx.policy.clone();
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        let mut last_error: Option<String> = None;
        loop {
            match self.round(&ctx, &mut sock) {
                Ok(missing) if missing.is_empty() => {
                    last_error = None;
                    self.condition.ready();
                }
                Ok(missing) => {
                    let why = missing.join("; ");
                    if last_error.as_deref() != Some(why.as_str()) {
                        error!("uplinks: {why} (retrying every {CHECK_INTERVAL:?} and on every link change)");
                        last_error = Some(why.clone());
                    }
                    self.condition.missing(why);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    if last_error.as_deref() != Some(why.as_str()) {
                        error!("uplinks: {why}");
                        last_error = Some(why.clone());
                    }
                    self.condition.missing(why);
                }
            }
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                ready = watch.readable() => {
                    let mut ready = ready.context("waiting on the link and route notifications failed")?;
                    drain(ready.get_inner());
                    ready.clear_ready();
                }
                Ok(()) = policy.changed() => { policy.borrow_and_update(); }
                _ = tick.tick() => {}
            }
        }
    }

    /// One round: the uplinks chosen now, the program on each that lacks it. Returns
    /// what is missing.
    fn round(&self, ctx: &Context, sock: &mut NlSocket) -> Result<Vec<String>> {
        let policy = ctx.policy.borrow().policy.clone();
        let scan = scan_with(sock, &self.spec, &policy)?;
        let mut guard = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let live: Vec<u32> = scan.devices.iter().map(|d| d.index).collect();
        if let Err(e) = guard.forget_vanished_uplinks(&live) {
            warn!("could not remove the pins of vanished uplinks: {e:#}");
        }
        let mut missing = Vec::new();
        let mut guarded = 0;
        for g in guard_all(&mut guard, &scan.uplinks, self.how) {
            let u = &g.uplink;
            match g.action {
                Ok(UplinkAction::Kept) => guarded += 1,
                Ok(action) => {
                    guarded += 1;
                    info!(uplink = %u.name, ifindex = u.index, reason = %u.reason, how = self.how.name(), ?action, "uplink guarded");
                }
                Err(e) => {
                    missing.push(format!("uplink {} ({}) does not run the uplink program: {e}", u.name, u.reason));
                }
            }
        }
        if let UplinkSpec::Named(names) = &self.spec {
            for name in names.iter().filter(|n| !scan.uplinks.iter().any(|u| &u.name == *n)) {
                let why = if scan.devices.iter().any(|d| &d.name == name) {
                    "is not an Ethernet device"
                } else {
                    "does not exist"
                };
                missing.push(format!("uplink {name} (named by --uplinks) {why}"));
            }
        }
        ctx.metrics.set_uplinks(guarded, missing.len());
        Ok(missing)
    }
}

/// A netlink socket in the calling thread's namespace, subscribed to link, route and
/// tc changes, registered with the runtime.
fn subscribe() -> Result<AsyncFd<NlSocket>> {
    let sock = NlSocket::open(libc::NETLINK_ROUTE)?;
    for group in [devices::RTNLGRP_LINK, devices::RTNLGRP_IPV4_ROUTE, devices::RTNLGRP_IPV6_ROUTE, RTNLGRP_TC] {
        devices::subscribe(&sock, group).with_context(|| format!("could not join rtnetlink group {group}"))?;
    }
    sock.set_nonblocking()?;
    // Notifications only wake the subsystem, which then reads the whole state: a
    // larger buffer just lets a burst (a CNI adding many routes) be dropped less.
    sock.set_recv_buffer(1 << 20);
    // SAFETY: the AsyncFd owns the socket, so the fd stays open while registered.
    Ok(unsafe { AsyncFd::register(sock) }?)
}

/// Reads every queued notification; their content does not matter (the round that
/// follows reads the state itself), nor does an overrun (`ENOBUFS`: read on).
fn drain(sock: &NlSocket) {
    const MAX_READS: usize = 4096;
    for _ in 0..MAX_READS {
        match sock.recv() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            _ => {}
        }
    }
}
