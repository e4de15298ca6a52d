// SPDX-License-Identifier: Apache-2.0
//! The node-wide cap on audit records per second.

use std::time::Instant;

/// A token bucket holding at most one second's worth of records, so a quiet node
/// can write a burst of `per_second` records and a busy one no more than
/// `per_second` a second on average.
#[derive(Debug)]
pub(super) struct TokenBucket {
    per_second: f64,
    tokens: f64,
    refilled: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket.
    pub(super) fn new(per_second: u32) -> TokenBucket {
        let per_second = f64::from(per_second);
        TokenBucket { per_second, tokens: per_second, refilled: None }
    }

    /// Takes a token if one is left at `now`.
    pub(super) fn try_take(&mut self, now: Instant) -> bool {
        if let Some(then) = self.refilled {
            // An earlier `now` than the last one adds nothing rather than panicking.
            let elapsed = now.saturating_duration_since(then).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        }
        self.refilled = Some(self.refilled.map_or(now, |then| then.max(now)));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn taken(bucket: &mut TokenBucket, now: Instant, tries: usize) -> usize {
        (0..tries).filter(|_| bucket.try_take(now)).count()
    }

    #[test]
    fn a_burst_gets_one_seconds_worth_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10);
        assert_eq!(taken(&mut bucket, start, 100), 10);
        assert_eq!(taken(&mut bucket, start + Duration::from_millis(500), 100), 5);
        assert_eq!(taken(&mut bucket, start + Duration::from_millis(600), 100), 1);
    }

    #[test]
    fn a_long_quiet_spell_does_not_save_up_more_than_a_second() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10);
        assert_eq!(taken(&mut bucket, start, 10), 10);
        assert_eq!(taken(&mut bucket, start + Duration::from_secs(3600), 100), 10);
    }

    #[test]
    fn time_going_backwards_grants_nothing_extra() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2);
        assert_eq!(taken(&mut bucket, start + Duration::from_secs(1), 5), 2);
        assert_eq!(taken(&mut bucket, start, 5), 0);
        assert_eq!(taken(&mut bucket, start + Duration::from_millis(1500), 5), 1);
    }
}
