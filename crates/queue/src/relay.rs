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
use pixmesh_model::tail::{EventCursor, GAP_TIMEOUT};
use pixmesh_model::{Event, Outbox, OutboxEvent};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument as _;

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

struct Relay {
    queue: Queue,
    outbox: Arc<dyn Outbox>,
    settings: RelaySettings,
    owner: String,
    leading: Option<EventCursor>,
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
                    metrics::counter!(crate::instruments::RELAY_ERRORS).increment(1);
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
        let cursor = self.leading.as_ref().map(EventCursor::cursor);
        match self.outbox.relay_lease(&self.owner, ttl, cursor).await {
            Ok(Some(saved)) => {
                if self.leading.is_none() {
                    tracing::info!(owner = %self.owner, cursor = saved, "relay: this process publishes the outbox now");
                    self.leading = Some(EventCursor::new(saved));
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
        let rows = leading.unread(self.outbox.as_ref(), BATCH).await.map_err(|e| QueueError::Nats(format!("outbox: {e}")))?;
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
                let span = self.queue.publish_span(row.traceparent.as_deref());
                pending.push((index, self.queue.send_wake(&wake, row.traceparent.as_deref()).instrument(span).await?));
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
        metrics::counter!(crate::instruments::RELAY_EVENTS).increment(complete as u64);
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
            acks.push(self.queue.send_wake(&Wake { job: job.clone(), attempt: *attempt }, None).await?);
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
            metrics::counter!(crate::instruments::SWEEPER_WAKES).increment(fresh);
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
