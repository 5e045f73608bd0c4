//! Signed URLs: a path that works without an API key until its expiry, so that results can be
//! embedded in pages (`<img src=…>`).
//!
//! A signed URL is the path plus `?expires=<unix seconds>&key=<key id>&sig=<hex>`, where `sig`
//! is HMAC-SHA256, under the named key's secret, of the path, a newline and the expiry. The
//! upload and status services sign result paths (`result_url`); the gateway checks the
//! signature in place of an API key, in constant time. Keys are rotatable: the first key of
//! `gateway.signed_urls.keys` signs, every listed key verifies, so a new key is added second,
//! reloaded everywhere, moved first, and the old one removed once the URLs it signed expired.
//!
//! Only the path is covered: another path, another expiry or another key id gives another
//! signature. The gateway admits a signed URL for `GET` and `HEAD` only.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::time::{SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

/// The shortest secret accepted: 32 bytes, the size of the HMAC-SHA256 output.
const MIN_SECRET_BYTES: usize = 32;
/// The longest life a signed URL may be given.
const MAX_TTL_S: u64 = 7 * 24 * 3600;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SignedUrlConfig {
    /// Signing keys; the first signs, all verify. Empty: no signed URLs.
    pub keys: Vec<SigningKey>,
    /// How long a signed URL works, from when it was made.
    pub ttl_s: u64,
}

impl Default for SignedUrlConfig {
    fn default() -> Self {
        SignedUrlConfig { keys: Vec::new(), ttl_s: 3600 }
    }
}

#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SigningKey {
    /// Named in each URL it signs (`key=`): `[A-Za-z0-9_-]{1,32}`.
    pub id: String,
    /// At least 32 bytes; keep it out of the file with `PIXMESH__GATEWAY__SIGNED_URLS__KEYS`.
    pub secret: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("id", &self.id).field("secret", &"…").finish()
    }
}

impl SignedUrlConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (i, key) in self.keys.iter().enumerate() {
            let id_ok =
                !key.id.is_empty() && key.id.len() <= 32 && key.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !id_ok {
                return Err(format!("gateway.signed_urls.keys[{i}].id {:?}: use 1 to 32 of A-Z a-z 0-9 _ -", key.id));
            }
            if key.secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "gateway.signed_urls.keys[{i}] ({}): the secret must be at least {MIN_SECRET_BYTES} bytes (for example `openssl rand -hex 32`)",
                    key.id
                ));
            }
            if self.keys[..i].iter().any(|k| k.id == key.id) {
                return Err(format!("gateway.signed_urls.keys: the id {:?} is used twice", key.id));
            }
        }
        if self.ttl_s == 0 || self.ttl_s > MAX_TTL_S {
            return Err(format!("gateway.signed_urls.ttl_s must be 1 to {MAX_TTL_S} (7 days), not {}", self.ttl_s));
        }
        Ok(())
    }
}

/// Why a signed URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the signed URL is incomplete: it needs expires, key and sig")]
    Incomplete,
    #[error("the signed URL expired {0} s ago; ask /api/status/{{id}} for a fresh result_url")]
    Expired(u64),
    #[error("the signed URL names a signing key this gateway does not have (rotated out?)")]
    UnknownKey,
    #[error("the signature does not match the URL")]
    BadSignature,
}

/// Signs and checks URLs with the configured keys.
pub struct Signer {
    keys: Vec<(String, HmacSha256)>,
    ttl_s: u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("keys", &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>()).finish()
    }
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Signer {
    /// `None` when no key is configured. The configuration must have been validated.
    pub fn new(config: &SignedUrlConfig) -> Option<Signer> {
        let keys: Vec<_> = config
            .keys
            .iter()
            .filter_map(|k| HmacSha256::new_from_slice(k.secret.as_bytes()).ok().map(|mac| (k.id.clone(), mac)))
            .collect();
        (!keys.is_empty()).then_some(Signer { keys, ttl_s: config.ttl_s })
    }

    /// `path` signed with the first key, working until `now_s` + the configured life.
    pub fn sign(&self, path: &str, now_s: u64) -> String {
        let (id, mac) = &self.keys[0];
        let expires = now_s.saturating_add(self.ttl_s);
        format!("{path}?expires={expires}&key={id}&sig={}", hex::encode(tag(mac, path, expires)))
    }

    /// Checks the signature of `path` with its `query`, at `now_s`. A query without `sig` is
    /// not a signed URL: `None`.
    pub fn verify(&self, path: &str, query: Option<&str>, now_s: u64) -> Option<Result<(), Refusal>> {
        let (mut expires, mut key, mut sig) = (None, None, None);
        for pair in query.unwrap_or("").split('&') {
            match pair.split_once('=') {
                Some(("expires", v)) => expires = Some(v),
                Some(("key", v)) => key = Some(v),
                Some(("sig", v)) => sig = Some(v),
                _ => {}
            }
        }
        let sig = sig?;
        Some(self.check(path, expires, key, sig, now_s))
    }

    fn check(&self, path: &str, expires: Option<&str>, key: Option<&str>, sig: &str, now_s: u64) -> Result<(), Refusal> {
        let (Some(expires), Some(key)) = (expires, key) else { return Err(Refusal::Incomplete) };
        let expires: u64 = expires.parse().map_err(|_| Refusal::Incomplete)?;
        let sig = hex::decode(sig).map_err(|_| Refusal::BadSignature)?;
        let (_, mac) = self.keys.iter().find(|(id, _)| id == key).ok_or(Refusal::UnknownKey)?;
        let mut mac = mac.clone();
        mac.update(&message(path, expires));
        // Constant time: how much of a forged signature matched is not told by the timing.
        mac.verify_slice(&sig).map_err(|_| Refusal::BadSignature)?;
        if now_s > expires {
            return Err(Refusal::Expired(now_s - expires));
        }
        Ok(())
    }
}

/// Where a job's result is downloaded: its path signed now when there are signing keys, else
/// the plain path (which needs the API key). What upload and status answer as `result_url`.
pub fn result_url(signer: Option<&Signer>, job_id: &str) -> String {
    sign_path(signer, format!("/api/result/{job_id}"))
}

/// Where output `output` of a job with named outputs is downloaded, as [`result_url`].
pub fn output_url(signer: Option<&Signer>, job_id: &str, output: &str) -> String {
    sign_path(signer, format!("/api/result/{job_id}/{output}"))
}

fn sign_path(signer: Option<&Signer>, path: String) -> String {
    match signer {
        Some(signer) => signer.sign(&path, now_s()),
        None => path,
    }
}

fn message(path: &str, expires: u64) -> Vec<u8> {
    format!("{path}\n{expires}").into_bytes()
}

fn tag(mac: &HmacSha256, path: &str, expires: u64) -> Vec<u8> {
    let mut mac = mac.clone();
    mac.update(&message(path, expires));
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ids: &[&str]) -> SignedUrlConfig {
        SignedUrlConfig {
            keys: ids.iter().map(|id| SigningKey { id: id.to_string(), secret: format!("{id}-secret-of-at-least-32-bytes!!") }).collect(),
            ttl_s: 600,
        }
    }

    fn split(url: &str) -> (&str, Option<&str>) {
        let (path, query) = url.split_once('?').unwrap();
        (path, Some(query))
    }

    #[test]
    fn a_signed_path_verifies_until_it_expires_and_nothing_else_does() {
        let signer = Signer::new(&config(&["k1"])).unwrap();
        let url = signer.sign("/api/result/j1", 1_000);
        assert!(url.starts_with("/api/result/j1?expires=1600&key=k1&sig="), "{url}");
        let (path, query) = split(&url);
        assert_eq!(signer.verify(path, query, 1_000), Some(Ok(())));
        assert_eq!(signer.verify(path, query, 1_600), Some(Ok(())));
        assert_eq!(signer.verify(path, query, 1_601), Some(Err(Refusal::Expired(1))));
        // Another path, a later expiry, another key, a changed signature.
        assert_eq!(signer.verify("/api/result/j2", query, 1_000), Some(Err(Refusal::BadSignature)));
        assert_eq!(signer.verify("/api/status/j1", query, 1_000), Some(Err(Refusal::BadSignature)));
        let later = query.unwrap().replace("expires=1600", "expires=9600");
        assert_eq!(signer.verify(path, Some(&later), 1_000), Some(Err(Refusal::BadSignature)));
        let other = query.unwrap().replace("key=k1", "key=k9");
        assert_eq!(signer.verify(path, Some(&other), 1_000), Some(Err(Refusal::UnknownKey)));
        let sig = query.unwrap().rsplit_once("sig=").unwrap().1;
        let mut flipped = sig.as_bytes().to_vec();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let tampered = query.unwrap().replace(sig, std::str::from_utf8(&flipped).unwrap());
        assert_eq!(signer.verify(path, Some(&tampered), 1_000), Some(Err(Refusal::BadSignature)));
        let short = query.unwrap().replace(sig, &sig[..10]);
        assert_eq!(signer.verify(path, Some(&short), 1_000), Some(Err(Refusal::BadSignature)));
        assert_eq!(signer.verify(path, Some("expires=1600&key=k1&sig=zz"), 1_000), Some(Err(Refusal::BadSignature)));
        assert_eq!(signer.verify(path, Some("key=k1&sig=00"), 1_000), Some(Err(Refusal::Incomplete)));
        assert_eq!(signer.verify(path, Some("expires=soon&key=k1&sig=00"), 1_000), Some(Err(Refusal::Incomplete)));
        // No `sig`: not a signed URL at all.
        assert_eq!(signer.verify(path, Some("width=5"), 1_000), None);
        assert_eq!(signer.verify(path, None, 1_000), None);
    }

    #[test]
    fn keys_rotate_the_first_signs_and_every_one_verifies() {
        let old = Signer::new(&config(&["old"])).unwrap();
        let both = Signer::new(&config(&["new", "old"])).unwrap();
        let url = old.sign("/api/result/j", 0);
        let (path, query) = split(&url);
        assert_eq!(both.verify(path, query, 10), Some(Ok(())), "URLs of the old key still work");
        let fresh = both.sign("/api/result/j", 0);
        assert!(fresh.contains("key=new"));
        let (path, query) = split(&fresh);
        assert_eq!(old.verify(path, query, 10), Some(Err(Refusal::UnknownKey)));
        assert!(Signer::new(&SignedUrlConfig::default()).is_none());
        assert_eq!(result_url(None, "j"), "/api/result/j");
        assert!(result_url(Some(&both), "j").starts_with("/api/result/j?expires="));
    }

    #[test]
    fn settings_are_checked() {
        assert!(config(&["k1", "k-2_x"]).validate().is_ok());
        assert!(SignedUrlConfig::default().validate().is_ok());
        assert!(config(&["k1", "k1"]).validate().unwrap_err().contains("twice"));
        assert!(config(&["bad id"]).validate().is_err());
        assert!(config(&[""]).validate().is_err());
        let short = SignedUrlConfig { keys: vec![SigningKey { id: "k".into(), secret: "short".into() }], ttl_s: 60 };
        assert!(short.validate().unwrap_err().contains("32 bytes"));
        assert!(SignedUrlConfig { ttl_s: 0, ..config(&["k"]) }.validate().is_err());
        assert!(SignedUrlConfig { ttl_s: MAX_TTL_S + 1, ..config(&["k"]) }.validate().is_err());
        assert!(!format!("{:?}", config(&["k"])).contains("secret-of"), "secrets stay out of logs");
    }
}
