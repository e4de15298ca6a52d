// SPDX-License-Identifier: Apache-2.0
//! The audit record: one JSON object per line, in a schema that only grows.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize, Serializer};

use crate::{attempt::Attempt, pod_identity::Workload};

/// Names the layout below. Fields may be added within `v1`; renaming, removing or
/// changing the meaning of one needs `v2`.
pub(crate) const SCHEMA: &str = "metadata-guard.audit/v1";

/// One line of the audit trail: attempts by one workload to reach one blocked
/// destination, counted.
///
/// The first attempt of a workload at a destination is written at once with
/// `count: 1`; further identical attempts within the dedup window are written as one
/// follow-up record when the window ends. The `count`s of a workload's records add
/// up to its attempts, except for attempts the node could not afford to write as
/// records, which the next record names in `suppressed_since_last`.
///
/// Every field is always present but `source` (host-side and uplink attempts only) and `method`,
/// `path`, `rule` (concealed requests only); an unknown value is `null`, never `""`.
///
/// The schema, field by field, is docs/audit.md; the tests hold its table to the fields
/// this type writes and its samples to what it writes for them.
///
/// A sample, pretty-printed (the log has one compact object per line):
///
/// ```json
/// {
///   "schema": "metadata-guard.audit/v1",
///   "kind": "attempts",
///   "time": "2024-05-01T12:00:10.250Z",
///   "node": "node-a",
///   "verdict": "blocked",
///   "mode": "enforce",
///   "workload": "pod",
///   "namespace": "shop",
///   "pod": "cart-7d9f",
///   "pod_uid": "0b3c9a4e-5f7d-4c1e-9d2a-1f6e8b7c5a40",
///   "container": "app",
///   "container_id": "3f1c2d",
///   "runtime": "containerd",
///   "qos": "burstable",
///   "cgroup": null,
///   "cgroup_id": 12345,
///   "pid": 4242,
///   "comm": "curl",
///   "protocol": "tcp",
///   "family": "ipv4",
///   "destination": "169.254.169.254",
///   "port": 80,
///   "hook": "connect4",
///   "mapped": false,
///   "count": 3,
///   "first_seen": "2024-05-01T12:00:00.100Z",
///   "last_seen": "2024-05-01T12:00:04.900Z",
///   "suppressed_since_last": 0,
///   "lost_since_last": 0
/// }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    default,
    bound(
        serialize = "S: Serialize, T: Timestamp",
        deserialize = "S: Deserialize<'de> + Default, T: Deserialize<'de> + Default"
    )
)]
pub struct Record<S, T> {
    pub schema: S,
    pub kind: S,
    #[serde(serialize_with = "Timestamp::write")]
    pub time: T,
    pub node: S,
    pub verdict: S,
    pub mode: S,
    pub workload: S,
    pub namespace: Option<S>,
    pub pod: Option<S>,
    pub pod_uid: Option<S>,
    pub container: Option<S>,
    pub container_id: Option<S>,
    pub runtime: Option<S>,
    pub qos: Option<S>,
    pub cgroup: Option<S>,
    pub cgroup_id: u64,
    pub pid: Option<u32>,
    pub comm: Option<S>,
    pub protocol: String,
    pub family: S,
    /// Always present in a written record; None only in a read-back [`GapRecord`].
    pub destination: Option<IpAddr>,
    pub port: u16,
    pub hook: S,
    pub mapped: bool,
    /// Host-side attempts only: the packet's source address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
    pub count: u64,
    #[serde(serialize_with = "Timestamp::write")]
    pub first_seen: T,
    #[serde(serialize_with = "Timestamp::write")]
    pub last_seen: T,
    pub suppressed_since_last: u64,
    pub lost_since_last: u64,
    /// Conceal mode, `verdict: "concealed"` only: the refused request's method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<S>,
    /// The refused request's normalised path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<S>,
    /// The rule that refused it (e.g. `aws-iam-credentials`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<S>,
    /// `verdict: "identity"` only: the role (ARN) the pod was given or asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<S>,
    /// `verdict: "identity"` only: `served`, `token_refused` or `sts_error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_result: Option<S>,
    /// `verdict: "identity"` only: why the pod got no credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_reason: Option<S>,
}

/// A record as the agent writes it.
pub(crate) type AuditRecord<'a> = Record<&'a str, SystemTime>;

/// One line of the trail as a reader gets it back: an `AuditRecord` (`kind:
/// "attempts"`) or a `GapRecord` (`kind: "gap"`, whose attempt fields are absent:
/// their defaults here). For tools and tests that read the trail.
pub type RecordLine = Record<String, String>;

/// Suppressed attempts or lost events that no [`AuditRecord`] came along to report
/// within a dedup window (typically: the storm that caused them is over), on a line
/// of their own so that the trail accounts for them promptly.
///
/// It has only these fields, with the meanings given for [`AuditRecord`]:
///
/// ```json
/// {
///   "schema": "metadata-guard.audit/v1",
///   "kind": "gap",
///   "time": "2024-05-01T12:00:20.250Z",
///   "node": "node-a",
///   "mode": "enforce",
///   "suppressed_since_last": 0,
///   "lost_since_last": 1024
/// }
/// ```
#[derive(Clone, Debug, Serialize)]
pub(crate) struct GapRecord<'a> {
    pub schema: &'static str,
    pub kind: &'static str,
    #[serde(serialize_with = "rfc3339_millis")]
    pub time: SystemTime,
    pub node: &'a str,
    pub mode: &'a str,
    pub suppressed_since_last: u64,
    pub lost_since_last: u64,
}

impl<'a> GapRecord<'a> {
    pub(crate) fn new(time: SystemTime, node: &'a str, mode: &'a str, suppressed: u64, lost: u64) -> GapRecord<'a> {
        GapRecord {
            schema: SCHEMA,
            kind: "gap",
            time,
            node,
            mode,
            suppressed_since_last: suppressed,
            lost_since_last: lost,
        }
    }
}

/// What a record says besides the attempt and its workload.
#[derive(Clone, Copy, Debug)]
pub struct Tally {
    pub count: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub suppressed_since_last: u64,
    pub lost_since_last: u64,
}

impl<'a> Record<&'a str, SystemTime> {
    /// A record of `latest` and the attempts like it that `tally` counts.
    pub fn new(
        time: SystemTime,
        node: &'a str,
        mode: &'a str,
        workload: &'a Workload,
        latest: &'a Attempt,
        tally: Tally,
    ) -> AuditRecord<'a> {
        let identity = latest.request.as_ref().and_then(|r| r.identity.as_ref());
        let (workload_kind, pod, cgroup) = match workload {
            Workload::Pod(pod) => ("pod", Some(pod), None),
            Workload::Host { cgroup_path } => ("host", None, Some(cgroup_path.as_str())),
            Workload::Unknown => ("unknown", None, None),
        };
        AuditRecord {
            schema: SCHEMA,
            kind: "attempts",
            time,
            node,
            verdict: latest.verdict_name(),
            mode,
            workload: workload_kind,
            namespace: pod.and_then(|p| p.namespace.as_deref()),
            pod: pod.and_then(|p| p.pod.as_deref()),
            pod_uid: pod.map(|p| p.pod_uid.as_str()),
            container: pod.and_then(|p| p.container.as_deref()),
            container_id: pod.and_then(|p| p.container_id.as_deref()),
            runtime: pod.and_then(|p| p.runtime).map(super::super::pod_identity::Runtime::name),
            qos: pod.map(|p| p.qos.name()),
            cgroup,
            cgroup_id: latest.cgroup_id,
            pid: (latest.pid != 0).then_some(latest.pid),
            comm: (!latest.comm.is_empty()).then_some(latest.comm.as_str()),
            protocol: latest.protocol.name(),
            family: latest.family(),
            destination: Some(latest.destination),
            port: latest.port,
            hook: latest.hook.name(),
            mapped: latest.mapped,
            source: latest.source,
            count: tally.count,
            first_seen: tally.first_seen,
            last_seen: tally.last_seen,
            suppressed_since_last: tally.suppressed_since_last,
            lost_since_last: tally.lost_since_last,
            method: latest.request.as_ref().map(|r| r.method.as_str()),
            path: latest.request.as_ref().map(|r| r.path.as_str()),
            rule: latest.request.as_ref().map(|r| r.rule.as_str()),
            role: identity.and_then(|i| i.role.as_deref()),
            identity_result: identity.map(|i| i.result.name()),
            identity_reason: identity.and_then(|i| i.reason.as_deref()),
        }
    }
}

/// The latest time RFC 3339 can write: 9999-12-31T23:59:59.999Z.
const LAST_WRITABLE: Duration = Duration::from_millis(253_402_300_799_999);

/// How a record's times are written: RFC 3339 with milliseconds in UTC.
pub trait Timestamp {
    fn write<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
}

impl Timestamp for SystemTime {
    /// Clamps to the range RFC 3339 can express, so that a bogus kernel timestamp
    /// yields an odd date rather than a panic or a lost record.
    fn write<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        rfc3339_millis(self, serializer)
    }
}

/// A read-back line's time: the text as it was written.
impl Timestamp for String {
    fn write<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self)
    }
}

fn rfc3339_millis<S: Serializer>(time: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let clamped = UNIX_EPOCH + since_epoch.min(LAST_WRITABLE);
    serializer.collect_str(&humantime::format_rfc3339_millis(clamped))
}

#[cfg(test)]
mod tests;
