// SPDX-License-Identifier: Apache-2.0
//! Conceal mode as one supervised subsystem of the agent, `conceal`: the proxy's
//! listener, the kernel's redirect to it, and what it reports (refused requests as
//! [`Attempt`]s into the audit pipeline, every request and the kernel's redirect
//! counters to metrics). Runs on a thread of its own: naming the pod behind a
//! connection walks the cgroup tree.
//!
//! Who writes what: the configuration subsystem puts the mode in force (with the
//! policy, in `MG_SETTINGS`); this one owns conceal mode's own maps (`MG_CONCEAL`,
//! `MG_CONCEAL_EP`) and rewrites them from each policy it sees in force. Either order
//! is safe: the kernel redirects only when the mode is conceal *and* a proxy is set;
//! otherwise a pod's metadata connection is refused as in enforce mode.
//!
//! Readiness condition `conceal`: in conceal mode, ready once the proxy's listener is
//! bound and the kernel's redirect points at it; in the other modes, once the
//! redirect is off.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use super::identity::{aws::AwsSource, metrics::IdentityMetrics, IdentitySource as _};
use super::{
    decide::Decision,
    endpoints,
    host_sockets::HostSockets,
    metrics::ConcealMetrics,
    peers::KernelPeers,
    proxy::{Outcome, Proxy},
};
use crate::{
    attempt::{Attempt, ConcealedRequest, Hook, Protocol, Verdict},
    config::{Config, Mode},
    pod_identity::PodResolver,
    supervise::{Condition, Context, Shutdown},
};

/// How often the kernel's counters are published (and a failed bind retried).
const TICK: Duration = Duration::from_secs(1);
/// How often pods' kept credentials are checked against the pods still running.
const FORGET_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) struct Conceal {
    host_netns: Option<PathBuf>,
    condition: Condition,
    /// Asks IPVS whether a virtual service claims the proxy's address (`ipvs`).
    ipvs: Mutex<Option<metadata_guard_netfilter::NlSocket>>,
}

/// The proxy, once its listener is bound.
struct Bound {
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    resolver: Arc<Mutex<PodResolver>>,
    /// Pods' own AWS identities, while configured.
    aws: Option<Arc<AwsSource>>,
    stop: watch::Sender<bool>,
    serving: JoinHandle<()>,
}

impl Conceal {
    /// `host_netns`: where the proxy's sockets live (`--host-netns`; None: the agent's own).
    pub(crate) fn new(ctx: &Context, host_netns: Option<PathBuf>) -> Conceal {
        Conceal { host_netns, condition: ctx.readiness.condition("conceal", "not started"), ipvs: Mutex::default() }
    }

    /// Follows the policy in force until shutdown. In conceal mode, a proxy that cannot
    /// be bound is retried every second, with the readiness condition saying why;
    /// meanwhile pods' metadata connections are refused as in enforce mode.
    pub(crate) async fn run(self, ctx: Context, mut shutdown: Shutdown) -> Result<()> {
        let metrics = Arc::new(ConcealMetrics::register(&ctx.metrics));
        let identity_metrics = Arc::new(IdentityMetrics::register(&ctx.metrics));
        let mut forgot_at = std::time::Instant::now();
        let mut policy = ctx.policy.clone();
        let mut bound: Option<Bound> = None;
        let mut tick = tokio::time::interval(TICK);
        let mut settled = false;
        let mut reported: Option<String> = None;
        loop {
            if !settled {
                let config = policy.borrow_and_update().config.clone();
                let put = self.put_in_force(&ctx, &config, &mut bound, &metrics).await;
                let put = put.and_then(|()| self.identities_in_force(&config, bound.as_mut(), &identity_metrics));
                match put {
                    Ok(()) => {
                        settled = true;
                        if reported.take().is_some() {
                            info!("conceal mode: recovered");
                        }
                        self.condition.ready();
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        if reported.as_ref() != Some(&why) {
                            warn!("conceal mode: {why}; retrying every {TICK:?}");
                        }
                        self.condition.missing(why.clone());
                        reported = Some(why);
                    }
                }
            }
            tokio::select! {
                _ = shutdown.wait() => break,
                Ok(()) = policy.changed() => settled = false,
                _ = tick.tick() => {
                    publish_counters(&ctx, &metrics);
                    // A virtual service that appears later turns the redirect off.
                    let redirecting = bound.as_ref().filter(|_| policy.borrow().config.mode == Mode::Conceal);
                    if settled && redirecting.is_some_and(|b| self.ipvs_claims(b.addr)) {
                        settled = false;
                    }
                    if forgot_at.elapsed() >= FORGET_INTERVAL {
                        forgot_at = std::time::Instant::now();
                        if let Some(b) = bound.as_ref() {
                            forget_gone_pods(b);
                        }
                    }
                }
            }
        }
        if let Some(b) = bound {
            // The redirect goes before the listener: with no agent, pods' metadata
            // connections are refused (EPERM, as in enforce mode), never sent to a
            // port nobody answers.
            let off = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).set_conceal(None, &[]);
            match off {
                Ok(()) => {
                    info!("conceal mode: pods' metadata HTTP connections are refused until an agent's proxy listens");
                }
                Err(e) => warn!("could not turn the kernel's redirect to the conceal proxy off: {e:#}"),
            }
            let _ = b.stop.send(true);
            let _ = b.serving.await;
        }
        Ok(())
    }

    /// Makes the kernel and the proxy follow `config`: binds the proxy when an address
    /// is configured and none is bound yet, hands it the endpoints and extra paths, and
    /// writes the redirect (on in conceal mode, off otherwise).
    async fn put_in_force(
        &self,
        ctx: &Context,
        config: &Config,
        bound: &mut Option<Bound>,
        metrics: &Arc<ConcealMetrics>,
    ) -> Result<()> {
        let endpoints = endpoints(&config.block);
        let mut bind_failed = None;
        if let (None, Some(addr)) = (bound.as_ref(), config.conceal.addr) {
            match self.bind(ctx, config, addr, metrics).await {
                Ok(b) => *bound = Some(b),
                Err(e) => bind_failed = Some(e),
            }
        }
        if let Some(b) = bound.as_ref() {
            if config.conceal.addr.is_some_and(|a| a != b.addr) {
                warn!("a new conceal address takes effect when the agent restarts; the proxy stays on {}", b.addr);
            }
            b.proxy.set_endpoints(endpoints.clone());
            b.proxy.set_extras(config.conceal.extra_paths.clone());
        }
        let mut redirect_to = bound.as_ref().filter(|_| config.mode == Mode::Conceal).map(|b| b.addr);
        let claimed = redirect_to.filter(|addr| self.ipvs_claims(*addr));
        if claimed.is_some() {
            redirect_to = None;
        }
        {
            let mut guard = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            guard
                .set_conceal(redirect_to, &endpoints)
                .context("could not write the conceal settings into the kernel")?;
        }
        if let Some(proxy) = redirect_to {
            info!(%proxy, ?endpoints, "conceal mode: pods' metadata HTTP requests are filtered");
        }
        if let Some(addr) = claimed {
            anyhow::bail!(
                "an IPVS virtual service claims the proxy's address {addr} (a Service with externalIPs or a \
                 hostPort on it?); it would take pods' metadata connections, so they are refused until it goes \
                 (or give conceal.addr a port no Service uses)"
            );
        }
        match bind_failed {
            Some(e) if config.mode == Mode::Conceal => {
                Err(e.context("pods' metadata connections are refused until the proxy listens"))
            }
            Some(e) => {
                // Nothing depends on it until a reload switches to conceal mode, which binds again.
                warn!("the conceal proxy is not listening (conceal mode is not in force): {e:#}");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Gives the proxy the pods' own identities `config` asks for, keeping the kept
    /// credentials of pods across reloads (a pod whose role changed starts afresh).
    fn identities_in_force(
        &self,
        config: &Config,
        bound: Option<&mut Bound>,
        metrics: &Arc<IdentityMetrics>,
    ) -> Result<()> {
        let Some(b) = bound else { return Ok(()) };
        match (&config.conceal.identity.aws, &b.aws) {
            (None, _) => {
                if b.aws.take().is_some() {
                    info!("identity: pods' own AWS credentials are off; their credential paths are concealed");
                }
                b.proxy.set_identity(None);
            }
            (Some(aws), Some(source)) => source.set(config.kubelet_dir.clone(), aws.clone()),
            (Some(aws), None) => {
                let sockets = HostSockets::new(self.host_netns.as_deref())?;
                let source = Arc::new(AwsSource::new(
                    config.kubelet_dir.clone(),
                    aws.clone(),
                    sockets,
                    metrics.clone(),
                    Arc::new(SystemTime::now),
                ));
                b.proxy.set_identity(Some(source.clone()));
                b.aws = Some(source);
                info!(
                    roles = aws.roles.len(),
                    kubelet_dir = %config.kubelet_dir.display(),
                    "identity: mapped pods get their own role's credentials"
                );
            }
        }
        Ok(())
    }

    async fn bind(
        &self,
        ctx: &Context,
        config: &Config,
        addr: SocketAddr,
        metrics: &Arc<ConcealMetrics>,
    ) -> Result<Bound> {
        let sockets = HostSockets::new(self.host_netns.as_deref())?;
        let listener = sockets.listen(addr).await?;
        let peers = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).conceal_peers()?;
        let resolver = Arc::new(Mutex::new(PodResolver::new(
            ctx.cgroup.clone(),
            config.pod_logs_dir.clone(),
            config.container_logs_dir.clone(),
        )));
        let identify = resolver.clone();
        let (attempts, metrics) = (ctx.attempts.clone(), metrics.clone());
        let report = move |outcome: Outcome| {
            debug!(
                cgroup_id = outcome.cgroup_id,
                method = %outcome.method,
                path = %outcome.path,
                rule = outcome.decision.rule(),
                status = outcome.status,
                elapsed = ?outcome.elapsed,
                "conceal proxy request"
            );
            metrics.request(&outcome);
            if let Some(attempt) = audit_attempt(&outcome) {
                if attempts.try_send(attempt).is_err() {
                    warn!("the audit queue is full; a concealed request goes unrecorded");
                }
            }
        };
        let proxy = Arc::new(Proxy::new(
            Arc::new(KernelPeers::new(peers)),
            Arc::new(move |cgroup_id| {
                identify.lock().unwrap_or_else(std::sync::PoisonError::into_inner).resolve(cgroup_id)
            }),
            Arc::new(report),
            endpoints(&config.block),
            config.conceal.extra_paths.clone(),
            sockets,
        ));
        let (stop, stopped) = watch::channel(false);
        let serving = tokio::spawn(proxy.clone().serve(listener, stopped));
        info!(%addr, "conceal proxy listening");
        Ok(Bound { addr, proxy, resolver, aws: None, stop, serving })
    }
}

impl Conceal {
    /// Whether IPVS has a virtual service on the proxy's address; a failed check says
    /// so in the log and counts as no claim (IPVS being absent is the common case).
    fn ipvs_claims(&self, proxy: SocketAddr) -> bool {
        let mut sock = self.ipvs.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if sock.is_none() {
            match metadata_guard_netfilter::NlSocket::open_in(self.host_netns.as_deref(), libc::NETLINK_GENERIC) {
                Ok(s) => *sock = Some(s),
                Err(e) => {
                    warn!("conceal mode: could not open a generic netlink socket to ask IPVS: {e}");
                    return false;
                }
            }
        }
        let result = super::ipvs::claims(sock.as_mut().expect("opened above"), proxy);
        result.unwrap_or_else(|e| {
            warn!("conceal mode: could not ask IPVS for its services: {e:#}");
            *sock = None;
            false
        })
    }
}

/// Copies the kernel's redirect counters into metrics.
fn publish_counters(ctx: &Context, metrics: &ConcealMetrics) {
    let counters = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).conceal_counters();
    match counters {
        Ok(values) => metrics.kernel_counters(&values),
        Err(e) => warn!("could not read the conceal counters: {e:#}"),
    }
}

/// Drops the kept credentials of pods whose cgroups are gone.
fn forget_gone_pods(bound: &Bound) {
    let Some(aws) = bound.aws.as_ref().filter(|a| a.keeps_any()) else { return };
    let live: std::collections::HashSet<String> = {
        let mut resolver = bound.resolver.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        resolver.forget_vanished();
        resolver.rescan_pods().into_iter().map(|(_, pod)| pod.pod_uid).collect()
    };
    aws.forget(&|uid| live.contains(uid));
}

/// A refused request, or one a pod's own identity answered, as an attempt for the
/// audit pipeline, which names its pod from the cgroup id like any other attempt.
fn audit_attempt(outcome: &Outcome) -> Option<Attempt> {
    let rule = match (&outcome.decision, &outcome.identity) {
        (Decision::Refuse { rule, .. }, _) | (Decision::Pass { rule, .. }, Some(_)) => rule,
        (Decision::Pass { .. }, None) => return None,
    };
    let destination = outcome.destination.ip().to_canonical();
    Some(Attempt {
        time: SystemTime::now(),
        cgroup_id: outcome.cgroup_id,
        netns_cookie: 0,
        pid: 0,
        tid: 0,
        comm: String::new(),
        destination,
        port: outcome.destination.port(),
        protocol: Protocol::Tcp,
        hook: if matches!(destination, IpAddr::V4(_)) { Hook::Connect4 } else { Hook::Connect6 },
        verdict: Verdict::Blocked,
        mapped: false,
        source: None,
        ingress_ifindex: 0,
        request: Some(ConcealedRequest {
            method: outcome.method.clone(),
            path: outcome.path.clone(),
            rule: rule.clone(),
            identity: outcome.identity.clone(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pod_identity::Workload;

    fn outcome(decision: Decision, destination: &str) -> Outcome {
        Outcome {
            cgroup_id: 9,
            workload: Workload::Unknown,
            destination: destination.parse().unwrap(),
            method: "GET".into(),
            path: "/latest/meta-data/iam/info".into(),
            decision,
            status: 404,
            elapsed: Duration::ZERO,
            identity: None,
        }
    }

    #[test]
    fn only_refusals_become_attempts_and_they_are_concealed() {
        let pass =
            Decision::Pass { cloud: None, class: "listing", rule: "root-listing".into(), query: Default::default() };
        assert!(audit_attempt(&outcome(pass, "169.254.169.254:80")).is_none());
        let refuse = Decision::Refuse { status: 404, rule: "aws-iam-credentials".into(), reason: String::new() };
        let attempt = audit_attempt(&outcome(refuse.clone(), "169.254.169.254:80")).unwrap();
        assert_eq!(attempt.verdict_name(), "concealed");
        assert_eq!(attempt.hook, Hook::Connect4);
        let request = attempt.request.unwrap();
        assert_eq!((request.method.as_str(), request.rule.as_str()), ("GET", "aws-iam-credentials"));
        let v6 = audit_attempt(&outcome(refuse, "[fd00:ec2::254]:80")).unwrap();
        assert_eq!((v6.hook, v6.family()), (Hook::Connect6, "ipv6"));
    }
}
