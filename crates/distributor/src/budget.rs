//! Retry budget: retries may add at most `ratio` of the first calls (20% by default) plus a
//! floor of `per_second` retries each second, so when every worker is failing, retries do not
//! multiply the load on them. A retry the budget refuses sends the job back to the queue (with
//! its delay) instead of to another worker at once.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    per_second: f64,
    /// Tokens saved at most (ten seconds of the floor, or 100 first calls' worth).
    max: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(ratio: f64, per_second: f64) -> RetryBudget {
        let max = (per_second * 10.0).max(ratio * 100.0).max(1.0);
        RetryBudget { ratio, per_second, max, state: Mutex::new((max, Instant::now())) }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let now = Instant::now();
        let elapsed = now.duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.per_second).min(self.max);
        state.1 = now;
    }

    /// A first call was made: it earns `ratio` of a retry.
    pub fn deposit(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state);
        state.0 = (state.0 + self.ratio).min(self.max);
    }

    /// Takes one retry from the budget, if there is one.
    pub fn withdraw(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.refill(&mut state);
        // A hair under one counts: fifty deposits of 0.2 must buy ten retries.
        if state.0 >= 1.0 - 1e-9 {
            state.0 = (state.0 - 1.0).max(0.0);
            true
        } else {
            metrics::counter!("pixmesh_distributor_retries_refused_total").increment(1);
            false
        }
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(0.2, 10.0)
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
        let b = RetryBudget::new(0.2, 10.0);
        // Starts with its savings (100 tokens), then is empty.
        let mut granted = 0;
        while b.withdraw() {
            granted += 1;
        }
        assert_eq!(granted, 100);
        // 50 first calls earn 10 retries.
        for _ in 0..50 {
            b.deposit();
        }
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        // A second of time earns the floor: 10.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        assert!(remaining(Duration::from_secs(1), Instant::now()).is_some());
        let start = Instant::now();
        tokio::time::advance(Duration::from_millis(990)).await;
        assert!(remaining(Duration::from_secs(1), start).is_none(), "10 ms left is not worth a call");
    }
}
