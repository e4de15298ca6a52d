// SPDX-License-Identifier: Apache-2.0
//! Scenarios at the limits: storms, the rate cap, the key limit, losses, failed
//! writes and shutdown. Whatever happens, every attempt is accounted for.

use std::time::Duration;

use super::{connect, counts, pod, secs, sum, AuditSettings, Node, RotatingFile, Sink, MAX_OPEN_WINDOWS, METADATA};

#[test]
fn a_storm_from_one_pod_is_a_handful_of_records_that_count_every_attempt() {
    let mut node = Node::new(&AuditSettings::default());
    let app = pod("uid-1", "app");
    // 100 000 attempts in 5 s, with the pipeline's 200 ms ticks in between.
    for n in 0..100_000u32 {
        let at = Duration::from_micros(u64::from(n) * 50);
        node.attempt(at, &app, connect(METADATA, 80));
        if n % 4000 == 0 {
            node.tick(at);
        }
    }
    node.tick(secs(12.0));
    let records = node.records();
    assert_eq!(counts(&records), [1, 99_999]);
    assert_eq!(node.auditor.stats().records_written, 2);
}

#[test]
fn a_storm_over_many_destinations_stays_bounded_and_balances_the_books() {
    let mut node = Node::new(&AuditSettings { rate_limit: 50, ..AuditSettings::default() });
    let app = pod("uid-1", "app");
    let attempts = 100_000u32;
    // 10 000 distinct ports, each tried 10 times, over 4 s.
    for n in 0..attempts {
        let at = Duration::from_micros(u64::from(n) * 40);
        node.attempt(at, &app, connect(METADATA, (n % 10_000) as u16));
        if n % 5000 == 0 {
            node.tick(at);
        }
    }
    node.tick(secs(30.0));
    // Someone else's attempt afterwards carries the news of what was suppressed.
    node.attempt(secs(31.0), &pod("uid-2", "app"), connect(METADATA, 80));
    node.auditor.flush_all();

    let records = node.records();
    // A burst of 50, then 50 a second at most.
    assert!(records.len() <= 50 + 50 * 31, "{} records", records.len());
    let stats = node.auditor.stats();
    let suppressed = stats.attempts_rate_limited + stats.attempts_over_key_limit + stats.attempts_write_failed;
    assert!(stats.attempts_over_key_limit > 0 && stats.attempts_rate_limited > 0, "{stats:?}");
    assert_eq!(sum(&records, "count") + suppressed, u64::from(attempts) + 1);
    assert_eq!(sum(&records, "suppressed_since_last"), suppressed, "every suppression is reported in a record");
    assert_eq!(stats.records_written, records.len() as u64);
    assert_eq!(stats.open_windows, 0);
}

#[test]
fn rate_capped_records_are_merged_into_their_follow_up_or_reported_as_suppressed() {
    let mut node = Node::new(&AuditSettings { rate_limit: 2, ..AuditSettings::default() });
    let app = pod("uid-1", "app");
    for port in 1..=5 {
        node.attempt(secs(0.0), &app, connect(METADATA, port));
    }
    let ports = |node: &Node| node.records().iter().map(|r| r["port"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!(ports(&node), [1, 2], "the cap allows a burst of two");

    // The windows end with two tokens back: ports 3 and 4 get their record
    // (count 1, the capped first attempt), port 5's is refused again.
    node.tick(secs(10.0));
    assert_eq!(ports(&node), [1, 2, 3, 4]);
    assert_eq!(node.auditor.stats().attempts_rate_limited, 1);

    node.attempt(secs(11.0), &app, connect(METADATA, 6));
    let records = node.records();
    assert_eq!(counts(&records), [1, 1, 1, 1, 1]);
    assert_eq!(records[4]["port"], 6);
    assert_eq!(records[4]["suppressed_since_last"], 1);
    assert_eq!(records[3]["suppressed_since_last"], 0);
}

#[test]
fn open_windows_are_bounded_and_the_overflow_is_suppressed_not_dropped() {
    let mut node = Node::new(&AuditSettings { rate_limit: 1_000_000, ..AuditSettings::default() });
    let extra = 10;
    for n in 0..MAX_OPEN_WINDOWS + extra {
        node.attempt(secs(0.0), &pod(&format!("uid-{n}"), "app"), connect(METADATA, 80));
    }
    let stats = node.auditor.stats();
    assert_eq!(stats.open_windows, MAX_OPEN_WINDOWS as u64);
    assert_eq!(stats.attempts_over_key_limit, extra as u64);
    assert_eq!(node.records().len(), MAX_OPEN_WINDOWS);

    // Once the windows end there is room again, and the next record tells of the gap.
    node.attempt(secs(10.0), &pod("uid-late", "app"), connect(METADATA, 80));
    let records = node.records();
    assert_eq!(records.last().unwrap()["pod_uid"], "uid-late");
    assert_eq!(records.last().unwrap()["suppressed_since_last"], extra);
    assert_eq!(node.auditor.stats().open_windows, 1);
}

#[test]
fn losses_no_record_comes_to_carry_get_a_gap_record_after_a_window() {
    let mut node = Node::new(&AuditSettings::default());
    node.auditor.report_lost(3);
    node.tick(secs(0.0));
    node.tick(secs(9.9));
    assert!(node.records().is_empty(), "a record may still come along to carry them");

    node.tick(secs(10.0));
    node.tick(secs(30.0));
    let records = node.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["kind"], "gap");
    assert_eq!(records[0]["lost_since_last"], 3);
    assert_eq!(records[0]["suppressed_since_last"], 0);
}

#[test]
fn shutdown_writes_open_windows_despite_the_cap() {
    let mut node = Node::new(&AuditSettings { rate_limit: 1, ..AuditSettings::default() });
    let app = pod("uid-1", "app");
    node.attempt(secs(0.0), &app, connect(METADATA, 1));
    node.attempt(secs(0.0), &app, connect(METADATA, 2));
    node.attempt(secs(0.5), &app, connect(METADATA, 1));
    assert_eq!(counts(&node.records()), [1]);

    node.auditor.flush_all();
    let records = node.records();
    let ports: Vec<u64> = records.iter().map(|r| r["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, [1, 1, 2]);
    assert_eq!(counts(&records), [1, 1, 1]);
    assert_eq!(node.auditor.stats().open_windows, 0);
}

#[test]
fn shutdown_reports_suppressed_counts_that_no_record_carried() {
    let mut node = Node::new(&AuditSettings { rate_limit: 1, ..AuditSettings::default() });
    let app = pod("uid-1", "app");
    for port in 1..=3 {
        node.attempt(secs(0.0), &app, connect(METADATA, port));
    }
    // Port 2's window gets the one token at its end; port 3's record is suppressed.
    node.tick(secs(10.0));
    node.auditor.flush_all();

    let records = node.records();
    let kinds: Vec<&str> = records.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["attempts", "attempts", "gap"]);
    assert_eq!(records[2]["suppressed_since_last"], 1);
    assert_eq!(sum(&records[..2], "count") + 1, 3);
}

#[test]
fn a_failed_write_is_counted_and_its_attempts_reported_by_the_next_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::new(&AuditSettings::default());
    // A file too small for any record: every write fails.
    node.auditor.out.sink = Sink::File(RotatingFile::open(&dir.path().join("audit.log"), 10, 1).unwrap());
    node.attempt(secs(0.0), &pod("uid-1", "app"), connect(METADATA, 80));
    let stats = node.auditor.stats();
    assert_eq!((stats.write_errors, stats.attempts_write_failed, stats.records_written), (1, 1, 0));

    node.auditor.out.sink = Sink::Memory(Vec::new());
    node.attempt(secs(1.0), &pod("uid-2", "app"), connect(METADATA, 80));
    assert_eq!(node.records()[0]["suppressed_since_last"], 1);
}
