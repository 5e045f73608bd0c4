use crate::errors::error_code;
use crate::pool::{CpuPool, PoolError};
use pixmesh_chassis::{ApiError, ErrorCode};
use pixmesh_imaging::{Crop, Fit, Flip, Gravity, Limits, Options, OutputFormat};
use pixmesh_proto::v1::image_worker_server::ImageWorker;
use pixmesh_proto::v1::{Operations, ProcessRequest, ProcessResponse};
use std::time::Instant;
use tonic::{Request, Response, Status};

pub struct ImageWorkerService {
    pool: CpuPool,
    limits: Limits,
}

impl ImageWorkerService {
    pub fn new(pool: CpuPool, limits: Limits) -> Self {
        ImageWorkerService { pool, limits }
    }
}

/// Reads the wire operations into pipeline options; bad values are a `bad_request`.
pub(crate) fn options_from(ops: Option<Operations>) -> Result<Options, ApiError> {
    let ops = ops.unwrap_or_default();
    let bad = |e: pixmesh_imaging::ImagingError| ApiError::new(ErrorCode::BadRequest, e.to_string());
    let fit: Fit = if ops.fit.is_empty() { Fit::default() } else { ops.fit.parse().map_err(bad)? };
    let format: OutputFormat = if ops.format.is_empty() { OutputFormat::default() } else { ops.format.parse().map_err(bad)? };
    let quality = match ops.quality {
        0 => None,
        q => {
            Some(u8::try_from(q).map_err(|_| ApiError::new(ErrorCode::BadRequest, format!("quality must be between 1 and 100, got {q}")))?)
        }
    };
    let gravity: Gravity = if ops.gravity.is_empty() { Gravity::default() } else { ops.gravity.parse().map_err(bad)? };
    let flip: Option<Flip> = if ops.flip.is_empty() { None } else { Some(ops.flip.parse().map_err(bad)?) };
    let rotate = u16::try_from(ops.rotate)
        .map_err(|_| ApiError::new(ErrorCode::BadRequest, format!("rotate must be 0, 90, 180 or 270, got {}", ops.rotate)))?;
    let crop = ops.crop.map(|c| Crop { x: c.x, y: c.y, width: c.width, height: c.height });
    let options = Options {
        width: (ops.width > 0).then_some(ops.width),
        height: (ops.height > 0).then_some(ops.height),
        fit,
        format,
        quality,
        enlarge: ops.enlarge,
        lossless: ops.lossless,
        gravity,
        rotate,
        flip,
        crop,
        grayscale: ops.grayscale,
        blur: (ops.blur > 0.0).then_some(ops.blur),
        sharpen: (ops.sharpen > 0.0).then_some(ops.sharpen),
    };
    options.validate().map_err(bad)?;
    Ok(options)
}

#[tonic::async_trait]
impl ImageWorker for ImageWorkerService {
    async fn process(&self, request: Request<ProcessRequest>) -> Result<Response<ProcessResponse>, Status> {
        let req = request.into_inner();
        let options = options_from(req.ops).map_err(|e| e.to_grpc_status())?;
        let limits = self.limits;
        let image = req.image;
        let started = Instant::now();
        let outcome = self.pool.run(move || pixmesh_imaging::process(&image, &options, &limits)).await.map_err(|e| match e {
            PoolError::Full(_) | PoolError::Closed => ApiError::new(ErrorCode::Unavailable, e.to_string()).to_grpc_status(),
        })?;
        let elapsed = started.elapsed();
        metrics::histogram!("pixmesh_worker_process_seconds").record(elapsed.as_secs_f64());
        match outcome {
            Ok(out) => {
                metrics::counter!("pixmesh_worker_images_total", "outcome" => "ok").increment(1);
                tracing::debug!(job = %req.job_id, attempt = req.attempt, width = out.width, height = out.height, ms = elapsed.as_millis() as u64, "processed");
                Ok(Response::new(ProcessResponse {
                    content_type: out.format.mime().to_string(),
                    format: out.format.as_str().to_string(),
                    width: out.width,
                    height: out.height,
                    image: out.bytes.into(),
                    cpu_micros: elapsed.as_micros() as u64,
                }))
            }
            Err(err) => {
                let code = error_code(&err);
                metrics::counter!("pixmesh_worker_images_total", "outcome" => code.as_str()).increment(1);
                tracing::info!(job = %req.job_id, attempt = req.attempt, error = %err, "image rejected");
                Err(ApiError::new(code, err.to_string()).to_grpc_status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_options_are_validated() {
        let ok = options_from(Some(Operations { width: 800, format: "webp".into(), ..Operations::default() })).unwrap();
        assert_eq!((ok.width, ok.height, ok.format), (Some(800), None, OutputFormat::Webp));
        for bad in [
            Operations { fit: "stretch".into(), ..Operations::default() },
            Operations { format: "avif".into(), ..Operations::default() },
            Operations { quality: 101, ..Operations::default() },
            Operations { quality: 100_000, ..Operations::default() },
        ] {
            let err = options_from(Some(bad.clone())).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{bad:?}");
        }
    }
}
