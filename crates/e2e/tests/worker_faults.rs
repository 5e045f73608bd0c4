//! Worker faults, end to end with real processes: a decoder that panics on one input, and
//! JPEGs with damaged metadata that libjpeg-based readers decode.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use futures_util::future::join_all;
use pixmesh_store::EventKind;
use pixmesh_test_support::{System, jpeg};
use serde_json::Value;
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// The worker option that makes a call panic on an image containing it (tests only).
const MARKER: &str = "pixmesh-e2e-fault: panic on this image";
const THREADS: usize = 2;
const CAPACITY: usize = 4;

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// `jpeg` with `text` in a comment (COM) segment right after SOI: still a valid image, and
/// the gateway's and upload's header checks let it through.
fn with_comment(jpeg: &[u8], text: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((text.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(text);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A process's metrics, in the Prometheus text format, from its admin port.
async fn scrape(system: &System, admin: &str) -> String {
    system.client().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap()
}

/// The sum of a metric's samples (over label sets).
fn sum(metrics: &str, name: &str) -> f64 {
    metrics.lines().filter(|l| l.split(['{', ' ']).next() == Some(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_that_panics_the_decoder_fails_internal_after_two_calls_and_costs_no_thread() {
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("worker.fault_panic_marker=\"{MARKER}\"");
    let (threads, capacity) = (format!("worker.threads={THREADS}"), format!("worker.capacity={CAPACITY}"));
    let system = System::start(dir.path(), 2, &[&marker, &threads, &capacity]).await.unwrap();
    let workers = ["worker-1", "worker-2"];
    let pids = |system: &System| workers.map(|w| system.child(w).unwrap().pid);
    let pids_before = pids(&system);

    // Three poisoned images among twelve good ones, all at once: more panics than threads.
    let poison = with_comment(&jpeg(320, 240), MARKER.as_bytes());
    let uploads = (0..15).map(|i| {
        let bytes = if i % 5 == 2 { poison.clone() } else { jpeg(400 + i * 8, 300) };
        let system = &system;
        async move { (i % 5 == 2, system.upload(bytes, "image/jpeg", "width=120&format=png").await.unwrap()) }
    });
    let mut jobs = Vec::new();
    for (poisoned, (code, body)) in join_all(uploads).await {
        assert_eq!(code, 202, "{body}");
        jobs.push((poisoned, id(&body)));
    }

    let store = pixmesh_e2e::job_store(&system).await;
    for (poisoned, job) in &jobs {
        let status = system.wait_terminal(job, JOB_TIMEOUT).await.unwrap();
        if !poisoned {
            assert_eq!(status["state"], "succeeded", "a good job next to the panics: {status}");
            assert_eq!(status["result"]["width"], 120);
            continue;
        }
        assert_eq!(status["state"], "failed", "{status}");
        assert_eq!(status["error"]["code"], "internal", "{status}");
        assert_eq!(status["error"]["message"], "the image could not be processed: an internal error occurred", "{status}");
        assert_eq!(status["attempts"], 1, "not sent back to the queue: {status}");
        // One call, and at most one retry on another worker: never round every worker.
        let events = store.events(job).await.unwrap();
        let retried = events.iter().filter(|e| e.kind() == EventKind::Retried).count();
        assert!(retried <= 1, "{job}: {:?}", events.iter().map(|e| (e.kind(), e.data())).collect::<Vec<_>>());
        assert_eq!(events.iter().filter(|e| e.kind() == EventKind::Failed).count(), 1);
    }

    // Each panic was a call to a worker: 3 jobs, 1 or 2 calls each. The pools kept their size.
    let mut panics = 0.0;
    for w in workers {
        let metrics = scrape(&system, &system.child(w).unwrap().addresses["admin"]).await;
        panics += sum(&metrics, "pixmesh_worker_panics_total");
        assert_eq!(sum(&metrics, "pixmesh_worker_pool_threads"), THREADS as f64, "{w}:\n{metrics}");
    }
    assert!((3.0..=6.0).contains(&panics), "{panics} panics for 3 poisoned jobs");
    assert_eq!(pids(&system), pids_before, "no worker process died or was restarted");

    // Every slot of every worker still works: the whole capacity at once, twice over.
    let burst = (0..2 * CAPACITY * workers.len()).map(|i| {
        let system = &system;
        async move {
            let (code, body) = system.upload(jpeg(360 + i as u32, 270), "image/jpeg", "width=90&format=jpeg").await.unwrap();
            assert_eq!(code, 202, "{body}");
            system.wait_terminal(&id(&body), JOB_TIMEOUT).await.unwrap()
        }
    });
    for status in join_all(burst).await {
        assert_eq!(status["state"], "succeeded", "{status}");
    }
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jpeg_with_an_unknown_adobe_transform_is_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 1, &[]).await.unwrap();
    // An Adobe APP14 segment with a transform value no standard defines: libjpeg (libvips,
    // Pillow) warns and decodes as YCbCr; zune-jpeg refused the file.
    let mut adobe = vec![0xFF, 0xEE, 0, 14];
    adobe.extend_from_slice(b"Adobe");
    adobe.extend_from_slice(&[0, 100, 0, 0, 0, 0, 7]);
    let original = jpeg(640, 480);
    let mut damaged = original[..2].to_vec();
    damaged.extend_from_slice(&adobe);
    damaged.extend_from_slice(&original[2..]);
    // At full size (the general decoder's path) and reduced (pixmesh's own decoder's).
    for (query, width) in [("format=png", 640), ("width=100&format=png", 100)] {
        let (code, body) = system.upload(damaged.clone(), "image/jpeg", query).await.unwrap();
        assert_eq!(code, 202, "{query}: {body}");
        let status = system.wait_terminal(&id(&body), JOB_TIMEOUT).await.unwrap();
        assert_eq!(status["state"], "succeeded", "{query}: {status}");
        assert_eq!(status["result"]["width"], width, "{query}");
    }
    system.stop().await.unwrap();
}
