//! `pixmesh-loadgen`: the load side of `bench/gateway.sh`.
//!
//! wrk measures closed-loop throughput well but cannot hold a fixed rate (its latencies then
//! suffer from coordinated omission), cannot hold back an upload body to time a refusal, and
//! cannot count what reached the upstream. These three modes do:
//!
//! - `rate`: an open-loop GET load at a fixed rate; latency is measured from each request's
//!   scheduled time, so a stall counts against every request it delays. Served requests,
//!   refusals (any HTTP answer that is not 2xx/3xx, timed to their first byte) and errors (no
//!   answer) are reported apart, and failed requests never fail the run (see `open_loop.rs`).
//! - `overload`: the same at a multiple of a proxy's knee (its saturation throughput), to see
//!   whether it sheds the excess (fast refusals, served requests still fast) or collapses.
//! - `flood`: many clients POST huge uploads whose image header says 7680×4320 (half with a
//!   `Content-Length`, half chunked); the time from the header bytes to the refusal is measured,
//!   while legitimate small uploads run at a fixed rate beside them.
//! - `sink`: an upstream that answers `ok` and counts requests and body bytes, by whether the
//!   path contains `flood`; `GET /__stats` returns the counts.
//!
//! Results are printed as one JSON object.

mod balance;
mod dispatch;
mod e2e;
mod open_loop;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use open_loop::{fixed_rate, percentiles};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Fixed-rate GETs; prints latency percentiles of the served requests, the refusals with
    /// their time to first byte, and the errors.
    Rate {
        url: String,
        #[arg(long, default_value_t = 2000)]
        rps: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long)]
        api_key: Option<String>,
        /// A request without its whole answer after this long counts as an error.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// For an https:// URL: the CA certificates (PEM) to trust, and only those.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
    /// Fixed-rate GETs at `factor` × `knee` req/s (the knee: the proxy's saturation throughput,
    /// e.g. wrk's closed-loop req/s); the same report as `rate`.
    Overload {
        url: String,
        #[arg(long)]
        knee: f64,
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long)]
        api_key: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Upload flood with legitimate uploads beside it.
    Flood {
        /// Gateway address, host:port.
        addr: String,
        #[arg(long, default_value = "/api/upload")]
        path: String,
        #[arg(long, default_value_t = 200)]
        clients: usize,
        /// Body size each flood request claims (and sends, until refused).
        #[arg(long, default_value_t = 30_000_000)]
        bytes: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Legitimate uploads per second (0: none).
        #[arg(long, default_value_t = 50)]
        legit_rps: u64,
        #[arg(long)]
        api_key: String,
    },
    /// The floor of a hyper-based proxy: hyper's HTTP/1 server and pooled client forwarding
    /// every request to one upstream, nothing else (no routing, headers, limits or metrics).
    /// bench/gateway.sh runs it to show what the HTTP stack alone costs against nginx.
    BareProxy {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// e.g. http://127.0.0.1:8081
        #[arg(long)]
        upstream: String,
    },
    /// Distributors moving accepted jobs through a job store with instant workers, and the
    /// wait from accepted to claimed (see dispatch.rs).
    Dispatch {
        /// The `pixmesh` binary that runs the distributors.
        #[arg(long)]
        pixmesh: std::path::PathBuf,
        /// The job store: sqlite:PATH or postgres://…
        #[arg(long)]
        database: String,
        /// Data directory (blobs; the SQLite file when relative).
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long, default_value_t = 5000)]
        jobs: usize,
        #[arg(long, default_value_t = 1)]
        distributors: usize,
        /// Jobs in flight per distributor.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 500)]
        latency_jobs: usize,
        /// Jobs per second recorded in the latency phase.
        #[arg(long, default_value_t = 100)]
        latency_rate: u64,
        /// More settings for the distributors (`key=value`, repeatable).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// The broker (nats://HOST:PORT/NAMESPACE): distributors are woken by it, and each
        /// latency-phase job gets the upload service's early wake-up.
        #[arg(long)]
        queue: Option<String>,
    },
    /// A whole running system through its gateway: tiny images, jobs/s until all ended
    /// (see e2e.rs).
    E2e {
        /// e.g. http://127.0.0.1:8080
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        key: String,
        /// The system's job store (to see when every job ended).
        #[arg(long)]
        database: String,
        #[arg(long)]
        data_dir: std::path::PathBuf,
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Upload this image instead of the tiny PNG (its type from its extension).
        #[arg(long)]
        image: Option<std::path::PathBuf>,
        /// The processing options of every upload.
        #[arg(long, default_value = "width=8&format=png")]
        query: String,
        /// Report the CPU time this process (a distributor) spent during the run, per job.
        #[arg(long)]
        watch_pid: Option<u32>,
        /// For an https:// gateway: the CA certificates (PEM) to trust, and only those.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
    },
    /// A real S3-compatible server (s3s-fs, signatures checked) for the benchmarks: prints its
    /// endpoint and key pair as one JSON line, serves until killed.
    S3Server {
        /// Added before every answer, as a remote S3's latency (0: this host's own).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// An OTLP/gRPC trace receiver (the tests' own, counting only) for the tracing benchmark:
    /// prints its endpoint as one JSON line; on SIGTERM or Ctrl-C prints the spans and exports
    /// it took and its own CPU time.
    OtlpReceiver,
    /// The JetStream floor: publish (with Nats-Msg-Id, waiting for every ack) then consume
    /// and ack, on a work-queue stream with file storage, as pixmesh's wake-ups do.
    JetstreamFloor {
        /// nats://HOST:PORT
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 20000)]
        messages: usize,
    },
    /// Worker picking against simulated gRPC workers (see balance.rs).
    Balance {
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// How many of them (the last ones) are slow.
        #[arg(long, default_value_t = 0)]
        slow: usize,
        #[arg(long, default_value_t = 10.0)]
        slow_factor: f64,
        /// Mean service time.
        #[arg(long, default_value_t = 20)]
        service_ms: u64,
        /// Calls each worker takes at once.
        #[arg(long, default_value_t = 4)]
        capacity: usize,
        /// Callers in the closed loop (default: the healthy capacity).
        #[arg(long)]
        concurrency: Option<usize>,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// p2c (pixmesh's WorkerSet), rr (round-robin) or pinned (caller k → worker k mod n)
        #[arg(long, default_value = "p2c")]
        policy: String,
        /// After the closed loop: wait --idle-ms, then send this many calls at once (0: none).
        #[arg(long, default_value_t = 0)]
        burst: usize,
        #[arg(long, default_value_t = 1500)]
        idle_ms: u64,
    },
    /// The cost of one worker pick, without calls.
    PickOverhead {
        #[arg(long, default_value_t = 16)]
        workers: usize,
    },
    /// A counting upstream.
    Sink {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Answer each request only after this long (a slow shadow for bench/mirror.sh).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Read each request and never answer it (a shadow that hangs).
        #[arg(long)]
        never: bool,
    },
}

/// A JPEG header (SOI, APP0, SOF0) claiming `w`×`h`, padded with `len - header` filler bytes.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut v = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 16, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0];
    v.extend_from_slice(&[0xFF, 0xC0, 0, 17, 8]);
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
    v
}

/// One flood request: header bytes, then body until refused. Returns (ms from the header
/// bytes to the first response byte, status, body bytes sent).
async fn flood_once(addr: &str, path: &str, key: &str, total: u64, chunked: bool) -> anyhow::Result<(f64, u16, u64)> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let framing = if chunked { "transfer-encoding: chunked".to_string() } else { format!("content-length: {total}") };
    let head = format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\nx-api-key: {key}\r\ncontent-type: image/jpeg\r\n{framing}\r\n\r\n");
    let mut first = jpeg_claiming(7680, 4320);
    first.resize(16 * 1024, 0x55);
    let (mut rd, mut wr) = stream.into_split();
    let piece = Bytes::from(vec![0x55u8; 64 * 1024]);
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        let frame = |data: &[u8]| -> Vec<u8> {
            if chunked {
                let mut v = format!("{:x}\r\n", data.len()).into_bytes();
                v.extend_from_slice(data);
                v.extend_from_slice(b"\r\n");
                v
            } else {
                data.to_vec()
            }
        };
        let mut out = head.into_bytes();
        out.extend(frame(&first));
        if wr.write_all(&out).await.is_err() {
            return sent;
        }
        sent += first.len() as u64;
        while sent < total {
            let n = (total - sent).min(piece.len() as u64) as usize;
            if wr.write_all(&frame(&piece[..n])).await.is_err() {
                break;
            }
            sent += n as u64;
        }
        sent
    });
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf)).await.context("no answer in 30 s")??;
    let took = started.elapsed().as_secs_f64() * 1e3;
    writer.abort();
    let sent = writer.await.unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((took, status, sent))
}

async fn flood(addr: String, path: String, clients: usize, bytes: u64, seconds: u64, legit_rps: u64, key: String) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let results = Arc::new(Mutex::new((Vec::new(), std::collections::BTreeMap::<u16, u64>::new(), 0u64, 0u64)));
    let mut attackers = tokio::task::JoinSet::new();
    for c in 0..clients {
        let (addr, path, key, results) = (addr.clone(), format!("{path}?flood={c}"), key.clone(), Arc::clone(&results));
        attackers.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let outcome = flood_once(&addr, &path, &key, bytes, (c + n as usize) % 2 == 1).await;
                let mut r = results.lock().await;
                match outcome {
                    Ok((ms, status, _)) => {
                        r.0.push((ms * 1e3) as u64);
                        *r.1.entry(status).or_default() += 1;
                    }
                    Err(_) => r.2 += 1,
                }
                r.3 += 1;
                n += 1;
            }
        });
    }
    let legit = if legit_rps > 0 {
        let body = Bytes::from({
            let mut v = jpeg_claiming(800, 600);
            v.resize(200 * 1024, 0x33);
            v
        });
        let url = format!("http://{addr}{path}?legit=1");
        Some(
            fixed_rate(&open_loop::client(None)?, legit_rps, seconds, Duration::from_secs(30), || {
                http::Request::post(&url)
                    .header("x-api-key", &key)
                    .header("content-type", "image/jpeg")
                    .body(Full::new(body.clone()))
                    .unwrap_or_default()
            })
            .await,
        )
    } else {
        None
    };
    while attackers.join_next().await.is_some() {}
    let r = std::mem::take(&mut *results.lock().await);
    let statuses: serde_json::Map<_, _> = r.1.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    let legit = legit.map(|o| o.report());
    println!(
        "{}",
        json!({ "flood": { "requests": r.3, "reject_latency": percentiles(r.0), "statuses": statuses, "errors": r.2 }, "legit": legit })
    );
    Ok(())
}

async fn sink(listen: String, delay_ms: u64, never: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    println!("{}", json!({ "sink": listener.local_addr()?.to_string() }));
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // flood req, flood bytes, other req, other bytes
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let counts = Arc::clone(&counts);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let counts = Arc::clone(&counts);
                async move {
                    if req.uri().path() == "/__stats" {
                        let c: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
                        let body = json!({ "flood_requests": c[0], "flood_bytes": c[1], "other_requests": c[2], "other_bytes": c[3] });
                        return Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(body.to_string()))));
                    }
                    let base = if req.uri().query().unwrap_or("").contains("flood") { 0 } else { 2 };
                    counts[base].fetch_add(1, Ordering::Relaxed);
                    let mut body = req.into_body();
                    while let Some(Ok(frame)) = body.frame().await {
                        counts[base + 1].fetch_add(frame.data_ref().map_or(0, |d| d.len() as u64), Ordering::Relaxed);
                    }
                    if never {
                        std::future::pending::<()>().await;
                    }
                    if delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    }
                    Ok(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn bare_proxy(listen: String, upstream: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&listen).await?;
    println!("{}", json!({ "bare_proxy": listener.local_addr()?.to_string() }));
    let upstream: http::Uri = upstream.parse().context("bad upstream URL")?;
    let authority = upstream.authority().cloned().context("upstream URL without host")?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, hyper::body::Incoming> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).build(connector);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                let client = client.clone();
                let uri = http::Uri::builder()
                    .scheme("http")
                    .authority(authority.clone())
                    .path_and_query(req.uri().path_and_query().map_or("/", |p| p.as_str()))
                    .build();
                async move {
                    *req.uri_mut() = uri?;
                    let res = client.request(req).await?;
                    Ok::<_, anyhow::Error>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// Fixed-rate GETs of `url`; the report of [`open_loop::Outcomes`].
async fn rate(
    url: &str,
    rps: u64,
    seconds: u64,
    api_key: Option<String>,
    timeout_ms: u64,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<serde_json::Value> {
    let uri: http::Uri = url.parse().context("bad URL")?;
    let client = open_loop::client(ca)?;
    let outcomes = fixed_rate(&client, rps, seconds, Duration::from_millis(timeout_ms), || {
        let mut b = http::Request::get(uri.clone());
        if let Some(k) = &api_key {
            b = b.header("x-api-key", k);
        }
        b.body(Full::new(Bytes::new())).unwrap_or_default()
    })
    .await;
    Ok(outcomes.report())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.mode {
            Mode::Rate { url, rps, seconds, api_key, timeout_ms, ca } => {
                println!("{}", rate(&url, rps, seconds, api_key, timeout_ms, ca.as_deref()).await?);
                Ok(())
            }
            Mode::Overload { url, knee, factor, seconds, api_key, timeout_ms } => {
                anyhow::ensure!(knee >= 1.0 && factor > 0.0, "--knee must be at least 1 req/s and --factor above 0");
                let rps = (knee * factor).round() as u64;
                let mut report = rate(&url, rps, seconds, api_key, timeout_ms, None).await?;
                report["knee"] = json!(knee);
                report["factor"] = json!(factor);
                println!("{report}");
                Ok(())
            }
            Mode::Flood { addr, path, clients, bytes, seconds, legit_rps, api_key } => {
                flood(addr, path, clients, bytes, seconds, legit_rps, api_key).await
            }
            Mode::Sink { listen, delay_ms, never } => sink(listen, delay_ms, never).await,
            Mode::Balance { workers, slow, slow_factor, service_ms, capacity, concurrency, seconds, policy, burst, idle_ms } => {
                let service = Duration::from_millis(service_ms);
                let (addresses, served) = balance::start_workers(workers, slow, service, slow_factor, capacity).await?;
                let concurrency = concurrency.unwrap_or((workers - slow).max(1) * capacity);
                let idle = Duration::from_millis(idle_ms);
                let mut out = balance::run(&addresses, &policy, capacity, concurrency, seconds, idle, burst).await?;
                // The ideal: every healthy slot busy all the time, the slow ones idle — at the
                // nominal service time, and at the one the healthy workers actually gave.
                let healthy_slots = ((workers - slow) * capacity) as f64;
                out["ideal_per_second"] = json!(healthy_slots / service.as_secs_f64());
                let mean = served.mean_seconds().unwrap_or(service.as_secs_f64());
                out["served_ms"] = json!(mean * 1e3);
                out["ideal_served_per_second"] = json!(healthy_slots / mean);
                println!("{out}");
                Ok(())
            }
            Mode::Dispatch { pixmesh, database, data_dir, jobs, distributors, concurrency, latency_jobs, latency_rate, sets, queue } => {
                let run = dispatch::Dispatch {
                    pixmesh,
                    database,
                    data_dir,
                    jobs,
                    distributors,
                    concurrency,
                    latency_jobs,
                    latency_rate,
                    sets,
                    queue,
                };
                println!("{}", dispatch::run(run).await?);
                Ok(())
            }
            Mode::E2e { gateway, key, database, data_dir, jobs, concurrency, image, query, watch_pid, ca } => {
                let run = e2e::E2e { gateway, key, database, data_dir, jobs, concurrency, image, query, watch_pid, ca };
                println!("{}", e2e::run(run).await?);
                Ok(())
            }
            Mode::S3Server { latency_ms } => {
                let server = pixmesh_test_support::s3::S3Server::start_with_latency(Duration::from_millis(latency_ms));
                let line = serde_json::json!({
                    "endpoint": server.endpoint(),
                    "access_key": server.access_key(),
                    "secret_key": server.secret_key(),
                });
                println!("{line}");
                tokio::signal::ctrl_c().await?;
                Ok(())
            }
            Mode::OtlpReceiver => {
                let receiver = pixmesh_test_support::otlp::OtlpReceiver::start_counting().await?;
                println!("{}", serde_json::json!({ "endpoint": receiver.endpoint }));
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                // This process's CPU time: what receiving cost the machine the system runs on.
                let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
                    .ok()
                    .and_then(|s| {
                        let fields: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
                        let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
                        Some(ticks / 100.0)
                    })
                    .unwrap_or(0.0);
                println!(
                    "{}",
                    serde_json::json!({ "spans": receiver.counted(), "exports": receiver.exports(), "cpu_seconds": cpu_seconds })
                );
                Ok(())
            }
            Mode::JetstreamFloor { url, messages } => {
                println!("{}", dispatch::jetstream_floor(&url, messages).await?);
                Ok(())
            }
            Mode::PickOverhead { workers } => {
                println!("{}", balance::pick_overhead(workers));
                Ok(())
            }
            Mode::BareProxy { listen, upstream } => bare_proxy(listen, upstream).await,
        }
    })
}
