// SPDX-License-Identifier: Apache-2.0
//! Which pods may reach the metadata service without hostNetwork (a metadata proxy,
//! a cloud node agent): the allow rules matched against the pods on this node, as
//! the set of cgroup ids the kernel lets through.
//!
//! Fail-closed: a pod is allowed only once its namespace and name are known, so a
//! container is blocked until it is resolved, never the other way round.

use std::collections::BTreeSet;

use crate::{pod_identity::PodIdentity, policy::AllowRule};

pub(crate) fn allowed_cgroups(rules: &[AllowRule], pods: &[(u64, PodIdentity)]) -> BTreeSet<u64> {
    if rules.is_empty() {
        return BTreeSet::new();
    }
    pods.iter()
        .filter(|(_, pod)| match (&pod.namespace, &pod.pod) {
            (Some(ns), Some(name)) => rules.iter().any(|r| r.matches(ns, name)),
            _ => false,
        })
        .map(|(id, _)| *id)
        .collect()
}

/// The allowlist subsystem: keeps the kernel's pod allowlist equal to the allow rules
/// applied to the pods on this node — at start, on every kubepods cgroup change, on
/// every new policy and every [`ALLOWLIST_RESYNC`]. Runs on a thread of its own: a
/// sync walks the cgroup tree and the kubelet's log directories. Its readiness
/// condition, `allowlist`, holds once a sync has succeeded and while syncs succeed.
pub(crate) struct AllowlistSync {
    /// The host-side table, which the allowlist opens for allowed pods too.
    host: std::sync::Arc<std::sync::Mutex<crate::hostside::HostTable>>,
    condition: crate::supervise::Condition,
}

/// How often the pod allowlist is recomputed even without a cgroup event (names that
/// the kubelet wrote after the cgroup appeared, missed events).
pub(crate) const ALLOWLIST_RESYNC: std::time::Duration = std::time::Duration::from_secs(2);

impl AllowlistSync {
    /// Keeps the kernel guard's allowlist (`ctx.guard`) and the host-side table's (`host`).
    pub(crate) fn new(
        ctx: &crate::supervise::Context,
        host: std::sync::Arc<std::sync::Mutex<crate::hostside::HostTable>>,
    ) -> AllowlistSync {
        AllowlistSync { host, condition: ctx.readiness.condition("allowlist", "not synced yet") }
    }

    pub(crate) async fn run(
        self,
        ctx: crate::supervise::Context,
        mut shutdown: crate::supervise::Shutdown,
    ) -> anyhow::Result<()> {
        use tracing::{error, info, warn};

        let condition = self.condition.clone();
        let mut policy = ctx.policy.clone();
        let config = policy.borrow_and_update().config.clone();
        let mut resolver = crate::pod_identity::PodResolver::new(
            ctx.cgroup.clone(),
            config.pod_logs_dir.clone(),
            config.container_logs_dir.clone(),
        );
        let mut watch = crate::kubepods_watch::KubepodsWatch::new(&ctx.cgroup)
            .map_err(|e| {
                warn!("cannot watch the kubepods cgroups, the allowlist follows every {ALLOWLIST_RESYNC:?}: {e:#}");
            })
            .ok();
        let mut resync = tokio::time::interval(ALLOWLIST_RESYNC);
        let mut rules = config.allow_pods.clone();
        // The set last put in force in the kernel.
        let mut current = BTreeSet::new();
        loop {
            let wanted =
                if rules.is_empty() { BTreeSet::new() } else { allowed_cgroups(&rules, &resolver.rescan_pods()) };
            resolver.forget_vanished();
            // The host side opens for a new pod before the socket hooks let it through
            // (it must find the node open), and closes for a removed one after them.
            let opening: BTreeSet<u64> = current.union(&wanted).copied().collect();
            let host_opened = self.set_host_allowed(&ctx.guard, &opening);
            let synced = ctx.guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).sync_allowed(&wanted);
            let host_closed = if opening == wanted { Ok(()) } else { self.set_host_allowed(&ctx.guard, &wanted) };
            let host_synced = host_opened.and(host_closed);
            if let Err(e) = &host_synced {
                error!("could not update the host side's pod allowlist: {e:#}");
            }
            match synced {
                Ok((added, removed)) => {
                    if added + removed > 0 {
                        info!(added, removed, allowed = wanted.len(), "pod allowlist updated");
                    }
                    current = wanted;
                    match &host_synced {
                        Ok(()) => condition.ready(),
                        Err(e) => condition.missing(format!("the host side's pod allowlist: {e:#}")),
                    }
                }
                Err(e) => {
                    error!("could not update the pod allowlist in the kernel: {e:#}");
                    condition.missing(format!("{e:#}"));
                }
            }
            let changed = async {
                match &mut watch {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                Ok(()) = policy.changed() => rules = policy.borrow_and_update().config.allow_pods.clone(),
                result = changed => if let Err(e) = result {
                    warn!("watching the kubepods cgroups failed, the allowlist now follows every {ALLOWLIST_RESYNC:?}: {e:#}");
                    watch = None;
                },
                _ = resync.tick(), if !rules.is_empty() => {}
            }
        }
    }
}

impl AllowlistSync {
    /// The host side's table and, from the same view of the pods' interfaces, the
    /// uplink program's allowlist (`guard`).
    fn set_host_allowed(
        &self,
        guard: &std::sync::Mutex<crate::loader::Guard>,
        allowed: &BTreeSet<u64>,
    ) -> anyhow::Result<()> {
        let mut host = self.host.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        host.set_allowed(allowed)?;
        let entries = crate::uplink::allow_keys(&host.allowed_entries());
        drop(host);
        guard.lock().unwrap_or_else(std::sync::PoisonError::into_inner).sync_uplink_allowed(&entries).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod_identity::Qos;

    fn pod(ns: Option<&str>, name: Option<&str>) -> PodIdentity {
        PodIdentity {
            namespace: ns.map(Into::into),
            pod: name.map(Into::into),
            pod_uid: "u".into(),
            container: None,
            container_id: None,
            runtime: None,
            qos: Qos::BestEffort,
        }
    }

    fn rule(ns: &str, pod: &str) -> AllowRule {
        serde_norway::from_str(&format!("{{namespace: '{ns}', pod: '{pod}'}}")).unwrap()
    }

    #[test]
    fn the_proxy_is_allowed_and_its_neighbour_is_not() {
        let pods = vec![
            (1, pod(Some("kube-system"), Some("metadata-proxy-abcde"))),
            (2, pod(Some("kube-system"), Some("coredns-1234"))),
            (3, pod(Some("default"), Some("metadata-proxy-x"))),
        ];
        let allowed = allowed_cgroups(&[rule("kube-system", "metadata-proxy-*")], &pods);
        assert_eq!(allowed, BTreeSet::from([1]));
    }

    #[test]
    fn a_pod_not_yet_named_stays_blocked() {
        let pods = vec![(1, pod(None, None))];
        assert!(allowed_cgroups(&[rule("*", "*")], &pods).is_empty());
    }

    #[test]
    fn no_rules_allow_nothing() {
        let pods = vec![(1, pod(Some("a"), Some("b")))];
        assert!(allowed_cgroups(&[], &pods).is_empty());
    }
}
