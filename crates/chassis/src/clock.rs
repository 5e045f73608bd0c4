//! This process's hybrid logical clock (HLC), through `uhlc`.
//!
//! Every process keeps one clock. It stamps what the process writes (job events, through the
//! job store) with [`Clock::now`], and it is moved forward by the times the process receives:
//! the last event of a job a store is about to extend, and the `pixmesh-hlc` metadata of the
//! gRPC calls between the distributor and the workers ([`Clock::observe`]). A time it hands
//! out is therefore above every time it has seen, so a job's history carries times that never
//! run backwards even when the processes that wrote it sit on hosts whose wall clocks differ.
//!
//! A received time further ahead of this process's wall clock than
//! `chassis.clock_max_offset_ms` (500 ms by default, CockroachDB's bound) is not adopted:
//! one host with a wrong clock must not drag every other clock along. It is logged and counted
//! (`pixmesh_clock_offset_rejected_total{from}`); the event written next carries this
//! process's own time, lower than the one it follows, and the history is still ordered by its
//! per-job sequence.
//!
//! `chassis.clock_skew_ms` shifts this process's physical clock, for tests of the above only.

use pixmesh_model::Hlc;
use serde::Deserialize;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use uhlc::{HLC, HLCBuilder, ID, Timestamp};
/// For [`Clock::with_physical`]: the time format, and the system clock.
pub use uhlc::{NTP64, system_time_clock};

/// The gRPC metadata key that carries the sender's HLC time (decimal).
pub const METADATA_KEY: &str = "pixmesh-hlc";

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ChassisConfig {
    /// A received HLC time further ahead of this process's clock than this is not adopted.
    pub clock_max_offset_ms: u64,
    /// Shifts this process's physical clock by this much (negative: behind). For tests only.
    pub clock_skew_ms: i64,
}

impl Default for ChassisConfig {
    fn default() -> Self {
        ChassisConfig { clock_max_offset_ms: 500, clock_skew_ms: 0 }
    }
}

impl ChassisConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.clock_max_offset_ms == 0 || self.clock_max_offset_ms > 60_000 {
            return Err(format!("chassis.clock_max_offset_ms must be 1 to 60000, not {}", self.clock_max_offset_ms));
        }
        if self.clock_skew_ms.unsigned_abs() > 3_600_000 {
            return Err(format!("chassis.clock_skew_ms must be within an hour either way, not {}", self.clock_skew_ms));
        }
        Ok(())
    }
}

/// A hybrid logical clock (see the module doc).
pub struct Clock {
    hlc: HLC,
    physical: fn() -> NTP64,
    max_offset: Duration,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock").field("max_offset", &self.max_offset).finish_non_exhaustive()
    }
}

/// The skew of [`skewed_system_time`], in milliseconds; set once, by [`init`].
static SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// The system clock shifted by [`SKEW_MS`]. `uhlc` takes its physical clock as a plain `fn`,
/// so the skew lives in a static: it is a setting of the whole process.
fn skewed_system_time() -> NTP64 {
    let now = uhlc::system_time_clock();
    let skew = SKEW_MS.load(Ordering::Relaxed);
    let shift = Hlc::MIN.plus_ms(skew.unsigned_abs()).0;
    NTP64(if skew >= 0 { now.0.saturating_add(shift) } else { now.0.saturating_sub(shift) })
}

impl Clock {
    /// A clock on `physical` (a function that reads the time, for tests), refusing received
    /// times more than `max_offset` ahead of it.
    pub fn with_physical(max_offset: Duration, physical: fn() -> NTP64) -> Clock {
        let hlc = HLCBuilder::new().with_max_delta(max_offset).with_clock(physical).build();
        Clock { hlc, physical, max_offset }
    }

    fn from_config(config: &ChassisConfig) -> Clock {
        SKEW_MS.store(config.clock_skew_ms, Ordering::Relaxed);
        Clock::with_physical(Duration::from_millis(config.clock_max_offset_ms), skewed_system_time)
    }

    /// A new time, above every time this clock handed out or adopted.
    pub fn now(&self) -> Hlc {
        Hlc(self.hlc.new_timestamp().get_time().0)
    }

    pub fn max_offset(&self) -> Duration {
        self.max_offset
    }

    /// Moves this clock past `time`, received from `from` (a role or a store, for the log),
    /// unless `time` is further ahead than the maximum offset: then it is logged, counted and
    /// not adopted, and `false` comes back.
    pub fn observe(&self, time: Hlc, from: &'static str) -> bool {
        // uhlc wants the sender's id; it plays no part in the update.
        let stamp = Timestamp::new(NTP64(time.0), ID::from(PEER));
        match self.hlc.update_with_timestamp(&stamp) {
            Ok(()) => true,
            Err(e) => {
                metrics::counter!(crate::instruments::CLOCK_OFFSET_REJECTED, "from" => from).increment(1);
                tracing::warn!(
                    from,
                    ahead_ms = time.unix_ms().saturating_sub(self.wall().unix_ms()),
                    max_offset_ms = self.max_offset.as_millis() as u64,
                    error = %e,
                    "a received clock time is beyond the maximum offset and is not adopted; check that host's clock"
                );
                false
            }
        }
    }

    /// This clock's physical time, without the logical part.
    fn wall(&self) -> Hlc {
        Hlc((self.physical)().0)
    }

    /// Puts a new time of this clock into gRPC metadata.
    pub fn stamp(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Ok(value) = self.now().to_string().parse() {
            metadata.insert(METADATA_KEY, value);
        }
    }

    /// Observes the time in gRPC metadata, if there is one (an older peer sends none).
    pub fn observe_metadata(&self, metadata: &tonic::metadata::MetadataMap, from: &'static str) {
        if let Some(time) = metadata.get(METADATA_KEY).and_then(|v| v.to_str().ok()).and_then(Hlc::parse) {
            self.observe(time, from);
        }
    }
}

/// The id every received time is given (see [`Clock::observe`]).
const PEER: std::num::NonZeroU128 = std::num::NonZeroU128::MIN;

static PROCESS: OnceLock<Arc<Clock>> = OnceLock::new();

/// Sets this process's clock from its configuration. The first call wins; later ones (a second
/// role in the same process) get the same clock.
pub fn init(config: &ChassisConfig) -> Arc<Clock> {
    PROCESS.get_or_init(|| Arc::new(Clock::from_config(config))).clone()
}

/// This process's clock ([`init`]'s, or one with the default settings if nothing called it).
pub fn process() -> Arc<Clock> {
    init(&ChassisConfig::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ahead_by_2s() -> NTP64 {
        NTP64(uhlc::system_time_clock().0 + Hlc::MIN.plus_ms(2_000).0)
    }

    fn ahead_by_300ms() -> NTP64 {
        NTP64(uhlc::system_time_clock().0 + Hlc::MIN.plus_ms(300).0)
    }

    fn clock() -> Clock {
        Clock::with_physical(Duration::from_millis(500), uhlc::system_time_clock)
    }

    #[test]
    fn times_never_run_backwards_and_follow_what_was_observed_within_the_offset() {
        let clock = clock();
        let mut last = clock.now();
        for _ in 0..1000 {
            let next = clock.now();
            assert!(next > last);
            last = next;
        }
        let peer = Clock::with_physical(Duration::from_millis(500), ahead_by_300ms).now();
        assert!(peer > clock.now());
        assert!(clock.observe(peer, "test"));
        assert!(clock.now() > peer, "a time after an observed one is above it");
    }

    #[test]
    fn a_time_beyond_the_offset_is_not_adopted() {
        let clock = clock();
        let peer = Clock::with_physical(Duration::from_millis(500), ahead_by_2s).now();
        assert!(!clock.observe(peer, "test"));
        let next = clock.now();
        assert!(next < peer, "the clock did not jump to the peer's");
        assert!(peer.unix_ms() - next.unix_ms() > 1_500);
    }

    #[test]
    fn metadata_carries_a_time_and_garbage_is_ignored() {
        let (a, b) = (Clock::with_physical(Duration::from_millis(500), ahead_by_300ms), clock());
        let mut metadata = tonic::metadata::MetadataMap::new();
        a.stamp(&mut metadata);
        let sent = metadata.get(METADATA_KEY).and_then(|v| v.to_str().ok()).and_then(Hlc::parse).unwrap();
        b.observe_metadata(&metadata, "test");
        assert!(b.now() > sent);
        let mut junk = tonic::metadata::MetadataMap::new();
        junk.insert(METADATA_KEY, "soon".parse().unwrap());
        b.observe_metadata(&junk, "test");
    }

    #[test]
    fn settings_are_checked() {
        assert!(ChassisConfig::default().validate().is_ok());
        assert!(ChassisConfig { clock_max_offset_ms: 0, ..Default::default() }.validate().is_err());
        assert!(ChassisConfig { clock_skew_ms: -4_000_000, ..Default::default() }.validate().is_err());
        assert!(ChassisConfig { clock_skew_ms: -300, ..Default::default() }.validate().is_ok());
    }
}
