//! A hybrid logical clock time, as events carry it.
//!
//! The value is the 64-bit NTP format that `uhlc` (the clock every process keeps, in the
//! chassis) produces: the high 32 bits are seconds since the Unix epoch, the low 32 bits the
//! fraction of a second, whose last bits the clock uses as a logical counter. Two times compare
//! as unsigned integers; an event's HLC time is never lower than that of an event it follows
//! causally, whatever the wall clocks of the processes that wrote them say (within the clocks'
//! maximum offset).
//!
//! On the wire (JSON, gRPC metadata) the value is its decimal string: JavaScript numbers lose
//! precision above 2^53. In SQL (`BIGINT`, signed) it is stored with its top bit flipped
//! ([`Hlc::to_sql`]), so that SQL compares stored values in the same order as the times.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A hybrid logical clock time (see the module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc(pub u64);

/// Flipping it maps unsigned order onto signed order.
const TOP_BIT: u64 = 1 << 63;

impl Hlc {
    /// The lowest time: what a history without HLC times starts from.
    pub const MIN: Hlc = Hlc(0);

    /// The time of a wall-clock instant, with no logical part (for events written before
    /// events carried HLC times).
    pub fn from_unix_ms(ms: i64) -> Hlc {
        Hlc(units(u64::try_from(ms).unwrap_or(0)))
    }

    /// The wall-clock part, in milliseconds since the Unix epoch.
    pub fn unix_ms(self) -> i64 {
        let secs = self.0 >> 32;
        let millis = ((self.0 & 0xFFFF_FFFF) * 1000) >> 32;
        i64::try_from(secs * 1000 + millis).unwrap_or(i64::MAX)
    }

    /// `self` plus a span of milliseconds, in the clock's units.
    pub fn plus_ms(self, ms: u64) -> Hlc {
        Hlc(self.0.saturating_add(units(ms)))
    }

    /// The stored form: the top bit flipped, so that signed comparison keeps the order.
    pub fn to_sql(self) -> i64 {
        i64::from_ne_bytes((self.0 ^ TOP_BIT).to_ne_bytes())
    }

    pub fn from_sql(stored: i64) -> Hlc {
        Hlc(u64::from_ne_bytes(stored.to_ne_bytes()) ^ TOP_BIT)
    }

    /// Reads the decimal form.
    pub fn parse(s: &str) -> Option<Hlc> {
        s.parse().ok().map(Hlc)
    }
}

/// Milliseconds in the clock's units (2^-32 s), rounded up, so that [`Hlc::unix_ms`] gives the
/// same milliseconds back.
fn units(ms: u64) -> u64 {
    ((ms / 1000) << 32) | (((ms % 1000) << 32).div_ceil(1000))
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Hlc {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Hlc, D::Error> {
        let s = String::deserialize(deserializer)?;
        Hlc::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not an HLC time (a decimal u64): {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_form_keeps_the_order_and_round_trips() {
        let times = [0, 1, 7_711_000_000_000_000_000, (1 << 63) - 1, 1 << 63, (1 << 63) + 1, u64::MAX - 1, u64::MAX];
        for pair in times.windows(2) {
            let (a, b) = (Hlc(pair[0]), Hlc(pair[1]));
            assert!(a.to_sql() < b.to_sql(), "{a} {b}");
            assert_eq!(Hlc::from_sql(a.to_sql()), a);
        }
        assert_eq!(Hlc::MIN.to_sql(), i64::MIN);
        assert_eq!(Hlc(u64::MAX).to_sql(), i64::MAX);
    }

    #[test]
    fn milliseconds_round_trip_and_the_logical_part_is_below_a_millisecond() {
        for ms in [0, 1, 999, 1000, 1_796_353_500_123] {
            assert_eq!(Hlc::from_unix_ms(ms).unix_ms(), ms, "{ms}");
        }
        let t = Hlc::from_unix_ms(1_796_353_500_123);
        assert_eq!(Hlc(t.0 + 15).unix_ms(), 1_796_353_500_123);
        assert_eq!(t.plus_ms(500).unix_ms(), 1_796_353_500_623);
        assert_eq!(t.plus_ms(1_500).unix_ms(), 1_796_353_501_623);
        assert_eq!(Hlc::from_unix_ms(-5), Hlc::MIN);
    }

    #[test]
    fn the_wire_form_is_a_decimal_string() {
        let t = Hlc(7_711_000_000_000_000_123);
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"7711000000000000123\"");
        assert_eq!(serde_json::from_str::<Hlc>("\"7711000000000000123\"").unwrap(), t);
        assert!(serde_json::from_str::<Hlc>("\"-1\"").is_err());
        assert!(serde_json::from_str::<Hlc>("17").is_err());
    }
}
