//! The worker registry on NATS KV, for deployments that run NATS instead of pixmesh's own
//! registry role.
//!
//! A worker puts its entry (address, capacity) into the bucket `pixmesh_workers` (in the
//! URL's namespace, if it has one) under its id
//! and puts it again every heartbeat; on a graceful stop it deletes it. Distributors watch the
//! bucket: a put or a delete reaches them at once, and an entry not put again within the
//! missed-heartbeat bound is dropped by each watcher itself (NATS 2.9 does not announce
//! entries that age out of a bucket). The bucket's own age limit removes such entries from the
//! server too.

use crate::{QueueError, connect_client, nats_url};
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Heartbeats a worker may miss before watchers drop it (as the built-in registry's default).
pub const MISSED_HEARTBEATS: u32 = 3;

/// A worker's entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    pub address: String,
    pub capacity: usize,
    /// Calls at once when their bytes come by presigned URLs (0, or absent in an older
    /// worker's entry: `capacity`).
    #[serde(default)]
    pub transfers: usize,
    /// How often the worker puts its entry again (watchers drop it after [`MISSED_HEARTBEATS`]).
    pub heartbeat_ms: u64,
}

/// Keys allowed by NATS KV: the worker id with anything else replaced.
pub fn key_for(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') { c } else { '_' }).collect()
}

/// Connects for the registry at `url` (refused with a sentence that names `setting`).
async fn connect(url: &str, name: &str, setting: &str) -> Result<(jetstream::Context, String), QueueError> {
    let bucket = nats_url(setting, url).map_err(QueueError::Connect)?.names().workers_bucket;
    let client = connect_client(url, name, Duration::from_secs(3), setting).await?;
    Ok((jetstream::new(client), bucket))
}

/// Opens the bucket, creating it if it is not there (first start, or a server that lost it).
async fn bucket(js: &jetstream::Context, bucket: &str, heartbeat: Duration) -> Result<kv::Store, QueueError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    // The bucket's stream, made as the KV convention has it (`KV_<bucket>`, `$KV.<bucket>.>`,
    // one value per key). `create_key_value` of the client asks the server for an account
    // field that NATS 2.9 does not send, so the stream is made directly.
    let config = jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("pixmesh image workers".into()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        // Entries of workers that died are removed from the server too (watchers drop them
        // sooner, after the missed heartbeats); at least the 2-minute duplicate window, which
        // a stream's age limit may not be below.
        max_age: (heartbeat * MISSED_HEARTBEATS * 10).max(Duration::from_secs(120)),
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    if let Err(e) = js.create_stream(config).await {
        // Another process may have made it in between.
        tracing::debug!(error = %e, "creating the workers' bucket");
    }
    js.get_key_value(bucket).await.map_err(|e| QueueError::Nats(format!("cannot open the KV bucket {bucket}: {e}")))
}

/// A worker's registration: its entry, put again every heartbeat until [`NatsRegistration::deregister`].
pub struct NatsRegistration {
    store: kv::Store,
    key: String,
    task: JoinHandle<()>,
}

impl NatsRegistration {
    /// Connects (refusing an unreachable server with a sentence naming `worker.registry`) and
    /// puts the first entry before returning, so the worker is known once it says it is ready.
    pub async fn start(url: &str, id: &str, member: Member) -> Result<NatsRegistration, QueueError> {
        let heartbeat = Duration::from_millis(member.heartbeat_ms);
        let (js, name) = connect(url, &format!("worker-{id}"), "worker.registry").await?;
        let store = bucket(&js, &name, heartbeat).await?;
        let key = key_for(id);
        let value: bytes::Bytes = serde_json::to_vec(&member).map_err(QueueError::nats)?.into();
        store.put(&key, value.clone()).await.map_err(QueueError::nats)?;
        let (mut beat_store, beat_key) = (store.clone(), key.clone());
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(heartbeat);
            ticks.tick().await;
            let mut failing = false;
            loop {
                ticks.tick().await;
                match beat_store.put(&beat_key, value.clone()).await {
                    Ok(_) if failing => {
                        tracing::info!("registry heartbeats reach NATS again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "registry heartbeat to NATS failed; retrying every heartbeat");
                            failing = true;
                        }
                        // The server may have lost the bucket (its store wiped): make it again.
                        if let Ok(store) = bucket(&js, &name, heartbeat).await {
                            beat_store = store;
                        }
                    }
                }
            }
        });
        Ok(NatsRegistration { store, key, task })
    }

    /// Stops the heartbeats and deletes the entry: watchers drop this worker at once.
    pub async fn deregister(self) {
        self.task.abort();
        if let Err(e) = self.store.delete(&self.key).await {
            tracing::warn!(error = %e, "cannot delete the registry entry; watchers drop it after the missed heartbeats");
        }
    }
}

/// The distributor's view of the bucket.
pub struct NatsWatch {
    url: String,
    js: Option<(jetstream::Context, String)>,
    watch: Option<kv::Watch>,
    /// Live entries by key, with when each was last put (as this watcher saw it).
    members: BTreeMap<String, (Member, Instant)>,
    last: Option<Vec<Member>>,
}

impl NatsWatch {
    pub fn new(url: &str) -> NatsWatch {
        NatsWatch { url: url.to_string(), js: None, watch: None, members: BTreeMap::new(), last: None }
    }

    fn expires(member: &Member, seen: Instant) -> Instant {
        seen + Duration::from_millis(member.heartbeat_ms) * MISSED_HEARTBEATS
    }

    fn current(&self) -> Vec<Member> {
        self.members.values().map(|(m, _)| m.clone()).collect()
    }

    /// Waits for the next change of the set and answers the whole set (the first call answers
    /// at once with the set as it is). An error means NATS is unreachable for now: the caller
    /// keeps the last set and asks again.
    pub async fn next(&mut self) -> Result<Vec<Member>, String> {
        if self.watch.is_none() {
            if self.js.is_none() {
                self.js = Some(connect(&self.url, "distributor", "distributor.registry").await.map_err(|e| e.to_string())?);
            }
            let (js, name) = self.js.as_ref().ok_or("not connected")?;
            let store = bucket(js, name, Duration::from_secs(1)).await.map_err(|e| e.to_string())?;
            // The last entry of every key, then every change.
            let watch = store.watch_with_history(">").await.map_err(|e| format!("cannot watch the workers' bucket: {e}"))?;
            self.watch = Some(watch);
            self.members.clear();
        }
        loop {
            let now = Instant::now();
            self.members.retain(|_, (m, seen)| Self::expires(m, *seen) > now);
            let set = self.current();
            if self.last.as_ref() != Some(&set) && (self.last.is_some() || !self.members.is_empty()) {
                self.last = Some(set.clone());
                return Ok(set);
            }
            let next_expiry = self.members.values().map(|(m, seen)| Self::expires(m, *seen)).min();
            let watch = self.watch.as_mut().ok_or("no watch")?;
            let entry = tokio::select! {
                entry = watch.next() => entry,
                _ = sleep_until(next_expiry) => continue,
                // The first answer may be an empty set: say so once the history is read.
                _ = tokio::time::sleep(Duration::from_millis(300)), if self.last.is_none() => {
                    self.last = Some(set.clone());
                    return Ok(set);
                }
            };
            match entry {
                Some(Ok(entry)) => self.apply(entry),
                Some(Err(e)) => {
                    self.watch = None;
                    return Err(format!("the watch of the workers' bucket broke: {e}"));
                }
                None => {
                    self.watch = None;
                    return Err("the watch of the workers' bucket ended".into());
                }
            }
        }
    }

    fn apply(&mut self, entry: kv::Entry) {
        match entry.operation {
            kv::Operation::Put => match serde_json::from_slice::<Member>(&entry.value) {
                Ok(member) => {
                    // An entry from the history that is already older than its bound is a
                    // worker that died: not taken.
                    let age = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .ok()
                        .and_then(|now| u64::try_from(now.as_millis()).ok())
                        .zip(u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).ok())
                        .map(|(now, at)| Duration::from_millis(now.saturating_sub(at)))
                        .unwrap_or_default();
                    let bound = Duration::from_millis(member.heartbeat_ms) * MISSED_HEARTBEATS;
                    if age < bound {
                        let seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                        self.members.insert(entry.key, (member, seen));
                    }
                }
                Err(e) => tracing::warn!(key = %entry.key, error = %e, "unreadable worker entry in the workers' bucket; ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.members.remove(&entry.key);
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_what_nats_kv_allows() {
        assert_eq!(key_for("worker-1"), "worker-1");
        assert_eq!(key_for("host.example:5/a b"), "host_example_5_a_b");
    }
}
