//! Every role's `/metrics` with real processes after real work: clean for `promtool check
//! metrics` (Debian's `prometheus` package; CI installs it), named by the conventions, and with
//! per-worker labels that leave with their worker. Also `pixmesh health`, the containers'
//! health check, against a real admin port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::{Role, System, jpeg, pixmesh_bin, promtool};
use serde_json::Value;
use std::time::Duration;

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

async fn scrape(system: &System, admin: &str) -> String {
    system.client().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap()
}

fn has_sample(text: &str, name: &str, label: &str) -> bool {
    text.lines().any(|l| l.starts_with(name) && l.contains(label))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_roles_metrics_pass_promtool_and_worker_labels_leave_with_their_worker() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 2, &["registry.missed_heartbeats=2"]).await.unwrap();
    // A third worker of the test's own, to stop for good (`up` would restart its own).
    let registry = format!("worker.registry={}", system.registry());
    let extra = Role::start("worker", None, &[&registry, "worker.id=passing"], &[]).await.unwrap();
    let extra_address = extra.addresses["grpc"].clone();
    let distributor = system.child("distributor").unwrap().addresses["admin"].clone();
    let listed = || async {
        let v: Value = system.client().get(format!("http://{distributor}/workers")).send().await.unwrap().json().await.unwrap();
        v["workers"].as_array().unwrap().iter().map(|w| w["address"].as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !listed().await.contains(&extra_address) {
        assert!(tokio::time::Instant::now() < deadline, "the distributor never saw the extra worker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Work of every kind: made, refused by the image, read back.
    let mut ids = Vec::new();
    for i in 0..6 {
        let (code, body) = system.upload(jpeg(160 + i, 120), "image/jpeg", "width=32&format=png").await.unwrap();
        assert_eq!(code, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let (code, _) = system.upload(b"\xff\xd8\xff\xe0 not really a jpeg".to_vec(), "image/jpeg", "width=32").await.unwrap();
    assert!(code >= 400);
    for id in &ids {
        assert_eq!(system.wait_terminal(id, JOB_TIMEOUT).await.unwrap()["state"], "succeeded");
        assert_eq!(system.status(id).await.unwrap().0, 200);
    }
    // The queue's gauges are read every 5 s (the first time at start).
    tokio::time::sleep(Duration::from_millis(200)).await;

    // (With the NATS KV registry, `up` starts no registry role.)
    let mut names = vec!["gateway", "upload", "status", "distributor", "worker-1", "worker-2"];
    if system.queue.is_none() {
        names.push("registry");
    }
    let mut roles: Vec<(String, String)> =
        names.iter().map(|name| (name.to_string(), system.child(name).unwrap().addresses["admin"].clone())).collect();
    roles.push(("extra worker".into(), extra.addresses["admin"].clone()));
    for (name, admin) in &roles {
        let text = scrape(&system, admin).await;
        assert!(!text.is_empty(), "{name}: no metrics");
        if let Some(findings) = promtool(&text) {
            assert_eq!(findings, "", "{name}: promtool check metrics found problems");
        }
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let family = line.split(' ').nth(2).unwrap();
            assert!(text.contains(&format!("# HELP {family} ")), "{name}: {family} has no help text");
        }
    }
    let admin = |name: &str| roles.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let distributor_text = scrape(&system, &admin("distributor")).await;
    assert!(has_sample(&distributor_text, "pixmesh_jobs_total", "outcome=\"succeeded\""));
    assert!(has_sample(&distributor_text, "pixmesh_job_duration_seconds_bucket", "le="));
    assert!(has_sample(&distributor_text, "pixmesh_queue_depth", ""));
    assert!(has_sample(&distributor_text, "pixmesh_queue_oldest_job_age_seconds", ""));
    assert!(has_sample(&distributor_text, "rpc_client_call_duration_seconds_bucket", "rpc_grpc_status_code=\"0\""));
    assert!(has_sample(&distributor_text, "pixmesh_distributor_worker_breaker_state", &format!("worker=\"{extra_address}\"")));
    let upload_text = scrape(&system, &admin("upload")).await;
    assert!(has_sample(&upload_text, "http_server_request_duration_seconds_bucket", "http_route=\"/api/upload\""), "{upload_text}");
    assert!(has_sample(&upload_text, "http_server_request_duration_seconds_bucket", "http_response_status_code=\"202\""));
    let status_text = scrape(&system, &admin("status")).await;
    assert!(
        has_sample(&status_text, "http_server_request_duration_seconds_bucket", "http_route=\"/api/status/{id}\""),
        "a route, not a path per job"
    );
    assert!(!status_text.contains(&ids[0]), "no label takes a job's id");
    let gateway_text = scrape(&system, &admin("gateway")).await;
    assert!(has_sample(&gateway_text, "http_server_request_duration_seconds_bucket", "http_route=\"/api/upload\""));
    assert!(has_sample(&gateway_text, "pixmesh_gateway_responses_total", "status_class=\"2xx\""));
    let worker_text = scrape(&system, &admin("worker-1")).await;
    assert!(has_sample(&worker_text, "rpc_server_call_duration_seconds_bucket", "rpc_method=\"pixmesh.v1.ImageWorker/Process\""));

    // The extra worker goes for good: its label goes from the distributor's metrics with it.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(extra.pid().unwrap()), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while listed().await.contains(&extra_address) {
        assert!(tokio::time::Instant::now() < deadline, "the distributor never saw the extra worker leave");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = scrape(&system, &distributor).await;
    assert!(!after.contains(&extra_address), "a departed worker's label stays in the metrics");
    let workers = ["worker-1", "worker-2"].map(|n| system.child(n).unwrap().addresses["grpc"].clone());
    for worker in &workers {
        assert!(has_sample(&after, "pixmesh_distributor_worker_calls_in_flight", &format!("worker=\"{worker}\"")));
    }
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pixmesh_health_exits_0_on_a_ready_role_and_1_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 1, &[]).await.unwrap();
    let admin = system.child("gateway").unwrap().addresses["admin"].clone();
    let health = |url: String| async move {
        tokio::process::Command::new(pixmesh_bin()).args(["health", "--url", &url]).env_remove("PIXMESH_HEALTH_URL").output().await.unwrap()
    };
    let ready = health(format!("http://{admin}/readyz")).await;
    assert_eq!(ready.status.code(), Some(0), "{}", String::from_utf8_lossy(&ready.stderr));
    let missing = health(format!("http://{admin}/no-such-page")).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    // The URL from the environment, as the image's HEALTHCHECK has it.
    let from_env = tokio::process::Command::new(pixmesh_bin())
        .arg("health")
        .env("PIXMESH_HEALTH_URL", format!("http://{admin}/healthz"))
        .output()
        .await
        .unwrap();
    assert_eq!(from_env.status.code(), Some(0));
    system.stop().await.unwrap();
    // Nothing listens any more.
    let gone = health(format!("http://{admin}/readyz")).await;
    assert_eq!(gone.status.code(), Some(1));
}
