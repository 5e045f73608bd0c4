//! The distributors' side of the wake-up stream: one durable pull consumer that all of them
//! share. A distributor asks for as many wake-ups as it has room for, claims their jobs in the
//! database, processes them, and only then acks; while it works it reports progress, so the
//! stream delivers a wake-up again only when its distributor is gone.

use crate::{Queue, QueueError, Wake};
use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use futures_util::StreamExt;
use std::future::Future;
use std::time::Duration;

/// The shared consumer of wake-ups.
pub struct Wakeups {
    queue: Queue,
    consumer: PullConsumer,
}

impl Wakeups {
    /// Opens (or creates) the durable consumer.
    pub async fn open(queue: &Queue) -> Result<Wakeups, QueueError> {
        let c = queue.config();
        let config = pull::Config {
            durable_name: Some(queue.names().wake_consumer.clone()),
            description: Some("pixmesh distributors".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_millis(c.ack_wait_ms),
            max_deliver: c.max_deliver,
            max_ack_pending: 1_000_000,
            ..Default::default()
        };
        let names = queue.names();
        let stream = queue.jetstream().get_stream(&names.wake_stream).await.map_err(QueueError::nats)?;
        let consumer = stream.get_or_create_consumer(&names.wake_consumer, config).await.map_err(QueueError::nats)?;
        Ok(Wakeups { queue: queue.clone(), consumer })
    }

    /// Whether the consumer is still there (a server whose store was wiped lost it, and its pull
    /// requests then simply bring nothing).
    pub async fn exists(&mut self) -> bool {
        self.consumer.info().await.is_ok()
    }

    /// Asks for up to `max` wake-ups, waiting up to `wait` for the first; the batch ends when
    /// `max` came or `wait` ran out.
    pub async fn take(&self, max: usize, wait: Duration) -> Result<Batch, QueueError> {
        let batch = self.consumer.batch().max_messages(max.max(1)).expires(wait).messages().await.map_err(QueueError::nats)?;
        Ok(Batch { inner: batch, queue: self.queue.clone() })
    }
}

/// The wake-ups of one pull request, as they arrive.
pub struct Batch {
    inner: async_nats::jetstream::consumer::pull::Batch,
    queue: Queue,
}

impl Batch {
    /// The next wake-up; `None` when the batch is over.
    pub async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let message = self.inner.next().await?;
        Some(message.map(|m| Delivery::new(m, self.queue.clone())).map_err(QueueError::nats))
    }

    /// The next wake-up if one has already arrived.
    pub fn ready(&mut self) -> Option<Result<Delivery, QueueError>> {
        use futures_util::FutureExt;
        self.next().now_or_never().flatten()
    }
}

/// One delivered wake-up. Each ends with [`Delivery::done`], [`Delivery::later`] or
/// [`Delivery::dead`]; one dropped without is delivered again after `ack_wait`.
pub struct Delivery {
    message: async_nats::jetstream::Message,
    queue: Queue,
    /// The wake-up, or why it could not be read.
    pub wake: Result<Wake, String>,
}

impl Delivery {
    fn new(message: async_nats::jetstream::Message, queue: Queue) -> Delivery {
        let wake = serde_json::from_slice::<Wake>(&message.payload).map_err(|e| format!("unreadable wake-up: {e}"));
        Delivery { message, queue, wake }
    }

    /// The trace the wake-up was published in (its `traceparent` header).
    pub fn traceparent(&self) -> Option<&str> {
        self.message.headers.as_ref()?.get(pixmesh_chassis::trace::TRACEPARENT).map(|v| v.as_str())
    }

    /// How many times this wake-up has been delivered (1 the first time).
    pub fn delivered(&self) -> i64 {
        self.message.info().map(|i| i.delivered).unwrap_or(1)
    }

    /// Runs `work`, telling the stream every third of `ack_wait` that this wake-up is still
    /// being worked on. `work` is polled while a progress report is sent, too: it may hold a
    /// store's write turn, which other writers of this process would otherwise wait for until
    /// the broker answered.
    pub async fn hold<F: Future>(&self, work: F) -> F::Output {
        let every = Duration::from_millis(self.queue.config().ack_wait_ms) / 3;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                _ = ticks.tick() => {
                    let progress = self.message.ack_with(AckKind::Progress);
                    tokio::select! {
                        out = &mut work => return out,
                        sent = progress => if let Err(e) = sent {
                            tracing::debug!(error = %e, "cannot report progress on a wake-up");
                        },
                    }
                }
            }
        }
    }

    /// The wake-up was handled: the stream drops it.
    pub async fn done(self) {
        if let Err(e) = self.message.ack().await {
            // It comes again after ack_wait; its job's claim decides again (idempotent).
            tracing::debug!(error = %e, "cannot ack a wake-up");
        }
    }

    /// Deliver again after `delay`; on its last delivery it goes to the dead-letter stream.
    pub async fn later(self, delay: Duration) {
        if self.delivered() >= self.queue.config().max_deliver {
            let why = format!("delivered {} times without being handled", self.delivered());
            return self.dead(&why).await;
        }
        if let Err(e) = self.message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::debug!(error = %e, "cannot nak a wake-up");
        }
    }

    /// Copies the wake-up to the dead-letter stream with `why`, then drops it from the queue.
    /// Its job, if it is still claimable, is woken for again by the sweeper.
    pub async fn dead(self, why: &str) {
        tracing::warn!(reason = why, "wake-up goes to the dead-letter stream");
        metrics::counter!(crate::instruments::WAKEUPS_DEAD).increment(1);
        let publish =
            async_nats::jetstream::message::PublishMessage::build().payload(self.message.payload.clone()).header("Pixmesh-Reason", why);
        let stored = match self.queue.jetstream().send_publish(self.queue.names().dead_subject.clone(), publish).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = stored {
            // Keep it in the queue rather than lose it: it is delivered again.
            tracing::warn!(error = %e, "cannot store a dead wake-up; it stays in the queue");
            return;
        }
        if let Err(e) = self.message.ack().await {
            tracing::debug!(error = %e, "cannot ack a dead wake-up");
        }
    }
}
