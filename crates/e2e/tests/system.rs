//! The whole system, end to end, with real processes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use futures_util::future::join_all;
use pixmesh_store::{EventKind, JobStore, SqliteJobStore};
use pixmesh_test_support::{System, corpus, jpeg, png};
use serde_json::Value;
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// Every job succeeded exactly once: one `succeeded` event, the job row terminal with a result.
async fn assert_exactly_one_result(system: &System, ids: &[String]) {
    let store = SqliteJobStore::open(&system.data_dir.join("pixmesh.db")).await.unwrap();
    for id in ids {
        let events = store.events(id).await.unwrap();
        let succeeded = events.iter().filter(|e| e.kind == EventKind::Succeeded).count();
        let failed = events.iter().filter(|e| e.kind == EventKind::Failed).count();
        assert_eq!((succeeded, failed), (1, 0), "job {id}: {:?}", events.iter().map(|e| e.kind).collect::<Vec<_>>());
        let job = store.get(id).await.unwrap().unwrap();
        assert!(job.result.is_some(), "job {id} has no result");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_poll_download_concurrency_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &[]).await.unwrap();

    // The walk-through from the README: a real photo when the corpus is there.
    let photo = corpus("photos").map(|d| std::fs::read(d.join("ladybird-2560x1600.jpg")).unwrap()).unwrap_or_else(|| jpeg(2560, 1600));
    let (code, body) = system.upload(photo, "image/jpeg", "width=800&format=webp").await.unwrap();
    assert_eq!(code, 202, "{body}");
    let job = id(&body);
    assert_eq!(body["status_url"], format!("/api/status/{job}"));
    let status = system.wait_terminal(&job, JOB_TIMEOUT).await.unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["result"]["width"], 800);
    assert_eq!(status["result"]["format"], "webp");
    assert!(status["attempts"].as_u64().unwrap() >= 1);
    let (code, headers, bytes) = system.result(&job).await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(headers["content-type"], "image/webp");
    assert!(headers.contains_key("etag"));
    let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::WebP).unwrap();
    assert_eq!(decoded.width(), 800);
    assert_eq!(status["result"]["bytes"].as_u64().unwrap(), bytes.len() as u64);

    // 20 concurrent uploads, with one corrupt image among them.
    let mut corrupt = jpeg(640, 480);
    corrupt.truncate(300);
    let uploads = (0..20).map(|i| {
        let bytes = if i == 7 { corrupt.clone() } else { jpeg(1200 + i * 10, 900) };
        let system = &system;
        async move { system.upload(bytes, "image/jpeg", "width=300&format=jpeg").await.unwrap() }
    });
    let answers = join_all(uploads).await;
    let mut ids = Vec::new();
    let mut corrupt_id = None;
    for (i, (code, body)) in answers.into_iter().enumerate() {
        if i == 7 {
            // A header this short may already be refused at upload; otherwise the job fails.
            if code == 202 {
                corrupt_id = Some(id(&body));
            } else {
                assert_eq!(code, 422, "{body}");
                assert_eq!(body["error"]["code"], "corrupt_image");
            }
            continue;
        }
        assert_eq!(code, 202, "{body}");
        ids.push(id(&body));
    }
    let statuses = join_all(ids.iter().map(|id| system.wait_terminal(id, JOB_TIMEOUT))).await;
    for s in statuses {
        let s = s.unwrap();
        assert_eq!(s["state"], "succeeded", "{s}");
        assert_eq!(s["result"]["width"], 300);
    }
    if let Some(bad) = corrupt_id {
        let s = system.wait_terminal(&bad, JOB_TIMEOUT).await.unwrap();
        assert_eq!(s["state"], "failed", "{s}");
        assert_eq!(s["error"]["code"], "corrupt_image", "{s}");
        assert_eq!(s["attempts"], 1, "a corrupt image is not retried");
        let (code, _, body) = system.result(&bad).await.unwrap();
        assert_eq!(code, 422, "{}", String::from_utf8_lossy(&body));
    }
    assert_exactly_one_result(&system, &ids).await;

    // Refusals are JSON errors that say what to do.
    let client = system.client();
    let res = client.post(format!("{}/api/upload", system.gateway)).body(png(8, 8)).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unauthorized");
    let res = client.get(format!("{}/api/status/nope", system.gateway)).header("x-api-key", "wrong").send().await.unwrap();
    assert_eq!(res.status(), 401);
    let (code, v) = system.status("no-such-job").await.unwrap();
    assert_eq!((code, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (code, _, _) = system.result("no-such-job").await.unwrap();
    assert_eq!(code, 404);
    let (code, v) = system.upload(png(8, 8), "image/png", "fit=sideways").await.unwrap();
    assert_eq!((code, v["error"]["code"].as_str()), (400, Some("bad_request")));
    let (code, v) = system.upload(b"hello".to_vec(), "image/png", "").await.unwrap();
    assert_eq!((code, v["error"]["code"].as_str()), (415, Some("unsupported_format")));
    let res = client.get(format!("{}/nowhere", system.gateway)).header("x-api-key", &system.api_key).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let res = client.delete(format!("{}/api/upload", system.gateway)).header("x-api-key", &system.api_key).send().await.unwrap();
    assert_eq!(res.status(), 405);

    // Upload and status also work when called directly, without the gateway.
    let upload = system.child("upload").unwrap().addresses["http"].clone();
    let res = client
        .post(format!("http://{upload}/api/upload?width=4"))
        .header("content-type", "image/png")
        .body(png(8, 8))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let direct: Value = res.json().await.unwrap();
    let status = system.child("status").unwrap().addresses["http"].clone();
    let res = client.get(format!("http://{status}/api/status/{}", id(&direct))).send().await.unwrap();
    assert_eq!(res.status(), 200);

    let exit = system.stop().await.unwrap();
    assert!(exit.success(), "{exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_worker_mid_load_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &[]).await.unwrap();
    let image = jpeg(2400, 1600);
    let mut ids = Vec::new();
    for _ in 0..24 {
        let (code, body) = system.upload(image.clone(), "image/jpeg", "width=640&format=png").await.unwrap();
        assert_eq!(code, 202, "{body}");
        ids.push(id(&body));
    }
    // Wait until work is in flight, then kill one worker without warning.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = system.status(&ids[2]).await.unwrap();
        if s["state"] != "queued" || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = system.child("worker-1").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim.pid), nix::sys::signal::Signal::SIGKILL).unwrap();

    let statuses = join_all(ids.iter().map(|id| system.wait_terminal(id, JOB_TIMEOUT))).await;
    for s in statuses {
        let s = s.unwrap();
        assert_eq!(s["state"], "succeeded", "{s}");
    }
    assert_exactly_one_result(&system, &ids).await;

    // The supervisor brought the worker back as a new process.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while system.child("worker-1").map(|c| c.pid) == Some(victim.pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(system.child("worker-1").unwrap().pid, victim.pid, "worker-1 was restarted");
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_on_the_same_data_dir_keeps_finished_jobs_and_finishes_queued_ones() {
    let dir = tempfile::tempdir().unwrap();

    // Run 1: three jobs finish.
    let system = System::start(dir.path(), 1, &[]).await.unwrap();
    let key = system.api_key.clone();
    let mut finished = Vec::new();
    for w in [100, 200, 300] {
        let (code, body) = system.upload(jpeg(640, 480), "image/jpeg", &format!("width={w}")).await.unwrap();
        assert_eq!(code, 202);
        finished.push(id(&body));
    }
    let mut etags = Vec::new();
    for job in &finished {
        assert_eq!(system.wait_terminal(job, JOB_TIMEOUT).await.unwrap()["state"], "succeeded");
        etags.push(system.result(job).await.unwrap().1["etag"].clone());
    }
    system.stop().await.unwrap();

    // Run 2: no workers, so new jobs stay queued when the system stops.
    let system = System::start(dir.path(), 0, &[]).await.unwrap();
    assert_eq!(system.api_key, key, "the development key is kept");
    let mut queued = Vec::new();
    for _ in 0..5 {
        let (code, body) = system.upload(png(320, 240), "image/png", "width=50&format=webp").await.unwrap();
        assert_eq!(code, 202);
        queued.push(id(&body));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for job in &queued {
        assert_eq!(system.status(job).await.unwrap().1["state"], "queued");
    }
    system.stop().await.unwrap();

    // Run 3: the finished jobs are intact and the queued ones finish.
    let system = System::start(dir.path(), 2, &[]).await.unwrap();
    for (job, etag) in finished.iter().zip(&etags) {
        let (code, headers, _) = system.result(job).await.unwrap();
        assert_eq!(code, 200);
        assert_eq!(&headers["etag"], etag);
    }
    for job in &queued {
        let s = system.wait_terminal(job, JOB_TIMEOUT).await.unwrap();
        assert_eq!(s["state"], "succeeded", "{s}");
        assert_eq!(s["result"]["width"], 50);
    }
    assert_exactly_one_result(&system, &queued).await;
    system.stop().await.unwrap();
}

/// Every hostile or unusual file in the shared corpus ends as a correct result, a failed job
/// with a reason, or a 4xx with a reason; no process crashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edge_corpus_ends_cleanly() {
    let Some(edge) = corpus("edge") else {
        eprintln!("skipping: ../shared/corpus/edge is not present");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &[]).await.unwrap();
    let pids_before: Vec<i32> =
        ["worker-1", "worker-2", "upload", "status", "distributor", "gateway"].iter().map(|n| system.child(n).unwrap().pid).collect();
    let mut files: Vec<_> = std::fs::read_dir(&edge).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut accepted = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let (code, body) = system.upload(bytes, "image/*", "width=64&format=png").await.unwrap();
        match code {
            202 => accepted.push((name, id(&body))),
            400..=499 => {
                let message = body["error"]["message"].as_str().unwrap_or_default();
                assert!(!message.is_empty(), "{name}: {code} without a reason: {body}");
                eprintln!("{name}: refused at upload: {code} {}: {message}", body["error"]["code"]);
            }
            other => panic!("{name}: unexpected status {other}: {body}"),
        }
    }
    for (name, job) in &accepted {
        let s = system.wait_terminal(job, JOB_TIMEOUT).await.unwrap();
        match s["state"].as_str() {
            Some("succeeded") => {
                let (code, _, bytes) = system.result(job).await.unwrap();
                assert_eq!(code, 200, "{name}");
                let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
                    .unwrap_or_else(|e| panic!("{name}: result does not decode: {e}"));
                assert!(img.width() <= 64 && img.width() > 0, "{name}");
                eprintln!("{name}: succeeded, {}x{}", img.width(), img.height());
            }
            Some("failed") => {
                assert!(!s["error"]["message"].as_str().unwrap_or_default().is_empty(), "{name}: {s}");
                assert_eq!(s["attempts"], 1, "{name}: a bad image is not retried: {s}");
                eprintln!("{name}: failed: {}: {}", s["error"]["code"], s["error"]["message"]);
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    // EXIF orientation 6 (rotate 90°): the 128x128 hopper stays square, so check a known
    // non-square case via the generated-image unit tests instead; here: no process restarted.
    let pids_after: Vec<i32> =
        ["worker-1", "worker-2", "upload", "status", "distributor", "gateway"].iter().map(|n| system.child(n).unwrap().pid).collect();
    assert_eq!(pids_before, pids_after, "no process crashed");
    system.stop().await.unwrap();
}
