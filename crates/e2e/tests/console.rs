//! The web console and `GET /api/cluster` with real processes. The console is driven in headless
//! Chromium (Debian's `chromium`, through Playwright's `playwright-core` from npm: `.ci/run`
//! installs both) by `crates/e2e/console/console.mjs`; its screenshots are kept under the
//! target directory (`tmp/console`), as the test prints.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pixmesh_test_support::{System, corpus, jpeg, png};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SEEDED: usize = 1000;

/// The two tests run one at a time: the browser's thousand jobs on two cores would make the
/// cluster view's healthy roles miss their deadline, which is the one thing that test times.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn cluster(system: &System, key: &str) -> (u16, Value) {
    let res = system.client().get(format!("{}/api/cluster", system.gateway)).header("x-api-key", key).send().await.unwrap();
    let code = res.status().as_u16();
    (code, res.json().await.unwrap())
}

fn role<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["roles"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no role {name} in {view}"))
}

/// Makes `n` tiny jobs through the gateway, 32 at a time.
async fn seed(system: &System, n: usize) {
    use futures_util::StreamExt;
    let image = png(16, 16);
    let done = futures_util::stream::iter(0..n)
        .map(|_| {
            let image = image.clone();
            async move { system.upload(image, "image/png", "width=8&format=png").await.unwrap().0 }
        })
        .buffer_unordered(32)
        .collect::<Vec<u16>>()
        .await;
    assert!(done.iter().all(|c| *c == 202), "every seeded upload is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_view_composes_every_role_and_names_a_dead_one() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &["gateway.cluster.timeout_ms=800", "gateway.cluster.cache_ms=0"]).await.unwrap();
    let id = system.upload(jpeg(64, 64), "image/jpeg", "width=16").await.unwrap().1["id"].as_str().unwrap().to_string();
    assert_eq!(system.wait_terminal(&id, Duration::from_secs(60)).await.unwrap()["state"], "succeeded");
    let (bad, _) = system.upload(b"not an image at all, but long enough to be sniffed".to_vec(), "image/jpeg", "").await.unwrap();
    assert!(bad >= 400);

    // Every role answers (a role still busy with the upload may miss one deadline: ask again).
    let deadline = Instant::now() + Duration::from_secs(15);
    let view = loop {
        let (code, view) = cluster(&system, &system.api_key).await;
        assert_eq!(code, 200, "{view}");
        if view["sources"].as_array().unwrap().iter().all(|s| s["ok"] == true) {
            break view;
        }
        assert!(Instant::now() < deadline, "a healthy role never answered in time: {view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // (With the NATS KV registry, `up` starts no registry role.)
    let own_registry = system.queue.is_none();
    let mut names = vec!["worker-1", "worker-2", "distributor", "upload", "status"];
    if own_registry {
        names.push("registry");
    }
    assert_eq!(view["roles"].as_array().unwrap().len(), names.len(), "{view}");
    for name in names {
        assert_eq!(role(&view, name)["state"], "ready", "{name}: {view}");
    }
    let workers = view["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "{view}");
    for w in workers {
        assert_eq!(w["breaker"], "closed");
        if own_registry {
            assert_eq!(w["registered"], true, "the registry lists it too");
        }
        assert!(w["capacity"].as_u64().unwrap() >= 1 && w["in_flight"].is_u64() && w["latency_estimate_seconds"].is_number());
        assert_eq!(w["seen_by"], serde_json::json!(["distributor"]));
    }
    assert!(view["queue"]["depth"].is_number(), "{view}");
    assert_eq!(view["distributors"][0]["jobs"]["succeeded"], 1.0);

    // A role that stops answering: named dead, with why; the rest is answered, in time.
    let frozen = system.child("worker-2").unwrap();
    kill(Pid::from_raw(frozen.pid), Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    let (code, view) = cluster(&system, &system.api_key).await;
    let took = started.elapsed();
    kill(Pid::from_raw(frozen.pid), Signal::SIGCONT).unwrap();
    assert_eq!(code, 200);
    assert!(took < Duration::from_millis(2500), "a dead source costs its deadline, not more: {took:?}");
    assert_eq!(role(&view, "worker-2")["state"], "dead", "{view}");
    assert_eq!(role(&view, "worker-1")["state"], "ready");
    let failed: Vec<&Value> = view["sources"].as_array().unwrap().iter().filter(|s| s["ok"] == false).collect();
    assert_eq!(failed.len(), 1, "{view}");
    assert_eq!(failed[0]["name"], "worker-2");
    assert!(failed[0]["error"].as_str().unwrap().contains("timed out"), "{}", failed[0]);

    // Only an admin key reads it: a second, ordinary key is refused (the keys file reloads).
    let keys = system.data_dir.join("api-keys.toml");
    let plain = "pxm_an_ordinary_key_for_the_cluster_test";
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(plain.as_bytes()));
    let mut text = std::fs::read_to_string(&keys).unwrap();
    text.push_str(&format!("\n[[keys]]\nname = \"ordinary\"\nsha256 = \"{hash}\"\n"));
    std::fs::write(&keys, text).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = cluster(&system, plain).await;
        if code == 403 {
            assert_eq!(body["error"]["code"], "forbidden");
            break;
        }
        assert!(Instant::now() < deadline, "the new key was never taken: {code} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = system.client().get(format!("{}/api/cluster", system.gateway)).send().await.unwrap();
    assert_eq!(refused.status(), 401, "no key, no view");
    system.stop().await.unwrap();
}

/// Where playwright-core is installed (`.ci/run` puts it there).
fn playwright_modules() -> Option<PathBuf> {
    let dir = std::env::var_os("PIXMESH_PLAYWRIGHT_MODULES")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pixmesh-console-e2e/node_modules")))?;
    dir.join("playwright-core").is_dir().then_some(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_uploads_follows_a_job_lists_a_thousand_and_shows_the_cluster_in_chromium() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let (Some(modules), true) = (playwright_modules(), std::path::Path::new("/usr/bin/chromium").exists()) else {
        assert!(std::env::var_os("CI").is_none(), "CI needs chromium and playwright-core (.ci/run installs them)");
        eprintln!("skipped: needs Debian's chromium and playwright-core in ~/.cache/pixmesh-console-e2e (see .ci/run)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &[]).await.unwrap();
    seed(&system, SEEDED).await;
    // The smallest photo of the corpus (the gateway's default limit is 16 MP).
    let photo = corpus("photos")
        .and_then(|d| {
            let photos = std::fs::read_dir(d).ok()?.filter_map(|e| e.ok().map(|e| e.path()));
            photos.filter(|p| p.extension().is_some_and(|x| x == "jpg")).min_by_key(|p| p.metadata().map(|m| m.len()).unwrap_or(u64::MAX))
        })
        .unwrap_or_else(|| {
            let path = dir.path().join("photo.jpg");
            std::fs::write(&path, jpeg(1200, 800)).unwrap();
            path
        });
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("console/console.mjs");
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .env("GATEWAY", &system.gateway)
        .env("KEY", &system.api_key)
        .env("PHOTO", &photo)
        .env("SHOTS", &shots)
        .env("SEEDED", SEEDED.to_string())
        .env("STOPPED_WORKER", "worker-2")
        .env("PLAYWRIGHT_MODULES", &modules)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let frozen = system.child("worker-2").unwrap();
    let mut steps = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            eprintln!("console: {line}");
            if line == "WAIT freeze" {
                kill(Pid::from_raw(frozen.pid), Signal::SIGSTOP).unwrap();
                stdin.write_all(b"go\n").await.unwrap();
            } else if let Some(step) = line.strip_prefix("STEP ") {
                steps.push(step.split(' ').next().unwrap().to_string());
            } else if line == "DONE" || line.starts_with("FAILED") {
                return line;
            }
        }
        "node ended without a word".to_string()
    })
    .await;
    let _ = kill(Pid::from_raw(frozen.pid), Signal::SIGCONT);
    eprintln!("console screenshots: {}", shots.display());
    let outcome = outcome.expect("the console test took over 5 minutes");
    assert_eq!(outcome, "DONE", "steps passed: {steps:?}");
    assert_eq!(steps, ["first-load", "key", "upload", "job", "jobs", "cluster", "dead-role"]);
    for shot in ["01-first-load.png", "02-job.png", "03-jobs.png", "04-cluster.png", "05-cluster-dead-role.png"] {
        assert!(shots.join(shot).metadata().unwrap().len() > 1000, "{shot}");
    }
    let _ = node.wait().await;
    system.stop().await.unwrap();
}
