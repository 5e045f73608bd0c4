//! `pixmesh sidecar metrics`: an application's own metrics, scraped every `interval_ms`, served
//! as Prometheus text on `/metrics`.
//!
//! - `redis://HOST:PORT`: `INFO` (every section), into `redis_*` metrics with counters as
//!   counters (`_total`), sizes in bytes, times in seconds, and `redis_db_keys{db}`.
//! - `nginx+http://HOST:PORT/PATH`: nginx's `stub_status` page, into `nginx_*` metrics.
//!
//! Each scrape also gives `<app>_up` (1 when the last scrape worked) and
//! `<app>_scrape_duration_seconds`. `/metrics` serves the last scrape; it never waits for the
//! application, so a hung application cannot hang Prometheus.

use serde::Deserialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `[sidecar.metrics]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsAdapterConfig {
    /// Where `/metrics` (and `/healthz`) are served.
    pub listen: SocketAddr,
    /// What to scrape: `redis://HOST:PORT` or `nginx+http://HOST:PORT/PATH` (stub_status).
    pub source: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for MetricsAdapterConfig {
    fn default() -> Self {
        MetricsAdapterConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9180)),
            source: String::new(),
            interval_ms: 5000,
            timeout_ms: 2000,
        }
    }
}

/// What is scraped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Redis { addr: String },
    Nginx { url: String },
}

impl Source {
    pub fn parse(source: &str) -> Result<Source, String> {
        if let Some(addr) = source.strip_prefix("redis://") {
            let addr = addr.trim_end_matches('/');
            if !addr.contains(':') {
                return Err(format!("sidecar.metrics.source {source:?}: give redis://HOST:PORT"));
            }
            return Ok(Source::Redis { addr: addr.to_string() });
        }
        if let Some(url) = source.strip_prefix("nginx+") {
            if !url.starts_with("http://") {
                return Err(format!("sidecar.metrics.source {source:?}: give nginx+http://HOST:PORT/PATH (the stub_status page)"));
            }
            return Ok(Source::Nginx { url: url.to_string() });
        }
        Err(format!("sidecar.metrics.source {source:?}: use redis://HOST:PORT or nginx+http://HOST:PORT/PATH"))
    }

    fn app(&self) -> &'static str {
        match self {
            Source::Redis { .. } => "redis",
            Source::Nginx { .. } => "nginx",
        }
    }
}

impl MetricsAdapterConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.source.is_empty() {
            Source::parse(&self.source)?;
        }
        if !(100..=3_600_000).contains(&self.interval_ms) || !(10..=60_000).contains(&self.timeout_ms) {
            return Err("sidecar.metrics.interval_ms must be 100–3600000 and timeout_ms 10–60000".into());
        }
        Ok(())
    }
}

/// A metric family as written: name, type, help, and its samples (labels, value).
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: &'static str,
    pub help: &'static str,
    pub samples: Vec<(String, f64)>,
}

/// The Prometheus text of `families`.
pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            let _ = writeln!(out, "{}{} {}", f.name, labels, value);
        }
    }
    out
}

fn single(name: &str, kind: &'static str, help: &'static str, value: f64) -> Family {
    Family { name: name.to_string(), kind, help, samples: vec![(String::new(), value)] }
}

/// `INFO` fields worth a metric: the field, its name, type, help and unit scale.
const REDIS_FIELDS: &[(&str, &str, &str, &str)] = &[
    ("uptime_in_seconds", "redis_uptime_seconds", "gauge", "Seconds since the server started"),
    ("connected_clients", "redis_connected_clients", "gauge", "Client connections open"),
    ("blocked_clients", "redis_blocked_clients", "gauge", "Clients waiting in a blocking command"),
    ("maxclients", "redis_max_clients", "gauge", "The server's client limit"),
    ("used_memory", "redis_memory_used_bytes", "gauge", "Memory used by the data set and the server"),
    ("used_memory_rss", "redis_memory_rss_bytes", "gauge", "Resident memory of the process"),
    ("used_memory_peak", "redis_memory_peak_bytes", "gauge", "Most memory used since the start"),
    ("maxmemory", "redis_memory_max_bytes", "gauge", "The memory limit (0: none)"),
    ("mem_fragmentation_ratio", "redis_memory_fragmentation_ratio", "gauge", "Resident memory over used memory"),
    ("total_connections_received", "redis_connections_received_total", "counter", "Connections accepted"),
    ("rejected_connections", "redis_connections_rejected_total", "counter", "Connections refused at maxclients"),
    ("total_commands_processed", "redis_commands_processed_total", "counter", "Commands processed"),
    ("instantaneous_ops_per_sec", "redis_instantaneous_ops_per_second", "gauge", "Commands per second, as the server samples it"),
    ("total_net_input_bytes", "redis_net_input_bytes_total", "counter", "Bytes read from clients"),
    ("total_net_output_bytes", "redis_net_output_bytes_total", "counter", "Bytes written to clients"),
    ("expired_keys", "redis_expired_keys_total", "counter", "Keys removed on expiry"),
    ("evicted_keys", "redis_evicted_keys_total", "counter", "Keys evicted at maxmemory"),
    ("keyspace_hits", "redis_keyspace_hits_total", "counter", "Lookups that found their key"),
    ("keyspace_misses", "redis_keyspace_misses_total", "counter", "Lookups that did not"),
    ("connected_slaves", "redis_connected_replicas", "gauge", "Replicas connected"),
    ("rdb_changes_since_last_save", "redis_rdb_changes_since_last_save", "gauge", "Writes since the last snapshot"),
    ("aof_enabled", "redis_aof_enabled", "gauge", "1 when the append-only file is on"),
];

/// The metrics of an `INFO` answer.
pub fn redis_families(info: &str) -> Vec<Family> {
    let fields: Vec<(&str, &str)> = info.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.trim_end().split_once(':')).collect();
    let mut out = Vec::new();
    for (field, name, kind, help) in REDIS_FIELDS {
        if let Some(value) = fields.iter().find(|(k, _)| k == field).and_then(|(_, v)| v.parse::<f64>().ok()) {
            out.push(single(name, kind, help, value));
        }
    }
    if let Some((_, role)) = fields.iter().find(|(k, _)| *k == "role") {
        out.push(Family {
            name: "redis_role".into(),
            kind: "gauge",
            help: "1 for the server's replication role",
            samples: vec![(format!("{{role=\"{}\"}}", escape(role)), 1.0)],
        });
    }
    // db0:keys=12,expires=3,avg_ttl=0
    let mut keys = Family { name: "redis_db_keys".into(), kind: "gauge", help: "Keys per database", samples: vec![] };
    let mut expires =
        Family { name: "redis_db_keys_expiring".into(), kind: "gauge", help: "Keys with an expiry per database", samples: vec![] };
    for (db, stats) in fields.iter().filter(|(k, _)| k.starts_with("db") && k[2..].chars().all(|c| c.is_ascii_digit())) {
        for part in stats.split(',') {
            match part.split_once('=') {
                Some(("keys", n)) => keys.samples.extend(n.parse().ok().map(|n| (format!("{{db=\"{db}\"}}"), n))),
                Some(("expires", n)) => expires.samples.extend(n.parse().ok().map(|n| (format!("{{db=\"{db}\"}}"), n))),
                _ => {}
            }
        }
    }
    if !keys.samples.is_empty() {
        out.push(keys);
        out.push(expires);
    }
    out
}

/// The metrics of a `stub_status` page.
pub fn nginx_families(page: &str) -> Result<Vec<Family>, String> {
    let number = |s: &str| s.trim().parse::<f64>().map_err(|_| format!("not a stub_status page: {page:?}"));
    let mut lines = page.lines();
    let active =
        lines.next().and_then(|l| l.strip_prefix("Active connections:")).ok_or("not a stub_status page: no 'Active connections'")?;
    lines.next();
    let totals: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let [accepts, handled, requests] = totals[..] else { return Err("not a stub_status page: no totals line".into()) };
    let states: Vec<&str> = lines.next().unwrap_or_default().split_whitespace().collect();
    let [_, reading, _, writing, _, waiting] = states[..] else { return Err("not a stub_status page: no Reading/Writing/Waiting".into()) };
    Ok(vec![
        single("nginx_connections_active", "gauge", "Client connections open, waiting ones included", number(active)?),
        single("nginx_connections_accepted_total", "counter", "Client connections accepted", number(accepts)?),
        single("nginx_connections_handled_total", "counter", "Client connections handled", number(handled)?),
        single("nginx_http_requests_total", "counter", "Client requests", number(requests)?),
        single("nginx_connections_reading", "gauge", "Connections whose request head is being read", number(reading)?),
        single("nginx_connections_writing", "gauge", "Connections whose response is being written", number(writing)?),
        single("nginx_connections_waiting", "gauge", "Idle keep-alive connections", number(waiting)?),
    ])
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Asks Redis for `INFO` (RESP2, one bulk string back).
async fn redis_info(addr: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream.write_all(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n").await.map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(8192);
    loop {
        if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the connection closed before INFO's answer".into());
        }
        if buf.first() == Some(&b'-') {
            return Err(format!("INFO answered {}", String::from_utf8_lossy(&buf).trim_end()));
        }
        let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") else { continue };
        let len: usize = std::str::from_utf8(&buf[1..nl]).ok().and_then(|n| n.parse().ok()).ok_or("INFO's answer is not a bulk string")?;
        if buf.len() >= nl + 2 + len {
            return Ok(String::from_utf8_lossy(&buf[nl + 2..nl + 2 + len]).into_owned());
        }
    }
}

async fn scrape(source: &Source, client: &reqwest::Client) -> Result<Vec<Family>, String> {
    match source {
        Source::Redis { addr } => Ok(redis_families(&redis_info(addr).await?)),
        Source::Nginx { url } => {
            let res = client.get(url).send().await.map_err(|e| format!("cannot GET {url}: {e}"))?;
            if !res.status().is_success() {
                return Err(format!("GET {url} answered {}", res.status()));
            }
            nginx_families(&res.text().await.map_err(|e| e.to_string())?)
        }
    }
}

/// The last scrape, rendered.
#[derive(Clone, Default)]
pub struct Latest(Arc<Mutex<String>>);

impl Latest {
    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Scrapes every `interval_ms` into `latest`, until dropped.
pub async fn scrape_loop(source: Source, config: MetricsAdapterConfig, latest: Latest) {
    let timeout = Duration::from_millis(config.timeout_ms);
    let client = reqwest::Client::builder().timeout(timeout).build().unwrap_or_default();
    let mut ticker = tokio::time::interval(Duration::from_millis(config.interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let app = source.app();
    loop {
        ticker.tick().await;
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(timeout, scrape(&source, &client)).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let took = started.elapsed().as_secs_f64();
        let mut families = match &outcome {
            Ok(families) => families.clone(),
            Err(e) => {
                tracing::warn!(source = %config.source, error = %e, "scrape failed");
                Vec::new()
            }
        };
        families.push(single(
            &format!("{app}_up"),
            "gauge",
            "1 when the last scrape of the application worked",
            f64::from(u8::from(outcome.is_ok())),
        ));
        families.push(single(&format!("{app}_scrape_duration_seconds"), "gauge", "How long the last scrape took", took));
        *latest.0.lock().unwrap_or_else(|p| p.into_inner()) = render(&families);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_info_becomes_named_and_typed_metrics() {
        let info = "# Server\r\nredis_version:7.0.15\r\nuptime_in_seconds:42\r\n# Clients\r\nconnected_clients:3\r\n\
                    # Stats\r\ntotal_commands_processed:1000\r\nkeyspace_hits:7\r\nrole:master\r\n# Keyspace\r\n\
                    db0:keys=12,expires=3,avg_ttl=0\r\ndb3:keys=1,expires=0,avg_ttl=0\r\n";
        let text = render(&redis_families(info));
        for line in [
            "# TYPE redis_uptime_seconds gauge",
            "redis_uptime_seconds 42",
            "redis_connected_clients 3",
            "# TYPE redis_commands_processed_total counter",
            "redis_commands_processed_total 1000",
            "redis_role{role=\"master\"} 1",
            "redis_db_keys{db=\"db0\"} 12",
            "redis_db_keys{db=\"db3\"} 1",
            "redis_db_keys_expiring{db=\"db0\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("redis_version"), "strings are not metrics");
    }

    #[test]
    fn stub_status_becomes_metrics_and_anything_else_an_error() {
        let page = "Active connections: 291 \nserver accepts handled requests\n 16630948 16630948 31070465 \nReading: 6 Writing: 179 Waiting: 106 \n";
        let text = render(&nginx_families(page).unwrap());
        for line in ["nginx_connections_active 291", "nginx_http_requests_total 31070465", "nginx_connections_waiting 106"] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(nginx_families("<html>welcome to nginx</html>").is_err());
        assert!(nginx_families("Active connections: 1\nx\n1 2\n").is_err());
    }

    #[test]
    fn sources_are_checked() {
        assert_eq!(Source::parse("redis://127.0.0.1:6379").unwrap(), Source::Redis { addr: "127.0.0.1:6379".into() });
        assert_eq!(Source::parse("nginx+http://h:80/status").unwrap(), Source::Nginx { url: "http://h:80/status".into() });
        for bad in ["redis://nohost", "nginx+https://h/status", "mysql://h:3306", ""] {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }
}
