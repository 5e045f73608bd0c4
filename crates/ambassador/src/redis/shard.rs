//! The shards: a few long-lived connections to each Redis server, shared by every client.
//!
//! A connection is two loops over one socket. The writer takes the batches that clients queued
//! (a client's commands for this shard, in its order), writes as many as are waiting in one
//! write, and tells the reader how many replies each batch is owed; the reader cuts that many
//! replies off the stream, in order, and hands them back. Commands of many clients thus share
//! one write and one read, as in twemproxy.
//!
//! A failure (refused connection, reset, no reply within `timeout_ms`) fails every batch in
//! flight on that connection with an error reply and counts against the shard. An idle
//! connection sends a `PING` every second, so a shard that goes away while nobody uses it is
//! found (and ejected) before a client needs it. With ejection
//! on, `eject_after` failures in a row take the shard out of the ring (its keys go to the
//! others) until `retry_after_ms` has passed and it answers `PING` again.

use super::ketama::Ring;
use super::resp;
use crate::instruments;
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Batches a connection may have queued before clients wait to queue more.
const QUEUE: usize = 4096;
/// Bytes a connection's writer gathers into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// The first wait before connecting again to a shard that refused; it doubles up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// A connection with nothing to send for this long sends a `PING` of its own.
const IDLE_PING: Duration = Duration::from_secs(1);

/// Why a batch got no replies from its shard.
#[derive(Debug, Clone, thiserror::Error)]
#[error("pixmesh ambassador: shard {shard} ({addr}): {reason}")]
pub struct ShardError {
    pub shard: String,
    pub addr: String,
    pub reason: String,
}

pub type Replies = Result<Vec<Bytes>, ShardError>;

/// A client's commands for one shard, and where their replies go.
pub struct Batch {
    pub payload: Vec<u8>,
    pub count: usize,
    pub reply: oneshot::Sender<Replies>,
}

/// How the pool connects and when it ejects.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub connections: usize,
    pub timeout: Duration,
    pub eject_after: u32,
    pub retry_after: Duration,
    pub password: Option<String>,
}

/// One shard as configured: its ring name, address and weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSpec {
    pub name: String,
    pub addr: String,
    pub weight: u32,
}

/// A shard's state, shared by its connections.
pub struct Shard {
    pub spec: ShardSpec,
    queues: Vec<mpsc::Sender<Batch>>,
    /// Failures in a row (reset by any reply).
    failures: AtomicU32,
    ejected: AtomicBool,
    /// Milliseconds since the pool started when the shard was last ejected.
    ejected_at_ms: AtomicU64,
    /// Connections up now.
    connected: AtomicU32,
    last_error: Mutex<Option<String>>,
    commands: metrics::Counter,
    errors: metrics::Counter,
}

/// Every shard, and the ring over those that are in it.
pub struct Pool {
    pub shards: Vec<Arc<Shard>>,
    ring: ArcSwap<Ring>,
    settings: PoolSettings,
    started: Instant,
    ejections: metrics::Counter,
    closed: CancellationToken,
}

impl Pool {
    /// Starts the connections of every shard (each connects in the background, and keeps
    /// trying while its shard is down).
    pub fn start(specs: Vec<ShardSpec>, settings: PoolSettings) -> Arc<Pool> {
        let mut receivers = Vec::new();
        let shards = specs
            .into_iter()
            .map(|spec| {
                let (queues, rx): (Vec<_>, Vec<_>) = (0..settings.connections).map(|_| mpsc::channel(QUEUE)).unzip();
                receivers.push(rx);
                let label = spec.name.clone();
                Arc::new(Shard {
                    queues,
                    failures: AtomicU32::new(0),
                    ejected: AtomicBool::new(false),
                    ejected_at_ms: AtomicU64::new(0),
                    connected: AtomicU32::new(0),
                    last_error: Mutex::new(None),
                    commands: metrics::counter!(instruments::COMMANDS, "shard" => label.clone()),
                    errors: metrics::counter!(instruments::SHARD_ERRORS, "shard" => label),
                    spec,
                })
            })
            .collect();
        let pool = Arc::new(Pool {
            shards,
            ring: ArcSwap::from_pointee(Ring::default()),
            settings,
            started: Instant::now(),
            ejections: metrics::counter!(instruments::EJECTIONS),
            closed: CancellationToken::new(),
        });
        pool.rebuild();
        for (index, queues) in receivers.into_iter().enumerate() {
            for rx in queues {
                tokio::spawn(connection(pool.clone(), index, rx));
            }
        }
        pool
    }

    /// Stops every connection: what is in flight fails with "the ambassador is stopping".
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// The ring now (a snapshot: ejections replace it, they do not change it).
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.load_full()
    }

    fn rebuild(&self) {
        let live = self.shards.iter().enumerate().filter(|(_, s)| !s.ejected.load(Ordering::Acquire));
        let ring = Ring::new(live.map(|(i, s)| (i, s.spec.name.as_str(), s.spec.weight)));
        self.ring.store(Arc::new(ring));
        let ejected = self.shards.iter().filter(|s| s.ejected.load(Ordering::Acquire)).count();
        metrics::gauge!(instruments::SHARDS_EJECTED).set(ejected as f64);
    }

    /// Queues a batch on one of the shard's connections (`lane` picks which).
    pub async fn send(&self, shard: usize, lane: usize, batch: Batch) {
        let shard = &self.shards[shard];
        shard.commands.increment(batch.count as u64);
        let queue = &shard.queues[lane % shard.queues.len()];
        if let Err(mpsc::error::SendError(batch)) = queue.send(batch).await {
            let _ = batch.reply.send(Err(shard.error("the ambassador is stopping")));
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A failure of the shard `index`: counted, and the shard ejected at the limit.
    fn failed(&self, index: usize, reason: &str) {
        let shard = &self.shards[index];
        shard.errors.increment(1);
        *shard.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        let failures = shard.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if self.settings.eject_after > 0 && failures >= self.settings.eject_after && !shard.ejected.swap(true, Ordering::AcqRel) {
            shard.ejected_at_ms.store(self.now_ms(), Ordering::Release);
            self.ejections.increment(1);
            tracing::warn!(shard = %shard.spec.name, addr = %shard.spec.addr, failures, reason, "shard ejected: its keys go to the other shards");
            self.rebuild();
        }
    }

    /// The shard answered: its failures are forgiven, and an ejected shard rejoins the ring.
    fn answered(&self, index: usize) {
        let shard = &self.shards[index];
        if shard.failures.load(Ordering::Relaxed) != 0 {
            shard.failures.store(0, Ordering::Release);
        }
        if shard.ejected.load(Ordering::Acquire) && shard.ejected.swap(false, Ordering::AcqRel) {
            tracing::warn!(shard = %shard.spec.name, addr = %shard.spec.addr, "shard back in the ring");
            self.rebuild();
        }
    }

    /// How long an ejected shard still waits before it is tried again.
    fn ejection_left(&self, index: usize) -> Option<Duration> {
        let shard = &self.shards[index];
        if !shard.ejected.load(Ordering::Acquire) {
            return None;
        }
        let until = shard.ejected_at_ms.load(Ordering::Acquire) + self.settings.retry_after.as_millis() as u64;
        until.checked_sub(self.now_ms()).filter(|&ms| ms > 0).map(Duration::from_millis)
    }

    /// What `GET /shards` shows.
    pub fn snapshot(&self) -> Vec<serde_json::Value> {
        self.shards
            .iter()
            .map(|s| {
                let ejected = s.ejected.load(Ordering::Acquire);
                let connected = s.connected.load(Ordering::Acquire);
                serde_json::json!({
                    "name": s.spec.name,
                    "addr": s.spec.addr,
                    "weight": s.spec.weight,
                    "state": if ejected { "ejected" } else if connected > 0 { "up" } else { "down" },
                    "connections": connected,
                    "failures": s.failures.load(Ordering::Acquire),
                    "last_error": *s.last_error.lock().unwrap_or_else(|p| p.into_inner()),
                })
            })
            .collect()
    }

    /// Shards in the ring that have a connection up (what readiness asks for: at least one).
    pub fn live(&self) -> usize {
        self.shards.iter().filter(|s| !s.ejected.load(Ordering::Acquire) && s.connected.load(Ordering::Acquire) > 0).count()
    }
}

impl Shard {
    pub fn error(&self, reason: impl Into<String>) -> ShardError {
        ShardError { shard: self.spec.name.clone(), addr: self.spec.addr.clone(), reason: reason.into() }
    }
}

/// One connection of shard `index`, for the pool's life: connect, serve, and on a failure fail
/// what was in flight and connect again after a backoff.
async fn connection(pool: Arc<Pool>, index: usize, mut queue: mpsc::Receiver<Batch>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        if let Some(wait) = pool.ejection_left(index) {
            if !refuse_for(&pool, index, &mut queue, wait, "ejected after failing").await {
                return;
            }
            continue;
        }
        let shard = pool.shards[index].clone();
        let connecting = tokio::select! {
            c = connect(&shard.spec.addr, &pool.settings) => c,
            _ = pool.closed.cancelled() => return,
        };
        let stream = match connecting {
            Ok(stream) => stream,
            Err(reason) => {
                pool.failed(index, &reason);
                if !refuse_for(&pool, index, &mut queue, backoff, &reason).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        pool.answered(index);
        shard.connected.fetch_add(1, Ordering::AcqRel);
        let outcome = serve(stream, &pool, index, &mut queue).await;
        shard.connected.fetch_sub(1, Ordering::AcqRel);
        match outcome {
            Ok(()) => return,
            Err(reason) => {
                tracing::warn!(shard = %shard.spec.name, addr = %shard.spec.addr, reason, "shard connection failed");
                pool.failed(index, &reason);
            }
        }
    }
}

/// While the shard is down: fails every batch queued for `wait` at once (a client learns of
/// it now rather than at its timeout). False when the pool is gone.
async fn refuse_for(pool: &Pool, index: usize, queue: &mut mpsc::Receiver<Batch>, wait: Duration, reason: &str) -> bool {
    let shard = &pool.shards[index];
    let until = tokio::time::Instant::now() + wait;
    loop {
        tokio::select! {
            batch = queue.recv() => match batch {
                Some(batch) => {
                    let _ = batch.reply.send(Err(shard.error(format!("unavailable: {reason}"))));
                }
                None => return false,
            },
            _ = tokio::time::sleep_until(until) => return true,
            _ = pool.closed.cancelled() => return false,
        }
    }
}

/// Connects, authenticates when a password is set, and checks the shard answers `PING`.
async fn connect(addr: &str, settings: &PoolSettings) -> Result<TcpStream, String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("cannot connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut hello = Vec::new();
        let mut expected = 1;
        if let Some(password) = &settings.password {
            resp::write_command(&mut hello, [&b"AUTH"[..], password.as_bytes()].into_iter());
            expected += 1;
        }
        resp::write_command(&mut hello, [&b"PING"[..]].into_iter());
        stream.write_all(&hello).await.map_err(|e| format!("cannot write: {e}"))?;
        let mut buf = BytesMut::with_capacity(256);
        let mut replies = Vec::new();
        while replies.len() < expected {
            match resp::reply_len(&buf).map_err(|e| e.to_string())? {
                Some(n) => replies.push(buf.split_to(n)),
                None => {
                    if stream.read_buf(&mut buf).await.map_err(|e| format!("cannot read: {e}"))? == 0 {
                        return Err("closed the connection".to_string());
                    }
                }
            }
        }
        for reply in replies {
            if reply.first() == Some(&b'-') {
                return Err(format!("answered {}", String::from_utf8_lossy(&reply).trim_end()));
            }
        }
        Ok(stream)
    };
    tokio::time::timeout(settings.timeout, attempt).await.map_err(|_| format!("no answer within {:?}", settings.timeout))?
}

/// What a batch is owed: how many replies, and where they go.
struct Owed {
    count: usize,
    reply: oneshot::Sender<Replies>,
}

/// Serves one connection until it fails (`Err`, every batch in flight failed) or the pool
/// stops (`Ok`).
async fn serve(stream: TcpStream, pool: &Pool, index: usize, queue: &mut mpsc::Receiver<Batch>) -> Result<(), String> {
    let (mut reader, mut writer) = stream.into_split();
    let owed: Mutex<VecDeque<Owed>> = Mutex::new(VecDeque::new());
    let notify = tokio::sync::Notify::new();
    let timeout = pool.settings.timeout;

    let write = async {
        let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
        loop {
            let first = match tokio::time::timeout(IDLE_PING, queue.recv()).await {
                Ok(Some(batch)) => batch,
                Ok(None) => return Ok::<(), String>(()),
                // Idle: a PING of the connection's own, so that a shard that went away is found
                // (and ejected) before a client needs it. Its reply only has to come.
                Err(_) => {
                    let (reply, _) = oneshot::channel();
                    Batch { payload: b"*1\r\n$4\r\nPING\r\n".to_vec(), count: 1, reply }
                }
            };
            out.clear();
            let mut next = Some(first);
            {
                let mut owed = owed.lock().unwrap_or_else(|p| p.into_inner());
                while let Some(batch) = next.take() {
                    out.extend_from_slice(&batch.payload);
                    owed.push_back(Owed { count: batch.count, reply: batch.reply });
                    if out.len() < WRITE_BATCH {
                        next = queue.try_recv().ok();
                    }
                }
            }
            notify.notify_one();
            writer.write_all(&out).await.map_err(|e| format!("cannot write: {e}"))?;
        }
    };

    let read = async {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            let next = owed.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
            let Some(Owed { count, reply }) = next else {
                notify.notified().await;
                continue;
            };
            let mut replies = Vec::with_capacity(count);
            let outcome = loop {
                if replies.len() == count {
                    break Ok(());
                }
                match resp::reply_len(&buf) {
                    Ok(Some(n)) => replies.push(buf.split_to(n).freeze()),
                    Ok(None) => {
                        if buf.capacity() - buf.len() < 16 * 1024 {
                            buf.reserve(64 * 1024.max(buf.len()));
                        }
                        match tokio::time::timeout(timeout, reader.read_buf(&mut buf)).await {
                            Ok(Ok(0)) => break Err("closed the connection".to_string()),
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => break Err(format!("cannot read: {e}")),
                            Err(_) => break Err(format!("no reply within {timeout:?}")),
                        }
                    }
                    Err(e) => break Err(e.to_string()),
                }
            };
            match outcome {
                Ok(()) => {
                    pool.answered(index);
                    let _ = reply.send(Ok(replies));
                }
                Err(reason) => {
                    let _ = reply.send(Err(pool.shards[index].error(reason.clone())));
                    return Err::<(), String>(reason);
                }
            }
        }
    };

    let outcome = tokio::select! {
        r = write => r,
        r = read => r,
        _ = pool.closed.cancelled() => Ok(()),
    };
    // Whatever is still owed on this connection will not come: its clients hear why now.
    let reason = outcome.as_ref().err().cloned().unwrap_or_else(|| "the ambassador is stopping".to_string());
    let shard = &pool.shards[index];
    for owed in owed.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        let _ = owed.reply.send(Err(shard.error(reason.clone())));
    }
    outcome
}
