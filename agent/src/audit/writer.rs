// SPDX-License-Identifier: Apache-2.0
//! Turns closed-over attempts into written records, under the node-wide rate cap,
//! and keeps the books on whatever could not be written.

use std::{
    io,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;
use tracing::{info, warn};

use super::{
    rate::TokenBucket,
    record::{AuditRecord, GapRecord, Tally},
    sink::Sink,
    window::Window,
    AuditStats,
};

/// The rate cap refused a record; its attempts are still the caller's to account for.
#[derive(Debug)]
pub(super) struct Capped;

/// Why attempts ended up in no record's count.
#[derive(Clone, Copy, Debug)]
pub(super) enum Suppression {
    RateLimit,
    KeyLimit,
}

#[derive(Debug)]
pub(super) struct Writer {
    node: String,
    mode: String,
    bucket: TokenBucket,
    pub sink: Sink,
    suppressed_since_last: u64,
    lost_since_last: u64,
    /// When a tick first saw suppressed or lost counts waiting for a record.
    gap_since: Option<Instant>,
    pub stats: AuditStats,
    /// Reused so that a record costs no allocation for its line.
    line: Vec<u8>,
    /// Why the latest write failed, while writes fail.
    failing: Option<String>,
}

impl Writer {
    pub(super) fn new(node: String, mode: String, rate_limit: u32, sink: Sink) -> Writer {
        Writer {
            node,
            mode,
            bucket: TokenBucket::new(rate_limit),
            sink,
            suppressed_since_last: 0,
            lost_since_last: 0,
            gap_since: None,
            stats: AuditStats::default(),
            line: Vec::new(),
            failing: None,
        }
    }

    /// Why records cannot be written right now; `None` while they can.
    pub(super) fn failing(&self) -> Option<&str> {
        self.failing.as_deref()
    }

    pub(super) fn set_mode(&mut self, mode: String) {
        self.mode = mode;
    }

    pub(super) fn report_lost(&mut self, events: u64) {
        self.lost_since_last = self.lost_since_last.saturating_add(events);
    }

    pub(super) fn suppress(&mut self, attempts: u64, why: Suppression) {
        self.suppressed_since_last += attempts;
        match why {
            Suppression::RateLimit => self.stats.attempts_rate_limited += attempts,
            Suppression::KeyLimit => self.stats.attempts_over_key_limit += attempts,
        }
    }

    /// Writes a record of `window`'s unreported attempts if the rate cap allows one
    /// at `now`.
    pub(super) fn write_capped(&mut self, window: &Window, now: Instant) -> Result<(), Capped> {
        if !self.bucket.try_take(now) {
            return Err(Capped);
        }
        self.write(window);
        Ok(())
    }

    /// Writes a record of `window`'s unreported attempts, whatever the cap says.
    /// Attempts whose record fails to be written are handed on to the next record.
    pub(super) fn write(&mut self, window: &Window) {
        let tally = Tally {
            count: window.unreported,
            first_seen: window.first_seen,
            last_seen: window.last_seen,
            suppressed_since_last: self.suppressed_since_last,
            lost_since_last: self.lost_since_last,
        };
        let record =
            AuditRecord::new(SystemTime::now(), &self.node, &self.mode, &window.workload, &window.latest, tally);
        let serialized = line_of(&mut self.line, &record);
        if self.emit(serialized).is_err() {
            self.stats.attempts_write_failed += window.unreported;
            self.suppressed_since_last += window.unreported;
        }
    }

    /// Writes a [`GapRecord`] if suppressed or lost counts have waited `patience`
    /// for a record to carry them and the cap allows.
    pub(super) fn write_overdue_gap(&mut self, now: Instant, patience: Duration) {
        if self.suppressed_since_last == 0 && self.lost_since_last == 0 {
            return;
        }
        let since = *self.gap_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= patience && self.bucket.try_take(now) {
            self.write_gap();
        }
    }

    /// Writes a [`GapRecord`] of any suppressed or lost counts, whatever the cap says.
    pub(super) fn write_gap(&mut self) {
        if self.suppressed_since_last == 0 && self.lost_since_last == 0 {
            return;
        }
        let record =
            GapRecord::new(SystemTime::now(), &self.node, &self.mode, self.suppressed_since_last, self.lost_since_last);
        let serialized = line_of(&mut self.line, &record);
        // On failure the counts stay pending for the next record: nothing to add.
        let _ = self.emit(serialized);
    }

    /// Writes the line that [`line_of`] left in `self.line` (split from it because
    /// records borrow `self`) and keeps the books on the outcome.
    fn emit(&mut self, serialized: io::Result<()>) -> io::Result<()> {
        let written = serialized.and_then(|()| self.sink.write_line(&self.line));
        match &written {
            Ok(()) => {
                self.stats.records_written += 1;
                self.suppressed_since_last = 0;
                self.lost_since_last = 0;
                self.gap_since = None;
                if self.failing.take().is_some() {
                    info!(sink = %self.sink, "audit records are being written again");
                }
            }
            Err(e) => {
                self.stats.write_errors += 1;
                // Once per outage: a full disk must not turn into a log storm.
                if self.failing.replace(e.to_string()).is_none() {
                    warn!(
                        sink = %self.sink,
                        "could not write an audit record ({e}); its attempts will be counted in the next \
                         written record's suppressed_since_last; check the disk or the log file's directory"
                    );
                }
            }
        }
        written
    }
}

/// Serializes `record` into `buffer` as one newline-terminated line.
fn line_of(buffer: &mut Vec<u8>, record: &impl Serialize) -> io::Result<()> {
    buffer.clear();
    serde_json::to_writer(&mut *buffer, record)?;
    buffer.push(b'\n');
    Ok(())
}
