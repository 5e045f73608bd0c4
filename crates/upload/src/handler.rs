use crate::UploadConfig;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pixmesh_chassis::{ApiError, ErrorCode};
use pixmesh_imaging::{Crop, Fit, Flip, Gravity, Options, OutputFormat};
use pixmesh_store::{NewJob, StoreError, Stores};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Header the gateway sets to the name of the authenticated API key; idempotency keys are
/// scoped by it so two clients cannot collide.
pub const CLIENT_HEADER: &str = "x-pixmesh-client";
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Clone)]
struct AppState {
    stores: Stores,
    config: Arc<UploadConfig>,
    permits: Arc<Semaphore>,
}

/// The upload API, without a listener (tests call it with `oneshot`).
pub fn router(config: UploadConfig, stores: Stores) -> Router {
    let limit = config.max_body_bytes;
    let permits = Arc::new(Semaphore::new(config.max_concurrent));
    Router::new()
        .route("/api/upload", post(upload))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(AppState { stores, config: Arc::new(config), permits })
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no such endpoint: {} {}; upload with POST /api/upload", request.method(), request.uri().path()),
    )
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed on {}; upload with POST", request.method(), request.uri().path()))
}

/// Parses the query parameters of an upload into pipeline options.
pub fn parse_options(params: &[(String, String)]) -> Result<Options, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    let number = |name: &str, v: &str| v.parse::<u32>().map_err(|_| bad(format!("{name} must be a positive integer, got {v:?}")));
    let boolean = |name: &str, v: &str| match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(bad(format!("{name} must be true or false, got {other:?}"))),
    };
    let sigma = |name: &str, v: &str| v.parse::<f32>().map_err(|_| bad(format!("{name} must be a number (a sigma in pixels), got {v:?}")));
    let mut options = Options::default();
    for (key, value) in params {
        match key.as_str() {
            "width" => options.width = Some(number("width", value)?),
            "height" => options.height = Some(number("height", value)?),
            "fit" => options.fit = value.parse::<Fit>().map_err(|e| bad(e.to_string()))?,
            "format" => options.format = value.parse::<OutputFormat>().map_err(|e| bad(e.to_string()))?,
            "quality" => {
                let q = number("quality", value)?;
                options.quality = Some(u8::try_from(q).map_err(|_| bad(format!("quality must be between 1 and 100, got {q}")))?);
            }
            "enlarge" => options.enlarge = boolean("enlarge", value)?,
            "lossless" => options.lossless = boolean("lossless", value)?,
            "gravity" => options.gravity = value.parse::<Gravity>().map_err(|e| bad(e.to_string()))?,
            "rotate" => {
                let r = number("rotate", value)?;
                options.rotate = u16::try_from(r).map_err(|_| bad(format!("rotate must be 0, 90, 180 or 270, got {r}")))?;
            }
            "flip" => options.flip = Some(value.parse::<Flip>().map_err(|e| bad(e.to_string()))?),
            "crop" => options.crop = Some(value.parse::<Crop>().map_err(|e| bad(e.to_string()))?),
            "grayscale" => options.grayscale = boolean("grayscale", value)?,
            "blur" => options.blur = Some(sigma("blur", value)?),
            "sharpen" => options.sharpen = Some(sigma("sharpen", value)?),
            other => {
                return Err(bad(format!(
                    "unknown query parameter `{other}`; allowed: width, height, fit, gravity, format, quality, lossless, enlarge, rotate, flip, crop, grayscale, blur, sharpen"
                )));
            }
        }
    }
    options.validate().map_err(|e| bad(e.to_string()))?;
    Ok(options)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, format!("the upload is larger than the limit of {limit} bytes; send a smaller image"))
}

async fn read_image(request: Request, limit: usize) -> Result<Bytes, ApiError> {
    let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let bytes = if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("bad multipart body: {}", e.body_text())))?;
        let mut found = None;
        while let Some(field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
            let is_file = field.file_name().is_some() || matches!(field.name(), Some("file" | "image"));
            if is_file {
                found = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?);
                break;
            }
        }
        found.ok_or_else(|| {
            ApiError::new(ErrorCode::BadRequest, "the multipart body has no file field; send the image in a field named `file`")
        })?
    } else if content_type.is_empty() || content_type.starts_with("image/") || content_type.starts_with("application/octet-stream") {
        match Limited::new(request.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large(limit)),
            Err(e) => return Err(ApiError::new(ErrorCode::BadRequest, format!("could not read the request body: {e}"))),
        }
    } else {
        return Err(ApiError::new(
            ErrorCode::UnsupportedFormat,
            format!(
                "Content-Type `{content_type}` is not accepted; send the image bytes with Content-Type image/* or as multipart/form-data"
            ),
        ));
    };
    if bytes.is_empty() {
        return Err(ApiError::new(ErrorCode::BadRequest, "the request body is empty; send the image bytes"));
    }
    Ok(bytes)
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::new(ErrorCode::BadRequest, format!("bad multipart body: {}", e.body_text()))
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().map_err(|_| ApiError::new(ErrorCode::BadRequest, "Idempotency-Key must be printable ASCII"))?;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::new(ErrorCode::BadRequest, format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")));
    }
    let client = headers.get(CLIENT_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    Ok(Some(format!("{client}\u{1f}{key}")))
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::IdempotencyConflict { existing } => ApiError::new(
            ErrorCode::IdempotencyConflict,
            format!("this Idempotency-Key was already used for a different upload (job {existing}); use a new key for a new upload"),
        ),
        other => {
            tracing::error!(error = %other, "store error");
            other.api_error()
        }
    }
}

async fn upload(
    State(state): State<AppState>,
    Query(params): Query<Vec<(String, String)>>,
    request: Request,
) -> Result<Response, ApiError> {
    let options = parse_options(&params)?;
    let idempotency = idempotency_key(request.headers())?;
    let _permit = state.permits.acquire().await.map_err(|_| ApiError::new(ErrorCode::Unavailable, "shutting down"))?;
    let bytes = read_image(request, state.config.max_body_bytes).await?;
    let probe = pixmesh_imaging::probe(&bytes, &state.config.limits).map_err(|e| {
        let code = ErrorCode::parse(e.code()).unwrap_or(ErrorCode::Internal);
        ApiError::new(code, e.to_string())
    })?;
    let input = state.stores.blobs.put(bytes).await.map_err(store_error)?;
    let options_json = serde_json::to_string(&options).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let request_hash = hex::encode(Sha256::digest(format!("{}\n{}", input.digest, options_json)));
    let job = NewJob {
        id: uuid::Uuid::now_v7().to_string(),
        input,
        input_format: probe.format.as_str().to_string(),
        options,
        idempotency_key: idempotency,
        request_hash,
    };
    let created = state.stores.jobs.create(job).await.map_err(store_error)?;
    let id = created.job.id;
    metrics::counter!("pixmesh_upload_jobs_total", "replayed" => if created.created { "false" } else { "true" }).increment(1);
    if created.created {
        tracing::info!(job = %id, format = probe.format.as_str(), width = probe.width, height = probe.height, "job accepted");
    }
    let status_url = format!("/api/status/{id}");
    let body = serde_json::json!({ "id": id, "status_url": status_url, "result_url": format!("/api/result/{id}") });
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(v) = status_url.parse() {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if !created.created {
        response.headers_mut().insert("idempotent-replayed", http::HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    /// A minimal valid PNG made by hand (no image crate in this crate's tests): 8-bit gray,
    /// stored (uncompressed) deflate blocks.
    fn png(w: u32, h: u32) -> Vec<u8> {
        fn crc(data: &[u8]) -> u32 {
            let mut c = 0xFFFF_FFFFu32;
            for &b in data {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                }
            }
            !c
        }
        fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&crc(&body).to_be_bytes());
        }
        let mut raw = Vec::new();
        for y in 0..h {
            raw.push(0);
            raw.extend((0..w).map(|x| ((x + y) % 256) as u8));
        }
        let mut z = vec![0x78, 0x01];
        for (i, block) in raw.chunks(65_535).enumerate() {
            let last = (i + 1) * 65_535 >= raw.len();
            z.push(u8::from(last));
            z.extend_from_slice(&(block.len() as u16).to_le_bytes());
            z.extend_from_slice(&(!(block.len() as u16)).to_le_bytes());
            z.extend_from_slice(block);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &raw {
            a = (a + u32::from(x)) % 65_521;
            b = (b + a) % 65_521;
        }
        z.extend_from_slice(&((b << 16) | a).to_be_bytes());
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    async fn app(config: UploadConfig) -> (tempfile::TempDir, Router, Stores) {
        let dir = tempfile::tempdir().unwrap();
        let stores = Stores::open(&pixmesh_store::StoreConfig::default().with_data_dir(dir.path())).await.unwrap();
        (dir, router(config, stores.clone()), stores)
    }

    async fn send(app: &Router, req: http::Request<Body>) -> (StatusCode, HeaderMap, serde_json::Value) {
        let res = app.clone().oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn post(uri: &str, content_type: &str, body: Vec<u8>) -> http::Request<Body> {
        http::Request::post(uri).header("content-type", content_type).body(Body::from(body)).unwrap()
    }

    #[tokio::test]
    async fn accepts_a_raw_image_and_records_the_job() {
        let (_dir, app, stores) = app(UploadConfig::default()).await;
        let query = "/api/upload?width=10&format=webp&fit=cover&height=10&gravity=north-east&rotate=90&flip=h&crop=0,0,20,20&grayscale=true&blur=1.5&sharpen=0.5";
        let (status, headers, body) = send(&app, post(query, "image/png", png(40, 20))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["id"].as_str().unwrap();
        assert_eq!(body["status_url"], format!("/api/status/{id}"));
        assert_eq!(body["result_url"], format!("/api/result/{id}"));
        assert_eq!(headers[header::LOCATION], format!("/api/status/{id}"));
        let job = stores.jobs.get(id).await.unwrap().unwrap();
        assert_eq!(job.options.width, Some(10));
        assert_eq!((job.options.rotate, job.options.flip, job.options.gravity), (90, Some(Flip::H), Gravity::NorthEast));
        assert_eq!(job.options.crop, Some(Crop { x: 0, y: 0, width: 20, height: 20 }));
        assert_eq!((job.options.grayscale, job.options.blur, job.options.sharpen), (true, Some(1.5), Some(0.5)));
        assert_eq!(job.options.format, OutputFormat::Webp);
        assert_eq!(job.input_format, "png");
        assert!(stores.blobs.get(&job.input.digest).await.unwrap().is_some());
        assert_eq!(stores.jobs.events(id).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn accepts_multipart() {
        let (_dir, app, _stores) = app(UploadConfig::default()).await;
        let mut body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
        body.extend_from_slice(&png(8, 8));
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        let (status, _, body) = send(&app, post("/api/upload", "multipart/form-data; boundary=XyZ", body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }

    #[tokio::test]
    async fn bad_requests_get_clear_json_errors_and_store_nothing() {
        let config = UploadConfig {
            max_body_bytes: 64 * 1024,
            limits: pixmesh_imaging::Limits { max_pixels: 10_000, ..Default::default() },
            ..UploadConfig::default()
        };
        let (dir, app, stores) = app(config).await;
        let check = |req, status: StatusCode, code: &'static str| {
            let app = app.clone();
            async move {
                let (s, _, body) = send(&app, req).await;
                assert_eq!(s, status, "{body}");
                assert_eq!(body["error"]["code"], code, "{body}");
                assert!(!body["error"]["message"].as_str().unwrap().is_empty());
            }
        };
        check(post("/api/upload?width=abc", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?fit=stretch", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?colour=red", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?quality=300", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?rotate=45", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?crop=1,2,3", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?blur=lots", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?gravity=up", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload", "image/png", vec![]), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload", "text/plain", png(8, 8)), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_format").await;
        check(post("/api/upload", "image/png", b"GIF? no, plain text".to_vec()), StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_format")
            .await;
        check(post("/api/upload", "image/png", vec![0u8; 70_000]), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
        // 200 x 100 = 20,000 pixels > 10,000, refused from the header.
        check(post("/api/upload", "image/png", png(200, 100)), StatusCode::PAYLOAD_TOO_LARGE, "image_too_large").await;
        let mut broken = png(8, 8);
        broken.truncate(20);
        check(post("/api/upload", "image/png", broken), StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image").await;
        check(http::Request::get("/api/upload").body(Body::empty()).unwrap(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
        assert!(stores.jobs.counts().await.unwrap().is_empty(), "no job was recorded");
        let blobs = std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert_eq!(blobs, 1, "only the tmp directory exists");
    }

    #[tokio::test]
    async fn idempotency_key_replays_the_first_job() {
        let (_dir, app, _stores) = app(UploadConfig::default()).await;
        let req = |w: u32| {
            http::Request::post(format!("/api/upload?width={w}"))
                .header("content-type", "image/png")
                .header("idempotency-key", "abc")
                .body(Body::from(png(16, 16)))
                .unwrap()
        };
        let (s1, _, first) = send(&app, req(8)).await;
        let (s2, h2, second) = send(&app, req(8)).await;
        assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
        assert_eq!(first["id"], second["id"]);
        assert_eq!(h2["idempotent-replayed"], "true");
        let (s3, _, third) = send(&app, req(9)).await;
        assert_eq!(s3, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(third["error"]["code"], "idempotency_conflict");
    }
}
