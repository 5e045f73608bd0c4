//! Jobs with several named outputs (sagas) through the whole system: every output made in
//! parallel and downloadable at its own path, each kept across a crash of the role that made
//! it, and no blob left behind that no job names.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pixmesh_store::{EventKind, JobState};
use pixmesh_test_support::{System, form, jpeg};
use serde_json::Value;
use std::time::{Duration, Instant};

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// Downloads output `name` of job `id` and decodes it: its format and size.
async fn output(system: &System, id: &str, name: &str) -> (image::ImageFormat, u32, u32) {
    let (code, headers, bytes) = system.result(&format!("{id}/{name}")).await.unwrap();
    assert_eq!(code, 200, "{id}/{name}: {}", String::from_utf8_lossy(&bytes));
    let format = image::guess_format(&bytes).unwrap();
    assert_eq!(headers["content-type"], format.to_mime_type());
    let decoded = image::load_from_memory(&bytes).unwrap();
    (format, decoded.width(), decoded.height())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn named_outputs_are_made_in_parallel_and_each_downloads_at_its_own_path() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &[]).await.unwrap();
    let query = "format=jpeg&outputs=thumb:width=64,format=webp;medium:width=160;large:width=320,format=png";
    let (code, body) = system.upload(jpeg(640, 480), "image/jpeg", query).await.unwrap();
    assert_eq!(code, 202, "{body}");
    let job = id(&body);
    assert_eq!(body["result_urls"]["thumb"], format!("/api/result/{job}/thumb"));
    let status = system.wait_terminal(&job, JOB_TIMEOUT).await.unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    let names: Vec<&str> = status["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["thumb", "medium", "large"]);
    assert!(status["outputs"].as_array().unwrap().iter().all(|o| o["state"] == "succeeded"), "{status}");
    assert_eq!(output(&system, &job, "thumb").await, (image::ImageFormat::WebP, 64, 48));
    assert_eq!(output(&system, &job, "medium").await, (image::ImageFormat::Jpeg, 160, 120));
    assert_eq!(output(&system, &job, "large").await, (image::ImageFormat::Png, 320, 240));
    let (code, _, _) = system.result(&job).await.unwrap();
    assert_eq!(code, 404, "a job with named outputs has no single result");

    // The same as a form through the gateway's guard: an `outputs` part beside the image.
    let image = jpeg(300, 200);
    let outputs = br#"[{"name":"a","width":30},{"name":"b","width":60,"format":"png"}]"#;
    let body = form(
        "pixmesh-boundary",
        &[
            ("Content-Disposition: form-data; name=\"outputs\"", outputs),
            ("Content-Disposition: form-data; name=\"file\"; filename=\"x.jpg\"\r\nContent-Type: image/jpeg", &image),
        ],
    );
    let (code, answer) = system.upload(body, "multipart/form-data; boundary=pixmesh-boundary", "").await.unwrap();
    assert_eq!(code, 202, "{answer}");
    let job = id(&answer);
    let status = system.wait_terminal(&job, JOB_TIMEOUT).await.unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(output(&system, &job, "b").await, (image::ImageFormat::Png, 60, 40));

    // Bad lists are refused before a job exists.
    for (query, says) in [
        ("outputs=A:width=10", "not valid"),
        ("outputs=a:width=10;a:width=20", "named twice"),
        ("outputs=a:size=10", "unknown query parameter `size`"),
    ] {
        let (code, body) = system.upload(jpeg(64, 64), "image/jpeg", query).await.unwrap();
        assert_eq!(code, 400, "{query}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(says), "{query}: {body}");
    }
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saga_survives_kill_9_of_its_distributor_and_a_worker_and_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    // Slow steps (1.5 s each, one at a time per worker, with the bytes in the call or through
    // presigned URLs alike): the kills land in the middle.
    let sets = [
        "worker.capacity=1",
        "worker.transfers=1",
        "worker.extra_delay_ms=1500",
        "distributor.lease_ms=2000",
        "distributor.lease_renew_ms=500",
    ];
    let system = System::start(dir.path(), 2, &sets).await.unwrap();
    let store = pixmesh_e2e::job_store(&system).await;
    let before = pixmesh_e2e::blob_files(&system);
    let query = "outputs=a:width=40;b:width=50;c:width=60;d:width=70";
    let (code, body) = system.upload(jpeg(400, 300), "image/jpeg", query).await.unwrap();
    assert_eq!(code, 202, "{body}");
    let job = id(&body);
    let made = |events: &[pixmesh_store::JobEvent]| events.iter().filter(|e| e.kind() == EventKind::OutputSucceeded).count();

    // One output made, the others not yet: the distributor goes, with no goodbye.
    let started = Instant::now();
    while made(&store.events(&job).await.unwrap()) == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no output was made");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let distributor = system.child("distributor").unwrap();
    kill(Pid::from_raw(distributor.pid), Signal::SIGKILL).unwrap();

    // The restarted distributor claims it again; while that claim has a call in flight, a
    // worker goes too.
    let started = Instant::now();
    loop {
        let j = store.get(&job).await.unwrap().unwrap();
        if j.attempt >= 2 && j.state == JobState::Processing {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the job was not claimed again: {:?}", j.state);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // What the first claim recorded is fixed now: its fence is gone. (Counted here, not at the
    // kill: `kill` returns before the process is gone, and a commit in flight may still land.)
    let first_claim = |events: &[pixmesh_store::JobEvent]| {
        events
            .iter()
            .filter(|e| e.kind() == EventKind::OutputSucceeded && e.attempt == 1)
            .map(|e| e.data()["output"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let kept = first_claim(&store.events(&job).await.unwrap()).len();
    assert!((1..4).contains(&kept), "the kill came after every output was made: {kept}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let worker = system.child("worker-1").unwrap();
    kill(Pid::from_raw(worker.pid), Signal::SIGKILL).unwrap();

    let status = system.wait_terminal(&job, JOB_TIMEOUT).await.unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    let events = store.events(&job).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind() == EventKind::Succeeded).count(), 1);
    // What the first claim made was kept, not made again.
    let first = first_claim(&events);
    assert_eq!(first.len(), kept, "{first:?}");
    assert_eq!(made(&events), 4, "each output was recorded once: {:?}", events.iter().map(|e| e.kind()).collect::<Vec<_>>());
    for (name, width) in [("a", 40), ("b", 50), ("c", 60), ("d", 70)] {
        assert_eq!(output(&system, &job, name).await.1, width);
    }
    // The input and four outputs were added; nothing else, whatever the kills cut short.
    let after = pixmesh_e2e::blob_files(&system);
    let added: Vec<&String> = after.iter().filter(|f| !before.contains(f)).collect();
    assert_eq!(added.len(), 5, "{added:?}");
    assert_eq!(added.iter().filter(|f| f.starts_with(&format!("outputs/{job}/"))).count(), 4, "{added:?}");
    system.stop().await.unwrap();
}
