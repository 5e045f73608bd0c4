//! The result cache with real processes: an identical upload is answered from the cache with
//! no worker call, and identical uploads at once are made once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use base64::Engine;
use pixmesh_store::EventKind;
use pixmesh_test_support::{System, jpeg};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Images the workers of `system` have processed, whatever the outcome.
async fn worker_calls(system: &System) -> f64 {
    let mut total = 0.0;
    for i in 1.. {
        let Some(worker) = system.child(&format!("worker-{i}")) else { break };
        let url = format!("http://{}/metrics", worker.addresses["admin"]);
        let metrics = system.client().get(url).send().await.unwrap().text().await.unwrap();
        total += metrics
            .lines()
            .filter(|l| l.starts_with("pixmesh_worker_images_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
    }
    total
}

/// POSTs `image` with `query` and extra headers: the status, the `Cache-Status` field, the body.
async fn upload(system: &System, image: &[u8], query: &str, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let mut req = system
        .client()
        .post(format!("{}/api/upload?{query}", system.gateway))
        .header("x-api-key", &system.api_key)
        .header("content-type", "image/jpeg")
        .body(image.to_vec());
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let cache = res.headers().get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (status, cache, res.json().await.unwrap())
}

fn id(body: &Value) -> String {
    body["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identical_upload_is_served_from_the_cache_with_no_worker_call() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &["upload.cache=key"]).await.unwrap();
    let image = jpeg(320, 240);
    let (code, cache, body) = upload(&system, &image, "width=100&format=png", &[]).await;
    assert_eq!((code, cache.as_str()), (202, "pixmesh; fwd=miss; stored"), "{body}");
    let first = id(&body);
    assert_eq!(system.wait_terminal(&first, JOB_TIMEOUT).await.unwrap()["state"], "succeeded");
    let calls = worker_calls(&system).await;
    assert_eq!(calls, 1.0);

    // The same bytes and options, written the other way round: the result is there at once.
    let (code, cache, body) = upload(&system, &image, "format=png&width=100", &[]).await;
    assert_eq!((code, cache.as_str(), body["cached_from"].as_str()), (202, "pixmesh; hit", Some(first.as_str())), "{body}");
    let hit = id(&body);
    let (_, status) = system.status(&hit).await.unwrap();
    assert_eq!((status["state"].as_str(), status["cached_from"].as_str()), (Some("succeeded"), Some(first.as_str())), "{status}");
    assert_eq!(status["attempts"], 0, "no distributor claimed it: {status}");
    let (a, b) = (system.result(&first).await.unwrap(), system.result(&hit).await.unwrap());
    assert_eq!((a.0, b.0), (200, 200));
    assert_eq!(a.2, b.2, "the same result");
    let store = pixmesh_e2e::job_store(&system).await;
    let kinds: Vec<EventKind> = store.events(&hit).await.unwrap().iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, vec![EventKind::Accepted, EventKind::Cached, EventKind::Succeeded]);

    // Other options, other bytes: work. `no-cache` asks for the work again; `no-store` too,
    // and leaves the cache alone.
    let (_, cache, body) = upload(&system, &image, "format=png&width=101", &[]).await;
    assert_eq!(cache, "pixmesh; fwd=miss; stored");
    system.wait_terminal(&id(&body), JOB_TIMEOUT).await.unwrap();
    let (_, cache, body) = upload(&system, &jpeg(321, 240), "format=png&width=100", &[]).await;
    assert_eq!(cache, "pixmesh; fwd=miss; stored");
    system.wait_terminal(&id(&body), JOB_TIMEOUT).await.unwrap();
    let (_, cache, body) = upload(&system, &image, "width=100&format=png", &[("cache-control", "no-cache")]).await;
    assert_eq!((cache.as_str(), body.get("cached_from")), ("pixmesh; fwd=request; stored", None));
    let refreshed = id(&body);
    system.wait_terminal(&refreshed, JOB_TIMEOUT).await.unwrap();
    let (_, cache, body) = upload(&system, &image, "width=100&format=png", &[("cache-control", "no-store")]).await;
    assert_eq!(cache, "pixmesh; fwd=request");
    system.wait_terminal(&id(&body), JOB_TIMEOUT).await.unwrap();
    assert_eq!(worker_calls(&system).await, calls + 4.0);
    // The refresh is the entry now.
    let (_, cache, body) = upload(&system, &image, "width=100&format=png", &[]).await;
    assert_eq!((cache.as_str(), body["cached_from"].as_str()), ("pixmesh; hit", Some(refreshed.as_str())));
    assert_eq!(worker_calls(&system).await, calls + 4.0);

    // By digest alone, with no body: the key's cache answers at once, or 412 (send the image).
    let digest = |bytes: &[u8]| format!("sha-256=:{}:", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes)));
    let (code, cache, body) = upload(&system, b"", "width=100&format=png", &[("repr-digest", &digest(&image))]).await;
    assert_eq!((code, cache.as_str(), body["cached_from"].as_str()), (202, "pixmesh; hit", Some(refreshed.as_str())), "{body}");
    let (_, status) = system.status(&id(&body)).await.unwrap();
    assert_eq!(status["state"], "succeeded", "{status}");
    let (code, _, body) = upload(&system, b"", "width=99&format=png", &[("repr-digest", &digest(&image))]).await;
    assert_eq!((code, body["error"]["code"].as_str()), (412, Some("not_cached")), "other options: {body}");
    let (code, _, body) = upload(&system, b"", "width=100&format=png", &[("repr-digest", &digest(b"another image"))]).await;
    assert_eq!((code, body["error"]["code"].as_str()), (412, Some("not_cached")), "another image: {body}");
    // With the body, the digest is checked.
    let (code, _, body) = upload(&system, &image, "width=100&format=png", &[("repr-digest", &digest(b"another image"))]).await;
    assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (code, _, body) = upload(&system, b"", "width=100&format=png", &[("repr-digest", "md5=:abc:")]).await;
    assert_eq!((code, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (code, cache, _) = upload(&system, &image, "width=100&format=png", &[("repr-digest", &digest(&image))]).await;
    assert_eq!((code, cache.as_str()), (202, "pixmesh; hit"));
    assert_eq!(worker_calls(&system).await, calls + 4.0, "no work for any of these");

    // The upload service counts what the cache did.
    let upload_admin = system.child("upload").unwrap().addresses["admin"].clone();
    let metrics = system.client().get(format!("http://{upload_admin}/metrics")).send().await.unwrap().text().await.unwrap();
    let count = |outcome: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("pixmesh_upload_cache_total") && l.contains(&format!("outcome=\"{outcome}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        (count("hit"), count("miss"), count("refresh"), count("bypass"), count("not_cached")),
        (4.0, 3.0, 1.0, 1.0, 2.0),
        "{metrics}"
    );
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_uploads_at_once_are_made_once_and_end_together() {
    let dir = tempfile::tempdir().unwrap();
    // Slow work: every upload comes while the first is being made.
    let system = System::start(dir.path(), 2, &["upload.cache=key", "worker.extra_delay_ms=1500"]).await.unwrap();
    let image = jpeg(320, 240);
    let uploads = (0..8).map(|_| upload(&system, &image, "width=64", &[]));
    let answers = futures_util::future::join_all(uploads).await;
    let ids: Vec<String> = answers
        .iter()
        .map(|(code, _, body)| {
            assert_eq!(*code, 202, "{body}");
            id(body)
        })
        .collect();
    let made: Vec<&String> = ids.iter().zip(&answers).filter(|(_, a)| a.1 == "pixmesh; fwd=miss; stored").map(|(id, _)| id).collect();
    assert_eq!(made.len(), 1, "one upload is made: {answers:?}");
    let leader = made[0].clone();
    for (id, (_, cache, body)) in ids.iter().zip(&answers) {
        if *id != leader {
            assert_eq!((cache.as_str(), body["cached_from"].as_str()), ("pixmesh; fwd=miss; collapsed", Some(leader.as_str())));
        }
    }
    let mut results = Vec::new();
    for id in &ids {
        let status = system.wait_terminal(id, JOB_TIMEOUT).await.unwrap();
        assert_eq!(status["state"], "succeeded", "{status}");
        results.push(system.result(id).await.unwrap().2);
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]), "every job has the one result");
    assert_eq!(worker_calls(&system).await, 1.0, "the work was done once");
    system.stop().await.unwrap();
}
