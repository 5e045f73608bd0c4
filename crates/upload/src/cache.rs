//! The result cache, cache-aside in the upload path: an upload of image bytes and options that
//! pixmesh has already processed (the same SHA-256 of the input, the same canonical options,
//! within the scope the cache is shared in) gets the existing result instead of new work. No
//! worker is called: the job is created succeeded, with the result of the job that made it.
//! An identical upload while that job is still being made waits for it and ends with it, so
//! concurrent identical uploads do the work once.
//!
//! This file decides the policy (which uploads use the cache, under which key) and reports
//! what happened (metrics, the `Cache-Status` header of RFC 9211). The lookup and the create
//! are one transaction of the job store ([`pixmesh_store::JobStore::create_cached`]): two
//! identical uploads can never both miss. Entries live as long as the job they name (the
//! store's retention prunes both together); a job that failed is never a hit.
//!
//! A client opts out per request: `Cache-Control: no-cache` does the work again (and makes it
//! the entry), `no-store` does it without touching the cache.
//!
//! A client that uploaded an image before can ask for a result by the image's digest alone
//! (`Repr-Digest: sha-256=:…:`, RFC 9530, and no body): answered from its own key's cache, or
//! refused with 412 `not_cached` (then it sends the image). A hit then costs no upload at all.

use http::{HeaderMap, HeaderValue, header};
use pixmesh_store::{CacheKey, CacheOutcome, Created, JobStore, NewJob, StoreError};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Who shares cached results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    /// No cache: every upload is processed.
    Off,
    /// Each API key has a cache of its own: a key never learns what another key uploaded.
    #[default]
    Key,
    /// One cache for every key: identical uploads of different keys share the work. (A key can
    /// then tell that an image was uploaded before, by anyone, from the answer.)
    Global,
}

/// What the cache did for one upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The cache is off for this upload (`scope = "off"`, or `Cache-Control: no-store`).
    Bypassed { asked: bool },
    /// Looked up (or, with `no-cache`, refreshed): what the store did.
    Used { outcome: CacheOutcome, refreshed: bool },
}

#[derive(Debug, Clone, Copy)]
pub struct ResultCache {
    scope: CacheScope,
}

impl ResultCache {
    pub fn new(scope: CacheScope) -> Self {
        ResultCache { scope }
    }

    /// Creates `job` through the cache (or past it, as the scope and the request's
    /// `Cache-Control` say) and counts the outcome.
    pub async fn create(&self, jobs: &dyn JobStore, job: NewJob, headers: &HeaderMap) -> Result<(Created, Served), StoreError> {
        let directives = request_directives(headers);
        let no_store = directives.iter().any(|d| d == "no-store");
        if self.scope == CacheScope::Off || no_store {
            metrics::counter!(crate::instruments::CACHE, "outcome" => "bypass").increment(1);
            return Ok((jobs.create(job).await?, Served::Bypassed { asked: no_store }));
        }
        let refreshed = directives.iter().any(|d| d == "no-cache" || d == "max-age=0");
        let key = CacheKey { key: self.key(&job), lookup: !refreshed, only_cached: false };
        let (created, outcome) = jobs.create_cached(job, &key).await?;
        let label = if refreshed && outcome == CacheOutcome::Miss { "refresh" } else { outcome.as_str() };
        metrics::counter!(crate::instruments::CACHE, "outcome" => label).increment(1);
        Ok((created, Served::Used { outcome, refreshed }))
    }

    /// Creates `job` from the cache alone: the upload named its image by digest and sent no
    /// bytes (a client that uploaded this image before, asking for a result it may already
    /// have). Only the caller's own scope can answer it, so a digest alone never reaches
    /// another key's work: with the `global` scope, or with the cache off or bypassed, the
    /// answer is [`StoreError::NotCached`] (send the image), as it is when nothing matches.
    pub async fn create_from_digest(&self, jobs: &dyn JobStore, job: NewJob, headers: &HeaderMap) -> Result<(Created, Served), StoreError> {
        let directives = request_directives(headers);
        let bypassed = directives.iter().any(|d| matches!(d.as_str(), "no-store" | "no-cache" | "max-age=0"));
        if self.scope != CacheScope::Key || bypassed {
            metrics::counter!(crate::instruments::CACHE, "outcome" => "not_cached").increment(1);
            return Err(StoreError::NotCached);
        }
        let key = CacheKey { key: self.key(&job), lookup: true, only_cached: true };
        match jobs.create_cached(job, &key).await {
            Ok((created, outcome)) => {
                metrics::counter!(crate::instruments::CACHE, "outcome" => outcome.as_str()).increment(1);
                Ok((created, Served::Used { outcome, refreshed: false }))
            }
            Err(StoreError::NotCached) => {
                metrics::counter!(crate::instruments::CACHE, "outcome" => "not_cached").increment(1);
                Err(StoreError::NotCached)
            }
            Err(e) => Err(e),
        }
    }

    /// The entry's key: the request's fingerprint (the input's SHA-256 and the canonical
    /// options, `NewJob::request_hash`), in the scope's namespace.
    fn key(&self, job: &NewJob) -> String {
        let scope = match self.scope {
            CacheScope::Key => format!("key:{}", job.owner),
            CacheScope::Global | CacheScope::Off => "global".to_string(),
        };
        hex::encode(Sha256::digest(format!("pixmesh result cache v1\n{scope}\n{}", job.request_hash)))
    }
}

impl Served {
    /// The job this upload's result comes from, when it is another's.
    pub fn source(&self) -> Option<&str> {
        match self {
            Served::Used { outcome, .. } => outcome.source(),
            Served::Bypassed { .. } => None,
        }
    }

    /// The answer's `Cache-Status` field (RFC 9211); none for an idempotent replay.
    pub fn cache_status(&self) -> Option<HeaderValue> {
        let value = match self {
            Served::Bypassed { asked: true } => "pixmesh; fwd=request",
            Served::Bypassed { asked: false } => "pixmesh; fwd=bypass",
            Served::Used { outcome: CacheOutcome::Replayed, .. } => return None,
            Served::Used { outcome: CacheOutcome::Hit { .. }, .. } => "pixmesh; hit",
            Served::Used { outcome: CacheOutcome::Joined { .. }, .. } => "pixmesh; fwd=miss; collapsed",
            Served::Used { outcome: CacheOutcome::Miss, refreshed: true } => "pixmesh; fwd=request; stored",
            Served::Used { outcome: CacheOutcome::Miss, refreshed: false } => "pixmesh; fwd=miss; stored",
        };
        Some(HeaderValue::from_static(value))
    }
}

/// The request's `Cache-Control` directives, lowercased, without spaces.
fn request_directives(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| d.trim().to_ascii_lowercase().replace(' ', ""))
        .filter(|d| !d.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(owner: &str, hash: &str) -> NewJob {
        NewJob {
            id: "j".into(),
            owner: owner.into(),
            input: pixmesh_store::BlobRef::at_digest("d".repeat(64), 1),
            input_format: "png".into(),
            options: Default::default(),
            outputs: vec![],
            idempotency_key: None,
            request_hash: hash.into(),
            traceparent: None,
        }
    }

    #[test]
    fn the_key_scope_keeps_keys_apart_and_the_global_scope_shares() {
        let by_key = ResultCache::new(CacheScope::Key);
        assert_ne!(by_key.key(&job("alice", "h")), by_key.key(&job("bob", "h")));
        assert_eq!(by_key.key(&job("alice", "h")), by_key.key(&job("alice", "h")));
        assert_ne!(by_key.key(&job("alice", "h")), by_key.key(&job("alice", "other options")));
        let global = ResultCache::new(CacheScope::Global);
        assert_eq!(global.key(&job("alice", "h")), global.key(&job("bob", "h")));
        assert_ne!(global.key(&job("alice", "h")), by_key.key(&job("alice", "h")));
    }

    #[test]
    fn cache_control_directives_are_read_in_any_case_and_list_form() {
        let mut headers = HeaderMap::new();
        headers.append(header::CACHE_CONTROL, HeaderValue::from_static("max-stale, No-Cache"));
        headers.append(header::CACHE_CONTROL, HeaderValue::from_static(" NO-STORE "));
        assert_eq!(request_directives(&headers), vec!["max-stale", "no-cache", "no-store"]);
        assert!(request_directives(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn the_cache_status_field_says_what_happened() {
        let used = |outcome, refreshed| Served::Used { outcome, refreshed }.cache_status().map(|v| v.to_str().unwrap().to_string());
        assert_eq!(used(CacheOutcome::Hit { from: "a".into() }, false).as_deref(), Some("pixmesh; hit"));
        assert_eq!(used(CacheOutcome::Joined { leader: "a".into() }, false).as_deref(), Some("pixmesh; fwd=miss; collapsed"));
        assert_eq!(used(CacheOutcome::Miss, true).as_deref(), Some("pixmesh; fwd=request; stored"));
        assert_eq!(used(CacheOutcome::Replayed, false), None);
        assert_eq!(Served::Bypassed { asked: false }.cache_status().unwrap(), "pixmesh; fwd=bypass");
    }
}
