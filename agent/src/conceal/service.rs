//! Conceal mode as one subsystem of the agent: the proxy's listener, its view of the
//! kernel's records and of pod identities, and what it reports (refusals to the audit
//! trail, every request to metrics).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::{Context, Result};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};

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
    loader::Guard,
    metrics::Metrics,
    pod_identity::{PodResolver, Workload},
};

/// Refusals waiting for the audit trail; beyond this they are dropped and counted
/// (a pod hammering refused paths must not grow the agent's memory).
pub const AUDIT_QUEUE: usize = 4096;

pub struct Conceal {
    proxy: Arc<Proxy>,
    listener: Option<TcpListener>,
    addr: SocketAddr,
    metrics: Arc<ConcealMetrics>,
}

impl Conceal {
    /// Binds the proxy when the configuration names an address (in any mode, so that a
    /// reload can switch to conceal), and points the kernel at it in conceal mode.
    /// Returns None, with the kernel's redirect off, when no address is configured.
    pub async fn start(
        config: &Config,
        host_netns: Option<&Path>,
        cgroup: &Path,
        guard: &mut Guard,
        metrics: &Metrics,
        audit: mpsc::Sender<(Attempt, Workload)>,
    ) -> Result<Option<Conceal>> {
        let Some(addr) = config.conceal.addr else {
            guard.set_conceal(None, &[]).context("could not clear the conceal settings in the kernel")?;
            return Ok(None);
        };
        let sockets = HostSockets::new(host_netns)?;
        let listener = sockets.listen(addr).await?;
        let resolver = Mutex::new(PodResolver::new(
            cgroup.to_path_buf(),
            config.pod_logs_dir.clone(),
            config.container_logs_dir.clone(),
        ));
        let conceal_metrics = Arc::new(ConcealMetrics::register(metrics));
        let report_metrics = conceal_metrics.clone();
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
            report_metrics.request(&outcome);
            if let Some(attempt) = refusal_attempt(&outcome) {
                if audit.try_send((attempt, outcome.workload)).is_err() {
                    warn!("the audit queue is full; a concealed request goes unrecorded");
                }
            }
        };
        let proxy = Proxy::new(
            Arc::new(KernelPeers::new(guard.conceal_peers()?)),
            Arc::new(move |cgroup_id| resolver.lock().unwrap_or_else(|e| e.into_inner()).resolve(cgroup_id)),
            Arc::new(report),
            endpoints(&config.block),
            config.conceal.extra_paths.clone(),
            sockets,
        );
        let conceal = Conceal { proxy: Arc::new(proxy), listener: Some(listener), addr, metrics: conceal_metrics };
        conceal.apply(config, guard)?;
        Ok(Some(conceal))
    }

    /// Puts a (re)loaded configuration in force: the kernel's redirect, the pods'
    /// extra paths. The address and endpoints are fixed until a restart.
    pub fn apply(&self, config: &Config, guard: &mut Guard) -> Result<()> {
        if config.conceal.addr != Some(self.addr) {
            warn!("a new conceal address takes effect when the agent restarts; the proxy stays on {}", self.addr);
        }
        let on = config.mode == Mode::Conceal;
        guard
            .set_conceal(on.then_some(self.addr), &self.proxy.endpoints)
            .context("could not write the conceal settings into the kernel")?;
        self.proxy.set_extras(config.conceal.extra_paths.clone());
        if on {
            info!(proxy = %self.addr, endpoints = ?self.proxy.endpoints, "conceal mode: pods' metadata HTTP requests are filtered");
        }
        Ok(())
    }

    /// Copies the kernel's redirect counters into metrics.
    pub fn publish(&self, guard: &Guard) {
        match guard.conceal_counters() {
            Ok(values) => self.metrics.kernel_counters(&values),
            Err(e) => warn!("could not read the conceal counters: {e:#}"),
        }
    }

    /// The proxy's task: serves until `shutdown`.
    pub fn serve(&mut self, shutdown: watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let listener = self.listener.take().expect("serve is called once");
        self.proxy.clone().serve(listener, shutdown)
    }
}

/// A refused request as an attempt for the audit trail and the attempt metrics.
fn refusal_attempt(outcome: &Outcome) -> Option<Attempt> {
    let Decision::Refuse { rule, .. } = &outcome.decision else { return None };
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
        request: Some(ConcealedRequest {
            method: outcome.method.clone(),
            path: outcome.path.clone(),
            rule: rule.clone(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
        }
    }

    #[test]
    fn only_refusals_become_attempts_and_they_are_concealed() {
        let pass = Decision::Pass { cloud: None, class: "listing", rule: "root-listing".into() };
        assert!(refusal_attempt(&outcome(pass, "169.254.169.254:80")).is_none());
        let refuse = Decision::Refuse { status: 404, rule: "aws-iam-credentials".into(), reason: String::new() };
        let attempt = refusal_attempt(&outcome(refuse.clone(), "169.254.169.254:80")).unwrap();
        assert_eq!(attempt.verdict_name(), "concealed");
        assert_eq!(attempt.hook, Hook::Connect4);
        let request = attempt.request.unwrap();
        assert_eq!((request.method.as_str(), request.rule.as_str()), ("GET", "aws-iam-credentials"));
        let v6 = refusal_attempt(&outcome(refuse, "[fd00:ec2::254]:80")).unwrap();
        assert_eq!((v6.hook, v6.family()), (Hook::Connect6, "ipv6"));
    }
}
