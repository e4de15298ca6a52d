//! Scenarios for the whole auditor: attempts in, records out, books balanced.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant, SystemTime},
};

use serde_json::Value;

use super::{rotate::RotatingFile, sink::Sink, AuditSettings, Auditor, MAX_OPEN_WINDOWS};
use crate::{
    attempt::{Attempt, Hook, Protocol, Verdict},
    pod_identity::{PodIdentity, Qos, Runtime, Workload},
};

mod limits;

const METADATA: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));

/// An auditor writing to memory, with a clock the scenario moves by hand.
struct Node {
    auditor: Auditor,
    start: Instant,
    wall: SystemTime,
}

impl Node {
    fn new(settings: &AuditSettings) -> Node {
        Node {
            auditor: Auditor::with_sink(settings, "node-a".into(), "enforce".into(), Sink::Memory(Vec::new())),
            start: Instant::now(),
            wall: humantime::parse_rfc3339("2024-05-01T12:00:00Z").unwrap(),
        }
    }

    /// `workload` tries `attempt`'s destination `at` into the scenario.
    fn attempt(&mut self, at: Duration, workload: &Workload, mut attempt: Attempt) {
        attempt.time = self.wall + at;
        self.auditor.record(&attempt, workload, self.start + at);
    }

    fn tick(&mut self, at: Duration) {
        self.auditor.tick(self.start + at);
    }

    fn records(&self) -> Vec<Value> {
        let Sink::Memory(lines) = &self.auditor.out.sink else { unreachable!("scenarios write to memory") };
        lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn wall(&self, at: Duration) -> String {
        humantime::format_rfc3339_millis(self.wall + at).to_string()
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn pod(uid: &str, container: &str) -> Workload {
    Workload::Pod(PodIdentity {
        namespace: Some("shop".into()),
        pod: Some("cart-7d9f".into()),
        pod_uid: uid.into(),
        container: Some(container.into()),
        container_id: Some(format!("id-{container}")),
        runtime: Some(Runtime::Containerd),
        qos: Qos::Burstable,
    })
}

fn connect(destination: IpAddr, port: u16) -> Attempt {
    Attempt {
        time: SystemTime::UNIX_EPOCH,
        cgroup_id: 4711,
        netns_cookie: 9,
        pid: 4242,
        tid: 4242,
        comm: "curl".into(),
        destination,
        port,
        protocol: Protocol::Tcp,
        hook: Hook::Connect4,
        verdict: Verdict::Blocked,
        mapped: false,
        request: None,
        source: None,
        ingress_ifindex: 0,
    }
}

fn counts(records: &[Value]) -> Vec<u64> {
    records.iter().map(|r| r["count"].as_u64().unwrap()).collect()
}

fn sum(records: &[Value], field: &str) -> u64 {
    records.iter().map(|r| r[field].as_u64().unwrap()).sum()
}

#[test]
fn first_attempt_is_written_at_once_with_every_identity_field() {
    let mut node = Node::new(&AuditSettings::default());
    node.attempt(secs(1.0), &pod("uid-1", "app"), connect(METADATA, 80));

    let records = node.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    let when = node.wall(secs(1.0));
    for (field, expected) in [
        ("schema", "metadata-guard.audit/v1"),
        ("kind", "attempts"),
        ("node", "node-a"),
        ("verdict", "blocked"),
        ("mode", "enforce"),
        ("workload", "pod"),
        ("namespace", "shop"),
        ("pod", "cart-7d9f"),
        ("pod_uid", "uid-1"),
        ("container", "app"),
        ("container_id", "id-app"),
        ("runtime", "containerd"),
        ("qos", "burstable"),
        ("comm", "curl"),
        ("protocol", "tcp"),
        ("family", "ipv4"),
        ("destination", "169.254.169.254"),
        ("hook", "connect4"),
        ("first_seen", &when),
        ("last_seen", &when),
    ] {
        assert_eq!(r[field], expected, "field {field}");
    }
    assert_eq!(r["cgroup"], Value::Null);
    assert_eq!((r["pid"].as_u64(), r["port"].as_u64(), r["count"].as_u64()), (Some(4242), Some(80), Some(1)));
    assert_eq!(r["mapped"], false);
    assert!(humantime::parse_rfc3339(r["time"].as_str().unwrap()).is_ok());
}

#[test]
fn repeated_attempts_in_one_window_make_one_follow_up_record() {
    let mut node = Node::new(&AuditSettings::default());
    let app = pod("uid-1", "app");
    for at in [0.0, 1.0, 2.0, 3.0, 9.5] {
        node.attempt(secs(at), &app, connect(METADATA, 80));
    }
    node.tick(secs(9.9));
    assert_eq!(counts(&node.records()), [1], "the window is still open");

    node.tick(secs(10.0));
    node.tick(secs(30.0));
    let records = node.records();
    assert_eq!(counts(&records), [1, 4]);
    assert_eq!(records[1]["first_seen"], node.wall(secs(1.0)));
    assert_eq!(records[1]["last_seen"], node.wall(secs(9.5)));
    assert_eq!(node.auditor.stats().attempts_deduplicated, 4);

    // After the window, the next attempt is news again and is written at once.
    node.attempt(secs(31.0), &app, connect(METADATA, 80));
    assert_eq!(counts(&node.records()), [1, 4, 1]);
}

#[test]
fn a_lone_attempt_gets_no_follow_up_record() {
    let mut node = Node::new(&AuditSettings::default());
    node.attempt(secs(0.0), &pod("uid-1", "app"), connect(METADATA, 80));
    node.tick(secs(60.0));
    node.auditor.flush_all();
    assert_eq!(counts(&node.records()), [1]);
}

#[test]
fn different_destinations_ports_protocols_and_containers_are_separate_records() {
    let mut node = Node::new(&AuditSettings::default());
    let metadata_v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254));
    let mut udp = connect(METADATA, 80);
    udp.protocol = Protocol::Udp;
    node.attempt(secs(0.0), &pod("uid-1", "app"), connect(METADATA, 80));
    node.attempt(secs(0.1), &pod("uid-1", "app"), connect(METADATA, 443));
    node.attempt(secs(0.2), &pod("uid-1", "app"), connect(metadata_v6, 80));
    node.attempt(secs(0.3), &pod("uid-1", "app"), udp);
    node.attempt(secs(0.4), &pod("uid-1", "sidecar"), connect(METADATA, 80));
    node.attempt(secs(0.5), &pod("uid-2", "app"), connect(METADATA, 80));

    let records = node.records();
    assert_eq!(counts(&records), [1; 6]);
    assert_eq!(records[2]["family"], "ipv6");
    assert_eq!(records[3]["protocol"], "udp");
    assert_eq!(records[4]["container"], "sidecar");
    assert_eq!(records[5]["pod_uid"], "uid-2");
}

#[test]
fn host_process_record_names_its_cgroup() {
    let mut node = Node::new(&AuditSettings::default());
    let host = Workload::Host { cgroup_path: "/system.slice/cloud-init.service".into() };
    node.attempt(secs(0.0), &host, connect(METADATA, 80));

    let r = &node.records()[0];
    assert_eq!(r["workload"], "host");
    assert_eq!(r["cgroup"], "/system.slice/cloud-init.service");
    for field in ["namespace", "pod", "pod_uid", "container", "container_id", "runtime", "qos"] {
        assert_eq!(r[field], Value::Null, "field {field}");
    }
}

#[test]
fn lost_events_and_mode_changes_show_in_the_next_record() {
    let mut node = Node::new(&AuditSettings::default());
    node.auditor.report_lost(5);
    node.auditor.report_lost(2);
    node.auditor.set_mode("audit");
    let mut audited = connect(METADATA, 80);
    audited.verdict = Verdict::Audited;
    node.attempt(secs(0.0), &pod("uid-1", "app"), audited.clone());
    node.attempt(secs(0.1), &pod("uid-2", "app"), audited);

    let records = node.records();
    assert_eq!(records[0]["lost_since_last"], 7);
    assert_eq!(records[1]["lost_since_last"], 0);
    assert_eq!(records[0]["mode"], "audit");
    assert_eq!(records[0]["verdict"], "audited");
}

#[test]
fn an_audit_log_file_holds_one_record_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit/audit.log");
    let settings = AuditSettings { log_file: Some(path.clone()), ..AuditSettings::default() };
    let mut auditor = Auditor::new(&settings, "node-a".into(), "enforce").unwrap();
    let start = Instant::now();
    auditor.record(&connect(METADATA, 80), &pod("uid-1", "app"), start);
    auditor.record(&connect(METADATA, 443), &pod("uid-1", "app"), start);

    let text = std::fs::read_to_string(&path).unwrap();
    let ports: Vec<u64> =
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, [80, 443]);
}

#[test]
fn settings_that_could_never_write_a_record_are_refused() {
    let settings = AuditSettings { rate_limit: 0, ..AuditSettings::default() };
    assert!(Auditor::new(&settings, "node-a".into(), "enforce").is_err());
    let settings = AuditSettings { log_file: Some("/tmp/x".into()), max_size: 100, ..AuditSettings::default() };
    assert!(settings.validate().is_err());
}
