use crate::errors::error_code;
use crate::pool::{CpuPool, PoolError};
use crate::transfer::Transfer;
use pixmesh_chassis::{ApiError, ErrorCode};
use pixmesh_imaging::Limits;
use pixmesh_proto::v1::image_worker_server::ImageWorker;
use pixmesh_proto::v1::{ProcessRequest, ProcessResponse};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

pub struct ImageWorkerService {
    pool: CpuPool,
    limits: Limits,
    extra_delay: std::time::Duration,
    /// Fault injection for tests (`WorkerConfig::fault_panic_marker`): `None` unless configured.
    panic_marker: Option<Arc<[u8]>>,
    in_flight: Arc<AtomicUsize>,
    /// Reads inputs from and writes outputs to presigned URLs.
    transfer: Transfer,
}

/// What a client is told when processing panicked; the panic itself goes to the log.
const INTERNAL_MESSAGE: &str = "the image could not be processed: an internal error occurred";

/// Counts a call in `pixmesh_worker_in_flight` from its start until it ends (or is cancelled).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> InFlight {
        let now = count.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!(crate::instruments::IN_FLIGHT).set(now as f64);
        InFlight(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        metrics::gauge!(crate::instruments::IN_FLIGHT).set(now as f64);
    }
}

impl ImageWorkerService {
    pub fn new(pool: CpuPool, limits: Limits, transfer: Transfer) -> Self {
        ImageWorkerService { pool, limits, extra_delay: std::time::Duration::ZERO, panic_marker: None, in_flight: Arc::default(), transfer }
    }

    /// Panics on the pool thread for any input that contains `marker` (see
    /// `WorkerConfig::fault_panic_marker`); an empty marker turns this off.
    pub fn with_panic_marker(mut self, marker: &[u8]) -> Self {
        self.panic_marker = (!marker.is_empty()).then(|| Arc::from(marker));
        self
    }

    /// Delays every call (see `WorkerConfig::extra_delay_ms`).
    pub fn with_extra_delay(mut self, delay: std::time::Duration) -> Self {
        self.extra_delay = delay;
        self
    }
}

#[tonic::async_trait]
impl ImageWorker for ImageWorkerService {
    /// [`ImageWorkerService::answer`], with clock times both ways (`pixmesh-hlc` metadata):
    /// the caller's moves this process's clock, and the answer carries this one's.
    ///
    /// Its span continues the distributor's call (`traceparent` in the metadata); the
    /// decoding, resizing and encoding, and the output's upload, are spans inside it.
    async fn process(&self, request: Request<ProcessRequest>) -> Result<Response<ProcessResponse>, Status> {
        let clock = pixmesh_chassis::clock::process();
        clock.observe_metadata(request.metadata(), "distributor");
        // WARN, as every hop's root span: a log filter at `warn` still sees it.
        let span = tracing::warn_span!(
            "process",
            otel.name = "pixmesh.v1.ImageWorker/Process",
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = "pixmesh.v1.ImageWorker",
            rpc.method = "Process",
            rpc.grpc.status_code = tracing::field::Empty,
            job.id = %request.get_ref().job_id,
            job.attempt = request.get_ref().attempt,
            trace_id = tracing::field::Empty,
        );
        pixmesh_chassis::trace::continue_from(&span, pixmesh_chassis::trace::from_metadata(request.metadata()));
        let started = Instant::now();
        let mut answer = self.answer(request).instrument(span.clone()).await;
        let code = answer.as_ref().err().map(|status| status.code()).unwrap_or(tonic::Code::Ok);
        metrics::histogram!(
            crate::instruments::RPC_SERVER_CALL_DURATION,
            "rpc_method" => "pixmesh.v1.ImageWorker/Process",
            "rpc_grpc_status_code" => pixmesh_chassis::instruments::grpc_status_code(code)
        )
        .record(started.elapsed().as_secs_f64());
        match &answer {
            Ok(_) => span.record("rpc.grpc.status_code", 0),
            Err(status) => {
                span.record("otel.status_code", "ERROR");
                span.record("rpc.grpc.status_code", status.code() as i32)
            }
        };
        match &mut answer {
            Ok(response) => clock.stamp(response.metadata_mut()),
            Err(status) => clock.stamp(status.metadata_mut()),
        }
        answer
    }
}

impl ImageWorkerService {
    async fn answer(&self, request: Request<ProcessRequest>) -> Result<Response<ProcessResponse>, Status> {
        let _in_flight = InFlight::enter(&self.in_flight);
        if !self.extra_delay.is_zero() {
            tokio::time::sleep(self.extra_delay).await;
        }
        let req = request.into_inner();
        let options = crate::wire::options_from(req.ops).map_err(|e| e.to_grpc_status())?;
        let limits = self.limits;
        // A call with URLs holds a transfer place for its whole life (refused when none is
        // free) and waits for a CPU slot; a call with its bytes inline takes a CPU slot or is
        // refused at once.
        let by_url = !req.input_url.is_empty();
        let _transfer = if by_url { Some(self.transfer.admit().map_err(|e| e.to_grpc_status())?) } else { None };
        let image = if !by_url {
            req.image
        } else {
            let get = tracing::info_span!("blob get", otel.kind = "client", http.request.method = "GET");
            self.transfer.fetch(&req.input_url).instrument(get).await.map_err(|e| {
                tracing::warn!(job = %req.job_id, attempt = req.attempt, code = %e.code, reason = %e.message, "input not fetched");
                e.to_grpc_status()
            })?
        };
        let started = Instant::now();
        let marker = self.panic_marker.clone();
        // With an output URL the worker names what it puts there: hashed here, on the pool.
        let hash_output = !req.output_url.is_empty();
        // The pool's thread has no span of its own: the stages are children of this call's.
        let span = tracing::Span::current();
        let work = move || {
            let _call = span.enter();
            if let Some(marker) = marker
                && image.windows(marker.len()).any(|w| *w == *marker)
            {
                panic!("fault injection: the input contains worker.fault_panic_marker");
            }
            pixmesh_imaging::process(&image, &options, &limits).map(|out| {
                let digest = hash_output.then(|| hex::encode(Sha256::digest(&out.bytes)));
                (out, digest)
            })
        };
        let outcome = if by_url { self.pool.run_queued(work).await } else { self.pool.run(work).await };
        let outcome = outcome.map_err(|e| match e {
            PoolError::Full(_) | PoolError::Closed => ApiError::new(ErrorCode::Unavailable, e.to_string()).to_grpc_status(),
            PoolError::Panicked(panic) => {
                metrics::counter!(crate::instruments::IMAGES, "outcome" => ErrorCode::Internal.as_str()).increment(1);
                tracing::error!(job = %req.job_id, attempt = req.attempt, %panic, "processing panicked; the call fails with `internal`");
                ApiError::new(ErrorCode::Internal, INTERNAL_MESSAGE).to_grpc_status()
            }
        })?;
        let elapsed = started.elapsed();
        metrics::histogram!(crate::instruments::PROCESSING_DURATION).record(elapsed.as_secs_f64());
        match outcome {
            Ok((out, digest)) => {
                metrics::counter!(crate::instruments::IMAGES, "outcome" => "ok").increment(1);
                tracing::debug!(job = %req.job_id, attempt = req.attempt, width = out.width, height = out.height, ms = elapsed.as_millis() as u64, "processed");
                let mut response = ProcessResponse {
                    content_type: out.format.mime().to_string(),
                    format: out.format.as_str().to_string(),
                    width: out.width,
                    height: out.height,
                    image: out.bytes.into(),
                    cpu_micros: elapsed.as_micros() as u64,
                    digest: String::new(),
                    size: 0,
                };
                if let Some(digest) = digest {
                    let image = std::mem::take(&mut response.image);
                    response.digest = digest;
                    response.size = image.len() as u64;
                    let put = tracing::info_span!("blob put", otel.kind = "client", http.request.method = "PUT");
                    self.transfer.store(&req.output_url, image, &response.content_type).instrument(put).await.map_err(|e| {
                        tracing::warn!(job = %req.job_id, attempt = req.attempt, code = %e.code, reason = %e.message, "output not stored");
                        e.to_grpc_status()
                    })?;
                }
                Ok(Response::new(response))
            }
            Err(err) => {
                let code = error_code(&err);
                metrics::counter!(crate::instruments::IMAGES, "outcome" => code.as_str()).increment(1);
                // The client gets the plain message; what the decoder or encoder said stays here.
                let detail = err.detail().unwrap_or_default();
                if code == ErrorCode::Internal {
                    tracing::warn!(job = %req.job_id, attempt = req.attempt, error = %err, detail, "image processing failed");
                } else {
                    tracing::info!(job = %req.job_id, attempt = req.attempt, error = %err, detail, "image rejected");
                }
                Err(ApiError::new(code, err.to_string()).to_grpc_status())
            }
        }
    }
}
