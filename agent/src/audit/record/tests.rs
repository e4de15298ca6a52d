// SPDX-License-Identifier: Apache-2.0
//! The record as written: its documented samples, nulls, clamped times, reading it back.

use std::net::Ipv4Addr;

use super::*;
use crate::pod_identity::{PodIdentity, Qos, Runtime};

fn at(rfc3339: &str) -> SystemTime {
    humantime::parse_rfc3339(rfc3339).unwrap()
}

fn sample_workload() -> Workload {
    Workload::Pod(PodIdentity {
        namespace: Some("shop".into()),
        pod: Some("cart-7d9f".into()),
        pod_uid: "0b3c9a4e-5f7d-4c1e-9d2a-1f6e8b7c5a40".into(),
        container: Some("app".into()),
        container_id: Some("3f1c2d".into()),
        runtime: Some(Runtime::Containerd),
        qos: Qos::Burstable,
    })
}

fn sample_attempt() -> Attempt {
    Attempt::sample(at("2024-05-01T12:00:04.900Z"), IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), 80)
}

#[test]
fn a_concealed_request_names_method_path_and_rule_and_others_do_not() {
    let workload = sample_workload();
    let mut attempt = sample_attempt();
    let tally = Tally {
        count: 1,
        first_seen: attempt.time,
        last_seen: attempt.time,
        suppressed_since_last: 0,
        lost_since_last: 0,
    };
    let plain = AuditRecord::new(attempt.time, "n", "conceal", &workload, &attempt, tally);
    let plain = serde_json::to_value(&plain).unwrap();
    assert!(plain.get("method").is_none() && plain.get("rule").is_none(), "{plain}");
    attempt.request = Some(crate::attempt::ConcealedRequest {
        method: "GET".into(),
        path: "/latest/meta-data/iam/info".into(),
        rule: "aws-iam-credentials".into(),
        identity: None,
    });
    let record = AuditRecord::new(attempt.time, "n", "conceal", &workload, &attempt, tally);
    let record = serde_json::to_value(&record).unwrap();
    assert_eq!(record["verdict"], "concealed");
    assert_eq!(record["method"], "GET");
    assert_eq!(record["path"], "/latest/meta-data/iam/info");
    assert_eq!(record["rule"], "aws-iam-credentials");
    assert!(record.get("role").is_none() && record.get("identity_result").is_none(), "{record}");
}

#[test]
fn an_identity_answer_names_the_role_and_the_result() {
    let workload = sample_workload();
    let mut attempt = sample_attempt();
    let tally = Tally {
        count: 1,
        first_seen: attempt.time,
        last_seen: attempt.time,
        suppressed_since_last: 0,
        lost_since_last: 0,
    };
    attempt.request = Some(crate::attempt::ConcealedRequest {
        method: "GET".into(),
        path: "/latest/meta-data/iam/security-credentials/payments-api".into(),
        rule: "aws-identity".into(),
        identity: Some(crate::attempt::IdentityNote {
            role: Some("arn:aws:iam::111122223333:role/payments-api".into()),
            result: crate::attempt::IdentityResult::Served,
            reason: None,
        }),
    });
    let record =
        serde_json::to_value(AuditRecord::new(attempt.time, "n", "conceal", &workload, &attempt, tally)).unwrap();
    assert_eq!(record["verdict"], "identity");
    assert_eq!(record["role"], "arn:aws:iam::111122223333:role/payments-api");
    assert_eq!(record["identity_result"], "served");
    assert!(record.get("identity_reason").is_none(), "{record}");
}

/// The JSON blocks of a Markdown text, in order.
fn json_blocks<'a>(mut lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut samples = Vec::new();
    while lines.any(|l| l == "```json") {
        samples.push(lines.by_ref().take_while(|l| *l != "```").collect::<Vec<_>>().join("\n"));
    }
    samples
}

/// The audit trail's page for users.
const AUDIT_PAGE: &str = include_str!("../../../../docs/audit.md");

/// The record and the gap record of the samples, pretty-printed.
fn serialized_samples() -> [String; 2] {
    let workload = sample_workload();
    let attempt = sample_attempt();
    let tally = Tally {
        count: 3,
        first_seen: at("2024-05-01T12:00:00.100Z"),
        last_seen: attempt.time,
        suppressed_since_last: 0,
        lost_since_last: 0,
    };
    let record = AuditRecord::new(at("2024-05-01T12:00:10.250Z"), "node-a", "enforce", &workload, &attempt, tally);
    let gap = GapRecord::new(at("2024-05-01T12:00:20.250Z"), "node-a", "enforce", 0, 1024);
    [serde_json::to_string_pretty(&record).unwrap(), serde_json::to_string_pretty(&gap).unwrap()]
}

#[test]
fn the_documented_samples_are_what_the_serializer_writes() {
    let rustdoc = include_str!("../record.rs")
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("///"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l));
    assert_eq!(json_blocks(rustdoc), serialized_samples(), "the samples in record.rs");
    assert_eq!(json_blocks(AUDIT_PAGE.lines()), serialized_samples(), "docs/audit.md's samples");
}

#[test]
fn the_documented_schema_lists_every_field_written() {
    // A record with every optional field: a host-side attempt and a request a pod's
    // own identity could not serve.
    let mut attempt = sample_attempt();
    attempt.source = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
    attempt.request = Some(crate::attempt::ConcealedRequest {
        method: "GET".into(),
        path: "/latest/meta-data/iam/security-credentials/r".into(),
        rule: "aws-identity".into(),
        identity: Some(crate::attempt::IdentityNote {
            role: Some("arn:aws:iam::111122223333:role/r".into()),
            result: crate::attempt::IdentityResult::StsError,
            reason: Some("AccessDenied: not authorized".into()),
        }),
    });
    let tally = Tally {
        count: 1,
        first_seen: attempt.time,
        last_seen: attempt.time,
        suppressed_since_last: 0,
        lost_since_last: 0,
    };
    let workload = sample_workload();
    let record = AuditRecord::new(attempt.time, "n", "conceal", &workload, &attempt, tally);
    let written: Vec<String> = serde_json::to_value(&record).unwrap().as_object().unwrap().keys().cloned().collect();
    // The first column of the schema table: `field`, or `a`, `b`, `c` for fields
    // documented together.
    let table = &AUDIT_PAGE[AUDIT_PAGE.find("| field | type | meaning |").expect("docs/audit.md has a schema table")..];
    let mut documented: Vec<String> = table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .flat_map(|row| row.split('|').nth(1).unwrap().split(',').map(|f| f.trim().trim_matches('`').to_string()))
        .collect();
    let mut written = written;
    written.sort();
    documented.sort();
    assert_eq!(documented, written, "docs/audit.md's schema table against the serializer");
}

#[test]
fn unknown_names_are_null_and_a_record_is_one_line() {
    let mut attempt = sample_attempt();
    attempt.pid = 0;
    attempt.comm.clear();
    let tally = Tally {
        count: 1,
        first_seen: attempt.time,
        last_seen: attempt.time,
        suppressed_since_last: 0,
        lost_since_last: 0,
    };
    let record = AuditRecord::new(attempt.time, "node-a", "audit", &Workload::Unknown, &attempt, tally);
    let line = serde_json::to_string(&record).unwrap();
    assert!(!line.contains('\n'));
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    for field in ["namespace", "pod", "pod_uid", "container", "container_id", "runtime", "qos", "cgroup", "pid", "comm"]
    {
        assert!(value[field].is_null(), "{field} should be null in {line}");
    }
    assert_eq!(value["workload"], "unknown");
}

#[test]
fn timestamps_out_of_range_are_clamped_not_fatal() {
    let mut attempt = sample_attempt();
    attempt.time = UNIX_EPOCH - Duration::from_secs(1);
    let far_future = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
    let tally = Tally {
        count: 1,
        first_seen: attempt.time,
        last_seen: far_future,
        suppressed_since_last: 0,
        lost_since_last: 0,
    };
    let record = AuditRecord::new(far_future, "node-a", "enforce", &Workload::Unknown, &attempt, tally);
    let value = serde_json::to_value(&record).unwrap();
    assert_eq!(value["first_seen"], "1970-01-01T00:00:00.000Z");
    assert_eq!(value["last_seen"], "9999-12-31T23:59:59.999Z");
}

#[test]
fn a_written_record_reads_back_field_for_field() {
    let (attempt, workload) = (sample_attempt(), sample_workload());
    let tally = Tally {
        count: 3,
        first_seen: at("2024-05-01T12:00:00.100Z"),
        last_seen: attempt.time,
        suppressed_since_last: 2,
        lost_since_last: 1,
    };
    let record = AuditRecord::new(at("2024-05-01T12:00:10.250Z"), "node-a", "enforce", &workload, &attempt, tally);
    let line: RecordLine = serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
    let written = serde_json::to_value(&record).unwrap();
    let read = serde_json::json!({
        "schema": line.schema, "kind": line.kind, "time": line.time, "node": line.node,
        "verdict": line.verdict, "mode": line.mode, "workload": line.workload,
        "namespace": line.namespace, "pod": line.pod, "pod_uid": line.pod_uid, "container": line.container,
        "container_id": line.container_id, "runtime": line.runtime, "qos": line.qos, "cgroup": line.cgroup,
        "cgroup_id": line.cgroup_id, "pid": line.pid, "comm": line.comm, "protocol": line.protocol,
        "family": line.family, "destination": line.destination, "port": line.port, "hook": line.hook,
        "mapped": line.mapped, "count": line.count, "first_seen": line.first_seen, "last_seen": line.last_seen,
        "suppressed_since_last": line.suppressed_since_last, "lost_since_last": line.lost_since_last,
    });
    assert_eq!(written, read, "RecordLine must have every field AuditRecord writes");
    let gap = GapRecord::new(record.time, "node-a", "enforce", 5, 6);
    let line: RecordLine = serde_json::from_str(&serde_json::to_string(&gap).unwrap()).unwrap();
    assert_eq!((line.kind.as_str(), line.suppressed_since_last, line.lost_since_last, line.count), ("gap", 5, 6, 0));
}
