// SPDX-License-Identifier: Apache-2.0
use std::{
    io::Write,
    net::IpAddr,
    process::{Command, Stdio},
    time::SystemTime,
};

use super::*;
use crate::{
    attempt::Protocol,
    pod_identity::{PodIdentity, Qos},
};

fn attempt() -> Attempt {
    Attempt::sample(SystemTime::now(), "169.254.169.254".parse::<IpAddr>().unwrap(), 80)
}

fn pod_identity(name: &str) -> PodIdentity {
    PodIdentity {
        namespace: Some("shop".into()),
        pod: Some(name.into()),
        pod_uid: "u".into(),
        container: None,
        container_id: None,
        runtime: None,
        qos: Qos::Burstable,
    }
}

fn pod(name: &str) -> Workload {
    Workload::Pod(pod_identity(name))
}

#[test]
fn attempts_are_counted_by_pod() {
    let m = Metrics::new();
    m.attempt(&attempt(), &pod("cart"));
    m.attempt(&attempt(), &pod("cart"));
    let text = m.encode();
    assert!(text.contains(
        r#"metadata_guard_attempts_total{family="ipv4",namespace="shop",pod="cart",protocol="tcp",verdict="blocked",workload="pod"} 2"#
    ), "{text}");
}

#[test]
fn running_totals_become_increments() {
    let m = Metrics::new();
    m.set_kernel_verdicts(Hook::Egress, Verdict::Blocked, 5);
    m.set_kernel_verdicts(Hook::Egress, Verdict::Blocked, 7);
    m.set_events_lost(4);
    assert!(m.encode().contains(r#"metadata_guard_kernel_verdicts_total{hook="egress",verdict="blocked"} 7"#));
    assert!(m.encode().contains("metadata_guard_events_lost_total 4"));
}

fn attempt_series(text: &str) -> Vec<&str> {
    text.lines().filter(|l| l.starts_with("metadata_guard_attempts_total{")).collect()
}

#[test]
fn host_processes_are_labelled_as_host_without_a_pod() {
    let m = Metrics::new();
    m.attempt(&attempt(), &Workload::Host { cgroup_path: "/system.slice/rogue.service".into() });
    let text = m.encode();
    assert!(text.contains(
        r#"metadata_guard_attempts_total{family="ipv4",namespace="",pod="",protocol="tcp",verdict="blocked",workload="host"} 1"#
    ), "{text}");
}

#[test]
fn pod_churn_evicts_the_pods_seen_least_recently() {
    let m = Metrics::new();
    m.attempt(&attempt(), &pod("steady"));
    for n in 0..MAX_POD_SERIES + 50 {
        m.attempt(&attempt(), &pod(&format!("p{n}")));
        // A pod that keeps trying stays attributed however many come and go.
        m.attempt(&attempt(), &pod("steady"));
    }
    let text = m.encode();
    let series = attempt_series(&text);
    assert_eq!(series.len(), MAX_POD_SERIES);
    let steady = series.iter().find(|l| l.contains(r#"pod="steady""#)).expect("the steady pod was evicted");
    assert!(steady.ends_with(&format!(" {}", MAX_POD_SERIES + 51)), "{steady}");
    assert!(series.iter().any(|l| l.contains(&format!("pod=\"p{}\"", MAX_POD_SERIES + 49))));
    assert!(!series.iter().any(|l| l.contains(r#"pod="p50""#)), "p0..=p50 are the least recent");
    assert!(series.iter().any(|l| l.contains(r#"pod="p51""#)));
    assert!(text.contains("metadata_guard_attempt_pods_evicted_total 51"), "{text}");
}

#[test]
fn an_evicted_pod_that_tries_again_starts_a_new_series() {
    let m = Metrics::new();
    for n in 0..=MAX_POD_SERIES {
        m.attempt(&attempt(), &pod(&format!("p{n}")));
    }
    m.attempt(&attempt(), &pod("p0"));
    let text = m.encode();
    let series = attempt_series(&text);
    assert_eq!(series.len(), MAX_POD_SERIES);
    assert!(series.iter().any(|l| l.contains(r#"pod="p0""#) && l.ends_with(" 1")), "{series:?}");
    assert!(!series.iter().any(|l| l.contains(r#"pod="p1""#)));
}

#[test]
fn every_family_passes_promtool() {
    let m = Metrics::new();
    let mut v6 = attempt();
    (v6.destination, v6.protocol, v6.verdict) =
        ("fd00:ec2::254".parse().unwrap(), Protocol::Other(47), Verdict::Audited);
    m.attempt(&v6, &Workload::Unknown);
    m.attempt(&attempt(), &Workload::Host { cgroup_path: "/init.scope".into() });
    let mut odd = PodIdentity { namespace: Some(r#"a"b\c"#.into()), ..pod_identity("p\nq") };
    odd.container = Some("app".into());
    m.attempt(&attempt(), &Workload::Pod(odd));
    for hook in Hook::PROGRAMS {
        for verdict in Verdict::ALL {
            m.set_kernel_verdicts(hook, verdict, 3);
        }
    }
    m.set_events_lost(2);
    m.set_audit_stats(&AuditStats { records_written: 4, attempts_rate_limited: 1, ..AuditStats::default() });
    m.set_policy(&CompiledPolicy::default(), Mode::Audit);
    m.set_programs_attached(6);
    m.set_identity_cache(12);
    m.config_reloaded(false);
    let text = m.encode();

    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "CI=true: promtool is needed (Debian package `prometheus`; `cargo xtask test` installs it)");
            eprintln!("\n!!!!! SKIPPED: promtool is not installed (Debian package `prometheus`) !!!!!\n");
            return;
        }
        spawned => spawned.expect("could not run promtool"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_rejected_reload_shows() {
    let m = Metrics::new();
    m.config_reloaded(false);
    assert!(m.encode().contains("metadata_guard_config_last_reload_success 0"));
}

#[test]
fn the_metrics_page_lists_every_metric_with_its_type() {
    use crate::conceal::{decide::Decision, metrics::ConcealMetrics, proxy::Outcome};
    let m = Metrics::new();
    // Every labelled family needs a series to be written at all.
    m.attempt(&attempt(), &pod("p"));
    m.set_kernel_verdicts(Hook::ALL[0], Verdict::ALL[0], 1);
    m.set_audit_stats(&AuditStats { attempts_rate_limited: 1, ..AuditStats::default() });
    m.config_reloaded(true);
    let conceal = ConcealMetrics::register(&m);
    conceal.kernel_counters(&[0; metadata_guard_common::conceal_counters::SLOTS as usize]);
    conceal.request(&Outcome {
        cgroup_id: 1,
        workload: Workload::Unknown,
        destination: "169.254.169.254:80".parse().unwrap(),
        method: "GET".into(),
        path: "/latest/user-data".into(),
        decision: Decision::Refuse { status: 404, rule: "aws-user-data".into(), reason: String::new() },
        status: 404,
        elapsed: std::time::Duration::ZERO,
        identity: None,
    });
    let identity = crate::conceal::identity::metrics::IdentityMetrics::register(&m);
    identity.request("served", "arn:aws:iam::111122223333:role/r", "payments");
    identity.sts_call("ok", std::time::Duration::from_millis(30));
    identity.pods(1);
    let written: Vec<(String, String)> = m
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split_once(' ').map(|(n, t)| (n.to_string(), t.to_string())).unwrap())
        .collect();

    let page = include_str!("../../../docs/metrics.md");
    let table =
        &page[page.find("| metric | type | labels | meaning |").expect("docs/metrics.md has a metrics table")..];
    let mut documented: Vec<(String, String)> = table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect();
    let mut written = written;
    written.sort();
    documented.sort();
    assert_eq!(documented, written, "docs/metrics.md's table against the metrics the agent writes");
}
