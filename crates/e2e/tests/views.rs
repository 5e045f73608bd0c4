//! The status read model with real processes: `GET /api/jobs` through the gateway, and
//! `pixmesh admin rebuild-views` beside a running system giving back the same listing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::{System, jpeg, pixmesh_bin};
use serde_json::Value;
use std::time::{Duration, Instant};

async fn list(system: &System, query: &str) -> Value {
    let url = format!("{}/api/jobs?{query}", system.gateway);
    let res = system.client().get(url).header("x-api-key", &system.api_key).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_listing_follows_the_jobs_and_a_rebuild_gives_it_back_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &[]).await.unwrap();
    let mut ids = Vec::new();
    for w in [16, 24, 32] {
        let (code, body) = system.upload(jpeg(64, 48), "image/jpeg", &format!("width={w}")).await.unwrap();
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let (code, body) = system.upload(jpeg(64, 48), "image/jpeg", "outputs=a:width=8;b:width=9").await.unwrap();
    assert_eq!(code, 202, "{body}");
    ids.push(body["id"].as_str().unwrap().to_string());
    for id in &ids {
        assert_eq!(system.wait_terminal(id, Duration::from_secs(60)).await.unwrap()["state"], "succeeded");
    }
    // The listing: newest first, every job succeeded once the projection caught up.
    let started = Instant::now();
    let before = loop {
        let v = list(&system, "state=succeeded&limit=100").await;
        if v["jobs"].as_array().unwrap().len() == ids.len() {
            break v;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the listing did not catch up: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let listed: Vec<&str> = before["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert_eq!(before["jobs"][0]["outputs"][1]["name"], "b", "a saga is listed with its outputs");
    let page = list(&system, "limit=3").await;
    let rest = list(&system, &format!("limit=3&cursor={}", page["next_cursor"].as_str().unwrap())).await;
    assert_eq!(rest["jobs"][0]["id"].as_str(), Some(ids[0].as_str()));
    assert!(rest["next_cursor"].is_null());

    // Rebuilt from the events by the admin command, beside the running system.
    let mut command = tokio::process::Command::new(pixmesh_bin());
    for set in system.store_sets() {
        command.arg("--set").arg(set);
    }
    let out = command.arg("admin").arg("rebuild-views").output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said: Value = serde_json::from_slice(out.stdout.split(|b| *b == b'\n').find(|l| l.starts_with(b"{")).unwrap()).unwrap();
    assert_eq!(said["pixmesh"], "views_rebuilt");
    assert_eq!(said["views"], ids.len());
    let after = list(&system, "state=succeeded&limit=100").await;
    assert_eq!(after, before, "the same views, folded again from the events");
    system.stop().await.unwrap();
}
