//! Reading the outbox (the event rows) in order, for whoever follows it: the relay that
//! publishes it to NATS, and the status service that streams it to clients.
//!
//! Event ids are increasing but may have gaps: a transaction that took an id may commit after
//! one that took a later id (PostgreSQL), or roll back (an idempotent replay's insert takes an
//! id too). A reader reads what it sees, moves its cursor only over ids it read, and reads the
//! gaps again until they fill, or until [`GAP_TIMEOUT`] says the transaction that took the id
//! is gone. A job's events are still read in order: its next event is written under its row
//! lock, after the transaction of the previous one committed.

use crate::store::{Outbox, OutboxEvent, StoreError};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use std::time::Instant;

/// How long an id a reader skipped over may stay missing before it is taken for a transaction
/// that rolled back. Far beyond any transaction pixmesh runs (they are one statement, or a few).
pub const GAP_TIMEOUT: Duration = Duration::from_secs(30);

/// The widest span of missing ids that a reader waits for.
const MAX_GAP_SPAN: i64 = 4096;

/// A reader's place in the outbox: every event up to [`EventCursor::cursor`] is read (or its
/// id was never used), and the ids above it that are missing are read again until they appear
/// or [`GAP_TIMEOUT`] passes.
#[derive(Debug)]
pub struct EventCursor {
    /// Every event up to this id is published (or its id was never used).
    cursor: i64,
    /// The highest id published.
    high: i64,
    /// Ids above `cursor` that are published.
    done: BTreeSet<i64>,
    /// Ids above `cursor` and below `high` not seen yet, with when they were first missed.
    gaps: BTreeMap<i64, Instant>,
    /// Spans of ids not waited for (first → last).
    skips: BTreeMap<i64, i64>,
}

impl EventCursor {
    pub fn new(cursor: i64) -> EventCursor {
        EventCursor { cursor, high: cursor, done: BTreeSet::new(), gaps: BTreeMap::new(), skips: BTreeMap::new() }
    }

    /// Every event up to this id is read (or its id was never used).
    pub fn cursor(&self) -> i64 {
        self.cursor
    }

    /// Records that `id` was read (published, delivered: whatever the reader does with it).
    pub fn published(&mut self, id: i64) {
        if id <= self.cursor {
            return;
        }
        self.gaps.remove(&id);
        if id > self.high {
            // A span wider than any number of transactions in flight is not waited for: its ids
            // were pruned, or skipped by the sequence (PostgreSQL after a crash).
            if id - self.high <= MAX_GAP_SPAN {
                let now = Instant::now();
                for missing in (self.high + 1)..id {
                    if !self.done.contains(&missing) {
                        self.gaps.insert(missing, now);
                    }
                }
            } else {
                tracing::info!(from = self.high + 1, to = id - 1, "event ids skipped; not waiting for them");
                self.skips.insert(self.high + 1, id - 1);
            }
            self.high = id;
        }
        self.done.insert(id);
    }

    /// Moves the cursor over published ids, and over gaps older than `timeout`.
    pub fn advance(&mut self, timeout: Duration) {
        loop {
            let next = self.cursor + 1;
            if self.done.remove(&next) {
                self.cursor = next;
            } else if let Some(last) = self.skips.remove(&next) {
                self.cursor = last;
            } else if let Some(seen) = self.gaps.get(&next).copied() {
                if seen.elapsed() < timeout {
                    break;
                }
                self.gaps.remove(&next);
                tracing::warn!(id = next, "event id never appeared; taking it for a transaction that rolled back");
                self.cursor = next;
            } else {
                break;
            }
        }
    }

    /// Up to `batch` events after the highest id read, preceded by those that filled a gap
    /// since: what the reader has not read yet. Mark each with [`EventCursor::published`] once
    /// it is dealt with.
    pub async fn unread(&self, outbox: &dyn Outbox, batch: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut rows = outbox.events_after(self.high, batch).await?;
        if let Some(&first_gap) = self.gaps.keys().next() {
            // Gaps may have filled: read the ids between the cursor and the highest again.
            let span = u32::try_from(self.high - first_gap + 1).unwrap_or(u32::MAX).min(4 * batch);
            let again = outbox.events_after(first_gap - 1, span).await?;
            let filled: Vec<OutboxEvent> = again.into_iter().filter(|e| self.gaps.contains_key(&e.id)).collect();
            if !filled.is_empty() {
                rows.splice(0..0, filled);
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_moves_over_published_ids_and_waits_at_gaps() {
        let mut l = EventCursor::new(10);
        l.published(11);
        l.published(13);
        l.advance(GAP_TIMEOUT);
        assert_eq!(l.cursor, 11, "12 is missing");
        assert!(l.gaps.contains_key(&12));
        l.published(12);
        l.advance(GAP_TIMEOUT);
        assert_eq!(l.cursor, 13);
        assert!(l.gaps.is_empty() && l.done.is_empty());
        // A gap that never fills is passed once it is old enough.
        l.published(15);
        l.advance(GAP_TIMEOUT);
        assert_eq!(l.cursor, 13);
        l.advance(Duration::ZERO);
        assert_eq!(l.cursor, 15);
        // Ids at or below the cursor change nothing.
        l.published(14);
        assert_eq!((l.cursor, l.high), (15, 15));
        assert!(l.done.is_empty());
        // A span too wide for transactions in flight (pruned ids) is not waited for, even
        // behind a gap that is.
        l.published(17);
        l.published(17 + MAX_GAP_SPAN + 10);
        l.advance(GAP_TIMEOUT);
        assert_eq!(l.cursor, 15, "16 is waited for");
        l.published(16);
        l.advance(GAP_TIMEOUT);
        assert_eq!(l.cursor, 17 + MAX_GAP_SPAN + 10);
        assert!(l.gaps.is_empty() && l.skips.is_empty() && l.done.is_empty());
    }
}
