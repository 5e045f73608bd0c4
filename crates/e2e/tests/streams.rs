//! Live status over SSE through the gateway, with a client that disconnects in the middle and
//! comes back with `Last-Event-ID`: nothing lost, nothing repeated.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::sse::SseStream;
use pixmesh_test_support::{System, jpeg};
use serde_json::Value;
use std::collections::HashSet;
use std::time::Duration;

const QUIET: Duration = Duration::from_secs(30);

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// The `(seq, kind)` of every event of job `id`, from its history.
async fn history(system: &System, id: &str) -> Vec<(u64, String)> {
    let url = format!("{}/api/status/{id}/history", system.gateway);
    let v: Value = system.client().get(url).header("x-api-key", &system.api_key).send().await.unwrap().json().await.unwrap();
    v["events"].as_array().unwrap().iter().map(|e| (e["seq"].as_u64().unwrap(), e["kind"].as_str().unwrap().to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_reconnects_with_last_event_id_misses_nothing_and_sees_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    // Slow steps: the job's events come over seconds, so the disconnect lands in the middle.
    let system =
        System::start(dir.path(), 2, &["worker.extra_delay_ms=400", "worker.capacity=1", "status.keep_alive_ms=200"]).await.unwrap();
    let client = system.client().clone();
    let all = format!("{}/api/events", system.gateway);
    // The key's stream of every job, opened before the uploads.
    let mut mine = SseStream::open(&client, &all, &system.api_key, None).await.unwrap();

    let (code, body) = system.upload(jpeg(320, 240), "image/jpeg", "outputs=a:width=40;b:width=50;c:width=60").await.unwrap();
    assert_eq!(code, 202, "{body}");
    let job = id(&body);
    let url = format!("{}/api/status/{job}/events", system.gateway);

    // First connection: the first events (`accepted` at once), then the client goes away.
    let mut first = SseStream::open(&client, &url, &system.api_key, None).await.unwrap();
    let mut seen: Vec<(u64, String)> = Vec::new();
    for _ in 0..3 {
        let e = first.next(QUIET).await.unwrap().expect("the stream ended early");
        let data: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(e.id.as_deref(), Some(data["seq"].to_string().as_str()), "id: is the per-job seq");
        assert_eq!(data["kind"], e.event.as_str());
        seen.push((data["seq"].as_u64().unwrap(), e.event));
    }
    let last = first.last_id.clone().unwrap();
    drop(first);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Second connection, from where the first left off, to the job's end.
    let mut second = SseStream::open(&client, &url, &system.api_key, Some(&last)).await.unwrap();
    while let Some(e) = second.next(QUIET).await.unwrap() {
        let data: Value = serde_json::from_str(&e.data).unwrap();
        seen.push((data["seq"].as_u64().unwrap(), e.event));
    }
    assert_eq!(seen.last().map(|(_, k)| k.as_str()), Some("succeeded"), "{seen:?}");
    let expected = history(&system, &job).await;
    assert_eq!(seen, expected, "every event once, in order");

    // The key's own stream: the same events, each once, ids increasing; cut and resumed too.
    let mut got: Vec<(String, u64)> = Vec::new();
    let mut ids: HashSet<String> = HashSet::new();
    let mut read = |stream_event: pixmesh_test_support::sse::SseEvent, got: &mut Vec<(String, u64)>| {
        let data: Value = serde_json::from_str(&stream_event.data).unwrap();
        assert!(ids.insert(stream_event.id.clone().unwrap()), "event {:?} came twice", stream_event.id);
        assert_eq!(data["job_id"], job.as_str(), "each event of the key's stream names its job");
        got.push((stream_event.event, data["seq"].as_u64().unwrap()));
    };
    for _ in 0..4 {
        let e = mine.next(QUIET).await.unwrap().unwrap();
        read(e, &mut got);
    }
    let resume = mine.last_id.clone().unwrap();
    drop(mine);
    let mut again = SseStream::open(&client, &all, &system.api_key, Some(&resume)).await.unwrap();
    while got.len() < expected.len() {
        let e = again.next(QUIET).await.unwrap().unwrap();
        read(e, &mut got);
    }
    let kinds: Vec<(String, u64)> = expected.iter().map(|(seq, kind)| (kind.clone(), *seq)).collect();
    assert_eq!(got, kinds);
    // Quiet now: keep-alive comments hold the stream open.
    let quiet = tokio::time::timeout(Duration::from_millis(1_000), again.next(QUIET)).await;
    assert!(quiet.is_err(), "no event comes for a job that ended: {quiet:?}");
    assert!(again.comments() > 0, "keep-alive comments arrive while nothing happens");
    system.stop().await.unwrap();
}
