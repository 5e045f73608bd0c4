//! The S3 blob backend (AWS or any S3-compatible server), through `object_store`.
//!
//! Keys under the URL's prefix:
//! - `blobs/<sha256>`: the blobs, content-addressed and written create-only (`If-None-Match: *`):
//!   a blob that is already there has these bytes, so a second put is a no-op and nothing is
//!   ever overwritten.
//! - `staging/<call>`: one object per worker call, PUT by the worker through a presigned URL,
//!   then copied to its content address unless a blob is there already, and deleted
//!   ([`Presign::adopt`]).
//! - `outputs/<job>/<output>/<attempt>`: the outputs of a saga's steps, one key per attempt of
//!   each output (plain PUTs: a key is only ever written by its one attempt), deleted by a
//!   compensation and by the pivot's clean-up of other attempts' keys.
//! - `probe/<uuid>`: the write probe's objects, deleted at once.
//!
//! Every request has a timeout and is retried (backoff, a bounded total time): an outage
//! longer than that is a [`StoreError::Io`] of the blob store, which the services turn into 503
//! with `Retry-After`, and which raises the health alarm.

use crate::health::Alarm;
use crate::url::S3Url;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};
use pixmesh_model::{BlobRef, BlobStore, BlobStream, Presign, StoreError, StoreKind, is_output_key};
use std::time::Duration;

/// How requests to S3 are bounded (`store.blobs_timeout_ms`, `store.blobs_retry_ms`).
#[derive(Debug, Clone, Copy)]
pub struct S3Limits {
    /// One request, from connect to the last byte.
    pub timeout: Duration,
    /// Connecting.
    pub connect_timeout: Duration,
    /// All tries of one operation together (object_store retries 5xx, 429 and transport errors).
    pub retry_for: Duration,
}

/// Bodies from this size on are looked for (HEAD) before they are sent.
const HEAD_FIRST_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone)]
pub struct S3BlobStore {
    store: AmazonS3,
    /// `s3://bucket/prefix`, for messages.
    name: String,
    prefix: Path,
    alarm: Alarm,
}

/// What requests are signed with.
#[derive(Clone)]
pub enum S3Credentials {
    /// The usual `AWS_*` variables (read by object_store: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), or a role of the platform (web identity,
    /// ECS/EKS container credentials).
    Environment,
    /// A key pair given directly (tests, embedding).
    Keys { access_key_id: String, secret_access_key: String },
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            S3Credentials::Environment => f.write_str("Environment"),
            S3Credentials::Keys { access_key_id, .. } => write!(f, "Keys({access_key_id}, ***)"),
        }
    }
}

/// Whether the environment has anything to sign with.
fn environment_has_credentials() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    (set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY"))
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
}

impl S3BlobStore {
    /// Connects and lists the prefix once, so a wrong endpoint, bucket or key pair is refused
    /// here (before any port is bound) with a message that names what to check.
    pub async fn open(url: &S3Url, limits: S3Limits, credentials: S3Credentials) -> Result<S3BlobStore, String> {
        if matches!(credentials, S3Credentials::Environment) && !environment_has_credentials() {
            return Err(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones)".into()
            );
        }
        let region = url
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        let http = url.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&url.bucket)
            .with_region(region)
            .with_allow_http(http)
            .with_client_options(
                ClientOptions::new().with_timeout(limits.timeout).with_connect_timeout(limits.connect_timeout).with_allow_http(http),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig { init_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(1), base: 2.0 },
                max_retries: 10,
                retry_timeout: limits.retry_for,
            })
            // Create-only puts: `If-None-Match: *` on PutObject (AWS since 2024, MinIO, R2, s3s).
            .with_conditional_put(S3ConditionalPut::ETagMatch);
        if let S3Credentials::Keys { access_key_id, secret_access_key } = credentials {
            builder = builder.with_access_key_id(access_key_id).with_secret_access_key(secret_access_key);
        }
        if let Some(endpoint) = &url.endpoint {
            // A server of its own: path-style requests (`endpoint/bucket/key`).
            builder = builder.with_endpoint(endpoint).with_virtual_hosted_style_request(false);
        }
        let store = builder.build().map_err(|e| format!("{e}"))?;
        let prefix = Path::from(url.prefix.as_str());
        let this = S3BlobStore { store, name: format!("s3://{}/{}", url.bucket, url.prefix), prefix, alarm: Alarm::default() };
        this.list_probe().await.map_err(|e| {
            format!(
                "{e}; check that the S3 server answers at {}, that the bucket {} exists, and that AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are a key pair it accepts",
                url.endpoint.as_deref().unwrap_or("its AWS endpoint"),
                url.bucket
            )
        })?;
        Ok(this)
    }

    /// Raises `alarm` whenever a request to S3 fails.
    pub(crate) fn with_alarm(mut self, alarm: Alarm) -> Self {
        self.alarm = alarm;
        self
    }

    fn key(&self, area: &str, name: &str) -> Path {
        self.prefix.child(area).child(name)
    }

    /// The key of blob `name`: a digest under `blobs/`, an output key `job/output/attempt`
    /// under `outputs/`.
    fn blob_key(&self, name: &str) -> Result<Path, StoreError> {
        if BlobRef::is_digest(name) {
            return Ok(self.key("blobs", name));
        }
        if is_output_key(name) {
            return Ok(name.split('/').fold(self.prefix.child("outputs"), |path, part| path.child(part)));
        }
        Err(StoreError::Invalid(format!("not a blob digest or output key: {name:?}")))
    }

    fn staging_key(&self, call: &str) -> Result<Path, StoreError> {
        let valid =
            !call.is_empty() && call.len() <= 200 && call.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid || call.starts_with('.') {
            return Err(StoreError::Invalid(format!("not a staging name: {call:?}")));
        }
        Ok(self.key("staging", call))
    }

    /// A failed request, as the blob store's I/O error (503 with `Retry-After` to a client).
    fn failed(&self, key: &Path, e: object_store::Error) -> StoreError {
        self.alarm.raise();
        let path = format!(
            "{}/{}",
            self.name.trim_end_matches('/'),
            key.as_ref().strip_prefix(self.prefix.as_ref()).unwrap_or(key.as_ref()).trim_start_matches('/')
        );
        StoreError::Io { store: StoreKind::Blobs, path, source: std::io::Error::other(flatten(&e)) }
    }

    /// Whether a blob of `size` bytes is at `key`.
    async fn has(&self, key: &Path, size: u64) -> Result<bool, StoreError> {
        match self.store.head(key).await {
            Ok(meta) => Ok(meta.size == size),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.failed(key, e)),
        }
    }

    async fn list_probe(&self) -> Result<(), StoreError> {
        let probe = self.prefix.child("probe");
        self.store.list_with_delimiter(Some(&probe)).await.map(drop).map_err(|e| self.failed(&probe, e))
    }
}

/// An object_store error with its sources, on one line (its Display leaves the cause out).
fn flatten(e: &object_store::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        source = s.source();
    }
    text
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, bytes: Bytes) -> Result<BlobRef, StoreError> {
        let blob = BlobRef::of(&bytes);
        let key = self.blob_key(&blob.digest)?;
        // The body is held once (a `Bytes` shared by every retry, not copied): bodies are
        // bounded by the upload's size limit, and a single PUT is the one create-only write
        // that every S3 server supports.
        // A large body that is already there is not sent again (a server may also answer a
        // create-only PUT of an existing key before reading the body, and cut the connection).
        if bytes.len() >= HEAD_FIRST_BYTES && self.has(&key, blob.size).await? {
            return Ok(blob);
        }
        let create = PutOptions { mode: PutMode::Create, ..Default::default() };
        match self.store.put_opts(&key, PutPayload::from_bytes(bytes), create).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(blob),
            // A write that failed may have been made by another (or by a try whose answer was
            // lost): what is there under this address is these bytes.
            Err(e) => match self.has(&key, blob.size).await {
                Ok(true) => Ok(blob),
                _ => Err(self.failed(&key, e)),
            },
        }
    }

    async fn put_at(&self, name: &str, bytes: Bytes) -> Result<BlobRef, StoreError> {
        if !is_output_key(name) {
            return Err(StoreError::Invalid(format!("not an output key: {name:?}")));
        }
        let key = self.blob_key(name)?;
        let blob = BlobRef { key: Some(name.to_string()), ..BlobRef::of(&bytes) };
        // A plain PUT: an S3 PUT replaces the object whole or not at all.
        self.store.put(&key, PutPayload::from_bytes(bytes)).await.map_err(|e| self.failed(&key, e))?;
        Ok(blob)
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, StoreError> {
        let key = self.blob_key(name)?;
        let result = match self.store.get(&key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.failed(&key, e)),
        };
        result.bytes().await.map(Some).map_err(|e| self.failed(&key, e))
    }

    async fn stream(&self, name: &str) -> Result<Option<BlobStream>, StoreError> {
        let key = self.blob_key(name)?;
        let result = match self.store.get(&key).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.failed(&key, e)),
        };
        let size = result.meta.size;
        let this = self.clone();
        let chunks = result.into_stream().map(move |chunk| chunk.map_err(|e| this.failed(&key, e)));
        Ok(Some(BlobStream { size, chunks: Box::pin(chunks) }))
    }

    async fn delete(&self, name: &str) -> Result<(), StoreError> {
        let key = self.blob_key(name)?;
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(&key, e)),
        }
    }

    async fn probe(&self, write: bool) -> Result<(), StoreError> {
        if !write {
            return self.list_probe().await;
        }
        let key = self.key("probe", &uuid::Uuid::now_v7().to_string());
        let body = PutPayload::from_static(b"pixmesh blob store probe\n");
        self.store.put(&key, body).await.map_err(|e| self.failed(&key, e))?;
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(&key, e)),
        }
    }

    fn presign(&self) -> Option<&dyn Presign> {
        Some(self)
    }
}

#[async_trait]
impl Presign for S3BlobStore {
    async fn get_url(&self, digest: &str, ttl: Duration) -> Result<String, StoreError> {
        let key = self.blob_key(digest)?;
        let url = self.store.signed_url(http::Method::GET, &key, ttl).await.map_err(|e| self.failed(&key, e))?;
        Ok(url.to_string())
    }

    async fn staging_url(&self, call: &str, ttl: Duration) -> Result<String, StoreError> {
        let key = self.staging_key(call)?;
        let url = self.store.signed_url(http::Method::PUT, &key, ttl).await.map_err(|e| self.failed(&key, e))?;
        Ok(url.to_string())
    }

    async fn adopt(&self, call: &str, blob: &BlobRef) -> Result<(), StoreError> {
        let staged = self.staging_key(call)?;
        let target = self.blob_key(blob.name())?;
        let meta = match self.store.head(&staged).await {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StoreError::Invalid(format!("the worker's output for {call} is not in the staging area")));
            }
            Err(e) => return Err(self.failed(&staged, e)),
        };
        if meta.size != blob.size {
            let _ = self.discard(call).await;
            return Err(StoreError::Invalid(format!(
                "the worker's output for {call} has {} bytes, the worker said {}",
                meta.size, blob.size
            )));
        }
        // An address already holding a blob of this size holds these bytes: nothing to copy.
        // Otherwise one server-side CopyObject (a multipart copy would make it create-only on
        // every server, at three requests per result: a concurrent copy of the same output
        // writes the same bytes, so the plain copy changes nothing that is there).
        if !self.has(&target, blob.size).await? {
            self.store.copy(&staged, &target).await.map_err(|e| self.failed(&target, e))?;
        }
        // Off the result's path; what a failure leaves is swept with the staging area.
        let this = self.clone();
        let call = call.to_string();
        tokio::spawn(async move {
            if let Err(e) = this.discard(&call).await {
                tracing::debug!(call, error = %e, "staging object not deleted; the sweep will");
            }
        });
        Ok(())
    }

    async fn discard(&self, call: &str) -> Result<(), StoreError> {
        let key = self.staging_key(call)?;
        match self.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(&key, e)),
        }
    }

    async fn sweep_staging(&self, age: Duration) -> Result<u64, StoreError> {
        let area = self.prefix.child("staging");
        let before = chrono::Utc::now() - chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
        let mut listing = self.store.list(Some(&area));
        let mut deleted = 0;
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.failed(&area, e))?;
            if meta.last_modified < before {
                match self.store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => return Err(self.failed(&meta.location, e)),
                }
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_as_one_line_with_their_causes() {
        let e = object_store::Error::Generic { store: "S3", source: Box::new(std::io::Error::other("connection refused")) };
        assert!(flatten(&e).contains("connection refused"), "{}", flatten(&e));
    }
}
