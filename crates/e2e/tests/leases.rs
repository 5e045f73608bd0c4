//! Leases and departures with real processes: a distributor killed with jobs in flight loses
//! them for about one (short, renewed) lease, not for the longest call; calls to a worker that
//! froze are sent elsewhere once the registry has expired it, not at their deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use futures_util::future::join_all;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pixmesh_store::{EventKind, JobEvent, JobState, JobStore};
use pixmesh_test_support::{Role, System, jpeg};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Both tests measure how soon something happens: they run one at a time.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// Milliseconds since the Unix epoch, the clock of `job_events.at`.
fn epoch_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64
}

async fn store(system: &System) -> Arc<dyn JobStore> {
    pixmesh_e2e::job_store(system).await
}

async fn upload(system: &System, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let (code, body) = system.upload(jpeg(320, 240), "image/jpeg", "width=64&format=png").await.unwrap();
        assert_eq!(code, 202, "{body}");
        ids.push(id(&body));
    }
    ids
}

async fn wait_succeeded(system: &System, ids: &[String], within: Duration) {
    for s in join_all(ids.iter().map(|id| system.wait_terminal(id, within))).await {
        let s = s.unwrap();
        assert_eq!(s["state"], "succeeded", "{s}");
    }
}

/// Every job succeeded exactly once; returns their events.
async fn exactly_one_result(system: &System, ids: &[String]) -> HashMap<String, Vec<JobEvent>> {
    let store = store(system).await;
    let mut all = HashMap::new();
    for id in ids {
        let events = store.events(id).await.unwrap();
        let succeeded = events.iter().filter(|e| e.kind() == EventKind::Succeeded).count();
        let failed = events.iter().filter(|e| e.kind() == EventKind::Failed).count();
        assert_eq!((succeeded, failed), (1, 0), "job {id}: {:?}", events.iter().map(|e| e.kind()).collect::<Vec<_>>());
        assert!(store.get(id).await.unwrap().unwrap().result.is_some(), "job {id} has no result");
        all.insert(id.clone(), events);
    }
    all
}

/// The sum of the samples of `name` (with `label` in the line) at a process's admin port.
async fn metric(system: &System, admin: &str, name: &str, label: &str) -> f64 {
    let text = system.client().get(format!("http://{admin}/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name) && l.contains(label)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Those of `ids` that `owner` holds (processing under its lease).
async fn held_by(store: &Arc<dyn JobStore>, owner: &str, ids: &[String]) -> Vec<String> {
    let mut held = Vec::new();
    for id in ids {
        let job = store.get(id).await.unwrap().unwrap();
        if job.state == JobState::Processing && job.lease_owner.as_deref() == Some(owner) {
            held.push(id.clone());
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_distributors_jobs_are_taken_again_within_seconds() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // The default lease (10 s, renewed every 3 s) and calls longer than it (12 s): a call
    // outlives its lease and keeps its claim.
    let sets = ["worker.capacity=4", "worker.extra_delay_ms=12000"];
    let system = System::start(dir.path(), 2, &sets).await.unwrap();
    let victim = system.child("distributor").unwrap();
    let victim_id = victim.addresses["id"].clone();
    let registry = system.registry();
    let store = store(&system).await;
    // The first distributor takes the first four jobs; then a second one runs beside it.
    let mut ids = upload(&system, 4).await;
    let started = Instant::now();
    while held_by(&store, &victim_id, &ids).await.len() < 4 {
        assert!(started.elapsed() < Duration::from_secs(20), "the first distributor did not claim the jobs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sets = system.store_sets();
    sets.push(format!("distributor.registry={registry}"));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let second = Role::start("distributor", None, &sets, &[]).await.unwrap();
    ids.extend(upload(&system, 4).await);
    let started = Instant::now();
    loop {
        let mut processing = 0;
        for id in &ids {
            processing += usize::from(store.get(id).await.unwrap().unwrap().state == JobState::Processing);
        }
        if processing == ids.len() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "only {processing} of {} jobs were claimed", ids.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Killed with its calls in flight: no release, no goodbye.
    let lost = held_by(&store, &victim_id, &ids).await;
    assert!(lost.len() >= 4, "{lost:?}");
    kill(Pid::from_raw(victim.pid), Signal::SIGKILL).unwrap();
    let killed_at = epoch_ms();
    wait_succeeded(&system, &ids, Duration::from_secs(120)).await;
    let events = exactly_one_result(&system, &ids).await;

    let mut slowest = 0;
    for id in &ids {
        let events = &events[id];
        let expired: Vec<&JobEvent> = events.iter().filter(|e| e.kind() == EventKind::LeaseExpired).collect();
        if !lost.contains(id) {
            // Its 12 s call outlived the 10 s lease: renewal kept the claim.
            assert!(expired.is_empty(), "job {id} of a live distributor lost its lease: {events:?}");
            continue;
        }
        // Claimed again by a live distributor (the second one, or the restarted first).
        assert_eq!(expired.len(), 1, "job {id}: {events:?}");
        assert_eq!(expired[0].data()["owner"], victim_id.as_str());
        let again = events.iter().find(|e| e.kind() == EventKind::Claimed && e.attempt == expired[0].attempt + 1).unwrap();
        assert_ne!(again.data()["owner"], victim_id.as_str());
        slowest = slowest.max(again.at - killed_at);
    }
    eprintln!("the killed distributor's {} jobs were all claimed again {slowest} ms after the kill", lost.len());
    // At most one lease (10 s) after its last renewal, which came before the kill; the old
    // 60 s lease made this a minute.
    assert!(slowest < 25_000, "claimed again {slowest} ms after the kill");
    drop(second);
    system.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_to_a_frozen_worker_go_elsewhere_when_the_registry_expires_it_not_at_their_deadline() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // A call deadline far beyond the registry's expiry (3 missed 1 s heartbeats); slow calls,
    // so that the frozen worker surely holds some.
    let sets = ["distributor.call_timeout_ms=60000", "distributor.max_claim_ms=90000", "worker.capacity=2", "worker.extra_delay_ms=1500"];
    let system = System::start(dir.path(), 3, &sets).await.unwrap();
    let victim = system.child("worker-1").unwrap();
    let victim_address = victim.addresses["grpc"].clone();
    let distributor = system.child("distributor").unwrap().addresses["admin"].clone();
    let mut ids = upload(&system, 12).await;
    let started = Instant::now();
    while metric(&system, &victim.addresses["admin"], "pixmesh_worker_in_flight", "").await < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(20), "worker-1 never got a call");
        ids.extend(upload(&system, 1).await);
    }
    kill(Pid::from_raw(victim.pid), Signal::SIGSTOP).unwrap();
    let stopped_at = epoch_ms();
    let stopped = Instant::now();
    ids.extend(upload(&system, 6).await);
    // Done long before the 60 s deadline of the calls the frozen worker holds.
    wait_succeeded(&system, &ids, Duration::from_secs(40)).await;
    let done = stopped.elapsed();
    kill(Pid::from_raw(victim.pid), Signal::SIGCONT).unwrap();
    let events = exactly_one_result(&system, &ids).await;

    let abandoned: Vec<&JobEvent> =
        events.values().flatten().filter(|e| e.kind() == EventKind::Retried && e.data()["worker"] == victim_address.as_str()).collect();
    assert!(!abandoned.is_empty(), "the frozen worker's calls were sent elsewhere");
    let latest = abandoned.iter().map(|e| e.at - stopped_at).max().unwrap_or_default();
    eprintln!(
        "{} calls to the frozen worker were sent elsewhere, the last {latest} ms after SIGSTOP; all done after {done:?}",
        abandoned.len()
    );
    for e in &abandoned {
        assert_eq!(e.data()["code"], "unavailable", "abandoned when it left the set, not timed out: {e:?}");
    }
    // Expiry (3 s of silence, swept every 0.5 s), the watch, a 1.5 s health check: about 5 s.
    // (Without them the HTTP/2 keep-alive, a ping after 10 s of silence unanswered for 5 s,
    // ends the calls after about 15 s; the call deadline after 60.)
    assert!(latest < 10_000, "sent elsewhere {latest} ms after the worker froze, expected about the registry's expiry");
    // None ran into its deadline.
    assert!(metric(&system, &distributor, "pixmesh_distributor_calls_abandoned_total", "").await >= abandoned.len() as f64);
    assert_eq!(metric(&system, &distributor, "pixmesh_distributor_worker_failures_total", "code=\"timeout\"").await, 0.0);
    system.stop().await.unwrap();
}

/// Each event of the history comes after the one before it on the hybrid logical clock.
fn assert_causal(id: &str, events: &[JobEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[1].hlc > pair[0].hlc && pair[1].at >= pair[0].at,
            "job {id}: event {} is not after event {}: {events:?}",
            pair[1].seq,
            pair[0].seq
        );
    }
}

/// The owners of a history's claims.
fn claimers(events: &[JobEvent]) -> Vec<String> {
    events.iter().filter(|e| e.kind() == EventKind::Claimed).map(|e| e.data()["owner"].as_str().unwrap_or_default().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn histories_keep_causal_order_when_the_processes_clocks_disagree() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // The system (upload, distributor, worker) runs 150 ms ahead; a second distributor 150 ms
    // behind: 300 ms apart, within the 500 ms maximum offset.
    let system = System::start(dir.path(), 1, &["chassis.clock_skew_ms=150"]).await.unwrap();
    let distributor = |skew: i64| {
        let mut sets = system.store_sets();
        sets.push(format!("distributor.registry={}", system.registry()));
        sets.push(format!("chassis.clock_skew_ms={skew}"));
        async move { Role::start("distributor", None, &sets.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await.unwrap() }
    };
    let behind = distributor(-150).await;
    let behind_id = behind.addresses["id"].clone();
    let store = store(&system).await;
    let mut ids = Vec::new();
    let started = Instant::now();
    // Until the distributor behind has taken some of the jobs.
    loop {
        ids.extend(upload(&system, 8).await);
        wait_succeeded(&system, &ids, Duration::from_secs(60)).await;
        let mut by_behind = 0;
        for id in &ids {
            by_behind += usize::from(claimers(&store.events(id).await.unwrap()).contains(&behind_id));
        }
        if by_behind > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the second distributor claimed none of {} jobs", ids.len());
    }
    for id in &ids {
        assert_causal(id, &store.events(id).await.unwrap());
    }
    assert_eq!(metric(&system, &behind.addresses["admin"], "pixmesh_clock_offset_rejected_total", "").await, 0.0);
    drop(behind);

    // One more, 1,050 ms behind the rest: beyond the maximum offset. The times it reads are
    // not adopted but counted, and its claims carry its own time.
    let far = distributor(-900).await;
    let far_id = far.addresses["id"].clone();
    let started = Instant::now();
    let claimed_by_far = loop {
        let fresh = upload(&system, 8).await;
        wait_succeeded(&system, &fresh, Duration::from_secs(60)).await;
        let mut found = None;
        for id in &fresh {
            let events = store.events(id).await.unwrap();
            if claimers(&events).first() == Some(&far_id) {
                found = Some(events);
            }
        }
        if let Some(events) = found {
            break events;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the far-behind distributor claimed nothing");
    };
    // Its first claim follows the upload's `accepted`, 1,050 ms ahead of it.
    let (accepted, claim) = (&claimed_by_far[0], &claimed_by_far[1]);
    assert_eq!(
        (accepted.kind(), claim.kind(), claim.data()["owner"].as_str()),
        (EventKind::Accepted, EventKind::Claimed, Some(far_id.as_str()))
    );
    assert!(claim.hlc < accepted.hlc, "the far-behind claim adopted the time it follows: {claimed_by_far:?}");
    assert!(metric(&system, &far.addresses["admin"], "pixmesh_clock_offset_rejected_total", "").await >= 1.0);
    drop(far);
    system.stop().await.unwrap();
}
