//! `pixmesh-loadgen e2e`: jobs/s of a whole running system, through its gateway: `jobs` tiny
//! images uploaded by `concurrency` clients at once, timed from the first upload until the job
//! store says every job ended (read from the store, so polling the API costs nothing).

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use pixmesh_store::{StoreConfig, Stores};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub struct E2e {
    pub gateway: String,
    pub key: String,
    pub database: String,
    pub data_dir: PathBuf,
    pub jobs: usize,
    pub concurrency: usize,
    /// Uploaded instead of the tiny PNG.
    pub image: Option<PathBuf>,
    pub query: String,
    /// A process whose CPU time during the run is reported (a distributor).
    pub watch_pid: Option<u32>,
    /// The CA to trust for an https:// gateway.
    pub ca: Option<PathBuf>,
}

/// User + system CPU time of process `pid` so far, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    // The fields after the command name (which may hold spaces), from its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("/proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()? + fields.get(12).context("stime")?.parse::<u64>()?;
    // In USER_HZ, which Linux fixes at 100 for everything it shows to user space.
    Ok(Duration::from_millis(ticks * 10))
}

fn content_type_of(path: &std::path::Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        _ => "image/png",
    }
}

/// A 16×16 PNG.
fn tiny_png() -> Bytes {
    // A valid PNG: signature, IHDR 16x16 gray, one IDAT of 16 rows of zero, IEND.
    let mut raw = Vec::new();
    for _ in 0..16 {
        raw.push(0u8);
        raw.extend_from_slice(&[0x80; 16]);
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = |out: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    chunk(&mut out, b"IHDR", &[0, 0, 0, 16, 0, 0, 0, 16, 8, 0, 0, 0, 0]);
    chunk(&mut out, b"IDAT", &zlib_stored(&raw));
    chunk(&mut out, b"IEND", &[]);
    Bytes::from(out)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// zlib with one stored (uncompressed) block.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01, 1];
    let len = data.len() as u16;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

pub async fn run(run: E2e) -> anyhow::Result<serde_json::Value> {
    let stores = Stores::open(&StoreConfig::default().with_data_dir(&run.data_dir).with_database(&run.database)).await?;
    let before: u64 = stores.jobs.counts().await?.iter().map(|(_, n)| n).sum();
    let client = crate::open_loop::client(run.ca.as_deref())?;
    let (image, content_type) = match &run.image {
        Some(path) => (Bytes::from(std::fs::read(path).with_context(|| format!("{}", path.display()))?), content_type_of(path)),
        None => (tiny_png(), "image/png"),
    };
    let cpu_before = run.watch_pid.map(cpu_time).transpose()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..run.concurrency.max(1) {
        let (client, image, next, jobs) = (client.clone(), image.clone(), Arc::clone(&next), run.jobs);
        let uri = format!("{}/api/upload?{}", run.gateway.trim_end_matches('/'), run.query);
        let key = run.key.clone();
        clients.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < jobs {
                let request = http::Request::post(&uri)
                    .header("x-api-key", &key)
                    .header("content-type", content_type)
                    .body(Full::new(image.clone()))
                    .context("request")?;
                let response = client.request(request).await.context("upload")?;
                let status = response.status();
                let body = response.into_body().collect().await.context("upload body")?.to_bytes();
                if status.as_u16() != 202 {
                    bail!("upload answered {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for c in clients {
        c.await??;
    }
    let uploaded = started.elapsed();
    let total = before + run.jobs as u64;
    crate::dispatch::wait_done(&stores, total, Duration::from_secs(600)).await?;
    let elapsed = started.elapsed();
    let mut report = json!({
        "jobs": run.jobs,
        "concurrency": run.concurrency,
        "image_bytes": image.len(),
        "uploads_per_second": run.jobs as f64 / uploaded.as_secs_f64(),
        "jobs_per_second": run.jobs as f64 / elapsed.as_secs_f64(),
    });
    if let (Some(pid), Some(before)) = (run.watch_pid, cpu_before) {
        let spent = cpu_time(pid)?.saturating_sub(before);
        report["watched_cpu_ms_per_job"] = json!(spent.as_secs_f64() * 1000.0 / run.jobs as f64);
    }
    Ok(report)
}
