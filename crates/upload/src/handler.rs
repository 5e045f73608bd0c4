use crate::UploadConfig;
use crate::cache::ResultCache;
use crate::openapi::Accepted;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use pixmesh_chassis::signed_url::Signer;
use pixmesh_chassis::{ApiError, ErrorBody, ErrorCode, multipart};
use pixmesh_imaging::{Crop, Fit, Flip, Gravity, Options, OutputFormat};
use pixmesh_store::{NewJob, Output, StoreError, StoreErrorExt, Stores};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

/// Header the gateway sets to the name of the authenticated API key: the job's owner, and the
/// scope of idempotency keys so two clients cannot collide.
pub const CLIENT_HEADER: &str = pixmesh_chassis::headers::CLIENT;
const MAX_IDEMPOTENCY_KEY: usize = 255;

#[derive(Clone)]
pub(crate) struct AppState {
    stores: Stores,
    /// Signs `result_url` (`None`: the plain path, which needs the API key).
    signer: Option<Arc<Signer>>,
    config: Arc<UploadConfig>,
    permits: Arc<Semaphore>,
    cache: ResultCache,
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
        .with_state(AppState {
            stores,
            signer: Signer::new(&config.signed_urls).map(Arc::new),
            cache: ResultCache::new(config.cache),
            config: Arc::new(config),
            permits,
        })
        .layer(pixmesh_chassis::http_span::ServerSpanLayer::new("upload"))
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
    let mut seen: Vec<&str> = Vec::with_capacity(params.len());
    for (key, _) in params {
        if seen.contains(&key.as_str()) {
            return Err(bad(format!("query parameter `{key}` is given more than once; give each option once")));
        }
        seen.push(key);
    }
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

/// The query parameter (and the form field) that names an upload's outputs.
pub const OUTPUTS: &str = "outputs";

/// The parameter that names a preset (`upload.presets`).
pub const PRESET: &str = "preset";

/// A preset's options as query pairs: `width=200&format=webp`.
pub fn preset_pairs(options: &str) -> Result<Vec<(String, String)>, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    let mut pairs = Vec::new();
    for pair in options.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| bad(format!("`{pair}` is not key=value")))?;
        if k == PRESET || k == OUTPUTS {
            return Err(bad(format!("a preset cannot name `{k}`")));
        }
        pairs.push((k.to_string(), v.to_string()));
    }
    Ok(pairs)
}

/// The presets an upload may use, and whether its key is limited to them.
pub struct Presets<'a> {
    pub all: &'a std::collections::BTreeMap<String, String>,
    /// `Some`: the key may only upload with these presets, and nothing else.
    pub only: Option<Vec<String>>,
}

impl Presets<'_> {
    /// `pairs` with a `preset=NAME` among them replaced by that preset's options, the other
    /// pairs given beside it overriding them. A key limited to presets must give exactly
    /// `preset=NAME` with a name it may use (403 otherwise).
    pub fn expand(&self, pairs: &[(String, String)]) -> Result<Vec<(String, String)>, ApiError> {
        let named: Vec<&String> = pairs.iter().filter(|(k, _)| k == PRESET).map(|(_, v)| v).collect();
        if let Some(only) = &self.only {
            let allowed = named.len() == 1 && pairs.len() == 1 && only.contains(named[0]);
            if !allowed {
                let list = if only.is_empty() { "none".to_string() } else { only.join(", ") };
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!("this API key may only upload with presets ({list}): send preset=NAME alone, or outputs=name:preset=NAME;…"),
                ));
            }
        }
        let Some(name) = named.first() else { return Ok(pairs.to_vec()) };
        if named.len() > 1 {
            return Err(ApiError::new(ErrorCode::BadRequest, "`preset` is given more than once; give one"));
        }
        let options = self.all.get(name.as_str()).ok_or_else(|| {
            let known: Vec<&str> = self.all.keys().map(String::as_str).collect();
            let known = if known.is_empty() { "none are configured".to_string() } else { format!("known: {}", known.join(", ")) };
            ApiError::new(ErrorCode::BadRequest, format!("no preset named `{}`; {known}", clip(name)))
        })?;
        let mut merged = preset_pairs(options)?;
        for (k, v) in pairs.iter().filter(|(k, _)| k != PRESET) {
            match merged.iter_mut().find(|(m, _)| m == k) {
                Some(slot) => slot.1 = v.clone(),
                None => merged.push((k.clone(), v.clone())),
            }
        }
        Ok(merged)
    }
}

/// Parses the named outputs of an upload from the query's `outputs`:
/// `thumb:width=200,format=webp;large:width=1600` — outputs separated by `;`, each a name, a
/// colon, then its options as `key=value` pairs separated by commas (a name alone takes the
/// upload's options as they are). Each output starts from `base` (the upload's other
/// parameters) with its own pairs on top; names are `[a-z0-9_-]{1,32}`, each once, at most
/// `max` of them.
pub fn parse_outputs(spec: &str, base: &[(String, String)], max: usize, presets: &Presets<'_>) -> Result<Vec<Output>, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    let mut list = Vec::new();
    for (i, part) in spec.split(';').enumerate() {
        let (name, pairs) = part.split_once(':').unwrap_or((part, ""));
        if name.is_empty() {
            return Err(bad(format!(
                "output {} of `outputs` has no name; write outputs as name:key=value,key=value;name2:… (e.g. thumb:width=200,format=webp;large:width=1600)",
                i + 1
            )));
        }
        let mut options = Vec::new();
        for pair in pairs.split(',').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(bad(format!("output `{}`: `{pair}` is not key=value", clip(name))));
            };
            options.push((key.to_string(), value.to_string()));
        }
        list.push((name.to_string(), options));
    }
    build_outputs(list, base, max, presets)
}

/// Parses the named outputs of an upload from a form's `outputs` part, a JSON array:
/// `[{"name": "thumb", "width": 200, "format": "webp"}, {"name": "large", "width": 1600}]`,
/// each object a name and the same options as the query takes (strings, numbers or booleans),
/// under the same rules as [`parse_outputs`].
pub fn parse_outputs_json(json: &[u8], base: &[(String, String)], max: usize, presets: &Presets<'_>) -> Result<Vec<Output>, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    let example = r#"[{"name":"thumb","width":200,"format":"webp"},{"name":"large","width":1600}]"#;
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| bad(format!("the `outputs` part is not JSON ({e}); send an array like {example}")))?;
    let serde_json::Value::Array(items) = value else {
        return Err(bad(format!("the `outputs` part must be a JSON array like {example}")));
    };
    let mut list = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let serde_json::Value::Object(fields) = item else {
            return Err(bad(format!("output {} of the `outputs` part is not an object like {{\"name\":\"thumb\",\"width\":200}}", i + 1)));
        };
        let mut name = None;
        let mut options = Vec::new();
        for (key, value) in fields {
            let text = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => return Err(bad(format!("output {}: `{}` must be a string, number or boolean, got {other}", i + 1, clip(&key)))),
            };
            if key == "name" {
                name = Some(text);
            } else {
                options.push((key, text));
            }
        }
        let name = name.ok_or_else(|| bad(format!("output {} of the `outputs` part has no \"name\"", i + 1)))?;
        list.push((name, options));
    }
    build_outputs(list, base, max, presets)
}

/// Outputs from their names and own parameters, each on top of `base`, checked.
fn build_outputs(
    list: Vec<(String, Vec<(String, String)>)>,
    base: &[(String, String)],
    max: usize,
    presets: &Presets<'_>,
) -> Result<Vec<Output>, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    if list.is_empty() {
        return Err(bad("`outputs` names no output; name at least one, or leave it out for one unnamed output".into()));
    }
    if list.len() > max {
        return Err(bad(format!("`outputs` names {} outputs; at most {max} are allowed", list.len())));
    }
    let mut outputs: Vec<Output> = Vec::with_capacity(list.len());
    for (name, own) in list {
        if !Output::valid_name(&name) {
            return Err(bad(format!("output name `{}` is not valid: use 1 to 32 of a-z, 0-9, _ and -", clip(&name))));
        }
        if outputs.iter().any(|o| o.name == name) {
            return Err(bad(format!("output `{name}` is named twice; give each output a name of its own")));
        }
        let in_output = |e: ApiError| ApiError { message: format!("output `{name}`: {}", e.message), ..e };
        // Its own pairs alone first: a key given twice in one output is refused, not merged.
        let own = presets.expand(&own).map_err(in_output)?;
        parse_options(&own).map_err(in_output)?;
        let mut merged: Vec<(String, String)> = base.iter().filter(|(k, _)| !own.iter().any(|(o, _)| o == k)).cloned().collect();
        merged.extend(own);
        let options = parse_options(&merged).map_err(in_output)?;
        outputs.push(Output { name, options });
    }
    Ok(outputs)
}

/// At most 64 characters of a client's text, for an error message.
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

/// `format=auto`: WebP when the uploader's `Accept` names `image/webp` (with a q above 0),
/// else left to the pipeline (JPEG, or PNG for an image with an alpha channel). Marks the
/// options negotiated, so their results carry `Vary: Accept`.
fn negotiate(options: &mut Options, accept: &str) {
    if options.format != OutputFormat::Auto {
        return;
    }
    options.negotiated = true;
    let webp = accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let kind = parts.next().unwrap_or("");
        let q = parts.find_map(|p| p.strip_prefix("q=")).and_then(|q| q.parse::<f32>().ok()).unwrap_or(1.0);
        kind.eq_ignore_ascii_case("image/webp") && q > 0.0
    });
    if webp {
        options.format = OutputFormat::Webp;
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, format!("the upload is larger than the limit of {limit} bytes; send a smaller image"))
}

/// The image bytes of an upload: the raw body, or the one image part of a `multipart/form-data`
/// body, found by the rule and parser the gateway's guard uses too
/// (`pixmesh_chassis::multipart`), so the part the guard sized is the part stored here; and a
/// form's `outputs` part, if it has one.
async fn read_image(request: Request, limit: usize, may_be_empty: bool) -> Result<(Bytes, Option<Bytes>), ApiError> {
    // Not lowercased: a multipart boundary is case-sensitive.
    let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let bad_form = |e: multipart::MultipartError| ApiError::new(ErrorCode::BadRequest, e.to_string());
    let boundary = multipart::boundary(&content_type).map_err(bad_form)?;
    let mime = content_type.to_ascii_lowercase();
    let raw = mime.is_empty() || mime.starts_with("image/") || mime.starts_with("application/octet-stream");
    if boundary.is_none() && !raw {
        return Err(ApiError::new(
            ErrorCode::UnsupportedFormat,
            format!(
                "Content-Type `{content_type}` is not accepted; send the image bytes with Content-Type image/* or as multipart/form-data"
            ),
        ));
    }
    // The whole body is held either way (it is stored as one blob); a form's image is a slice of it.
    let body = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large(limit)),
        Err(e) => return Err(ApiError::new(ErrorCode::BadRequest, format!("could not read the request body: {e}"))),
    };
    let (bytes, outputs) = match &boundary {
        Some(boundary) => {
            let outputs = multipart::field_part(&body, boundary, OUTPUTS).map_err(bad_form)?.map(|range| body.slice(range));
            (body.slice(multipart::image_part(&body, boundary).map_err(bad_form)?), outputs)
        }
        None => (body, None),
    };
    if bytes.is_empty() && !(may_be_empty && boundary.is_none()) {
        return Err(ApiError::new(ErrorCode::BadRequest, "the image is empty; send the image bytes"));
    }
    Ok((bytes, outputs))
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
        StoreError::NotCached => ApiError::new(
            ErrorCode::NotCached,
            "there is no result of this image with these options for your key; send the image itself (without Repr-Digest, or with it and the body)",
        ),
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

/// The output limits for this request: the service's own, lowered (never raised) by what the
/// gateway says this key may ask for.
fn output_limits(config: &UploadConfig, headers: &HeaderMap) -> pixmesh_imaging::Limits {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut limits = config.limits;
    if let Some(pixels) = header(pixmesh_chassis::headers::MAX_OUTPUT_PIXELS) {
        limits.max_output_pixels = limits.max_output_pixels.min(pixels);
    }
    if let Some(side) = header(pixmesh_chassis::headers::MAX_OUTPUT_SIDE) {
        limits.max_output_side = limits.max_output_side.min(u32::try_from(side).unwrap_or(u32::MAX));
    }
    limits
}

/// Takes an image and records a job that makes what the parameters ask for.
///
/// The image is the raw body (`Content-Type: image/*`), or the one image part of a
/// `multipart/form-data` body. Its format and dimensions are checked from its header before any
/// work: oversized images are refused here (and at the gateway, before the body is read).
#[utoipa::path(
    post,
    path = "/api/upload",
    tag = "jobs",
    operation_id = "upload",
    params(
        crate::openapi::UploadParams,
        ("Idempotency-Key" = Option<String>, Header, description = "1–255 printable ASCII characters: a retry with the same key and the same request answers the first job"),
        ("Cache-Control" = Option<String>, Header, description = "`no-cache`: make the work again even if the result cache has it; `no-store`: leave the cache alone"),
        ("Repr-Digest" = Option<String>, Header, description = "`sha-256=:<base64>:` (RFC 9530): the image's SHA-256. With the image, it is checked (400 if it does not match); with an empty body, the upload asks for the result by digest alone: answered from the key's result cache, or 412 `not_cached` (then send the image)"),
    ),
    request_body(
        description = "The image: JPEG, PNG, WebP, GIF, BMP or TIFF, raw or as a form's file part",
        content(
            ("image/jpeg"),
            ("image/png"),
            ("image/webp"),
            ("application/octet-stream"),
            (crate::openapi::UploadForm = "multipart/form-data"),
        ),
    ),
    responses(
        (status = 202, description = "The job is recorded (or, from the result cache, already done)", body = crate::openapi::Accepted,
            headers(
                ("Location" = String, description = "The job's status URL"),
                ("Cache-Status" = String, description = "What the result cache did (RFC 9211)"),
            )),
        (status = 400, description = "A bad parameter, form or header; an empty body", body = ErrorBody),
        (status = 403, description = "The key is limited to presets and asked for something else", body = ErrorBody),
        (status = 413, description = "The body, the image's pixels or side, or an output is over its limit", body = ErrorBody),
        (status = 412, description = "An upload by digest alone (`Repr-Digest`, no body) that the result cache cannot answer: send the image", body = ErrorBody),
        (status = 415, description = "Not an image format pixmesh reads", body = ErrorBody),
        (status = 422, description = "The image's header is unreadable, or the Idempotency-Key was used for another request", body = ErrorBody),
        (status = 503, description = "A store is down, or the service is shutting down; retry", body = ErrorBody),
        (status = 507, description = "A store's disk is full; retry once space is freed", body = ErrorBody),
    ),
)]
pub(crate) async fn upload(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("bad query string: {}", e.body_text())))?;
    // The options of the upload; with named outputs, what each output starts from.
    let (spec, base): (Vec<_>, Vec<_>) = params.into_iter().partition(|(k, _)| k == OUTPUTS);
    let only = request.headers().get(pixmesh_chassis::headers::PRESETS).and_then(|v| v.to_str().ok());
    let presets = Presets {
        all: &state.config.presets,
        only: only.map(|list| list.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect()),
    };
    // A key limited to presets names them per output; with outputs, the upload's own options
    // must be empty.
    let bare = presets.only.is_some() && base.is_empty();
    let base = if bare { base } else { presets.expand(&base)? };
    let options = parse_options(&base)?;
    let mut outputs = match spec.as_slice() {
        [] => Vec::new(),
        [(_, spec)] => parse_outputs(spec, &base, state.config.max_outputs, &presets)?,
        _ => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "query parameter `outputs` is given more than once; name every output in one",
            ));
        }
    };
    let idempotency = idempotency_key(request.headers())?;
    let headers = request.headers().clone();
    let accept = request.headers().get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    // The job keeps the trace it was uploaded in: its claims, worker calls and commit join it.
    let traceparent = pixmesh_chassis::trace::outgoing(
        &tracing::Span::current(),
        request.headers().get(pixmesh_chassis::trace::TRACEPARENT).and_then(|v| v.to_str().ok()),
    );
    let owner = request.headers().get(CLIENT_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let limits = output_limits(&state.config, request.headers());
    let _permit = state.permits.acquire().await.map_err(|_| ApiError::new(ErrorCode::Unavailable, "shutting down"))?;
    let named = repr_digest(request.headers())?;
    let (bytes, form_outputs) = read_image(request, state.config.max_body_bytes, named.is_some()).await?;
    if let Some(json) = form_outputs {
        if !outputs.is_empty() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "outputs are named both in the query and in the form's `outputs` part; name them in one place",
            ));
        }
        outputs = parse_outputs_json(&json, &base, state.config.max_outputs, &presets)?;
    }
    if bare && outputs.is_empty() {
        // Limited to presets, and none named: refused with the list.
        presets.expand(&[])?;
    }
    let mut options = options;
    negotiate(&mut options, &accept);
    for output in &mut outputs {
        negotiate(&mut output.options, &accept);
    }
    let negotiated = if outputs.is_empty() { options.negotiated } else { outputs.iter().any(|o| o.options.negotiated) };
    let imaging_error =
        |e: pixmesh_imaging::ImagingError| ApiError::new(ErrorCode::parse(e.code()).unwrap_or(ErrorCode::Internal), e.to_string());
    let options_json = serde_json::to_string(&(&options, &outputs)).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    let fingerprint = |digest: &str| hex::encode(Sha256::digest(format!("{digest}\n{options_json}")));
    if let Some(digest) = &named {
        if bytes.is_empty() {
            // No image, only its digest: the result cache's, or nothing (412: send the image).
            let job = NewJob {
                id: uuid::Uuid::now_v7().to_string(),
                owner,
                // The store takes the input of the job it reuses.
                input: pixmesh_store::BlobRef::at_digest(digest.clone(), 0),
                input_format: String::new(),
                request_hash: fingerprint(digest),
                options,
                outputs,
                idempotency_key: idempotency,
                traceparent,
            };
            let (created, served) = state.cache.create_from_digest(state.stores.jobs.as_ref(), job, &headers).await.map_err(store_error)?;
            return Ok(accepted(&state, created, &served, negotiated));
        }
        if hex::encode(Sha256::digest(&bytes)) != *digest {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "the image's SHA-256 is not the one its Repr-Digest names (the body was changed on the way, or the digest is of another image)",
            ));
        }
    }
    let probe = pixmesh_imaging::probe(&bytes, &state.config.limits).map_err(imaging_error)?;
    // A small upload must not demand a huge output: refused here, before a job exists.
    if outputs.is_empty() {
        pixmesh_imaging::check_output(probe.width, probe.height, &options, &limits).map_err(imaging_error)?;
    }
    for output in &outputs {
        pixmesh_imaging::check_output(probe.width, probe.height, &output.options, &limits).map_err(|e| {
            let e = imaging_error(e);
            ApiError { message: format!("output `{}`: {}", output.name, e.message), ..e }
        })?;
    }
    let input =
        state.stores.blobs.put(bytes).instrument(tracing::info_span!("blob put", otel.kind = "client")).await.map_err(store_error)?;
    let request_hash = fingerprint(&input.digest);
    let job = NewJob {
        id: uuid::Uuid::now_v7().to_string(),
        owner,
        input,
        input_format: probe.format.as_str().to_string(),
        options,
        outputs,
        idempotency_key: idempotency,
        request_hash,
        traceparent,
    };
    let (created, served) = state
        .cache
        .create(state.stores.jobs.as_ref(), job, &headers)
        .instrument(tracing::info_span!("store create", otel.kind = "client"))
        .await
        .map_err(store_error)?;
    if created.created {
        tracing::info!(job = %created.job.id, format = probe.format.as_str(), width = probe.width, height = probe.height, cached_from = served.source(), "job accepted");
    }
    Ok(accepted(&state, created, &served, negotiated))
}

/// The answer to an upload that recorded (or replayed) `created`.
fn accepted(state: &AppState, created: pixmesh_store::Created, served: &crate::cache::Served, negotiated: bool) -> Response {
    let id = created.job.id.clone();
    metrics::counter!(crate::instruments::JOBS, "replayed" => if created.created { "false" } else { "true" }).increment(1);
    if created.created && served.source().is_none() {
        // Only work to do wakes a distributor: a hit is done, a joiner waits for its leader.
        state.stores.job_created(&id, created.job.traceparent.as_deref());
    }
    let status_url = format!("/api/status/{id}");
    let signer = state.signer.as_deref();
    let saga = created.job.is_saga();
    let body = Accepted {
        id: id.clone(),
        status_url: status_url.clone(),
        // One download per named output, or the one result.
        result_urls: saga.then(|| {
            created.job.outputs.iter().map(|o| (o.name.clone(), pixmesh_chassis::signed_url::output_url(signer, &id, &o.name))).collect()
        }),
        result_url: (!saga).then(|| pixmesh_chassis::signed_url::result_url(signer, &id)),
        cached_from: served.source().map(str::to_string),
    };
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    if let Ok(v) = status_url.parse() {
        response.headers_mut().insert(header::LOCATION, v);
    }
    if !created.created {
        response.headers_mut().insert("idempotent-replayed", http::HeaderValue::from_static("true"));
    }
    if let Some(value) = served.cache_status() {
        response.headers_mut().insert("cache-status", value);
    }
    if negotiated {
        // The output format was chosen from this request's Accept.
        response.headers_mut().insert(header::VARY, http::HeaderValue::from_static("Accept"));
    }
    response
}

/// The SHA-256 an upload's `Repr-Digest` (RFC 9530) names, as hex: `sha-256=:<base64>:`,
/// alone or among other algorithms' members (which are not checked). `None` without the header.
fn repr_digest(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("repr-digest") else { return Ok(None) };
    let bad = || {
        ApiError::new(ErrorCode::BadRequest, "Repr-Digest must name the image's SHA-256 as `sha-256=:<base64 of the 32 bytes>:` (RFC 9530)")
    };
    let text = value.to_str().map_err(|_| bad())?;
    let member = text.split(',').map(str::trim).find_map(|m| m.strip_prefix("sha-256=")).ok_or_else(bad)?;
    let encoded = member.strip_prefix(':').and_then(|m| m.strip_suffix(':')).ok_or_else(bad)?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| bad())?;
    if bytes.len() != 32 {
        return Err(bad());
    }
    Ok(Some(hex::encode(bytes)))
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

    /// A multipart body from raw part header blocks (CRLF line ends unless a test needs others).
    fn form(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (headers, data) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n\r\n").as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        body
    }

    /// Which part is the image, by the rule the gateway uses too: exactly one image part (named
    /// `file` or `image`, or carrying a filename), other fields ignored, anything ambiguous refused.
    #[tokio::test]
    async fn multipart_takes_exactly_one_image_part() {
        let (_dir, app, stores) = app(UploadConfig::default()).await;
        let (small, other) = (png(8, 8), png(9, 9));
        let file = "Content-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\nContent-Type: image/png";
        let note = "Content-Disposition: form-data; name=\"note\"";
        let big_note = vec![b'n'; 300 * 1024];
        let ct = "multipart/form-data; boundary=XyZ";
        let lf_only = [b"--XyZ\nContent-Disposition: form-data; name=\"file\"\n\n".as_slice(), &small, b"\n--XyZ--\n"].concat();
        let mut preamble = b"this is a preamble\r\n".to_vec();
        preamble.extend(form("XyZ", &[(file, &small)]));
        // (what, content type, body, the bytes stored or the refusal's code)
        type Case<'a> = (&'a str, &'a str, Vec<u8>, Result<&'a [u8], &'a str>);
        let cases: Vec<Case<'_>> = vec![
            ("a file part", ct, form("XyZ", &[(note, b"hi"), (file, &small)]), Ok(&small)),
            ("a part named image", ct, form("XyZ", &[("Content-Disposition: form-data; name=\"image\"", &small)]), Ok(&small)),
            ("header names in any case", ct, form("XyZ", &[("CONTENT-disposition: Form-Data; NAME=file", &small)]), Ok(&small)),
            ("a boundary in quotes", "multipart/form-data; boundary=\"a:b c\"", form("a:b c", &[(file, &small)]), Ok(&small)),
            ("a preamble", ct, preamble, Ok(&small)),
            ("a text field larger than the gateway's probe", ct, form("XyZ", &[(note, &big_note), (file, &small)]), Ok(&small)),
            (
                "a Content-Type without a filename is still a field",
                ct,
                form("XyZ", &[("Content-Disposition: form-data; name=\"x\"\r\nContent-Type: image/png", &other), (file, &small)]),
                Ok(&small),
            ),
            (
                "a filename on a field named x",
                ct,
                form("XyZ", &[("Content-Disposition: form-data; name=\"x\"; filename=\"huge.png\"", &other), (file, &small)]),
                Err("bad_request"),
            ),
            (
                "image and file",
                ct,
                form("XyZ", &[("Content-Disposition: form-data; name=\"image\"", &other), (file, &small)]),
                Err("bad_request"),
            ),
            ("no image part", ct, form("XyZ", &[(note, &small)]), Err("bad_request")),
            ("LF-only line ends", ct, lf_only, Err("bad_request")),
            (
                "a name given twice",
                ct,
                form("XyZ", &[("Content-Disposition: form-data; name=\"note\"; name=\"file\"", &small)]),
                Err("bad_request"),
            ),
            (
                "no closing boundary",
                ct,
                {
                    let mut b = form("XyZ", &[(file, &small)]);
                    b.truncate(b.len() - 4);
                    b
                },
                Err("bad_request"),
            ),
            ("a boundary of another case", "multipart/form-data; boundary=xyz", form("XyZ", &[(file, &small)]), Err("bad_request")),
            ("no boundary", "multipart/form-data", form("XyZ", &[(file, &small)]), Err("bad_request")),
        ];
        for (what, content_type, body, expected) in cases {
            let (status, _, v) = send(&app, post("/api/upload", content_type, body)).await;
            match expected {
                Ok(image) => {
                    assert_eq!(status, StatusCode::ACCEPTED, "{what}: {v}");
                    let job = stores.jobs.get(v["id"].as_str().unwrap()).await.unwrap().unwrap();
                    let stored = stores.blobs.get(&job.input.digest).await.unwrap().unwrap();
                    assert_eq!(stored.as_ref(), image, "{what}: the image part is what is stored");
                }
                Err(code) => {
                    assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {v}");
                    assert_eq!(v["error"]["code"], code, "{what}: {v}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_header_too_large_is_image_too_large_as_at_the_gateway() {
        let (_dir, app, _stores) = app(UploadConfig::default()).await;
        // 20,000 px wide: over the 16,384 px side limit, well under the pixel limit.
        for (w, h) in [(20_000, 2), (2, 20_000)] {
            let (status, _, v) = send(&app, post("/api/upload", "image/png", png(w, h))).await;
            assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("image_too_large")), "{w}x{h}: {v}");
        }
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
        // One option twice: which one would win is a guess, so neither does.
        check(post("/api/upload?width=40&width=50", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?blur=1&format=png&blur=2", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        // A query string that does not decode gets the JSON error too.
        check(post("/api/upload?width=%ff%fe", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
        check(post("/api/upload?blur=NaN", "image/png", png(8, 8)), StatusCode::BAD_REQUEST, "bad_request").await;
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
    async fn a_tiny_upload_cannot_demand_a_huge_output() {
        let config = UploadConfig {
            limits: pixmesh_imaging::Limits { max_output_pixels: 16_000_000, max_output_side: 8192, ..Default::default() },
            ..UploadConfig::default()
        };
        let (_dir, app, stores) = app(config).await;
        let huge = "/api/upload?width=16384&height=16384&enlarge=true&fit=fill";
        let (status, _, body) = send(&app, post(huge, "image/png", png(16, 16))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(body["error"]["code"], "image_too_large");
        assert!(body["error"]["message"].as_str().unwrap().contains("output"), "{body}");
        // The gateway lowers the limit per key; it cannot raise it.
        let lowered = |w: u32, pixels: &str| {
            http::Request::post(format!("/api/upload?width={w}&enlarge=true"))
                .header("content-type", "image/png")
                .header(pixmesh_chassis::headers::MAX_OUTPUT_PIXELS, pixels)
                .header(pixmesh_chassis::headers::MAX_OUTPUT_SIDE, "100000")
                .body(Body::from(png(16, 16)))
                .unwrap()
        };
        let (status, _, _) = send(&app, lowered(1000, "100000")).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "1000x1000 is over this key's 0.1 MP");
        let (status, _, _) = send(&app, lowered(300, "100000")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "300x300 is within it");
        let (status, _, _) = send(&app, lowered(9000, "999999999999")).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "a header cannot raise the service's own side limit");
        let counts: u64 = stores.jobs.counts().await.unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(counts, 1, "only the accepted upload made a job");
    }

    #[tokio::test]
    async fn the_job_belongs_to_the_key_that_uploaded_it() {
        let (_dir, app, stores) = app(UploadConfig::default()).await;
        let req = http::Request::post("/api/upload")
            .header("content-type", "image/png")
            .header(CLIENT_HEADER, "alice")
            .body(Body::from(png(8, 8)))
            .unwrap();
        let (status, _, body) = send(&app, req).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let job = stores.jobs.get(body["id"].as_str().unwrap()).await.unwrap().unwrap();
        assert_eq!(job.owner, "alice");
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

    #[tokio::test]
    async fn format_auto_is_webp_for_an_uploader_that_accepts_it_and_says_vary_accept() {
        let (_dir, app, stores) = app(UploadConfig::default()).await;
        let upload = |query: &str, accept: Option<&str>| {
            let mut req = http::Request::post(format!("/api/upload?{query}")).header("content-type", "image/png");
            if let Some(accept) = accept {
                req = req.header(header::ACCEPT, accept);
            }
            let (app, req) = (app.clone(), req.body(Body::from(png(16, 16))).unwrap());
            async move { send(&app, req).await }
        };
        let job = |body: serde_json::Value| {
            let stores = stores.clone();
            async move { stores.jobs.get(body["id"].as_str().unwrap()).await.unwrap().unwrap() }
        };
        for (accept, expected) in [
            (Some("image/avif,image/webp,image/apng,image/*,*/*;q=0.8"), OutputFormat::Webp),
            (Some("image/webp;q=0"), OutputFormat::Auto),
            (Some("*/*"), OutputFormat::Auto),
            (None, OutputFormat::Auto),
        ] {
            let (s, headers, body) = upload("format=auto&width=8", accept).await;
            assert_eq!(s, StatusCode::ACCEPTED, "{body}");
            assert_eq!(headers[header::VARY], "Accept");
            let job = job(body).await;
            assert_eq!((job.options.format, job.options.negotiated), (expected, true), "{accept:?}");
        }
        let (_, headers, body) = upload("outputs=a:format=auto;b:format=png", Some("image/webp")).await;
        assert_eq!(headers[header::VARY], "Accept");
        let job = job(body).await;
        assert_eq!((job.outputs[0].options.format, job.outputs[1].options.format), (OutputFormat::Webp, OutputFormat::Png));
        assert!(!job.outputs[1].options.negotiated);
        let (_, headers, _) = upload("format=png", Some("image/webp")).await;
        assert!(headers.get(header::VARY).is_none(), "nothing was negotiated");
    }

    static NO_PRESETS: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    /// No presets configured, none required.
    static ANY: Presets<'static> = Presets { all: &NO_PRESETS, only: None };

    #[tokio::test]
    async fn presets_name_option_sets_and_a_key_may_be_held_to_them() {
        let mut config = UploadConfig::default();
        config.presets.insert("thumb".into(), "width=20&format=webp".into());
        config.presets.insert("large".into(), "width=40&quality=90".into());
        config.validate().unwrap();
        let (_dir, app, stores) = app(config).await;
        let upload = |query: &str, only: Option<&str>| {
            let mut req = http::Request::post(format!("/api/upload?{query}")).header("content-type", "image/png");
            if let Some(only) = only {
                req = req.header(pixmesh_chassis::headers::PRESETS, only);
            }
            let app = app.clone();
            let req = req.body(Body::from(png(64, 32))).unwrap();
            async move { send(&app, req).await }
        };
        let options = |body: &serde_json::Value| {
            let stores = stores.clone();
            let id = body["id"].as_str().unwrap().to_string();
            async move { stores.jobs.get(&id).await.unwrap().unwrap() }
        };
        let (s, _, body) = upload("preset=thumb", None).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        let job = options(&body).await;
        assert_eq!((job.options.width, job.options.format), (Some(20), OutputFormat::Webp));
        let (_, _, body) = upload("preset=thumb&width=30", None).await;
        assert_eq!(options(&body).await.options.width, Some(30), "a parameter beside the preset overrides it");
        let (s, _, body) = upload("outputs=a:preset=thumb;b:preset=large,format=png", None).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        let job = options(&body).await;
        let shown: Vec<_> = job.outputs.iter().map(|o| (o.name.as_str(), o.options.width, o.options.format, o.options.quality)).collect();
        assert_eq!(shown, vec![("a", Some(20), OutputFormat::Webp, None), ("b", Some(40), OutputFormat::Png, Some(90))]);
        let (s, _, body) = upload("preset=huge", None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(body["error"]["message"].as_str().unwrap().contains("known: large, thumb"), "{body}");
        // A key held to `thumb`: exactly preset=thumb, per output too; anything else is 403.
        let (s, _, body) = upload("preset=thumb", Some("thumb")).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        let (s, _, _) = upload("outputs=x:preset=thumb;y:preset=thumb", Some("thumb")).await;
        assert_eq!(s, StatusCode::ACCEPTED);
        for refused in [
            "preset=thumb&width=5",
            "width=5",
            "",
            "preset=large",
            "outputs=x:preset=large",
            "outputs=x:width=3",
            "outputs=x:preset=thumb,width=3",
        ] {
            let (s, _, body) = upload(refused, Some("thumb")).await;
            assert_eq!((s, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{refused:?}: {body}");
            assert!(body["error"]["message"].as_str().unwrap().contains("(thumb)"), "{body}");
        }
        // A preset that is not valid options is refused at start.
        let mut bad = UploadConfig::default();
        bad.presets.insert("x".into(), "width=0".into());
        assert!(bad.validate().unwrap_err().contains("upload.presets.x"));
        bad.presets.clear();
        bad.presets.insert("Big".into(), "width=10".into());
        assert!(bad.validate().is_err());
    }

    fn pairs(query: &str) -> Vec<(String, String)> {
        query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap()).map(|(k, v)| (k.into(), v.into())).collect()
    }

    #[test]
    fn named_outputs_take_the_uploads_options_with_their_own_on_top() {
        let outputs =
            parse_outputs("thumb:width=200,format=webp;large:width=1600;plain", &pairs("format=png&quality=70"), 16, &ANY).unwrap();
        let shown: Vec<(&str, Option<u32>, OutputFormat, Option<u8>)> =
            outputs.iter().map(|o| (o.name.as_str(), o.options.width, o.options.format, o.options.quality)).collect();
        assert_eq!(
            shown,
            vec![
                ("thumb", Some(200), OutputFormat::Webp, Some(70)),
                ("large", Some(1600), OutputFormat::Png, Some(70)),
                ("plain", None, OutputFormat::Png, Some(70)),
            ]
        );
        let json = br#"[{"name":"thumb","width":200,"format":"webp"},{"name":"large","width":"1600","grayscale":true}]"#;
        let from_json = parse_outputs_json(json, &pairs("quality=70"), 16, &ANY).unwrap();
        assert_eq!(from_json[0].options, outputs[0].options);
        assert_eq!((from_json[1].options.width, from_json[1].options.grayscale), (Some(1600), true));
    }

    #[test]
    fn bad_output_lists_are_refused_with_what_is_wrong() {
        let refused = |spec: &str, max: usize, says: &str| {
            let e = parse_outputs(spec, &[], max, &ANY).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{spec}");
            assert!(e.message.contains(says), "{spec}: {}", e.message);
        };
        refused("", 16, "has no name");
        refused("thumb:width=1;", 16, "output 2 of `outputs` has no name");
        refused(":width=1", 16, "has no name");
        refused("Thumb:width=1", 16, "not valid");
        refused("a/b:width=1", 16, "not valid");
        refused(&"x".repeat(33), 16, "not valid");
        refused("a:width=1;a:width=2", 16, "named twice");
        refused("a;b;c", 2, "at most 2");
        refused("a:width", 16, "`width` is not key=value");
        refused("a:width=1,width=2", 16, "output `a`: query parameter `width` is given more than once");
        refused("a:colour=red", 16, "output `a`: unknown query parameter `colour`");
        refused("a:width=0", 16, "output `a`: invalid options: width must be between");
        let json = |body: &str, says: &str| {
            let e = parse_outputs_json(body.as_bytes(), &[], 16, &ANY).unwrap_err();
            assert!(e.message.contains(says), "{body}: {}", e.message);
        };
        json("{", "not JSON");
        json(r#"{"thumb":{}}"#, "must be a JSON array");
        json(r#"[1]"#, "is not an object");
        json(r#"[{"width":1}]"#, "has no \"name\"");
        json(r#"[{"name":"a","width":[1]}]"#, "must be a string, number or boolean");
        json("[]", "names no output");
    }

    #[tokio::test]
    async fn an_upload_with_named_outputs_records_a_saga_and_answers_a_url_per_output() {
        let (_dir, app, stores) = app(UploadConfig::default()).await;
        let (status, _, body) =
            send(&app, post("/api/upload?format=png&outputs=thumb:width=8;big:width=30,format=webp", "image/png", png(40, 20))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let id = body["id"].as_str().unwrap();
        assert_eq!(body["result_urls"]["thumb"], format!("/api/result/{id}/thumb"));
        assert_eq!(body["result_urls"]["big"], format!("/api/result/{id}/big"));
        assert!(body.get("result_url").is_none(), "{body}");
        let job = stores.jobs.get(id).await.unwrap().unwrap();
        assert!(job.is_saga());
        assert_eq!(
            job.outputs.iter().map(|o| (o.name.as_str(), o.options.width, o.options.format)).collect::<Vec<_>>(),
            vec![("thumb", Some(8), OutputFormat::Png), ("big", Some(30), OutputFormat::Webp)]
        );

        // The same in a form: the image part and an `outputs` part of JSON.
        let outputs = br#"[{"name":"thumb","width":8},{"name":"big","width":30,"format":"webp"}]"#;
        let image = png(40, 20);
        let body = form(
            "B",
            &[
                ("Content-Disposition: form-data; name=\"outputs\"", outputs),
                ("Content-Disposition: form-data; name=\"file\"; filename=\"a.png\"", &image),
            ],
        );
        let (status, _, answer) = send(&app, post("/api/upload?format=png", "multipart/form-data; boundary=B", body.clone())).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        let job2 = stores.jobs.get(answer["id"].as_str().unwrap()).await.unwrap().unwrap();
        assert_eq!(job2.outputs, job.outputs);
        // Named in both places, twice in the form, or not JSON: refused, and no job is made.
        let both = send(&app, post("/api/upload?outputs=a", "multipart/form-data; boundary=B", body)).await;
        assert_eq!((both.0, both.2["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{}", both.2);
        let twice = form(
            "B",
            &[
                ("Content-Disposition: form-data; name=\"outputs\"", outputs),
                ("Content-Disposition: form-data; name=\"OUTPUTS\"", outputs),
                ("Content-Disposition: form-data; name=\"file\"", &image),
            ],
        );
        let (status, _, answer) = send(&app, post("/api/upload", "multipart/form-data; boundary=B", twice)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("2 parts named `outputs`"), "{answer}");
        let (status, _, _) = send(&app, post("/api/upload?outputs=a&outputs=b", "image/png", png(4, 4))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let counts: u64 = stores.jobs.counts().await.unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(counts, 2);
        // Every output is held to the output limits, and the one over them is named.
        let config =
            UploadConfig { limits: pixmesh_imaging::Limits { max_output_side: 1000, ..Default::default() }, ..UploadConfig::default() };
        let (_dir2, small, _) = super::tests::app(config).await;
        let (status, _, answer) =
            send(&small, post("/api/upload?enlarge=true&outputs=ok:width=100;huge:width=5000", "image/png", png(40, 20))).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().starts_with("output `huge`: "), "{answer}");
    }
}
