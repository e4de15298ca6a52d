// SPDX-License-Identifier: Apache-2.0
//! Identity metrics: requests by result, role and namespace, and STS's latency.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};

use crate::metrics::Metrics;

pub(crate) struct IdentityMetrics {
    requests: IntCounterVec,
    sts: HistogramVec,
    pods: IntGauge,
}

impl IdentityMetrics {
    pub(crate) fn register(metrics: &Metrics) -> IdentityMetrics {
        let requests = IntCounterVec::new(
            Opts::new(
                "metadata_guard_identity_requests_total",
                "Pods' requests for their own role's credentials, by result (served, token_refused, sts_error), \
                 role ARN and namespace",
            ),
            &["result", "role", "namespace"],
        )
        .expect("valid metric definition");
        let sts = HistogramVec::new(
            HistogramOpts::new(
                "metadata_guard_identity_sts_seconds",
                "Time of each AssumeRoleWithWebIdentity call, by result (ok, or the error code's class: \
                 refused, unreachable); its count is the number of STS calls",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["result"],
        )
        .expect("valid metric definition");
        let pods = IntGauge::new(
            "metadata_guard_identity_pods",
            "Pods whose own credentials the agent keeps (dropped when the pod's cgroup goes)",
        )
        .expect("valid metric definition");
        // Registering twice only happens in tests that build several sources.
        let _ = metrics.registry().register(Box::new(requests.clone()));
        let _ = metrics.registry().register(Box::new(sts.clone()));
        let _ = metrics.registry().register(Box::new(pods.clone()));
        IdentityMetrics { requests, sts, pods }
    }

    pub(crate) fn request(&self, result: &str, role: &str, namespace: &str) {
        self.requests.with_label_values(&[result, role, namespace]).inc();
    }

    pub(crate) fn pods(&self, kept: usize) {
        self.pods.set(i64::try_from(kept).unwrap_or(i64::MAX));
    }

    pub(crate) fn sts_call(&self, result: &str, took: Duration) {
        self.sts.with_label_values(&[result]).observe(took.as_secs_f64());
    }
}
