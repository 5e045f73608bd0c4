//! Live job events for the SSE streams: one tail of the outbox per status process, handed out
//! to the streams that watch a job or an owner's jobs.
//!
//! The tail reads the event rows in id order ([`pixmesh_store::tail::EventCursor`]: ids that
//! commit late are read when they appear), every [`POLL`], whether anyone watches or not, so a
//! stream that subscribes and then replays from the database misses nothing in between. Each
//! watcher has a bounded queue; a watcher whose queue is full (its client reads slower than
//! events come) is dropped, not buffered for: its stream ends, and the client reconnects with
//! `Last-Event-ID` and gets the rest from the database.
//!
//! Why not tokio's `broadcast`: every stream would wake for every event of every job and
//! filter, and a lagging receiver skips events silently; here an event goes only to the
//! streams of its job and its owner, and a stream that cannot keep up is told so.

use pixmesh_store::tail::{EventCursor, GAP_TIMEOUT};
use pixmesh_store::{JobStore, Outbox, OutboxEvent};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the tail reads the outbox.
pub const POLL: Duration = Duration::from_millis(20);

/// Events one watcher may have waiting; past it the watcher is dropped.
pub const WATCHER_QUEUE: usize = 256;

/// Events read per round.
const BATCH: u32 = 512;

/// Owners remembered per job (for the owners' streams); forgotten all at once past this.
const OWNER_CACHE: usize = 100_000;

type Watchers = HashMap<String, Vec<(u64, mpsc::Sender<Arc<OutboxEvent>>)>>;

/// Who watches what.
#[derive(Default)]
pub struct Hub {
    jobs: Mutex<Watchers>,
    owners: Mutex<Watchers>,
    owner_of: Mutex<HashMap<String, String>>,
    next: AtomicU64,
}

/// A subscription: events arrive on `events`; dropping it unsubscribes.
pub struct Watch {
    pub events: mpsc::Receiver<Arc<OutboxEvent>>,
    hub: Arc<Hub>,
    key: (Kind, String),
    id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Job,
    Owner,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.hub.remove(self.key.0, &self.key.1, self.id);
    }
}

impl Hub {
    fn map(&self, kind: Kind) -> &Mutex<Watchers> {
        match kind {
            Kind::Job => &self.jobs,
            Kind::Owner => &self.owners,
        }
    }

    fn watch(self: &Arc<Self>, kind: Kind, key: &str) -> Watch {
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.map(kind).lock() {
            map.entry(key.to_string()).or_default().push((id, tx));
        }
        Watch { events: rx, hub: Arc::clone(self), key: (kind, key.to_string()), id }
    }

    /// Events of job `id` from now on.
    pub fn watch_job(self: &Arc<Self>, id: &str) -> Watch {
        self.watch(Kind::Job, id)
    }

    /// Events of every job of `owner` from now on.
    pub fn watch_owner(self: &Arc<Self>, owner: &str) -> Watch {
        self.watch(Kind::Owner, owner)
    }

    fn remove(&self, kind: Kind, key: &str, id: u64) {
        if let Ok(mut map) = self.map(kind).lock()
            && let Some(list) = map.get_mut(key)
        {
            list.retain(|(w, _)| *w != id);
            if list.is_empty() {
                map.remove(key);
            }
        }
    }

    /// Gives `event` to the watchers of `key`; a watcher that is full is dropped (its
    /// channel closes), one whose stream is gone is forgotten.
    fn deliver(&self, kind: Kind, key: &str, event: &Arc<OutboxEvent>) {
        let Ok(mut map) = self.map(kind).lock() else { return };
        let Some(list) = map.get_mut(key) else { return };
        list.retain(|(_, tx)| match tx.try_send(Arc::clone(event)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!(crate::instruments::STREAMS_DROPPED, "reason" => "slow_reader").increment(1);
                tracing::info!(key, "an event stream's client reads too slowly; its stream is ended");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if list.is_empty() {
            map.remove(key);
        }
    }

    fn has_owner_watchers(&self) -> bool {
        self.owners.lock().map(|m| !m.is_empty()).unwrap_or(false)
    }

    /// The owner of job `id` (remembered; read from the store the first time).
    async fn owner(&self, jobs: &dyn JobStore, id: &str) -> Option<String> {
        if let Some(owner) = self.owner_of.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Some(owner);
        }
        let owner = jobs.get(id).await.ok().flatten()?.owner;
        if let Ok(mut map) = self.owner_of.lock() {
            if map.len() >= OWNER_CACHE {
                map.clear();
            }
            map.insert(id.to_string(), owner.clone());
        }
        Some(owner)
    }

    /// Reads the outbox from its newest event on and hands each event to its watchers, until
    /// the task is dropped. A read that fails is tried again (the cursor stays).
    pub async fn tail(self: Arc<Self>, outbox: Arc<dyn Outbox>, jobs: Arc<dyn JobStore>) {
        let start = loop {
            match outbox.newest_event_id().await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(error = %e, "event streams: cannot read the outbox; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut cursor = EventCursor::new(start);
        loop {
            let rows = match cursor.unread(outbox.as_ref(), BATCH).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::debug!(error = %e, "event streams: cannot read the outbox; trying again");
                    tokio::time::sleep(POLL * 10).await;
                    continue;
                }
            };
            let full = rows.len() as u32 == BATCH;
            for row in rows {
                let id = row.id;
                let event = Arc::new(row);
                self.deliver(Kind::Job, &event.event.job_id, &event);
                if self.has_owner_watchers()
                    && let Some(owner) = self.owner(jobs.as_ref(), &event.event.job_id).await
                {
                    self.deliver(Kind::Owner, &owner, &event);
                }
                cursor.published(id);
            }
            cursor.advance(GAP_TIMEOUT);
            if !full {
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixmesh_store::{Event, Hlc, JobEvent};

    fn row(id: i64, job: &str) -> Arc<OutboxEvent> {
        let event = Event::LeaseExpired { owner: None };
        Arc::new(OutboxEvent {
            id,
            event: JobEvent { job_id: job.into(), seq: id as u32, attempt: 1, at: 0, hlc: Hlc::from_unix_ms(0), event },
            traceparent: None,
        })
    }

    #[tokio::test]
    async fn an_event_goes_to_its_jobs_watchers_only_and_a_full_watcher_is_dropped() {
        let hub = Arc::new(Hub::default());
        let mut a = hub.watch_job("a");
        let mut slow = hub.watch_job("a");
        let mut b = hub.watch_job("b");
        hub.deliver(Kind::Job, "a", &row(1, "a"));
        assert_eq!(a.events.recv().await.unwrap().id, 1);
        assert!(b.events.try_recv().is_err(), "not b's event");
        // `slow` never reads: once its queue is full, the next event drops it.
        for id in 2..=(WATCHER_QUEUE as i64 + 1) {
            hub.deliver(Kind::Job, "a", &row(id, "a"));
            assert_eq!(a.events.recv().await.unwrap().id, id, "the reader keeps up");
        }
        hub.deliver(Kind::Job, "a", &row(1_000, "a"));
        let mut got = 0;
        while slow.events.recv().await.is_some() {
            got += 1;
        }
        assert_eq!(got, WATCHER_QUEUE, "what was queued is still read, then the stream ends");
        assert_eq!(a.events.recv().await.unwrap().id, 1_000, "the reader that keeps up is kept");
        // A dropped subscription leaves nothing behind.
        drop(a);
        drop(b);
        assert!(hub.jobs.lock().unwrap().is_empty());
    }
}
