// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's metrics: proxied requests by result, cloud, path class and pod, and
//! the kernel's redirect counters.

use std::{collections::HashSet, sync::Mutex};

use metadata_guard_common::conceal_counters;
use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use super::{decide::Decision, proxy::Outcome};
use crate::{metrics::Metrics, pod_identity::Workload};

/// Pods with series of their own; the rest share `namespace=""`, `pod=""`.
const MAX_PODS: usize = 5000;

pub(crate) struct ConcealMetrics {
    requests: IntCounterVec,
    kernel: IntGaugeVec,
    pods: Mutex<HashSet<(String, String)>>,
}

impl ConcealMetrics {
    pub(crate) fn register(metrics: &Metrics) -> ConcealMetrics {
        let requests = IntCounterVec::new(
            Opts::new(
                "metadata_guard_conceal_requests_total",
                "Requests the conceal proxy judged, by result (passed, refused), cloud, path class and pod",
            ),
            &["result", "cloud", "class", "namespace", "pod"],
        )
        .expect("valid metric definition");
        let kernel = IntGaugeVec::new(
            Opts::new(
                "metadata_guard_conceal_kernel_connections",
                "Pod connections the kernel redirected to the conceal proxy, recorded for it, or could not record \
                 (then refused), since the maps were created",
            ),
            &["event"],
        )
        .expect("valid metric definition");
        // Registering twice only happens in tests that build several proxies.
        let _ = metrics.registry().register(Box::new(requests.clone()));
        let _ = metrics.registry().register(Box::new(kernel.clone()));
        ConcealMetrics { requests, kernel, pods: Mutex::default() }
    }

    pub(crate) fn request(&self, outcome: &Outcome) {
        let (result, cloud, class) = match &outcome.decision {
            Decision::Pass { cloud, class, .. } => ("passed", cloud.map_or("any", super::clouds::Cloud::name), *class),
            Decision::Refuse { .. } => ("refused", "", ""),
        };
        let (mut namespace, mut pod) = match &outcome.workload {
            Workload::Pod(p) => (p.namespace.clone().unwrap_or_default(), p.pod.clone().unwrap_or_default()),
            _ => (String::new(), String::new()),
        };
        let mut pods = self.pods.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !pods.contains(&(namespace.clone(), pod.clone())) {
            if pods.len() >= MAX_PODS {
                namespace.clear();
                pod.clear();
            } else {
                pods.insert((namespace.clone(), pod.clone()));
            }
        }
        self.requests.with_label_values(&[result, cloud, class, &namespace, &pod]).inc();
    }

    pub(crate) fn kernel_counters(&self, values: &[u64; conceal_counters::SLOTS as usize]) {
        let names = [
            (conceal_counters::REDIRECTED, "redirected"),
            (conceal_counters::RECORDED, "recorded"),
            (conceal_counters::RECORD_FAILED, "record_failed"),
        ];
        for (slot, name) in names {
            self.kernel.with_label_values(&[name]).set(values[slot as usize] as i64);
        }
    }
}
