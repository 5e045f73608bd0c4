//! A circuit breaker per instance: a sliding window of the last calls (the last N, or those of
//! the last T); it opens when the failure rate or the slow-call rate crosses its threshold
//! (once the window holds enough calls) or after N failures in a row, refuses calls while
//! open, lets a few trial calls through when half-open, and closes again when they succeed.
//!
//! Ours because tower has none, and the ones on crates.io either lack the slow-call rate or
//! half-open trial limits, or wrap the call themselves (we also need the breaker's verdict
//! when *choosing* a worker, before any call).

use serde::Deserialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// The most calls a time-based window keeps, whatever its length (bounds its memory).
const MAX_WINDOW_CALLS: usize = 10_000;

/// An instance's breaker: `[distributor.breaker]`, a sidecar service's `breaker`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Count-based window: the last this many calls.
    pub window_calls: usize,
    /// Time-based window instead, when above 0: the calls of the last this many ms.
    pub window_ms: u64,
    /// Calls the window must hold before the rates count.
    pub min_calls: usize,
    /// Open when at least this share of the window failed.
    pub failure_rate_percent: u32,
    /// Open when at least this share of the window was slower than `slow_call_ms`.
    pub slow_call_rate_percent: u32,
    /// A call slower than this counts as slow; 0 = 80% of the call deadline.
    pub slow_call_ms: u64,
    /// Open after this many failed calls in a row, whatever the window says (a worker that
    /// stopped answering fails every call it gets, but gets few); 0 = off.
    pub consecutive_failures: u32,
    /// How long it stays open before trial calls the first time; doubled each time it opens
    /// again without having closed in between, up to 8×.
    pub open_ms: u64,
    /// Trial calls when half-open; all must succeed to close.
    pub half_open_calls: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window_calls: 20,
            window_ms: 0,
            min_calls: 5,
            failure_rate_percent: 50,
            slow_call_rate_percent: 80,
            slow_call_ms: 0,
            consecutive_failures: 3,
            open_ms: 5_000,
            half_open_calls: 2,
        }
    }
}

impl BreakerConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window_ms == 0 && self.window_calls == 0 {
            return Err("breaker.window_calls must be at least 1 (or set window_ms)".into());
        }
        if !(1..=100).contains(&self.failure_rate_percent) || !(1..=100).contains(&self.slow_call_rate_percent) {
            return Err("breaker rate thresholds must be between 1 and 100 percent".into());
        }
        if self.open_ms == 0 || self.half_open_calls == 0 {
            return Err("breaker.open_ms and half_open_calls must be at least 1".into());
        }
        Ok(())
    }

    /// With `slow_call_ms` filled in from the call deadline when it was left at 0.
    pub fn for_deadline(&self, call_timeout: Duration) -> BreakerConfig {
        let mut config = self.clone();
        if config.slow_call_ms == 0 {
            config.slow_call_ms = (call_timeout.as_millis() as u64 * 4 / 5).max(1);
        }
        config
    }

    fn slow_call(&self) -> Duration {
        Duration::from_millis(if self.slow_call_ms == 0 { u64::MAX } else { self.slow_call_ms })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The value of the `pixmesh_worker_breaker_state` gauge.
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Call {
    failed: bool,
    slow: bool,
    at: Instant,
}

#[derive(Debug)]
struct Inner {
    state: State,
    window: VecDeque<Call>,
    opened_at: Instant,
    /// Openings in a row without a close (for the backoff).
    openings: u32,
    /// Failed calls in a row.
    consecutive_failures: u32,
    /// Half-open: trial calls handed out, and how many of them succeeded.
    trials: usize,
    trial_successes: usize,
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    name: String,
    /// The counter of transitions (by the state entered), and the labels it adds.
    transitions: &'static str,
    labels: Vec<(&'static str, String)>,
}

impl Breaker {
    /// A breaker for the instance `name`, counting its transitions in the counter `transitions`
    /// (with `labels` beside `to`).
    pub fn new(name: &str, config: BreakerConfig, transitions: &'static str, labels: Vec<(&'static str, String)>) -> Breaker {
        let inner = Inner {
            state: State::Closed,
            window: VecDeque::new(),
            opened_at: Instant::now(),
            openings: 0,
            consecutive_failures: 0,
            trials: 0,
            trial_successes: 0,
        };
        Breaker { config, inner: Mutex::new(inner), name: name.to_string(), transitions, labels }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the state whole, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        if inner.state == to {
            return;
        }
        tracing::warn!(instance = %self.name, from = ?inner.state, to = ?to, "circuit breaker");
        let mut labels: Vec<metrics::Label> = self.labels.iter().map(|(k, v)| metrics::Label::new(*k, v.clone())).collect();
        labels.push(metrics::Label::new("to", format!("{to:?}").to_lowercase()));
        metrics::counter!(self.transitions, labels).increment(1);
        inner.state = to;
        match to {
            State::Open => {
                inner.opened_at = Instant::now();
                inner.openings = inner.openings.saturating_add(1);
            }
            State::HalfOpen => {
                inner.trials = 0;
                inner.trial_successes = 0;
            }
            State::Closed => {
                inner.window.clear();
                inner.openings = 0;
                inner.consecutive_failures = 0;
            }
        }
    }

    /// How long the current opening lasts: `open_ms`, doubled per opening in a row, ≤ 8×.
    fn open_time(&self, inner: &Inner) -> Duration {
        Duration::from_millis(self.config.open_ms) * (1u32 << inner.openings.saturating_sub(1).min(3))
    }

    /// Opens at once, whatever the window says: the worker refused the connection, so it is not
    /// there (a crashed process, a stopped pod). Trial calls probe it again with backoff.
    pub fn trip(&self) {
        let mut inner = self.lock();
        self.refresh(&mut inner);
        if inner.state != State::Open {
            self.transition(&mut inner, State::Open);
        }
    }

    /// The state now (an open breaker whose time is up reads as half-open).
    pub fn state(&self) -> State {
        let mut inner = self.lock();
        self.refresh(&mut inner);
        inner.state
    }

    fn refresh(&self, inner: &mut Inner) {
        if inner.state == State::Open && inner.opened_at.elapsed() >= self.open_time(inner) {
            self.transition(inner, State::HalfOpen);
        }
    }

    /// Whether a call may go to this worker now, without taking a trial slot.
    pub fn would_allow(&self) -> bool {
        let mut inner = self.lock();
        self.refresh(&mut inner);
        match inner.state {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen => inner.trials < self.config.half_open_calls,
        }
    }

    /// Takes permission for one call (a trial slot when half-open).
    pub fn try_call(&self) -> bool {
        let mut inner = self.lock();
        self.refresh(&mut inner);
        match inner.state {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen if inner.trials < self.config.half_open_calls => {
                inner.trials += 1;
                true
            }
            State::HalfOpen => false,
        }
    }

    /// Records how a permitted call went.
    pub fn record(&self, failed: bool, latency: Duration) {
        let slow = latency >= self.config.slow_call();
        let mut inner = self.lock();
        match inner.state {
            State::HalfOpen => {
                if failed || slow {
                    self.transition(&mut inner, State::Open);
                } else {
                    inner.trial_successes += 1;
                    if inner.trial_successes >= self.config.half_open_calls {
                        self.transition(&mut inner, State::Closed);
                    }
                }
            }
            // A late answer to a call made before the breaker opened changes nothing.
            State::Open => {}
            State::Closed => {
                let now = Instant::now();
                inner.window.push_back(Call { failed, slow, at: now });
                self.slide(&mut inner, now);
                inner.consecutive_failures = if failed { inner.consecutive_failures.saturating_add(1) } else { 0 };
                let in_a_row = self.config.consecutive_failures > 0 && inner.consecutive_failures >= self.config.consecutive_failures;
                if in_a_row || self.rates_exceeded(&inner) {
                    self.transition(&mut inner, State::Open);
                }
            }
        }
    }

    /// Drops the calls that left the window: beyond its length, or older than its time span.
    fn slide(&self, inner: &mut Inner, now: Instant) {
        let (max_len, span) = match self.config.window_ms {
            0 => (self.config.window_calls, None),
            ms => (MAX_WINDOW_CALLS, Some(Duration::from_millis(ms))),
        };
        while inner.window.len() > max_len {
            inner.window.pop_front();
        }
        if let Some(span) = span {
            while inner.window.front().is_some_and(|c| now.duration_since(c.at) > span) {
                inner.window.pop_front();
            }
        }
    }

    fn rates_exceeded(&self, inner: &Inner) -> bool {
        let n = inner.window.len();
        if n == 0 || n < self.config.min_calls {
            return false;
        }
        let percent = |count: usize| (count * 100 / n) as u32;
        percent(inner.window.iter().filter(|c| c.failed).count()) >= self.config.failure_rate_percent
            || percent(inner.window.iter().filter(|c| c.slow).count()) >= self.config.slow_call_rate_percent
    }

    /// Gives back a trial slot that was taken but not used (no call was made).
    pub fn release_unused(&self) {
        let mut inner = self.lock();
        if inner.state == State::HalfOpen && inner.trials > 0 {
            inner.trials -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        let config =
            BreakerConfig { window_calls: 10, min_calls: 4, consecutive_failures: 0, slow_call_ms: 10_000, ..BreakerConfig::default() };
        Breaker::new("w", config, "test_transitions_total", vec![])
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failures_half_opens_and_closes_on_recovery() {
        let b = breaker();
        let ok = Duration::from_millis(10);
        // Too few calls to judge: three failures keep it closed.
        for _ in 0..3 {
            assert!(b.try_call());
            b.record(true, ok);
        }
        assert_eq!(b.state(), State::Closed);
        // The fourth makes 4 of 4 failed.
        assert!(b.try_call());
        b.record(true, ok);
        assert_eq!(b.state(), State::Open);
        assert!(!b.try_call() && !b.would_allow());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), State::HalfOpen);
        // Two trial calls, no third.
        assert!(b.try_call() && b.try_call());
        assert!(!b.try_call());
        b.record(false, ok);
        b.record(true, ok);
        assert_eq!(b.state(), State::Open, "a failed trial opens it again");
        tokio::time::advance(Duration::from_secs(10)).await; // for twice as long
        assert!(b.try_call() && b.try_call());
        b.record(false, ok);
        b.record(false, ok);
        assert_eq!(b.state(), State::Closed);
        assert!(b.try_call());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_trips_it_and_probes_back_off() {
        let b = breaker();
        b.trip();
        assert_eq!(b.state(), State::Open, "no window needed");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_call());
        b.trip(); // the probe is refused too
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), State::Open, "second opening lasts 10 s");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.try_call());
        b.record(true, Duration::from_millis(1));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(b.state(), State::Open, "third lasts 20 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(b.try_call() && b.try_call());
        b.record(false, Duration::from_millis(1));
        b.record(false, Duration::from_millis(1));
        assert_eq!(b.state(), State::Closed);
        b.trip();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(b.state(), State::HalfOpen, "closing reset the backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_slow_calls_and_forgets_old_failures() {
        let b = breaker();
        for _ in 0..8 {
            b.record(false, Duration::from_secs(11));
        }
        assert_eq!(b.state(), State::Open, "8 of 8 slower than the slow-call threshold");

        let b = breaker();
        // A failure rate under 50% over the window keeps it closed; old failures slide out.
        for i in 0..30 {
            b.record(i % 3 == 2, Duration::from_millis(5));
        }
        assert_eq!(b.state(), State::Closed);
        b.release_unused();
        assert_eq!(b.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_whatever_the_window_says() {
        let b = Breaker::new("w", BreakerConfig::default(), "test_transitions_total", vec![]);
        let ok = Duration::from_millis(5);
        for _ in 0..17 {
            b.record(false, ok);
        }
        // 2 of 19 failed, but in a row: still closed; a success resets the run.
        b.record(true, ok);
        b.record(true, ok);
        b.record(false, ok);
        b.record(true, ok);
        b.record(true, ok);
        assert_eq!(b.state(), State::Closed);
        b.record(true, ok);
        assert_eq!(b.state(), State::Open, "the third failure in a row opens it (4 of 20 is under 50%)");
    }

    #[tokio::test(start_paused = true)]
    async fn a_time_based_window_forgets_calls_older_than_its_span() {
        let config = BreakerConfig { window_ms: 10_000, min_calls: 4, consecutive_failures: 0, ..BreakerConfig::default() };
        let b = Breaker::new("w", config, "test_transitions_total", vec![]);
        let ok = Duration::from_millis(5);
        // Three failures, then 11 s of nothing: they slide out.
        for _ in 0..3 {
            b.record(true, ok);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..3 {
            b.record(false, ok);
        }
        b.record(true, ok);
        assert_eq!(b.state(), State::Closed, "1 of 4 in the last 10 s");
        // Many calls within the span all count, not just the last 20.
        for _ in 0..40 {
            b.record(false, ok);
        }
        for _ in 0..43 {
            b.record(true, ok);
        }
        assert_eq!(b.state(), State::Open, "44 of 87 in the last 10 s failed");
    }

    #[test]
    fn bad_settings_are_refused_and_slow_calls_follow_the_deadline() {
        assert!(BreakerConfig::default().validate().is_ok());
        assert!(BreakerConfig { window_calls: 0, ..BreakerConfig::default() }.validate().is_err());
        assert!(BreakerConfig { window_calls: 0, window_ms: 1000, ..BreakerConfig::default() }.validate().is_ok());
        assert!(BreakerConfig { failure_rate_percent: 0, ..BreakerConfig::default() }.validate().is_err());
        assert!(BreakerConfig { slow_call_rate_percent: 101, ..BreakerConfig::default() }.validate().is_err());
        assert!(BreakerConfig { half_open_calls: 0, ..BreakerConfig::default() }.validate().is_err());
        assert_eq!(BreakerConfig::default().for_deadline(Duration::from_secs(30)).slow_call_ms, 24_000);
        let set = BreakerConfig { slow_call_ms: 700, ..BreakerConfig::default() };
        assert_eq!(set.for_deadline(Duration::from_secs(30)).slow_call_ms, 700);
    }
}
