//! `pixmesh submit`: the command-line client. Uploads image files (or every image under the
//! folders given) through the gateway, several at once, follows each job on its SSE stream,
//! downloads what it made into one folder, and prints what was done and what failed, and why.
//!
//! Safe to run again after Ctrl-C: a file whose results are already in the folder is skipped,
//! and each upload carries an `Idempotency-Key` made from the file's SHA-256 and the options,
//! so a file whose job was accepted before the interruption gets that job back instead of a
//! new one. Uploads are refused politely: a 429 or 503 is retried after its `Retry-After`.

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Image files by extension (what the gateway accepts by default, and what the upload
/// service reads).
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];
/// What a result's `Content-Type` is written as.
const RESULT_EXTENSIONS: &[(&str, &str)] = &[("image/jpeg", "jpg"), ("image/png", "png"), ("image/webp", "webp")];
/// Tries of one request refused with 429 or 503, or cut off on the way.
const TRIES: u32 = 6;

#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    /// Image files, or folders to take every image from (recursively).
    #[arg(required = true, value_name = "FILES_OR_DIRS")]
    paths: Vec<PathBuf>,
    /// The gateway's URL.
    #[arg(long, env = "PIXMESH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An API key of the gateway.
    #[arg(long, env = "PIXMESH_API_KEY", hide_env_values = true)]
    key: String,
    /// A CA certificate (PEM) to trust for an https:// gateway, besides the system's: the
    /// development CA of `pixmesh up --tls` (DATA_DIR/tls/ca.pem).
    #[arg(long, env = "PIXMESH_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// What to make of every image, as upload parameters: `width=800&format=webp`, or named
    /// outputs `outputs=thumb:width=200;large:width=1600`.
    #[arg(long, short = 'q', default_value = "")]
    query: String,
    /// Where to write the results: `NAME.EXT`, or `NAME.OUTPUT.EXT` for named outputs.
    #[arg(long, short = 'o', default_value = ".")]
    out: PathBuf,
    /// Files in flight at once.
    #[arg(long, short = 'j', default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
}

/// One file to submit, and where its results go.
#[derive(Debug, Clone)]
struct Item {
    path: PathBuf,
    /// The file's name without its extension: its results' names start with it.
    stem: String,
}

/// How one file ended.
#[derive(Debug)]
enum Outcome {
    Done { files: usize, cached: bool },
    Skipped,
    Failed(String),
}

/// What a run did, for the summary and the exit code.
#[derive(Debug, Default)]
pub struct Summary {
    pub done: usize,
    pub cached: usize,
    pub skipped: usize,
    pub failed: Vec<(PathBuf, String)>,
    pub written: usize,
    pub elapsed: Duration,
}

impl Summary {
    fn print(&self) {
        let total = self.done + self.skipped + self.failed.len();
        let secs = self.elapsed.as_secs_f64();
        println!(
            "pixmesh submit: {} done ({} from the result cache, {} files written), {} skipped (already there), {} failed, of {total} in {secs:.1} s ({:.1} files/s)",
            self.done,
            self.cached,
            self.written,
            self.skipped,
            self.failed.len(),
            if secs > 0.0 { self.done as f64 / secs } else { 0.0 },
        );
        for (path, why) in &self.failed {
            println!("  failed: {}: {why}", path.display());
        }
    }
}

/// Runs `pixmesh submit`; the summary is printed. Errors are about the run as a whole (no
/// files, a folder that cannot be made), not about one file.
pub async fn run(args: SubmitArgs) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let items = collect(&args.paths)?;
    if items.is_empty() {
        bail!("no image files among {:?} (looked for {})", args.paths, IMAGE_EXTENSIONS.join(", "));
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot make {}", args.out.display()))?;
    let outputs = output_names(&args.query);
    let mut client = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if let Some(file) = &args.cacert {
        let pem = std::fs::read(file).with_context(|| format!("cannot read --cacert {}", file.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("--cacert {}", file.display()))? {
            client = client.add_root_certificate(cert);
        }
    }
    let client = client.build()?;
    let bar = ProgressBar::new(items.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} files  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let ctx =
        Arc::new(Ctx { client, url: args.url.trim_end_matches('/').to_string(), key: args.key, query: args.query, out: args.out, outputs });
    let permits = Arc::new(Semaphore::new(usize::from(args.jobs)));
    let mut tasks = tokio::task::JoinSet::new();
    for item in items {
        let (ctx, permits, bar) = (Arc::clone(&ctx), Arc::clone(&permits), bar.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let outcome = match submit_one(&ctx, &item, &bar).await {
                Ok(outcome) => outcome,
                Err(e) => Outcome::Failed(format!("{e:#}")),
            };
            bar.inc(1);
            (item, outcome)
        });
    }
    let mut summary = Summary::default();
    while let Some(joined) = tasks.join_next().await {
        let (item, outcome) = joined.context("a file's task failed")?;
        match outcome {
            Outcome::Done { files, cached } => {
                summary.done += 1;
                summary.written += files;
                summary.cached += usize::from(cached);
            }
            Outcome::Skipped => summary.skipped += 1,
            Outcome::Failed(why) => {
                bar.println(format!("failed: {}: {why}", item.path.display()));
                summary.failed.push((item.path, why));
            }
        }
        bar.set_message(format!("{} done, {} failed", summary.done + summary.skipped, summary.failed.len()));
    }
    bar.finish_and_clear();
    summary.failed.sort();
    summary.elapsed = started.elapsed();
    summary.print();
    Ok(summary)
}

struct Ctx {
    client: reqwest::Client,
    url: String,
    key: String,
    query: String,
    out: PathBuf,
    /// The names of the outputs the query asks for (empty: one unnamed output).
    outputs: Vec<String>,
}

/// Every image file under `paths`, in name order; two files whose results would have the same
/// name are an error (say which), not a silent overwrite.
fn collect(paths: &[PathBuf]) -> anyhow::Result<Vec<Item>> {
    let mut files = Vec::new();
    for path in paths {
        walk(path, true, &mut files).with_context(|| format!("cannot read {}", path.display()))?;
    }
    files.sort();
    files.dedup();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut items = Vec::with_capacity(files.len());
    for path in files {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some(first) = seen.insert(stem.clone(), path.clone()) {
            bail!(
                "{} and {} would write results of the same name ({stem}.…); submit them in separate runs or rename one",
                first.display(),
                path.display()
            );
        }
        items.push(Item { path, stem });
    }
    Ok(items)
}

/// The images under `path`; `path` itself when it is a file named on the command line (sent
/// whatever its extension: the service says what it is).
fn walk(path: &Path, named: bool, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            walk(&entry?.path(), false, files)?;
        }
    } else if named || is_image(path) {
        files.push(path.to_path_buf());
    }
    Ok(())
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The output names an upload query asks for (`outputs=a:…;b:…`).
fn output_names(query: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("outputs="))
        .flat_map(|spec| spec.split(';'))
        .map(|output| output.split(':').next().unwrap_or_default().to_string())
        .filter(|name| !name.is_empty())
        .collect()
}

/// A result's file name: `STEM.EXT`, or `STEM.OUTPUT.EXT`.
fn result_name(stem: &str, output: Option<&str>, ext: &str) -> String {
    match output {
        Some(output) => format!("{stem}.{output}.{ext}"),
        None => format!("{stem}.{ext}"),
    }
}

/// Whether every result of `item` is in the out folder already (in any of the result formats).
fn already_there(ctx: &Ctx, item: &Item) -> bool {
    let there =
        |output: Option<&str>| RESULT_EXTENSIONS.iter().any(|(_, ext)| ctx.out.join(result_name(&item.stem, output, ext)).is_file());
    if ctx.outputs.is_empty() { there(None) } else { ctx.outputs.iter().all(|o| there(Some(o))) }
}

async fn submit_one(ctx: &Ctx, item: &Item, bar: &ProgressBar) -> anyhow::Result<Outcome> {
    if already_there(ctx, item) {
        return Ok(Outcome::Skipped);
    }
    let bytes = tokio::fs::read(&item.path).await.with_context(|| format!("cannot read {}", item.path.display()))?;
    let digest = Sha256::digest(&bytes);
    // The same file with the same options is the same upload: a re-run gets the first job.
    let idempotency = hex::encode(&Sha256::digest(format!("pixmesh submit\n{}\n{}", hex::encode(digest), ctx.query))[..16]);
    let content_type = match item.path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        Some("bmp") => "image/bmp",
        Some("tif" | "tiff") => "image/tiff",
        _ => "application/octet-stream",
    };
    let url = format!("{}/api/upload?{}", ctx.url, ctx.query);
    let body = bytes::Bytes::from(bytes);
    let answer = send(|| {
        ctx.client
            .post(&url)
            .header("x-api-key", &ctx.key)
            .header("content-type", content_type)
            .header("idempotency-key", &idempotency)
            .body(body.clone())
    })
    .await?;
    let status = answer.status();
    let cached =
        answer.headers().get("cache-status").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("hit") || v.contains("collapsed"));
    let accepted: Value = answer.json().await.context("the upload's answer is not JSON")?;
    if status != reqwest::StatusCode::ACCEPTED {
        return Ok(Outcome::Failed(refusal(status, &accepted)));
    }
    let id = accepted["id"].as_str().context("the upload's answer has no job id")?.to_string();
    let job = follow(ctx, &id).await?;
    match job["state"].as_str() {
        Some("succeeded") => {}
        _ => return Ok(Outcome::Failed(format!("job {id} failed: {}", describe(&job["error"])))),
    }
    let mut files = 0;
    if ctx.outputs.is_empty() {
        let link = job["result_url"].as_str().context("the job succeeded without a result_url")?;
        download(ctx, link, &item.stem, None).await?;
        files += 1;
    } else {
        for output in job["outputs"].as_array().into_iter().flatten() {
            let (Some(name), Some(link)) = (output["name"].as_str(), output["result_url"].as_str()) else { continue };
            download(ctx, link, &item.stem, Some(name)).await?;
            files += 1;
        }
    }
    bar.set_message(format!("{}: {files} result(s)", item.path.display()));
    Ok(Outcome::Done { files, cached })
}

/// Sends what `make` builds; 429 and 503 (and a connection cut on the way) are tried again,
/// after the answer's `Retry-After` or a growing pause.
async fn send(make: impl Fn() -> reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
    let mut pause = Duration::from_millis(200);
    for attempt in 1..=TRIES {
        match make().send().await {
            Ok(res) if matches!(res.status().as_u16(), 429 | 503) && attempt < TRIES => {
                let wait = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).map(Duration::from_secs);
                tokio::time::sleep(wait.unwrap_or(pause).min(Duration::from_secs(10))).await;
            }
            Ok(res) => return Ok(res),
            Err(e) if (e.is_connect() || e.is_request()) && attempt < TRIES => tokio::time::sleep(pause).await,
            Err(e) => return Err(e.into()),
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    bail!("no answer after {TRIES} tries")
}

/// Waits for job `id` to end: on its event stream (read up to its terminal event), then its
/// status. A stream that cannot be opened (too many streams, say) falls back to polling.
async fn follow(ctx: &Ctx, id: &str) -> anyhow::Result<Value> {
    let status_url = format!("{}/api/status/{id}", ctx.url);
    let stream =
        send(|| ctx.client.get(format!("{status_url}/events")).header("x-api-key", &ctx.key).header("accept", "text/event-stream")).await;
    if let Ok(mut res) = stream.map_err(drop).and_then(|r| if r.status().is_success() { Ok(r) } else { Err(()) }) {
        let mut pending = String::new();
        'read: while let Ok(Some(chunk)) = res.chunk().await {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                if matches!(line.trim_end(), "event: succeeded" | "event: failed") {
                    break 'read;
                }
            }
        }
    }
    let mut pause = Duration::from_millis(100);
    loop {
        let res = send(|| ctx.client.get(&status_url).header("x-api-key", &ctx.key)).await?;
        let code = res.status();
        let job: Value = res.json().await.context("the job's status is not JSON")?;
        if !code.is_success() {
            bail!("the status of job {id}: {}", refusal(code, &job));
        }
        if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
            return Ok(job);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Writes one result into the out folder, whole or not at all (a temporary file, renamed).
async fn download(ctx: &Ctx, link: &str, stem: &str, output: Option<&str>) -> anyhow::Result<()> {
    let url = if link.starts_with("http") { link.to_string() } else { format!("{}{link}", ctx.url) };
    let res = send(|| ctx.client.get(&url).header("x-api-key", &ctx.key)).await?;
    let code = res.status();
    if !code.is_success() {
        let body: Value = res.json().await.unwrap_or_default();
        bail!("downloading {link}: {}", refusal(code, &body));
    }
    let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let ext = RESULT_EXTENSIONS.iter().find(|(t, _)| *t == content_type).map_or("bin", |(_, e)| e);
    let bytes = res.bytes().await.with_context(|| format!("downloading {link}"))?;
    let target = ctx.out.join(result_name(stem, output, ext));
    let partial = ctx.out.join(format!(".{}.partial", result_name(stem, output, ext)));
    tokio::fs::write(&partial, &bytes).await.with_context(|| format!("cannot write {}", partial.display()))?;
    tokio::fs::rename(&partial, &target).await.with_context(|| format!("cannot write {}", target.display()))?;
    Ok(())
}

/// An error answer in one line: its code and message.
fn refusal(status: reqwest::StatusCode, body: &Value) -> String {
    format!("{} {}", status.as_u16(), describe(&body["error"]))
}

fn describe(error: &Value) -> String {
    match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        _ => "no reason given".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_come_from_the_query() {
        assert_eq!(output_names("width=800&format=webp"), Vec::<String>::new());
        assert_eq!(output_names("format=webp&outputs=thumb:width=200;large:width=1600,format=jpeg"), vec!["thumb", "large"]);
        assert_eq!(output_names("outputs=a;b:width=9"), vec!["a", "b"]);
    }

    #[test]
    fn folders_give_their_images_and_clashing_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("more");
        std::fs::create_dir_all(&sub).unwrap();
        for name in ["a.jpg", "b.PNG", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::write(sub.join("c.webp"), b"x").unwrap();
        let items = collect(&[dir.path().to_path_buf()]).unwrap();
        let stems: Vec<&str> = items.iter().map(|i| i.stem.as_str()).collect();
        assert_eq!(stems, vec!["a", "b", "c"], "images only, from every level");
        // A file named on the command line is sent whatever its extension.
        let named = collect(&[dir.path().join("notes.txt")]).unwrap();
        assert_eq!(named.len(), 1);
        std::fs::write(sub.join("a.png"), b"x").unwrap();
        let err = collect(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(err.contains("same name"), "{err}");
        assert!(collect(&[dir.path().join("missing")]).is_err());
    }
}
