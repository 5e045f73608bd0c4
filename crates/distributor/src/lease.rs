//! A claim's lease, kept alive in the background for as long as the claim is held.
//!
//! Leases are short (`lease_ms`, 10 s by default) so that the jobs of a distributor that died
//! are claimed again within seconds, not after the longest call a claim may make. While a
//! claim is held its lease is renewed every `lease_renew_ms` (3 s), however long its worker
//! call takes. [`keep`] runs beside the claim's work, in the same `select!` (so it ends with
//! the claim and needs no task of its own), and returns only when the claim must stop:
//!
//! - [`Lost::Fenced`]: the store says the attempt no longer holds the job (this distributor
//!   was frozen or cut off past its lease and another claim took the job). The work is dropped
//!   at once, its worker call with it, and nothing is written.
//! - [`Lost::Expired`]: renewals failed (the store did not answer, or answered with an error)
//!   until the lease would have run out; the job may be someone else's by now, so the same.
//!   Until then a failed renewal is tried again every [`RETRY_AFTER`]: a store that is
//!   unavailable for less than a lease costs nothing.
//! - [`Lost::MaxClaim`]: the claim reached `max_claim_ms`. Renewal alone would let a claim
//!   stuck on something (a store write, a worker that never frees a slot) hold its job
//!   forever; this bounds it, and the caller gives the job back to the queue.
//!
//! The expiry is tracked on this process's clock from the moment a renewal was *sent*; the
//! store sets it from the moment it ran the update, which is later, so the lease held in the
//! store never ends before the one this module believes in.

use pixmesh_store::{JobStore, StoreError};
use std::time::Duration;
use tokio::time::Instant;

/// The wait before a renewal that failed for a store error is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// A renewal sent after the lease should have run out, with no failure before it (the process
/// was frozen, or its runtime starved), still gets this long to go through.
const LATE_TRY: Duration = Duration::from_millis(500);

/// Why a held claim must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    Fenced,
    Expired,
    MaxClaim,
}

/// The lease settings of a claim.
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    pub lease: Duration,
    pub renew: Duration,
    pub max_claim: Duration,
}

/// Renews the lease of claim `attempt` of job `id` every `terms.renew` until the claim is lost
/// (see the module doc); never returns otherwise. `claimed_at`: when the claim was asked for,
/// before the store set its first lease.
pub async fn keep(jobs: &dyn JobStore, id: &str, attempt: u32, claimed_at: Instant, terms: Terms) -> Lost {
    let give_up_at = claimed_at + terms.max_claim;
    let mut expires_at = claimed_at + terms.lease;
    let mut next = claimed_at + terms.renew;
    // Since the last renewal that went through, every try has failed.
    let mut failing = false;
    loop {
        if next >= give_up_at {
            tokio::time::sleep_until(give_up_at).await;
            metrics::counter!(crate::instruments::LEASE_RENEWALS, "outcome" => "max_claim").increment(1);
            return Lost::MaxClaim;
        }
        tokio::time::sleep_until(next).await;
        let sent = Instant::now();
        if failing && sent >= expires_at {
            tracing::error!(job = %id, attempt, "lease renewals failed until the lease ran out; the claim is given up");
            return Lost::Expired;
        }
        // A renewal stuck in the store (behind another writer's lock, say) is given up when
        // the lease runs out. One sent late without failures before it (the process was frozen,
        // or starved) still gets a moment: if nobody took the job meanwhile, the claim goes on.
        let until = if sent < expires_at { expires_at } else { sent + LATE_TRY };
        let error = match tokio::time::timeout_at(until, jobs.extend_lease(id, attempt, terms.lease)).await {
            Ok(Ok(())) => {
                metrics::counter!(crate::instruments::LEASE_RENEWALS, "outcome" => "ok").increment(1);
                if failing {
                    tracing::info!(job = %id, attempt, "lease renewed again");
                }
                failing = false;
                expires_at = sent + terms.lease;
                next = sent + terms.renew;
                continue;
            }
            Ok(Err(StoreError::Fenced { .. })) => {
                metrics::counter!(crate::instruments::LEASE_RENEWALS, "outcome" => "fenced").increment(1);
                return Lost::Fenced;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the store did not answer before the lease ran out".to_string(),
        };
        metrics::counter!(crate::instruments::LEASE_RENEWALS, "outcome" => "error").increment(1);
        failing = true;
        let now = Instant::now();
        if now >= expires_at {
            tracing::error!(job = %id, attempt, %error, "lease renewal failed and the lease ran out; the claim is given up");
            return Lost::Expired;
        }
        tracing::warn!(job = %id, attempt, %error, left_ms = (expires_at - now).as_millis() as u64, "lease renewal failed; trying again");
        next = (now + RETRY_AFTER).min(expires_at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixmesh_store::{BlobRef, NewJob, SqliteJobStore};

    const TERMS: Terms = Terms { lease: Duration::from_millis(400), renew: Duration::from_millis(100), max_claim: Duration::from_secs(60) };

    /// A real store in a temporary directory, with one job claimed by `owner`.
    async fn claimed(owner: &str) -> (tempfile::TempDir, SqliteJobStore, Instant, u32) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteJobStore::open(&dir.path().join("jobs.db")).await.unwrap();
        let job = NewJob {
            owner: String::new(),
            id: "j".into(),
            input: BlobRef::at_digest("a".repeat(64), 1),
            input_format: "png".into(),
            options: Default::default(),
            outputs: Vec::new(),
            idempotency_key: None,
            request_hash: "h".into(),
            traceparent: None,
        };
        store.create(job).await.unwrap();
        let claimed_at = Instant::now();
        let job = store.claim(owner, TERMS.lease, 5).await.unwrap().unwrap();
        (dir, store, claimed_at, job.attempt)
    }

    #[tokio::test]
    async fn a_kept_lease_outlives_its_length_and_a_taken_over_one_is_lost() {
        let (_dir, store, claimed_at, attempt) = claimed("d1").await;
        // `kept` is polled for as long as the test's own store calls wait: a renewal in flight
        // holds this process's write turn, and a future left unpolled in the middle of one
        // would keep every other writer of the store waiting for good.
        let kept = keep(&store, "j", attempt, claimed_at, TERMS);
        tokio::pin!(kept);
        // Three leases long, nobody else can claim the job.
        let untaken = async {
            let until = Instant::now() + TERMS.lease * 3;
            while Instant::now() < until {
                assert!(store.claim("d2", TERMS.lease, 5).await.unwrap().is_none(), "the renewed lease was taken");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            lost = &mut kept => panic!("lost the claim: {lost:?}"),
            () = untaken => {}
        }
        // Its lease is cut short (as if its renewals had stopped) and another claim takes the
        // job: the next renewal is fenced.
        let taken = async {
            loop {
                store.extend_lease("j", attempt, Duration::ZERO).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
                if let Some(job) = store.claim("d2", TERMS.lease, 5).await.unwrap() {
                    break job;
                }
            }
        };
        let (thief, lost) = tokio::time::timeout(TERMS.renew * 20, async { tokio::join!(taken, &mut kept) })
            .await
            .expect("a fenced renewal ends the claim");
        assert_eq!(thief.attempt, attempt + 1);
        assert_eq!(lost, Lost::Fenced);
    }

    #[tokio::test]
    async fn a_claim_is_held_no_longer_than_max_claim() {
        let (_dir, store, claimed_at, attempt) = claimed("d1").await;
        let terms = Terms { max_claim: Duration::from_millis(700), ..TERMS };
        let lost = tokio::time::timeout(Duration::from_secs(10), keep(&store, "j", attempt, claimed_at, terms)).await.unwrap();
        assert_eq!(lost, Lost::MaxClaim);
        assert!(claimed_at.elapsed() >= terms.max_claim);
        // It was renewed until then (the last renewal's lease still runs), then no more.
        assert!(store.claim("d2", TERMS.lease, 5).await.unwrap().is_none());
        tokio::time::sleep(TERMS.lease + Duration::from_millis(100)).await;
        assert!(store.claim("d2", TERMS.lease, 5).await.unwrap().is_some(), "not renewed past max_claim");
    }
}
