//! `pixmesh ambassador redis`: the application talks to one Redis address; its keys live on
//! several Redis servers (shards).
//!
//! - Each command goes to the shard of its key by consistent hashing ([`ketama`]), the
//!   placement twemproxy computes, so the two can replace each other without moving keys.
//! - `MGET`, `MSET`, `DEL`, `UNLINK`, `EXISTS` and `TOUCH` are split per shard and their replies
//!   merged; other multi-key commands run when their keys share a shard (a hash tag) and are
//!   refused with the reason otherwise; commands with no key or a connection's own state
//!   (`KEYS`, `MULTI`, `SUBSCRIBE`, blocking pops) are refused ([`commands`]).
//! - Pipelines are kept: a client's round of commands costs one read and one write, and the
//!   commands of every client share a few connections per shard ([`shard`]).
//! - A shard that fails `eject_after` times in a row leaves the ring until `retry_after_ms`
//!   has passed and it answers again.

pub mod commands;
pub mod ketama;
pub mod resp;
mod session;
pub mod shard;

use crate::instruments;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::admin::Readiness;
use pixmesh_chassis::announce::Announcement;
use serde::Deserialize;
use session::SessionSettings;
use shard::{Pool, PoolSettings, ShardSpec};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// `[ambassador.redis]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Where applications connect (RESP2).
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The shards, each `[NAME=]HOST:PORT[:WEIGHT]`. The ring places keys by NAME (default
    /// `HOST:PORT`): name them (`redis-0=…`) when their addresses may change.
    pub shards: Vec<String>,
    /// How keys are hashed: `fnv1a_32` (the default), `fnv1a_64` or `md5`, twemproxy's
    /// functions of those names (to keep a twemproxy pool's placement, use its `hash`).
    pub hash: String,
    /// The two characters around the hashed part of a key (`{}`: `user:{42}:a` and
    /// `user:{42}:b` share a shard); empty to hash whole keys.
    pub hash_tag: String,
    /// Connections to each shard, shared by every client.
    pub connections: usize,
    /// How long a shard may take to connect or to reply before it counts as failed.
    pub timeout_ms: u64,
    /// Failures in a row that take a shard out of the ring (its keys go to the others);
    /// 0 keeps every shard in, and the keys of a shard that is down get errors.
    pub eject_after: u32,
    /// How long an ejected shard stays out before it is tried again.
    pub retry_after_ms: u64,
    /// The password clients must send with `AUTH` (empty: none).
    pub password: String,
    /// The password sent to every shard (`AUTH`) when connecting (empty: none).
    pub shard_password: String,
    /// The largest command a client may send.
    pub max_command_bytes: usize,
    /// Client connections at once; more are answered with an error and closed.
    pub max_clients: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 6380)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shards: Vec::new(),
            hash: "fnv1a_32".into(),
            hash_tag: "{}".into(),
            connections: 1,
            timeout_ms: 2000,
            eject_after: 3,
            retry_after_ms: 10_000,
            password: String::new(),
            shard_password: String::new(),
            max_command_bytes: 64 * 1024 * 1024,
            max_clients: 10_000,
        }
    }
}

/// `[ambassador]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AmbassadorConfig {
    pub redis: RedisConfig,
}

impl AmbassadorConfig {
    pub fn validate(&self) -> Result<(), String> {
        // The shards are checked when the ambassador starts: other roles read this file too,
        // and an empty list is only wrong for the ambassador.
        self.redis.check_settings()
    }
}

impl RedisConfig {
    fn check_settings(&self) -> Result<(), String> {
        if ketama::Hash::parse(&self.hash).is_none() {
            return Err(format!("ambassador.redis.hash {:?}: use fnv1a_32, fnv1a_64 or md5", self.hash));
        }
        if !(self.hash_tag.is_empty() || self.hash_tag.len() == 2 && self.hash_tag.is_ascii()) {
            return Err("ambassador.redis.hash_tag must be two characters (like \"{}\") or empty".into());
        }
        if !(1..=64).contains(&self.connections) {
            return Err("ambassador.redis.connections must be between 1 and 64".into());
        }
        if !(10..=600_000).contains(&self.timeout_ms) {
            return Err("ambassador.redis.timeout_ms must be between 10 and 600000".into());
        }
        if !(10..=3_600_000).contains(&self.retry_after_ms) {
            return Err("ambassador.redis.retry_after_ms must be between 10 and 3600000".into());
        }
        if self.max_command_bytes < 1024 {
            return Err("ambassador.redis.max_command_bytes must be at least 1024".into());
        }
        if self.max_clients == 0 {
            return Err("ambassador.redis.max_clients must be at least 1".into());
        }
        Ok(())
    }

    /// The shards as the ring knows them; an error names the bad entry.
    pub fn shard_specs(&self) -> Result<Vec<ShardSpec>, String> {
        if self.shards.is_empty() {
            return Err("ambassador.redis.shards is empty: give at least one HOST:PORT (--shards a:6379,b:6379)".into());
        }
        let mut specs: Vec<ShardSpec> = Vec::new();
        for entry in &self.shards {
            let spec = parse_shard(entry.trim()).map_err(|why| format!("ambassador.redis.shards: {entry:?}: {why}"))?;
            if specs.iter().any(|s| s.name == spec.name) {
                return Err(format!("ambassador.redis.shards: the name {:?} is given twice", spec.name));
            }
            specs.push(spec);
        }
        Ok(specs)
    }

    fn tag(&self) -> Option<(u8, u8)> {
        let b = self.hash_tag.as_bytes();
        (b.len() == 2).then(|| (b[0], b[1]))
    }
}

/// `[NAME=]HOST:PORT[:WEIGHT]`.
fn parse_shard(entry: &str) -> Result<ShardSpec, &'static str> {
    let (name, rest) = match entry.split_once('=') {
        Some((name, rest)) if !name.is_empty() => (Some(name), rest),
        Some(_) => return Err("an empty name before '='"),
        None => (None, entry),
    };
    // An IPv6 host is in brackets: `[::1]:6379`.
    let (bracketed, rest) = match rest.strip_prefix('[') {
        Some(inner) => {
            let (host, after) = inner.split_once(']').ok_or("a '[' with no ']'")?;
            (Some(host), after.strip_prefix(':').ok_or("expected [HOST]:PORT")?)
        }
        None => (None, rest),
    };
    let mut parts = rest.split(':').collect::<Vec<_>>();
    if let Some(host) = bracketed {
        parts.insert(0, host);
    }
    let (host, port, weight) = match parts.as_slice() {
        [host, port] => (*host, *port, 1),
        [host, port, weight] => (*host, *port, weight.parse::<u32>().map_err(|_| "the weight is not a number")?),
        _ => return Err("expected HOST:PORT"),
    };
    if host.is_empty() {
        return Err("no host");
    }
    port.parse::<u16>().ok().filter(|p| *p > 0).ok_or("the port is not a port number")?;
    if weight == 0 || weight > 1000 {
        return Err("the weight must be between 1 and 1000");
    }
    let addr = if bracketed.is_some() { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok(ShardSpec { name: name.map(str::to_string).unwrap_or_else(|| addr.clone()), addr, weight })
}

/// Serves the ambassador on `listener` until `shutdown`.
pub async fn run(config: RedisConfig, listener: TcpListener, admin: TcpListener, shutdown: Shutdown) -> Result<(), String> {
    let specs = config.shard_specs()?;
    config.check_settings()?;
    let readiness = Readiness::new();
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    let pool = Pool::start(
        specs,
        PoolSettings {
            connections: config.connections,
            timeout: Duration::from_millis(config.timeout_ms),
            eject_after: config.eject_after,
            retry_after: Duration::from_millis(config.retry_after_ms),
            password: Some(config.shard_password.clone()).filter(|p| !p.is_empty()),
        },
    );
    let routes = axum::Router::new().route("/shards", axum::routing::get(shards)).with_state(pool.clone());
    let admin_server = pixmesh_chassis::serve::admin_with("ambassador", admin, readiness.clone(), shutdown.clone(), routes);
    let watch = tokio::spawn(watch_readiness(pool.clone(), readiness.clone()));
    let settings = Arc::new(SessionSettings {
        hash: ketama::Hash::parse(&config.hash).unwrap_or_default(),
        hash_tag: config.tag(),
        password: Some(config.password.clone()).filter(|p| !p.is_empty()),
        max_command_bytes: config.max_command_bytes,
    });
    Announcement::new("ambassador").with("redis", addr).with("admin", admin_addr).print();
    tracing::info!(redis = %addr, admin = %admin_addr, shards = pool.shards.len(), "redis ambassador listening");
    let open = Arc::new(AtomicUsize::new(0));
    let clients = metrics::gauge!(instruments::CLIENTS);
    let refused = metrics::counter!(instruments::CLIENTS_REFUSED);
    let mut sessions = tokio::task::JoinSet::new();
    let mut lane = 0usize;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let (mut stream, _) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if open.load(Ordering::Acquire) >= config.max_clients {
            refused.increment(1);
            tokio::spawn(async move {
                let _ = stream.write_all(b"-ERR max number of clients reached\r\n").await;
            });
            continue;
        }
        lane = lane.wrapping_add(1);
        let (pool, settings, open, clients) = (pool.clone(), settings.clone(), open.clone(), clients.clone());
        open.fetch_add(1, Ordering::AcqRel);
        clients.increment(1.0);
        sessions.spawn(async move {
            session::serve(stream, pool, settings, lane).await;
            open.fetch_sub(1, Ordering::AcqRel);
            clients.decrement(1.0);
        });
    }
    // Clients are closed at once: Redis clients reconnect, and a drain would wait on idle ones.
    readiness.set_ready(false);
    sessions.shutdown().await;
    pool.close();
    watch.abort();
    admin_server.stop().await;
    tracing::info!("redis ambassador stopped");
    Ok(())
}

/// Ready while at least one shard is in the ring and connected.
async fn watch_readiness(pool: Arc<Pool>, readiness: Readiness) {
    loop {
        let live = pool.live();
        readiness.set_check("shards", if live > 0 { Ok(()) } else { Err("no shard is connected".into()) });
        readiness.set_ready(live > 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /shards`: each shard's name, address, weight, state (`up`, `down`, `ejected`),
/// connections, failures in a row and last error.
async fn shards(axum::extract::State(pool): axum::extract::State<Arc<Pool>>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "shards": pool.snapshot() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_read_with_names_and_weights() {
        assert_eq!(
            parse_shard("10.0.0.1:6379").unwrap(),
            ShardSpec { name: "10.0.0.1:6379".into(), addr: "10.0.0.1:6379".into(), weight: 1 }
        );
        assert_eq!(
            parse_shard("redis-0=redis-0.redis:6379:3").unwrap(),
            ShardSpec { name: "redis-0".into(), addr: "redis-0.redis:6379".into(), weight: 3 }
        );
        assert_eq!(parse_shard("[::1]:7000:2").unwrap(), ShardSpec { name: "[::1]:7000".into(), addr: "[::1]:7000".into(), weight: 2 });
        for bad in ["[::1:7000", "[::1]7000", "nohost", ":6379", "h:0", "h:99999", "h:6379:0", "h:6379:x", "=h:1"] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
        let config = RedisConfig { shards: vec!["a=h:1".into(), "a=h:2".into()], ..RedisConfig::default() };
        assert!(config.shard_specs().unwrap_err().contains("twice"));
        assert!(RedisConfig::default().shard_specs().unwrap_err().contains("empty"));
        let bad_tag = RedisConfig { hash_tag: "{".into(), ..RedisConfig::default() };
        assert!(bad_tag.check_settings().is_err());
        assert_eq!(RedisConfig { hash_tag: String::new(), ..RedisConfig::default() }.tag(), None);
    }
}
