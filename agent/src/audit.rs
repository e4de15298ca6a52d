// SPDX-License-Identifier: Apache-2.0
//! The node's audit trail of refused (or, in audit mode, would-be refused) attempts.
//!
//! Records are JSON lines (schema: [`record::AuditRecord`]) on stdout or in a rotating file,
//! never through `tracing`, so operational logs and the audit trail can be shipped
//! and kept apart.
//!
//! A pod hammering the metadata service must not be able to flood the node, so:
//! - identical attempts within `dedup_window` share a record: the first is written
//!   at once, the rest are counted in one follow-up record when the window ends;
//! - the whole node writes at most `rate_limit` records a second;
//! - at most [`MAX_OPEN_WINDOWS`] workload/destination pairs are tracked at a time.
//!
//! Nothing is dropped silently: every attempt is either counted in some record's
//! `count` or, when a limit kept it out, in the next record's
//! `suppressed_since_last` and in [`AuditStats`]. When no record comes along
//! within a dedup window to report such counts (or kernel losses), a
//! [`record::GapRecord`] does.

mod rate;
pub(crate) mod record;
mod rotate;
mod sink;
mod window;
mod writer;

#[cfg(test)]
mod tests;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{attempt::Attempt, pod_identity::Workload};
pub use record::RecordLine;
use sink::Sink;
use window::{Key, Windows};
use writer::{Suppression, Writer};

/// Workload/destination pairs tracked at once; attempts of further pairs are
/// counted as suppressed until windows close. Bounds memory to a few MiB.
pub(crate) const MAX_OPEN_WINDOWS: usize = 4096;

/// The smallest `max_size` accepted: room for the largest possible record (a
/// `PATH_MAX` cgroup path and maximal Kubernetes names) with margin.
pub(crate) const MIN_MAX_SIZE: u64 = 64 * 1024;

/// Where audit records go and how many of them the node may write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AuditSettings {
    /// Append records to this file (rotated by size) instead of writing to stdout.
    pub log_file: Option<PathBuf>,
    /// Bytes a log file may reach before it is rotated; no file ever exceeds it.
    pub max_size: u64,
    /// Rotated files kept: `<log_file>.1` (newest) … `<log_file>.<max_files>`.
    pub max_files: u32,
    /// How long identical attempts are folded into one follow-up record.
    pub dedup_window: Duration,
    /// Records per second for the whole node, with bursts of up to one second's worth.
    pub rate_limit: u32,
}

impl Default for AuditSettings {
    fn default() -> AuditSettings {
        AuditSettings {
            log_file: None,
            max_size: 100 * 1024 * 1024,
            max_files: 5,
            dedup_window: Duration::from_secs(10),
            rate_limit: 100,
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuditSettingsError {
    #[error(
        "audit rate_limit is 0, so no audit record could ever be written: set it to at least 1 (records per second)"
    )]
    ZeroRateLimit,
    #[error("audit max_size is {0} bytes, too small to be sure a record fits: set it to at least {MIN_MAX_SIZE}")]
    MaxSizeTooSmall(u64),
}

impl AuditSettings {
    pub(crate) fn validate(&self) -> Result<(), AuditSettingsError> {
        if self.rate_limit == 0 {
            return Err(AuditSettingsError::ZeroRateLimit);
        }
        if self.log_file.is_some() && self.max_size < MIN_MAX_SIZE {
            return Err(AuditSettingsError::MaxSizeTooSmall(self.max_size));
        }
        Ok(())
    }
}

/// Counters for the metrics module; all but `open_windows` only ever grow.
///
/// `attempts_rate_limited + attempts_over_key_limit + attempts_write_failed` are the
/// attempts no record counts; every other attempt is in exactly one record's `count`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct AuditStats {
    pub records_written: u64,
    /// Attempts folded into a follow-up record instead of getting their own.
    /// Informational: they are counted, not lost.
    pub attempts_deduplicated: u64,
    /// Attempts whose record the rate cap refused.
    pub attempts_rate_limited: u64,
    /// Attempts of a new workload/destination pair while [`MAX_OPEN_WINDOWS`] were open.
    pub attempts_over_key_limit: u64,
    /// Attempts whose record could not be written.
    pub attempts_write_failed: u64,
    /// Records the sink failed to take.
    pub write_errors: u64,
    /// Dedup windows open now.
    pub open_windows: u64,
}

/// Turns attempts into audit records. Time is passed in, so the caller decides
/// what "now" is and tests need no sleeping.
#[derive(Debug)]
pub(crate) struct Auditor {
    windows: Windows,
    out: Writer,
    dedup_window: Duration,
}

impl Auditor {
    /// An auditor writing where `settings` say, for `node`, in `mode` ("enforce"
    /// or "audit").
    pub(crate) fn new(settings: &AuditSettings, node: String, mode: impl Into<String>) -> Result<Auditor> {
        settings.validate()?;
        Ok(Auditor::with_sink(settings, node, mode.into(), Sink::open(settings)?))
    }

    fn with_sink(settings: &AuditSettings, node: String, mode: String, sink: Sink) -> Auditor {
        Auditor {
            windows: Windows::new(settings.dedup_window, MAX_OPEN_WINDOWS),
            out: Writer::new(node, mode, settings.rate_limit, sink),
            dedup_window: settings.dedup_window,
        }
    }

    /// Accounts for one attempt by `workload`, seen at `now`.
    pub(crate) fn record(&mut self, attempt: &Attempt, workload: &Workload, now: Instant) {
        // Close ended windows first: this attempt may start a new one, and their
        // slots may be needed.
        self.close_ended(now);
        let key = Key::of(attempt, workload);
        if let Some(window) = self.windows.get_mut(&key) {
            window.absorb(attempt);
            self.out.stats.attempts_deduplicated += 1;
            return;
        }
        if self.windows.is_full() {
            self.out.suppress(1, Suppression::KeyLimit);
            return;
        }
        let window = self.windows.open(key, now, workload, attempt);
        // When capped, the attempt stays unreported in its window and is counted
        // in the window's follow-up record instead.
        if self.out.write_capped(window, now).is_ok() {
            window.reported();
        }
    }

    /// Writes the follow-up records of windows that ended by `now`, and a gap record
    /// for suppressed or lost counts that no record has reported for a whole window.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.close_ended(now);
        self.out.write_overdue_gap(now, self.dedup_window);
    }

    fn close_ended(&mut self, now: Instant) {
        while let Some(window) = self.windows.pop_ended(now) {
            if window.unreported > 0 && self.out.write_capped(&window, now).is_err() {
                self.out.suppress(window.unreported, Suppression::RateLimit);
            }
        }
    }

    /// Writes every open window's follow-up record and then any unreported
    /// suppressed or lost counts, at shutdown. The rate cap does not apply: there are
    /// at most [`MAX_OPEN_WINDOWS`] + 1 such records, written once, and they are the
    /// only trace of those attempts.
    pub(crate) fn flush_all(&mut self) {
        while let Some(window) = self.windows.pop_oldest() {
            if window.unreported > 0 {
                self.out.write(&window);
            }
        }
        self.out.write_gap();
    }

    /// Events the kernel could not deliver; the next record reports them.
    pub(crate) fn report_lost(&mut self, events: u64) {
        self.out.report_lost(events);
    }

    /// The mode named in records from now on ("enforce" or "audit").
    pub(crate) fn set_mode(&mut self, mode: impl Into<String>) {
        self.out.set_mode(mode.into());
    }

    /// Why audit records cannot be written right now (`None` while they can).
    pub(crate) fn failing(&self) -> Option<&str> {
        self.out.failing()
    }

    pub(crate) fn stats(&self) -> AuditStats {
        AuditStats { open_windows: self.windows.len() as u64, ..self.out.stats }
    }
}
