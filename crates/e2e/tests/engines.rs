//! pixmesh on real engines, many processes of each role at once, and the broker failing under
//! load: the database stays the truth, so a NATS server that restarts or loses its whole store
//! costs time, never a job.
//!
//! These start their own `nats-server` (ephemeral port, store in a temp dir) and S3 server
//! (s3s-fs, signatures checked) where they need one, and use the job store of the suite's
//! profile (SQLite, or PostgreSQL with `PIXMESH_E2E_DATABASE=postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use futures_util::future::join_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pixmesh_store::{EventKind, JobStore, StoreConfig, Stores};
use pixmesh_test_support::nats::NatsServer;
use pixmesh_test_support::s3::S3Server;
use pixmesh_test_support::{Engines, Role, System, jpeg};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The job store of the suite's profile for `data_dir`.
async fn database(data_dir: &std::path::Path) -> String {
    if pixmesh_test_support::postgres::e2e_on_postgres() {
        pixmesh_test_support::postgres::database_for(data_dir).await
    } else {
        format!("sqlite:{}", data_dir.join("pixmesh.db").display())
    }
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn open(data_dir: &std::path::Path, database: &str) -> Arc<dyn JobStore> {
    Stores::open(&StoreConfig::default().with_data_dir(data_dir).with_database(database)).await.unwrap().jobs
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

async fn upload(system: &System, n: usize) -> Vec<String> {
    let uploads = (0..n).map(|i| async move {
        let (code, body) = system.upload(jpeg(160 + i as u32 % 7, 120), "image/jpeg", "width=48&format=png").await.unwrap();
        assert_eq!(code, 202, "{body}");
        id(&body)
    });
    join_all(uploads).await
}

/// Every job ended `succeeded` exactly once, with one result; returns the claim owners.
async fn every_job_once(store: &Arc<dyn JobStore>, ids: &[String]) -> HashMap<String, usize> {
    let mut owners: HashMap<String, usize> = HashMap::new();
    for id in ids {
        let job = store.get(id).await.unwrap().unwrap_or_else(|| panic!("job {id} lost"));
        let events = store.events(id).await.unwrap();
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind()).collect();
        let succeeded = kinds.iter().filter(|k| **k == EventKind::Succeeded).count();
        assert_eq!((succeeded, kinds.contains(&EventKind::Failed)), (1, false), "job {id}: {kinds:?}");
        assert!(job.result.is_some(), "job {id} has no result");
        if let Some(owner) = events.iter().rev().find_map(|e| match &e.event {
            pixmesh_store::Event::Claimed { owner, .. } => Some(owner.clone()),
            _ => None,
        }) {
            *owners.entry(owner).or_default() += 1;
        }
    }
    owners
}

/// `n` uploads accepted once the engine that was down is `back`: a 503 meanwhile is retried,
/// for at most `within`.
async fn uploads_again(system: &System, n: usize, back: Instant, within: Duration) -> Vec<String> {
    let mut again = Vec::new();
    while again.len() < n {
        let (code, body) = system.upload(jpeg(160, 120), "image/jpeg", "width=48&format=png").await.unwrap();
        if code == 202 {
            again.push(id(&body));
        } else {
            assert_eq!(code, 503, "{body}");
            assert!(back.elapsed() < within, "uploads still refused {:?} after the engine was back", back.elapsed());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    again
}

/// One raw upload: its status, whether it had `Retry-After`, its body, and how long it took.
async fn upload_once(system: &System, bytes: Vec<u8>) -> (u16, bool, Value, Duration) {
    let started = Instant::now();
    let (status, retry_after, body) = system.upload_answer(bytes, "image/jpeg", "width=48&format=png").await.unwrap();
    (status, retry_after.is_some(), body, started.elapsed())
}

async fn all_terminal(system: &System, ids: &[String], within: Duration) {
    for s in join_all(ids.iter().map(|id| system.wait_terminal(id, within))).await {
        let s = s.unwrap();
        assert_eq!(s["state"], "succeeded", "{s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_three_distributors_four_workers_every_job_ends_once() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start().await.unwrap();
    let url = format!("{}/many", nats.url());
    let db = database(dir.path()).await;
    // Two systems on one data dir (one API key, one blob directory), one job store and one
    // broker: 2 gateways, 2 upload and 2 status services, 2 distributors and 2 + 2 workers,
    // all found through the NATS registry; a third distributor runs on its own.
    let lease = Duration::from_secs(5);
    let sets = ["distributor.lease_ms=5000", "distributor.lease_renew_ms=1500"];
    let s3 = S3Server::start();
    let engines = Engines { database: db.clone(), queue: Some(url.clone()), blobs: Some(s3.url("many")) };
    let a = System::start_on(dir.path(), 2, &sets, &engines).await.unwrap();
    let b = System::start_on(dir.path(), 2, &sets, &engines).await.unwrap();
    assert_ne!(a.gateway, b.gateway);
    let mut third_sets = a.store_sets();
    third_sets.extend([format!("distributor.registry={url}"), sets[0].to_string(), sets[1].to_string()]);
    let third_sets: Vec<&str> = third_sets.iter().map(String::as_str).collect();
    let third = Role::start("distributor", None, &third_sets, &[]).await.unwrap();

    // kill -9 of every distributor while the uploads come in, and so of the relay, whichever
    // holds its lease: `up` starts its two again; their jobs are taken again once their leases
    // run out, and a new relay takes over once the old one's relay lease has.
    let mut third = third;
    let uploads = async {
        let (mut ids, more) = tokio::join!(upload(&a, 60), upload(&b, 60));
        ids.extend(more);
        ids
    };
    let watcher = open(dir.path(), &db).await;
    let killer = async {
        // Once the distributors have work (claimed or done), so that theirs is taken over.
        let started = Instant::now();
        loop {
            let counts = watcher.counts().await.unwrap();
            let taken: u64 = counts.iter().filter(|(s, _)| *s != pixmesh_store::JobState::Queued).map(|(_, n)| n).sum();
            if taken >= 30 || started.elapsed() > Duration::from_secs(20) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for victim in [a.child("distributor").unwrap().pid, b.child("distributor").unwrap().pid] {
            kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        }
        third.child.kill().await.unwrap();
        (Instant::now(), epoch_ms())
    };
    let (mut ids, (killed, killed_at)) = tokio::join!(uploads, killer);
    // Status through either gateway: they share the store.
    for id in ids.iter().step_by(17) {
        assert_eq!(b.status(id).await.unwrap().0, 200);
        assert_eq!(a.status(id).await.unwrap().0, 200);
    }
    ids.extend(upload(&b, 40).await);
    all_terminal(&a, &ids, Duration::from_secs(90)).await;
    let recovered = killed.elapsed();
    println!("{} jobs ended {recovered:?} after every distributor was killed (lease {lease:?})", ids.len());
    assert!(recovered < Duration::from_secs(30), "recovered within the bound: {recovered:?}");
    let store = open(dir.path(), &db).await;
    let owners = every_job_once(&store, &ids).await;
    // The killed distributors' jobs: claimed again within 2× the lease of the kill.
    let mut again = Vec::new();
    for id in &ids {
        let events = store.events(id).await.unwrap();
        let claims: Vec<i64> = events.iter().filter(|e| e.kind() == EventKind::Claimed).map(|e| e.at).collect();
        if claims.len() > 1 && claims[0] <= killed_at {
            again.push(claims[1] - killed_at);
        }
    }
    let slowest = again.iter().max().copied().unwrap_or(0);
    println!(
        "jobs per distributor: {owners:?}; {} jobs of the killed distributors claimed again, the last {slowest} ms after the kill",
        again.len()
    );
    assert!(slowest <= 2 * lease.as_millis() as i64, "a killed distributor's job waited {slowest} ms (lease {lease:?})");
    assert!(owners.len() >= 2, "the distributors share the work: {owners:?}");
    // The images went through S3: every input and result is there under its digest, and the
    // staging objects of the calls are gone (the killed distributors' calls may leave theirs).
    let stored = s3.keys("many", "blobs");
    for id in ids.iter().step_by(11) {
        let job = store.get(id).await.unwrap().unwrap();
        assert!(stored.contains(&job.input.digest), "input of {id} is not in S3");
        assert!(stored.contains(&job.result.unwrap().blob.digest), "result of {id} is not in S3");
    }
    let staged = s3.keys("many", "staging");
    println!("{} blobs in S3, {} staging objects left (calls cut by the kill)", stored.len(), staged.len());
    assert!(staged.len() <= 3 * 8, "staging objects pile up: {staged:?}");
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_and_then_wiped_broker_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start().await.unwrap();
    let db = database(dir.path()).await;
    let engines = Engines { database: db.clone(), queue: Some(nats.url()), blobs: None };
    let system = System::start_on(dir.path(), 2, &[], &engines).await.unwrap();
    let mut ids = upload(&system, 30).await;

    // Restarted (kill -9, same store) while jobs are in flight, and uploads go on meanwhile.
    nats.kill().await;
    ids.extend(upload(&system, 10).await);
    nats.start_again().await.unwrap();
    let restarted = Instant::now();
    ids.extend(upload(&system, 10).await);
    all_terminal(&system, &ids, Duration::from_secs(60)).await;
    println!("after a restart: {} jobs ended {:?} after NATS was back", ids.len(), restarted.elapsed());

    // Wiped: every stream, consumer, message and registry entry gone.
    let before = upload(&system, 30).await;
    nats.wipe_and_start_again().await.unwrap();
    let wiped = Instant::now();
    let after = upload(&system, 10).await;
    all_terminal(&system, &before, Duration::from_secs(60)).await;
    all_terminal(&system, &after, Duration::from_secs(60)).await;
    println!("after a wipe: {} jobs ended {:?} after NATS was back empty", before.len() + after.len(), wiped.elapsed());
    ids.extend(before);
    ids.extend(after);
    let store = open(dir.path(), &db).await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    every_job_once(&store, &ids).await;
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_refuses_uploads_clearly_and_loses_no_job() {
    use pixmesh_test_support::postgres::PgCluster;
    let dir = tempfile::tempdir().unwrap();
    let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let nats = NatsServer::start().await.unwrap();
    let db = cluster.url("postgres");
    let engines = Engines { database: db.clone(), queue: Some(nats.url()), blobs: None };
    let system = System::start_on(dir.path(), 2, &["store.connect_timeout_ms=1000"], &engines).await.unwrap();
    let mut ids = upload(&system, 30).await;

    // The database goes down (immediate stop: like a crash) with jobs in flight.
    tokio::task::block_in_place(|| cluster.kill());
    let down = Instant::now();
    // Uploads meanwhile: a clear 503 with Retry-After, within the connect timeout; nothing kept.
    let mut refused = 0;
    for _ in 0..5 {
        let (status, retry_after, body, took) = upload_once(&system, jpeg(160, 120)).await;
        assert_eq!(status, 503, "{body}");
        assert!(retry_after, "503 without Retry-After: {body}");
        assert!(took < Duration::from_secs(5), "refused after {took:?}");
        refused += 1;
    }
    tokio::task::block_in_place(|| cluster.start_again());
    println!("database down for {:?}; {refused} uploads refused with 503 + Retry-After", down.elapsed());
    let back = Instant::now();
    // Uploads work again by themselves, and every accepted job finishes once.
    ids.extend(uploads_again(&system, 10, back, Duration::from_secs(30)).await);
    all_terminal(&system, &ids, Duration::from_secs(90)).await;
    println!("every job ended {:?} after the database was back", back.elapsed());
    let store = open(dir.path(), &db).await;
    every_job_once(&store, &ids).await;
    let counts = store.counts().await.unwrap();
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    assert_eq!(total, ids.len() as u64, "no job was half-written during the outage: {counts:?}");
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_of_10_s_under_load_refuses_uploads_clearly_and_loses_no_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start();
    let nats = NatsServer::start().await.unwrap();
    let db = database(dir.path()).await;
    let engines = Engines { database: db.clone(), queue: Some(nats.url()), blobs: Some(s3.url("outage")) };
    let sets = ["store.blobs_retry_ms=1000", "distributor.retry_delay_ms=500"];
    let system = System::start_on(dir.path(), 2, &sets, &engines).await.unwrap();
    let mut ids = upload(&system, 20).await;

    // S3 goes away for 10 s while jobs are in flight and uploads go on.
    s3.stop();
    let down = Instant::now();
    let (mut accepted, mut refused) = (0, 0);
    while down.elapsed() < Duration::from_secs(10) {
        let (status, retry_after, body, took) = upload_once(&system, jpeg(150 + refused % 9, 100)).await;
        match status {
            // Accepted before the store noticed: the blob was written, so the job must finish.
            202 => {
                ids.push(id(&body));
                accepted += 1;
            }
            503 => {
                assert!(retry_after, "503 without Retry-After: {body}");
                assert_eq!(body["error"]["code"], "unavailable", "{body}");
                refused += 1;
            }
            other => panic!("upload during the S3 outage: {other} {body}"),
        }
        assert!(took < Duration::from_secs(6), "an upload during the outage took {took:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    s3.start_again();
    let back = Instant::now();
    println!("S3 down for {:?}: {refused} uploads refused with 503 + Retry-After, {accepted} accepted", down.elapsed());
    assert!(refused > 0, "no upload noticed the outage");
    // Uploads work again by themselves, and every accepted job finishes once.
    ids.extend(uploads_again(&system, 10, back, Duration::from_secs(20)).await);
    all_terminal(&system, &ids, Duration::from_secs(90)).await;
    println!("every job ({}) ended {:?} after S3 was back", ids.len(), back.elapsed());
    let store = open(dir.path(), &db).await;
    every_job_once(&store, &ids).await;
    let counts = store.counts().await.unwrap();
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    assert_eq!(total, ids.len() as u64, "no job without its blob was created during the outage: {counts:?}");
    // Every result can be downloaded (from S3, through the status service).
    for id in ids.iter().step_by(7) {
        let (code, _, bytes) = system.result(id).await.unwrap();
        assert_eq!(code, 200);
        assert!(bytes.starts_with(b"\x89PNG"), "the result of {id} is a PNG");
    }
    system.stop().await.unwrap();
}
