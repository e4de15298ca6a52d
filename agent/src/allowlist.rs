//! Which pods may reach the metadata service without hostNetwork (a metadata proxy,
//! a cloud node agent): the allow rules matched against the pods on this node, as
//! the set of cgroup ids the kernel lets through.
//!
//! Fail-closed: a pod is allowed only once its namespace and name are known, so a
//! container is blocked until it is resolved, never the other way round.

use std::collections::BTreeSet;

use crate::{pod_identity::PodIdentity, policy::AllowRule};

pub fn allowed_cgroups(rules: &[AllowRule], pods: &[(u64, PodIdentity)]) -> BTreeSet<u64> {
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
