//! `pixmesh sidecar health`: rich checks of an application and what it needs, run every
//! `interval_ms`, served as `/readyz` and `/healthz` for Kubernetes probes.
//!
//! A check is `[NAME=]SPEC`:
//! - `tcp://HOST:PORT`: a connection is accepted;
//! - `http://HOST:PORT/PATH`: a GET answers 2xx or 3xx;
//! - `redis://HOST:PORT`: `PING` answers `PONG`;
//! - `postgres://…` or `sqlite:PATH`: a connection runs `SELECT 1`;
//! - `cmd:PROGRAM ARG…`: the command exits 0 (run without a shell).
//!
//! `/readyz` is 200 when every `checks` entry passed its last run, else 503; `/healthz` the same
//! for `live_checks`, and with none, 200 while the checks keep running (liveness should not
//! fail on a dependency: a restart does not mend a database). Both answer each check's last
//! outcome: `{"status":"ok","checks":[{"name","ok","detail","took_ms"}]}`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::json;
use sqlx::Connection;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `[sidecar.health]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthAdapterConfig {
    pub listen: SocketAddr,
    /// What `/readyz` needs: `[NAME=]SPEC` each.
    pub checks: Vec<String>,
    /// What `/healthz` needs (default none: alive while the checks run).
    pub live_checks: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl Default for HealthAdapterConfig {
    fn default() -> Self {
        HealthAdapterConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9181)),
            checks: Vec::new(),
            live_checks: Vec::new(),
            interval_ms: 2000,
            timeout_ms: 1000,
        }
    }
}

impl HealthAdapterConfig {
    pub fn validate(&self) -> Result<(), String> {
        for spec in self.checks.iter().chain(&self.live_checks) {
            Check::parse(spec)?;
        }
        if !(50..=3_600_000).contains(&self.interval_ms) || !(10..=60_000).contains(&self.timeout_ms) {
            return Err("sidecar.health.interval_ms must be 50–3600000 and timeout_ms 10–60000".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp(String),
    Http(String),
    Redis(String),
    Sql(String),
    Command(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub probe: Probe,
}

impl Check {
    pub fn parse(spec: &str) -> Result<Check, String> {
        let (name, spec) = match spec.split_once('=') {
            // A name is a word before the first '='; a URL's query has its '=' after a '?'.
            Some((name, rest)) if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') => {
                (Some(name.to_string()), rest)
            }
            _ => (None, spec),
        };
        let bad = |why: &str| format!("health check {spec:?}: {why}");
        let (kind, probe) = if let Some(addr) = spec.strip_prefix("tcp://") {
            ("tcp", Probe::Tcp(addr.trim_end_matches('/').to_string()))
        } else if spec.starts_with("http://") {
            ("http", Probe::Http(spec.to_string()))
        } else if let Some(addr) = spec.strip_prefix("redis://") {
            ("redis", Probe::Redis(addr.trim_end_matches('/').to_string()))
        } else if spec.starts_with("postgres://") || spec.starts_with("postgresql://") || spec.starts_with("sqlite:") {
            ("sql", Probe::Sql(spec.to_string()))
        } else if let Some(command) = spec.strip_prefix("cmd:") {
            let argv: Vec<String> = command.split_whitespace().map(str::to_string).collect();
            if argv.is_empty() {
                return Err(bad("no command after cmd:"));
            }
            ("cmd", Probe::Command(argv))
        } else {
            return Err(bad("use tcp://, http://, redis://, postgres://, sqlite: or cmd:"));
        };
        if let Probe::Tcp(a) | Probe::Redis(a) = &probe
            && !a.contains(':')
        {
            return Err(bad("give HOST:PORT"));
        }
        Ok(Check { name: name.unwrap_or_else(|| kind.to_string()), probe })
    }

    /// Runs the check once: `Ok(detail)` or `Err(why)`.
    pub async fn run(&self, client: &reqwest::Client) -> Result<String, String> {
        match &self.probe {
            Probe::Tcp(addr) => {
                tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                Ok(format!("{addr} accepts connections"))
            }
            Probe::Http(url) => {
                let res = client.get(url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
                let status = res.status();
                if status.is_success() || status.is_redirection() {
                    Ok(format!("GET answered {status}"))
                } else {
                    Err(format!("GET answered {status}"))
                }
            }
            Probe::Redis(addr) => {
                let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                stream.write_all(b"*1\r\n$4\r\nPING\r\n").await.map_err(|e| e.to_string())?;
                let mut buf = Vec::with_capacity(64);
                while !buf.ends_with(b"\r\n") {
                    if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                        return Err("the connection closed before PING's answer".into());
                    }
                }
                let answer = String::from_utf8_lossy(&buf).trim_end().to_string();
                if answer == "+PONG" { Ok("PING answered PONG".into()) } else { Err(format!("PING answered {answer}")) }
            }
            Probe::Sql(url) => {
                let shown = url.split('@').next_back().unwrap_or(url);
                if url.starts_with("sqlite:") {
                    let mut conn = sqlx::SqliteConnection::connect(url).await.map_err(|e| format!("cannot open {shown}: {e}"))?;
                    sqlx::query("SELECT 1").execute(&mut conn).await.map_err(|e| format!("SELECT 1 on {shown}: {e}"))?;
                    let _ = conn.close().await;
                } else {
                    let mut conn = sqlx::PgConnection::connect(url).await.map_err(|e| format!("cannot connect to {shown}: {e}"))?;
                    sqlx::query("SELECT 1").execute(&mut conn).await.map_err(|e| format!("SELECT 1 on {shown}: {e}"))?;
                    let _ = conn.close().await;
                }
                Ok(format!("SELECT 1 on {shown}"))
            }
            Probe::Command(argv) => {
                let out = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
                let said = String::from_utf8_lossy(if out.stderr.is_empty() { &out.stdout } else { &out.stderr }).trim().to_string();
                let said: String = said.chars().rev().take(200).collect::<Vec<_>>().into_iter().rev().collect();
                if out.status.success() {
                    Ok(format!("exit 0 {said}").trim_end().to_string())
                } else {
                    Err(format!("{}: {said}", out.status))
                }
            }
        }
    }
}

/// Each check's last outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    pub took_ms: u64,
}

#[derive(Clone)]
pub struct Board {
    ready: Arc<Mutex<Option<Vec<Outcome>>>>,
    live: Arc<Mutex<Option<Vec<Outcome>>>>,
    last_round: Arc<Mutex<Option<Instant>>>,
    interval: Duration,
}

impl Board {
    fn answer(outcomes: Option<Vec<Outcome>>) -> (StatusCode, Json<serde_json::Value>) {
        match outcomes {
            None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "starting", "checks": [] }))),
            Some(list) => {
                let ok = list.iter().all(|o| o.ok);
                let code = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                (code, Json(json!({ "status": if ok { "ok" } else { "failing" }, "checks": list })))
            }
        }
    }
}

fn lock<T: Clone>(m: &Mutex<T>) -> T {
    m.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

async fn readyz(State(board): State<Board>) -> impl IntoResponse {
    Board::answer(lock(&board.ready))
}

async fn healthz(State(board): State<Board>) -> impl IntoResponse {
    let live = lock(&board.live);
    if live.as_ref().is_some_and(|l| !l.is_empty()) {
        return Board::answer(live);
    }
    // No live checks: alive while the rounds keep coming.
    let recent = lock(&board.last_round).is_some_and(|t| t.elapsed() < board.interval * 3 + Duration::from_secs(5));
    let code = if recent { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({ "status": if recent { "ok" } else { "stalled" }, "checks": [] })))
}

/// The routes `/readyz` and `/healthz`, and the task that runs the checks.
pub fn start(config: &HealthAdapterConfig) -> Result<(axum::Router, tokio::task::JoinHandle<()>), String> {
    let ready: Vec<Check> = config.checks.iter().map(|s| Check::parse(s)).collect::<Result<_, _>>()?;
    let live: Vec<Check> = config.live_checks.iter().map(|s| Check::parse(s)).collect::<Result<_, _>>()?;
    let interval = Duration::from_millis(config.interval_ms);
    let timeout = Duration::from_millis(config.timeout_ms);
    let board = Board { ready: Arc::default(), live: Arc::default(), last_round: Arc::default(), interval };
    let client = reqwest::Client::builder().timeout(timeout).build().map_err(|e| e.to_string())?;
    let rounds = board.clone();
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (r, l) = tokio::join!(run_all(&ready, &client, timeout), run_all(&live, &client, timeout));
            *rounds.ready.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            *rounds.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
            *rounds.last_round.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    });
    let routes =
        axum::Router::new().route("/readyz", axum::routing::get(readyz)).route("/healthz", axum::routing::get(healthz)).with_state(board);
    Ok((routes, task))
}

async fn run_all(checks: &[Check], client: &reqwest::Client, timeout: Duration) -> Vec<Outcome> {
    let runs = checks.iter().map(|check| async move {
        let started = Instant::now();
        let result =
            tokio::time::timeout(timeout, check.run(client)).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let took_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(detail) => Outcome { name: check.name.clone(), ok: true, detail, took_ms },
            Err(detail) => Outcome { name: check.name.clone(), ok: false, detail, took_ms },
        }
    });
    futures_util::future::join_all(runs).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_read_with_or_without_a_name() {
        assert_eq!(
            Check::parse("db=postgres://u@h:5432/d?sslmode=disable").unwrap(),
            Check { name: "db".into(), probe: Probe::Sql("postgres://u@h:5432/d?sslmode=disable".into()) }
        );
        assert_eq!(
            Check::parse("http://h:8080/ping?x=1").unwrap(),
            Check { name: "http".into(), probe: Probe::Http("http://h:8080/ping?x=1".into()) }
        );
        assert_eq!(Check::parse("cache=redis://h:6379").unwrap().probe, Probe::Redis("h:6379".into()));
        assert_eq!(Check::parse("cmd:pg_isready -h h").unwrap().probe, Probe::Command(vec!["pg_isready".into(), "-h".into(), "h".into()]));
        for bad in ["ftp://h", "tcp://nohost", "cmd:", "x=", "redis://h"] {
            assert!(Check::parse(bad).is_err(), "{bad}");
        }
    }
}
