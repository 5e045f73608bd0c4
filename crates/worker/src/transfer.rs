//! Image bytes to and from presigned URLs (S3 blobs): the call names one object to GET and one to
//! PUT, each valid for a short time; the worker holds no credentials of its own.

use bytes::{Bytes, BytesMut};
use pixmesh_chassis::{ApiError, ErrorCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct Transfer {
    client: reqwest::Client,
    max_bytes: usize,
    /// Calls with URLs at once (`worker.transfers`). Such a call waits on the blob store for
    /// most of its life, so it holds one of these for all of it and a CPU slot only while its
    /// pixels are processed: a worker keeps its threads busy however slow the blob store is.
    calls: Arc<Semaphore>,
    limit: usize,
}

impl Transfer {
    /// `max_bytes` bounds a download (the same bound as an image sent in the call); at most
    /// `calls` calls with URLs are taken at once.
    pub fn new(max_bytes: usize, calls: usize) -> Result<Transfer, reqwest::Error> {
        let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(3)).timeout(Duration::from_secs(60)).build()?;
        let limit = calls.max(1);
        Ok(Transfer { client, max_bytes, calls: Arc::new(Semaphore::new(limit)), limit })
    }

    /// Takes a place for one call with URLs, for its whole life, or refuses it (`unavailable`:
    /// the distributor tries another worker) when all are taken.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.calls).try_acquire_owned().map_err(|_| {
            ApiError::new(ErrorCode::Unavailable, format!("worker is at capacity ({} calls with presigned URLs in flight)", self.limit))
        })
    }

    /// GETs the input. The body is read chunk by chunk and refused past `max_bytes`.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, ApiError> {
        let mut response = self.client.get(url).send().await.map_err(|e| unreachable("read the input image from", e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(ApiError::new(ErrorCode::Internal, "the uploaded image is missing from the blob store"));
        }
        if !status.is_success() {
            return Err(refused("read the input image from", status));
        }
        if response.content_length().is_some_and(|n| n > self.max_bytes as u64) {
            return Err(too_large(self.max_bytes));
        }
        let mut body = BytesMut::with_capacity(response.content_length().map_or(0, |n| n as usize));
        while let Some(chunk) = response.chunk().await.map_err(|e| unreachable("read the input image from", e))? {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(too_large(self.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// PUTs the output.
    pub async fn store(&self, url: &str, bytes: Bytes, content_type: &str) -> Result<(), ApiError> {
        let response = self
            .client
            .put(url)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes)
            .send()
            .await
            .map_err(|e| unreachable("write the output image to", e))?;
        if !response.status().is_success() {
            return Err(refused("write the output image to", response.status()));
        }
        Ok(())
    }
}

/// The blob store could not be reached: another try (elsewhere, later) may succeed.
fn unreachable(what: &str, e: reqwest::Error) -> ApiError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    ApiError::new(ErrorCode::Unavailable, format!("the worker could not {what} the blob store: {text}"))
}

/// The blob store answered with an error (an expired URL, throttling, a failing server).
fn refused(what: &str, status: reqwest::StatusCode) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("the worker could not {what} the blob store: it answered {status}"))
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, format!("the input image is larger than {max} bytes"))
}
