// SPDX-License-Identifier: Apache-2.0
//! Prometheus metrics: what the guard did (from the kernel's own counters), which
//! pods tried (from the events), and how the trail and the configuration fare.
//!
//! Kernel and audit counts arrive as running totals; they are turned into counter
//! increments here so the exposition stays a proper monotonic counter.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
};

use metadata_guard_common::{Hook, Verdict};
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::{attempt::Attempt, audit::AuditStats, config::Mode, pod_identity::Workload, policy::CompiledPolicy};

/// Distinct (namespace, pod) label pairs kept; beyond it the series of the pair seen
/// least recently go, so pod churn cannot grow the agent's memory. Evicting rather
/// than folding new pods into one catch-all keeps the newest offenders attributed,
/// which is what matters on a node that has run thousands of short-lived pods.
const MAX_POD_SERIES: usize = 5000;

pub(crate) struct Metrics {
    registry: Registry,
    attempts: IntCounterVec,
    attempt_pods_evicted: IntCounter,
    kernel_verdicts: IntCounterVec,
    events_lost: IntCounter,
    audit_records: IntCounter,
    audit_suppressed: IntCounterVec,
    audit_write_errors: IntCounter,
    programs_attached: IntGauge,
    enforcement_restores: IntCounter,
    identity_cache: IntGauge,
    policy_destinations: IntGauge,
    enforcing: IntGauge,
    config_reloads: IntCounterVec,
    config_last_reload_success: IntGauge,
    uplinks: IntGaugeVec,
    state: Mutex<State>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

type PodKey = (String, String);

#[derive(Default)]
struct State {
    /// Last running totals seen, to turn them into increments.
    totals: HashMap<String, u64>,
    /// Ticks once per attempt; orders pods by when they were last seen.
    clock: u64,
    pods: HashMap<PodKey, PodSeries>,
    by_last_seen: BTreeMap<u64, PodKey>,
}

struct PodSeries {
    last_seen: u64,
    /// Label values of every series of this pod, to remove them on eviction.
    label_sets: Vec<[String; 6]>,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric definition");
    registry.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let r = Registry::new();
        let build =
            IntGaugeVec::new(Opts::new("metadata_guard_build_info", "The agent's version (value 1)"), &["version"])
                .expect("valid metric definition");
        r.register(Box::new(build.clone())).expect("metric registered once");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Metrics {
            attempts: counter_vec(
                &r,
                "metadata_guard_attempts_total",
                "Refused or audited attempts to reach a blocked destination, as reported by events",
                &["verdict", "workload", "namespace", "pod", "protocol", "family"],
            ),
            attempt_pods_evicted: counter(
                &r,
                "metadata_guard_attempt_pods_evicted_total",
                "Pods whose metadata_guard_attempts_total series were dropped to stay within the label cap",
            ),
            kernel_verdicts: counter_vec(
                &r,
                "metadata_guard_kernel_verdicts_total",
                "Every verdict the kernel programs reached, by hook; complete even when events are lost",
                &["hook", "verdict"],
            ),
            events_lost: counter(
                &r,
                "metadata_guard_events_lost_total",
                "Events the kernel could not queue for the agent (ring buffer full); still counted in kernel verdicts",
            ),
            audit_records: counter(&r, "metadata_guard_audit_records_total", "Audit records written"),
            audit_suppressed: counter_vec(
                &r,
                "metadata_guard_audit_suppressed_total",
                "Attempts not written as records of their own, by reason; reported in later records",
                &["reason"],
            ),
            audit_write_errors: counter(&r, "metadata_guard_audit_write_errors_total", "Failed audit record writes"),
            programs_attached: gauge(&r, "metadata_guard_programs_attached", "Kernel programs attached and pinned"),
            enforcement_restores: counter(
                &r,
                "metadata_guard_enforcement_restores_total",
                "Times the agent re-pinned or re-attached enforcement that had been removed from the kernel",
            ),
            identity_cache: gauge(
                &r,
                "metadata_guard_identity_cache_entries",
                "Cgroups whose workload the agent remembers",
            ),
            policy_destinations: gauge(
                &r,
                "metadata_guard_policy_destinations",
                "Blocked destination prefixes in force",
            ),
            enforcing: gauge(&r, "metadata_guard_enforcing", "1 in enforce mode, 0 in audit mode"),
            config_reloads: counter_vec(
                &r,
                "metadata_guard_config_reloads_total",
                "Configuration reloads, by result",
                &["result"],
            ),
            config_last_reload_success: gauge(
                &r,
                "metadata_guard_config_last_reload_success",
                "1 when the last configuration (re)load was applied, 0 when it was rejected",
            ),
            uplinks: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "metadata_guard_uplinks",
                        "Uplinks (devices a packet can leave the node through) by state: guarded (running the \
                         uplink program) or missing (without it)",
                    ),
                    &["state"],
                )
                .expect("valid metric definition");
                r.register(Box::new(g.clone())).expect("metric registered once");
                // Both series from the start: none yet is a count too.
                for state in ["guarded", "missing"] {
                    g.with_label_values(&[state]).set(0);
                }
                g
            },
            registry: r,
            state: Mutex::new(State::default()),
        }
        .initialised()
    }

    /// Series that should exist from the start, at zero.
    fn initialised(self) -> Metrics {
        for result in ["success", "failure"] {
            self.config_reloads.with_label_values(&[result]);
        }
        for reason in ["rate_limit", "key_limit", "write_failed"] {
            self.audit_suppressed.with_label_values(&[reason]);
        }
        self.config_last_reload_success.set(1);
        self
    }

    /// Counts one reported attempt. Host processes and vanished cgroups have no pod:
    /// they are told apart by `workload="host"|"unknown"` and share the empty
    /// namespace and pod, so they take one slot of the label cap between them.
    pub(crate) fn attempt(&self, attempt: &Attempt, workload: &Workload) {
        let (kind, namespace, pod) = match workload {
            Workload::Pod(p) => ("pod", p.namespace.clone().unwrap_or_default(), p.pod.clone().unwrap_or_default()),
            Workload::Host { .. } => ("host", String::new(), String::new()),
            Workload::Unknown => ("unknown", String::new(), String::new()),
        };
        let labels = [
            attempt.verdict_name().to_string(),
            kind.to_string(),
            namespace.clone(),
            pod.clone(),
            attempt.protocol.name(),
            attempt.family().to_string(),
        ];
        let mut state = self.state.lock().unwrap();
        state.clock += 1;
        let now = state.clock;
        let State { pods, by_last_seen, .. } = &mut *state;
        let key = (namespace, pod);
        match pods.get_mut(&key) {
            Some(series) => {
                by_last_seen.remove(&series.last_seen);
                series.last_seen = now;
            }
            None => {
                if pods.len() >= MAX_POD_SERIES {
                    self.evict_least_recent(pods, by_last_seen);
                }
                pods.insert(key.clone(), PodSeries { last_seen: now, label_sets: Vec::new() });
            }
        }
        by_last_seen.insert(now, key.clone());
        let series = pods.get_mut(&key).expect("inserted above");
        if !series.label_sets.contains(&labels) {
            series.label_sets.push(labels.clone());
        }
        // Still under the lock: an eviction between here and a later increment would
        // leave a series nothing tracks, and so never removes.
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        self.attempts.with_label_values(&refs).inc();
    }

    fn evict_least_recent(&self, pods: &mut HashMap<PodKey, PodSeries>, by_last_seen: &mut BTreeMap<u64, PodKey>) {
        let Some((_, key)) = by_last_seen.pop_first() else { return };
        for labels in pods.remove(&key).map(|s| s.label_sets).unwrap_or_default() {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            // Cannot fail: every tracked label set was created with this arity.
            let _ = self.attempts.remove_label_values(&refs);
        }
        self.attempt_pods_evicted.inc();
    }

    /// Adds what a running total grew by since last time.
    fn advance(&self, key: String, total: u64, counter: &IntCounter) {
        let mut state = self.state.lock().unwrap();
        let last = state.totals.insert(key, total).unwrap_or(0);
        // A total that shrank was reset (new maps after a layout change): start over.
        counter.inc_by(total.saturating_sub(last));
    }

    pub(crate) fn set_kernel_verdicts(&self, hook: Hook, verdict: Verdict, total: u64) {
        let c = self.kernel_verdicts.with_label_values(&[hook.name(), verdict.name()]);
        self.advance(format!("kernel/{}/{}", hook.name(), verdict.name()), total, &c);
    }

    pub(crate) fn set_events_lost(&self, total: u64) {
        self.advance("events_lost".into(), total, &self.events_lost);
    }

    pub(crate) fn set_audit_stats(&self, stats: &AuditStats) {
        self.advance("audit/records".into(), stats.records_written, &self.audit_records);
        self.advance("audit/write_errors".into(), stats.write_errors, &self.audit_write_errors);
        for (reason, total) in [
            ("rate_limit", stats.attempts_rate_limited),
            ("key_limit", stats.attempts_over_key_limit),
            ("write_failed", stats.attempts_write_failed),
        ] {
            let c = self.audit_suppressed.with_label_values(&[reason]);
            self.advance(format!("audit/suppressed/{reason}"), total, &c);
        }
    }

    pub(crate) fn set_identity_cache(&self, entries: usize) {
        self.identity_cache.set(entries as i64);
    }

    pub(crate) fn set_programs_attached(&self, n: i64) {
        self.programs_attached.set(n);
    }

    pub(crate) fn enforcement_restored(&self) {
        self.enforcement_restores.inc();
    }

    pub(crate) fn set_policy(&self, policy: &CompiledPolicy, mode: Mode) {
        self.policy_destinations.set((policy.v4.len() + policy.v6.len()) as i64);
        // Conceal mode enforces too: everything but the filtered HTTP requests is refused.
        self.enforcing.set(i64::from(mode != Mode::Audit));
    }

    /// The uplinks running the uplink program, and those without it.
    pub(crate) fn set_uplinks(&self, guarded: usize, missing: usize) {
        self.uplinks.with_label_values(&["guarded"]).set(guarded as i64);
        self.uplinks.with_label_values(&["missing"]).set(missing as i64);
    }

    /// For subsystems that register metrics of their own (conceal/metrics.rs).
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    pub(crate) fn config_reloaded(&self, ok: bool) {
        self.config_reloads.with_label_values(&[if ok { "success" } else { "failure" }]).inc();
        self.config_last_reload_success.set(i64::from(ok));
    }

    /// The Prometheus text exposition (format 0.0.4): `promtool check metrics` and
    /// every Prometheus version read it, unlike the OpenMetrics text of other crates.
    pub(crate) fn encode(&self) -> String {
        TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_else(|e| {
            // Only malformed metric definitions fail, and those are fixed in this file.
            tracing::error!("could not encode the metrics for /metrics: {e}");
            String::new()
        })
    }
}

#[cfg(test)]
mod tests;
