//! Retry budget: retries may add at most a share of the first calls (20% by default) plus a
//! floor of retries per second (10), counted over the last ten seconds, so when every worker is
//! failing, retries do not multiply the load on them. A retry the budget refuses sends the job
//! back to the queue (with its delay) instead of to another worker at once.
//!
//! The accounting is tower's `TpsBudget` (Finagle's retry budget); this adds the metric and
//! takes its settings from the distributor's configuration.

use std::time::Duration;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

/// How long a first call counts towards retries.
const TTL: Duration = Duration::from_secs(10);

/// Largest `retry_budget_percent` (ten retries per first call).
pub const MAX_PERCENT: u32 = 1000;

pub struct RetryBudget {
    inner: TpsBudget,
    /// The counter of retries refused.
    refused: &'static str,
}

impl RetryBudget {
    /// `percent` of first calls (at most [`MAX_PERCENT`]) plus `per_second` retries.
    /// `percent` of first calls (at most [`MAX_PERCENT`]) plus `per_second` retries; a
    /// refusal counts in the counter `refused`.
    pub fn with_metric(percent: u32, per_second: u32, refused: &'static str) -> RetryBudget {
        let percent = percent.min(MAX_PERCENT);
        let per_second = per_second.min(i32::MAX as u32 - 1);
        RetryBudget { inner: TpsBudget::new(TTL, per_second, percent as f32 / 100.0), refused }
    }

    /// A first call was made: it earns its share of a retry.
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let granted = self.inner.withdraw();
        if !granted {
            metrics::counter!(self.refused).increment(1);
        }
        granted
    }
}

/// Time left of `total` after `since`, if any worth a call.
pub fn remaining(total: Duration, since: Instant) -> Option<Duration> {
    total.checked_sub(since.elapsed()).filter(|left| *left >= Duration::from_millis(20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_calls_plus_a_floor() {
        let b = RetryBudget::with_metric(20, 10, "test_retries_refused_total");
        // The floor: 10 a second over the 10-second window, then it is spent.
        let granted = (0..1000).take_while(|_| b.withdraw()).count();
        assert_eq!(granted, 100);
        // 50 first calls earn 10 retries.
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        // Once the window has passed, what was spent is back.
        tokio::time::advance(TTL + Duration::from_secs(1)).await;
        assert_eq!((0..200).filter(|_| b.withdraw()).count(), 100);
        // Without a floor, retries come only from first calls.
        let none = RetryBudget::with_metric(20, 0, "test_retries_refused_total");
        assert!(!none.withdraw());
        for _ in 0..5 {
            none.deposit();
        }
        assert!(none.withdraw() && !none.withdraw());

        assert!(remaining(Duration::from_secs(1), Instant::now()).is_some());
        let start = Instant::now();
        tokio::time::advance(Duration::from_millis(990)).await;
        assert!(remaining(Duration::from_secs(1), start).is_none(), "10 ms left is not worth a call");
    }
}
