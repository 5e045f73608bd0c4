//! The outbox relay and the sweeper.
//!
//! Every distributor runs one; they compete for the relay lease in the database, and the one
//! holding it publishes. The event rows of the job store are the outbox: the relay reads them
//! in id order after its cursor and publishes each to `pixmesh.events.<job id>`, and, for the
//! events after which a job is claimable (`accepted`, `released`, `lease_expired`), a wake-up.
//! The cursor is saved in the database with each lease renewal, after the stream acknowledged
//! everything up to it: a relay that dies is replaced within the lease, and its successor
//! publishes again what was not saved (the streams drop the duplicates by `Nats-Msg-Id`).
//!
//! Event ids are increasing but may have gaps: a transaction that took an id may commit after
//! one that took a later id (PostgreSQL), or roll back. The relay publishes what it sees, moves
//! its saved cursor only over ids it published, and reads the gaps again until they fill, or
//! until [`GAP_TIMEOUT`] says the transaction that took the id is gone. A job's events are
//! still published in order: its next event is written under its row lock, after the
//! transaction of the previous one committed.
//!
//! The sweeper runs with the relay lease too: it gives jobs whose lease ran out back to the
//! queue (their `lease_expired` event wakes a distributor), and wakes distributors again for
//! any job that stayed claimable longer than `queue.sweep_after_ms` — after a broker that lost
//! its messages, for instance.

use crate::{Queue, QueueError, Wake};
use pixmesh_model::{Event, Outbox, OutboxEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long an id the relay skipped over may stay missing before it is taken for a transaction
/// that rolled back. Far beyond any transaction pixmesh runs (they are one statement, or a few).
pub const GAP_TIMEOUT: Duration = Duration::from_secs(30);

/// The widest span of missing ids that the relay waits for.
const MAX_GAP_SPAN: i64 = 4096;

/// Events read per round.
const BATCH: u32 = 512;

/// Most jobs one sweep wakes for (the next sweep takes the rest).
const SWEEP_BATCH: u32 = 500;

/// What a relay needs to know of the distributors it serves.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// Claims before a job fails for good (a rescued job that used them up fails).
    pub max_attempts: u32,
}

/// Runs the relay and the sweeper until `stop` resolves.
pub async fn run(queue: Queue, outbox: Arc<dyn Outbox>, settings: RelaySettings, stop: impl std::future::Future<Output = ()>) {
    let owner = format!("relay-{}", uuid::Uuid::now_v7().simple());
    let mut relay = Relay::new(queue, outbox, settings, owner);
    tokio::select! {
        _ = relay.run() => {}
        _ = stop => {}
    }
}

/// The publishing side of a relay that holds the lease.
struct Leading {
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

impl Leading {
    fn new(cursor: i64) -> Leading {
        Leading { cursor, high: cursor, done: BTreeSet::new(), gaps: BTreeMap::new(), skips: BTreeMap::new() }
    }

    /// Records that `id` was published.
    fn published(&mut self, id: i64) {
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
    fn advance(&mut self, timeout: Duration) {
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
}

struct Relay {
    queue: Queue,
    outbox: Arc<dyn Outbox>,
    settings: RelaySettings,
    owner: String,
    leading: Option<Leading>,
}

impl Relay {
    fn new(queue: Queue, outbox: Arc<dyn Outbox>, settings: RelaySettings, owner: String) -> Relay {
        Relay { queue, outbox, settings, owner, leading: None }
    }

    async fn run(&mut self) {
        let c = self.queue.config().clone();
        let lease = Duration::from_millis(c.relay_lease_ms);
        let poll = Duration::from_millis(c.relay_poll_ms);
        let sweep_every = Duration::from_millis(c.sweep_interval_ms);
        let mut next_lease = Instant::now();
        let mut next_sweep = Instant::now();
        loop {
            if Instant::now() >= next_lease {
                self.renew(lease).await;
                next_lease = Instant::now() + lease / 3;
            }
            if self.leading.is_none() {
                tokio::time::sleep_until(next_lease).await;
                continue;
            }
            let published = match self.pump().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "relay: publishing failed; trying again");
                    metrics::counter!("pixmesh_relay_errors_total").increment(1);
                    self.repair().await;
                    0
                }
            };
            if Instant::now() >= next_sweep {
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "sweeper: failed; trying again");
                    self.repair().await;
                }
                next_sweep = Instant::now() + sweep_every;
            }
            if published == 0 {
                tokio::time::sleep(poll).await;
            }
        }
    }

    /// After a failed publish: the server may have lost its streams (its store wiped), so they
    /// are made again (a no-op when they are there), after a pause.
    async fn repair(&self) {
        if let Err(e) = self.queue.ensure_streams().await {
            tracing::debug!(error = %e, "relay: cannot check the streams");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Takes or renews the lease, saving the cursor; publishing stops when the lease is not ours.
    async fn renew(&mut self, ttl: Duration) {
        let cursor = self.leading.as_ref().map(|l| l.cursor);
        match self.outbox.relay_lease(&self.owner, ttl, cursor).await {
            Ok(Some(saved)) => {
                if self.leading.is_none() {
                    tracing::info!(owner = %self.owner, cursor = saved, "relay: this process publishes the outbox now");
                    self.leading = Some(Leading::new(saved));
                }
            }
            Ok(None) => {
                if self.leading.take().is_some() {
                    tracing::warn!(owner = %self.owner, "relay: another relay holds the lease; this one stands by");
                }
            }
            Err(e) => {
                // Without the database the lease may be someone else's by now: stop publishing.
                if self.leading.take().is_some() {
                    tracing::warn!(error = %e, "relay: cannot renew the lease; standing by");
                }
            }
        }
    }

    /// Publishes the events not published yet; returns how many.
    async fn pump(&mut self) -> Result<usize, QueueError> {
        let Some(leading) = self.leading.as_mut() else { return Ok(0) };
        let mut rows = self.outbox.events_after(leading.high, BATCH).await.map_err(|e| QueueError::Nats(format!("outbox: {e}")))?;
        if let Some(&first_gap) = leading.gaps.keys().next() {
            // Gaps may have filled: read the ids between the cursor and the highest again.
            let span = u32::try_from(leading.high - first_gap + 1).unwrap_or(u32::MAX).min(4 * BATCH);
            let again = self.outbox.events_after(first_gap - 1, span).await.map_err(|e| QueueError::Nats(format!("outbox: {e}")))?;
            let filled: Vec<OutboxEvent> = again.into_iter().filter(|e| leading.gaps.contains_key(&e.id)).collect();
            if !filled.is_empty() {
                rows.splice(0..0, filled);
            }
        }
        let count = rows.len();
        if count == 0 {
            leading.advance(GAP_TIMEOUT);
            return Ok(0);
        }
        // Send everything, then wait for the acknowledgements in order: the first failure
        // stops the round, and the rows whose messages all came before it count as published.
        let mut pending = Vec::with_capacity(count);
        for (index, row) in rows.iter().enumerate() {
            pending.push((index, self.queue.send_event(&row.event).await?));
            if let Some(wake) = wake_for(row) {
                pending.push((index, self.queue.send_wake(&wake).await?));
            }
        }
        let mut failed: Option<QueueError> = None;
        let mut complete = rows.len();
        for (index, ack) in pending {
            if let Err(e) = ack.await {
                failed = Some(QueueError::nats(e));
                complete = index;
                break;
            }
        }
        for row in &rows[..complete] {
            leading.published(row.id);
        }
        leading.advance(GAP_TIMEOUT);
        metrics::counter!("pixmesh_relay_events_total").increment(complete as u64);
        match failed {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Rescues expired leases, and wakes distributors again for jobs left claimable too long.
    async fn sweep(&mut self) -> Result<(), QueueError> {
        let store = |e: pixmesh_model::StoreError| QueueError::Nats(format!("job store: {e}"));
        self.outbox.rescue_expired(self.settings.max_attempts).await.map_err(store)?;
        let after = Duration::from_millis(self.queue.config().sweep_after_ms);
        let stale = self.outbox.stale_claimable(after, SWEEP_BATCH).await.map_err(store)?;
        if stale.is_empty() {
            return Ok(());
        }
        let mut acks = Vec::with_capacity(stale.len());
        for (job, attempt) in &stale {
            acks.push(self.queue.send_wake(&Wake { job: job.clone(), attempt: *attempt }).await?);
        }
        let mut fresh = 0u64;
        for ack in acks {
            // A duplicate: the first wake-up is still in the stream (it will be taken).
            if !ack.await.map_err(QueueError::nats)?.duplicate {
                fresh += 1;
            }
        }
        if fresh > 0 {
            tracing::info!(jobs = fresh, "sweeper: woke distributors again for jobs left claimable");
            metrics::counter!("pixmesh_sweeper_wakes_total").increment(fresh);
        }
        Ok(())
    }
}

/// The wake-up an event calls for: after these, the job is claimable at the event's attempt.
pub fn wake_for(row: &OutboxEvent) -> Option<Wake> {
    match row.event.event {
        // (A saga turned back by the store, not by its claimer, is queued for the claim that
        // compensates.)
        Event::Accepted { .. } | Event::Released { .. } | Event::LeaseExpired { .. } | Event::Compensating { output: None, .. } => {
            Some(Wake { job: row.event.job_id.clone(), attempt: row.event.attempt })
        }
        _ => None,
    }
}

impl Queue {
    /// Sends one job event to its subject; the stream's answer comes with the returned future.
    pub async fn send_event(
        &self,
        event: &pixmesh_model::JobEvent,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, QueueError> {
        let payload = serde_json::to_vec(event).map_err(QueueError::nats)?;
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("{}:{}", event.job_id, event.seq));
        self.jetstream().send_publish(self.names().events_subject(&event.job_id), publish).await.map_err(QueueError::nats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_moves_over_published_ids_and_waits_at_gaps() {
        let mut l = Leading::new(10);
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
