//! NATS JetStream for pixmesh, with the database as the source of truth.
//!
//! The broker carries two things and keeps neither for good: **wake-ups** (a job became
//! claimable: a distributor should claim it) on the work-queue stream `PIXMESH_WAKE`, and the
//! **events** of every job, in order per job, on `pixmesh.events.<job id>` (stream
//! `PIXMESH_EVENTS`). Both are published from the event rows of the job store — the outbox —
//! by the relay ([`relay`]), after the transaction that wrote them committed. A wake-up only
//! says "look at job J": the claim in the database still decides who processes it, so a lost,
//! duplicated or late wake-up costs time, never a job. The sweeper (part of the relay) wakes
//! distributors again for any job that stayed claimable too long, so even a wiped broker loses
//! nothing.
//!
//! Dedup: every message carries `Nats-Msg-Id` (a wake-up `<job>:<attempt>`, an event
//! `<job>:<seq>`), so the relay's re-publications after a restart, and the upload service's
//! early wake-up, are stored once within the stream's duplicate window. Past the window a
//! duplicate can get through; consumers are idempotent (a claim of a job already claimed
//! answers "held", an event carries its per-job `seq`).
//!
//! The registry on NATS KV ([`registry`]) is here too: it is the same connection and the same
//! server.

pub mod instruments;
pub mod registry;
pub mod relay;
pub mod wake;

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tracing::Instrument as _;

/// The names of pixmesh's streams, subjects, consumer and bucket on one server. A URL path
/// (`nats://HOST:PORT/NAME`) is a namespace: deployments (or test runs) that share a server
/// each get their own, and see nothing of each other's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The work-queue stream of wake-ups, its one subject, and the distributors' consumer.
    pub wake_stream: String,
    pub wake_subject: String,
    pub wake_consumer: String,
    /// The stream of job events, one subject per job under `events_prefix`.
    pub events_stream: String,
    pub events_prefix: String,
    /// Wake-ups that could not be handled (unreadable, or delivered `max_deliver` times),
    /// kept for an operator to look at.
    pub dead_stream: String,
    pub dead_subject: String,
    /// The KV bucket of the worker registry.
    pub workers_bucket: String,
}

impl Names {
    pub fn new(namespace: Option<&str>) -> Names {
        let (upper, dotted, under) = match namespace {
            Some(ns) => {
                (format!("PIXMESH_{}_", ns.to_ascii_uppercase().replace('-', "_")), format!("pixmesh.{ns}."), format!("pixmesh_{ns}_"))
            }
            None => ("PIXMESH_".to_string(), "pixmesh.".to_string(), "pixmesh_".to_string()),
        };
        Names {
            wake_stream: format!("{upper}WAKE"),
            wake_subject: format!("{dotted}wake"),
            wake_consumer: "distributors".into(),
            events_stream: format!("{upper}EVENTS"),
            events_prefix: format!("{dotted}events"),
            dead_stream: format!("{upper}DEAD"),
            dead_subject: format!("{dotted}dead.wake"),
            workers_bucket: format!("{under}workers"),
        }
    }

    /// The subject of a job's events.
    pub fn events_subject(&self, job: &str) -> String {
        format!("{}.{job}", self.events_prefix)
    }
}

/// How long the streams remember a `Nats-Msg-Id` (the server's default, stated).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The `queue` section: the broker, and how the wake-ups flow through it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `nats://HOST:PORT` (several, comma-separated, for a cluster); empty: no broker, the
    /// distributors find work by polling the database.
    pub url: String,
    /// How long connecting waits for the server at start.
    pub connect_timeout_ms: u64,
    /// A wake-up taken by a distributor that neither acks nor reports progress within this is
    /// delivered again (the distributor reports progress while it works on the job).
    pub ack_wait_ms: u64,
    /// Deliveries of one wake-up before it goes to the dead-letter stream.
    pub max_deliver: i64,
    /// A job claimable for longer than this without being claimed is woken for again.
    pub sweep_after_ms: u64,
    /// How often the sweeper looks (and rescues jobs whose lease ran out).
    pub sweep_interval_ms: u64,
    /// How often the relay looks for new events when it found none.
    pub relay_poll_ms: u64,
    /// The relay lease: the relay holding it publishes; another takes over this long after it
    /// stopped renewing.
    pub relay_lease_ms: u64,
    /// How long the events stream keeps an event.
    pub events_max_age_secs: u64,
    /// Most wake-ups the wake stream holds; past it the oldest are dropped (the sweeper wakes
    /// for their jobs again).
    pub wake_max_messages: i64,
    /// Stream replicas (1 for a single server; 3 on a cluster).
    pub replicas: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            url: String::new(),
            connect_timeout_ms: 3000,
            ack_wait_ms: 10_000,
            max_deliver: 10,
            sweep_after_ms: 2000,
            sweep_interval_ms: 500,
            relay_poll_ms: 10,
            relay_lease_ms: 3000,
            events_max_age_secs: 24 * 3600,
            wake_max_messages: 1_000_000,
            replicas: 1,
        }
    }
}

impl QueueConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.enabled() {
            nats_url("queue.url", &self.url)?;
        }
        if self.connect_timeout_ms == 0 || self.ack_wait_ms < 1000 || self.max_deliver < 2 {
            return Err("queue.connect_timeout_ms must be above 0, queue.ack_wait_ms at least 1000 and queue.max_deliver at least 2".into());
        }
        if self.sweep_after_ms == 0 || self.sweep_interval_ms == 0 || self.relay_poll_ms == 0 || self.relay_lease_ms < 300 {
            return Err(
                "queue.sweep_after_ms, queue.sweep_interval_ms and queue.relay_poll_ms must be above 0, queue.relay_lease_ms at least 300"
                    .into(),
            );
        }
        if self.events_max_age_secs == 0 || self.wake_max_messages < 1 || !(1..=5).contains(&self.replicas) {
            return Err("queue.events_max_age_secs and queue.wake_max_messages must be above 0, queue.replicas between 1 and 5".into());
        }
        Ok(())
    }
}

/// A checked `nats://HOST:PORT[,nats://HOST:PORT…][/NAMESPACE]` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsUrl {
    pub servers: Vec<String>,
    pub namespace: Option<String>,
}

impl NatsUrl {
    pub fn names(&self) -> Names {
        Names::new(self.namespace.as_deref())
    }
}

/// Checks a `nats://HOST:PORT[,nats://HOST:PORT…][/NAMESPACE]` setting.
pub fn nats_url(setting: &str, url: &str) -> Result<NatsUrl, String> {
    let mut servers = Vec::new();
    let mut namespace = None;
    for one in url.split(',') {
        let one = one.trim();
        let rest = one
            .strip_prefix("nats://")
            .or_else(|| one.strip_prefix("tls://"))
            .ok_or_else(|| format!("{setting}: {one:?} is not a NATS URL; use nats://HOST:PORT"))?;
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (rest, None),
        };
        if let Some(path) = path.filter(|p| !p.is_empty()) {
            if path.len() > 32 || !path.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("{setting}: namespace {path:?} must be up to 32 letters, digits, '-' or '_'"));
            }
            namespace = Some(path.to_string());
        }
        let hostport = authority.rsplit('@').next().unwrap_or(authority);
        let (host, port) =
            hostport.rsplit_once(':').ok_or_else(|| format!("{setting}: {one:?} has no port; use nats://HOST:PORT (4222 is NATS's)"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{setting}: {one:?} is not HOST:PORT"));
        }
        let scheme = if one.starts_with("tls://") { "tls" } else { "nats" };
        servers.push(format!("{scheme}://{authority}"));
    }
    Ok(NatsUrl { servers, namespace })
}

/// A wake-up: job `job` is claimable at `attempt` (the attempts it has had).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wake {
    pub job: String,
    pub attempt: u32,
}

impl Wake {
    /// Its `Nats-Msg-Id`: one per claimable period of a job (each claim raises the attempt).
    pub fn msg_id(&self) -> String {
        format!("{}:{}", self.job, self.attempt)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{0}")]
    Connect(String),
    #[error("NATS: {0}")]
    Nats(String),
}

impl QueueError {
    fn nats(e: impl std::fmt::Display) -> Self {
        QueueError::Nats(e.to_string())
    }
}

/// A connection to the broker, with the streams in place.
#[derive(Clone)]
pub struct Queue {
    js: jetstream::Context,
    config: QueueConfig,
    names: Names,
}

impl Queue {
    /// Connects (waiting up to `connect_timeout_ms`) and creates or updates the streams. After
    /// this the client reconnects by itself whenever the connection breaks.
    pub async fn connect(config: &QueueConfig, name: &str) -> Result<Queue, QueueError> {
        let url = nats_url("queue.url", &config.url).map_err(QueueError::Connect)?;
        let client = connect_client(&config.url, name, Duration::from_millis(config.connect_timeout_ms), "queue.url").await?;
        let js = jetstream::new(client);
        let queue = Queue { js, config: config.clone(), names: url.names() };
        queue.ensure_streams().await.map_err(|e| {
            QueueError::Connect(format!(
                "queue.url ({}): cannot set up the JetStream streams: {e}; is JetStream enabled (nats-server -js)?",
                config.url
            ))
        })?;
        Ok(queue)
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Creates the streams, or brings their settings to this configuration. Also run again by
    /// the relay when a publish finds no stream (the server's store was wiped).
    pub async fn ensure_streams(&self) -> Result<(), QueueError> {
        let (c, n) = (&self.config, &self.names);
        self.ensure(stream::Config {
            name: n.wake_stream.clone(),
            description: Some("pixmesh: jobs that became claimable (the database decides who claims them)".into()),
            subjects: vec![n.wake_subject.clone()],
            // Each wake-up is taken by one distributor and removed when acked.
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_messages: c.wake_max_messages,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: c.replicas,
            ..Default::default()
        })
        .await?;
        self.ensure(stream::Config {
            name: n.events_stream.clone(),
            description: Some("pixmesh: every job's events, in order per job (a copy; the database keeps them)".into()),
            subjects: vec![format!("{}.>", n.events_prefix)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(c.events_max_age_secs),
            max_bytes: 1 << 30,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: c.replicas,
            ..Default::default()
        })
        .await?;
        self.ensure(stream::Config {
            name: n.dead_stream.clone(),
            description: Some("pixmesh: wake-ups that could not be handled, for an operator".into()),
            subjects: vec![n.dead_subject.clone()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_messages: 100_000,
            discard: stream::DiscardPolicy::Old,
            num_replicas: c.replicas,
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    async fn ensure(&self, config: stream::Config) -> Result<(), QueueError> {
        let name = config.name.clone();
        match self.js.get_stream(&name).await {
            Ok(_) => {
                self.js.update_stream(config).await.map_err(|e| QueueError::Nats(format!("stream {name}: {e}")))?;
            }
            Err(_) => {
                if let Err(e) = self.js.create_stream(config.clone()).await {
                    // Another process created it in between.
                    self.js.update_stream(config).await.map_err(|_| QueueError::Nats(format!("stream {name}: {e}")))?;
                }
            }
        }
        Ok(())
    }

    /// Publishes a wake-up and waits for the stream to store it (or to report it a duplicate).
    pub async fn publish_wake(&self, wake: &Wake) -> Result<(), QueueError> {
        self.send_wake(wake, None).await?.await.map_err(QueueError::nats)?;
        Ok(())
    }

    /// Sends a wake-up without waiting for the stream's answer; the answer comes with the
    /// returned future.
    ///
    /// Sent inside a [`Queue::publish_span`] of its job's trace: the wake-up carries that span
    /// as its `traceparent` header, for the claim it leads to (without exported traces, the
    /// job's own `traceparent`).
    pub async fn send_wake(&self, wake: &Wake, traceparent: Option<&str>) -> Result<jetstream::context::PublishAckFuture, QueueError> {
        let payload = serde_json::to_vec(wake).map_err(QueueError::nats)?;
        let mut publish = jetstream::message::PublishMessage::build().payload(payload.into()).message_id(wake.msg_id());
        if let Some(parent) = pixmesh_chassis::trace::outgoing(&tracing::Span::current(), traceparent) {
            publish = publish.header(pixmesh_chassis::trace::TRACEPARENT, parent);
        }
        self.js.send_publish(self.names.wake_subject.clone(), publish).await.map_err(QueueError::nats)
    }

    /// The producer span of a wake-up's publish; a child of the current span, or of
    /// `traceparent` (the job's trace) when given.
    pub fn publish_span(&self, traceparent: Option<&str>) -> tracing::Span {
        let span = tracing::info_span!(
            "wake publish",
            otel.name = %format!("send {}", self.names.wake_subject),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.destination.name = %self.names.wake_subject,
            trace_id = tracing::field::Empty,
        );
        if traceparent.is_some() {
            pixmesh_chassis::trace::continue_from(&span, traceparent);
        }
        span
    }
}

/// The upload service's early wake-up: published as soon as the job is committed, without
/// waiting for the stream's answer; the relay publishes the same wake-up (same `Nats-Msg-Id`)
/// from the outbox in any case.
impl pixmesh_model::Notify for Queue {
    fn job_created(&self, id: &str, traceparent: Option<&str>) {
        let queue = self.clone();
        let wake = Wake { job: id.to_string(), attempt: 0 };
        // A child of the upload's span (the current one): the relay's copy of this wake-up is
        // dropped as a duplicate, so this one carries the trace to the distributor.
        let span = self.publish_span(None);
        let traceparent = traceparent.map(str::to_string);
        tokio::spawn(
            async move {
                if let Err(e) = queue.send_wake(&wake, traceparent.as_deref()).await {
                    tracing::debug!(job = %wake.job, error = %e, "early wake-up not sent; the relay sends it");
                }
            }
            .instrument(span),
        );
    }
}

/// Connects a client; an unreachable server is refused with a sentence that names `setting`.
pub async fn connect_client(url: &str, name: &str, timeout: Duration, setting: &str) -> Result<async_nats::Client, QueueError> {
    let parsed = nats_url(setting, url).map_err(QueueError::Connect)?;
    let options = async_nats::ConnectOptions::new()
        .name(format!("pixmesh-{name}"))
        .connection_timeout(timeout)
        // After the first connection, reconnect forever (with the client's backoff).
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!(event = %other, "NATS"),
            }
        });
    let urls: Vec<&str> = parsed.servers.iter().map(String::as_str).collect();
    let connect = options.connect(urls.as_slice());
    match tokio::time::timeout(timeout + Duration::from_millis(500), connect).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => {
            Err(QueueError::Connect(format!("{setting} ({url}): cannot connect: {e}; check that nats-server runs there, or fix the URL")))
        }
        Err(_) => Err(QueueError::Connect(format!(
            "{setting} ({url}): no answer within {} ms; check that nats-server runs there, or fix the URL",
            timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_urls_are_checked() {
        assert!(nats_url("queue.url", "nats://127.0.0.1:4222").is_ok());
        assert!(nats_url("queue.url", "nats://a:1, nats://b:2").is_ok());
        assert!(nats_url("queue.url", "nats://user:pw@host:4222").is_ok());
        let err = nats_url("queue.url", "http://127.0.0.1:4222").unwrap_err();
        assert!(err.contains("queue.url") && err.contains("nats://HOST:PORT"), "{err}");
        assert!(nats_url("queue.url", "nats://127.0.0.1").unwrap_err().contains("no port"));
        assert!(nats_url("queue.url", "nats://:4222").is_err());
        assert!(nats_url("queue.url", "nats://h:99999").is_err());
        let url = nats_url("queue.url", "nats://h:1/ci-7").unwrap();
        assert_eq!(url.servers, vec!["nats://h:1".to_string()]);
        assert_eq!(url.names().wake_stream, "PIXMESH_CI_7_WAKE");
        assert_eq!(url.names().wake_subject, "pixmesh.ci-7.wake");
        assert_eq!(url.names().workers_bucket, "pixmesh_ci-7_workers");
        assert_eq!(nats_url("queue.url", "nats://h:1").unwrap().names().events_subject("j"), "pixmesh.events.j");
        assert!(nats_url("queue.url", "nats://h:1/a.b").unwrap_err().contains("namespace"));
    }

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert_eq!(QueueConfig::default().validate(), Ok(()));
        let bad = QueueConfig { url: "redis://x:1".into(), ..QueueConfig::default() };
        assert!(bad.validate().unwrap_err().contains("queue.url"));
        let bad = QueueConfig { max_deliver: 1, ..QueueConfig::default() };
        assert!(bad.validate().unwrap_err().contains("max_deliver"));
    }

    #[test]
    fn a_wake_up_is_named_by_job_and_attempt() {
        let wake = Wake { job: "j1".into(), attempt: 2 };
        assert_eq!(wake.msg_id(), "j1:2");
        let json = serde_json::to_string(&wake).unwrap();
        assert_eq!(serde_json::from_str::<Wake>(&json).unwrap(), wake);
    }
}
