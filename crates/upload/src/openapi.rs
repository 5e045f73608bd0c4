//! The upload API's part of the OpenAPI document (`GET /api/openapi.json`, assembled by the
//! binary from every role's part): `POST /api/upload`, its parameters and its answers, from
//! the types the handler uses.

use pixmesh_chassis::ErrorBody;
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::{IntoParams, OpenApi, ToSchema};

/// The answer to an accepted upload.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Accepted {
    /// The job's id.
    pub id: String,
    /// Where to follow the job: `/api/status/{id}`.
    pub status_url: String,
    /// Where to download the result (one unnamed output): signed when signing keys are
    /// configured, so it works without the API key for a while.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
    /// Where to download each named output (an upload with `outputs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_urls: Option<BTreeMap<String, String>>,
    /// The result cache answered: the job whose result this one has (or waits for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<String>,
}

/// The query parameters of an upload: what to make of the image.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // read by the OpenAPI derive only: the handler parses the pairs itself
pub struct UploadParams {
    /// Output width in pixels (the height follows the aspect ratio unless given).
    #[param(minimum = 1)]
    width: Option<u32>,
    /// Output height in pixels.
    #[param(minimum = 1)]
    height: Option<u32>,
    /// How the image meets `width` × `height`: `contain` (fit inside, pad to the box; the
    /// default), `cover` (fill the box, crop), `fill` (stretch), `inside` (fit inside).
    fit: Option<String>,
    /// What a `cover` keeps: `center` (the default), `north`, `south`, `east`, `west`,
    /// `north-east`, `north-west`, `south-east`, `south-west`.
    gravity: Option<String>,
    /// `jpeg`, `png`, `webp`, `same` (the input's, the default) or `auto` (WebP when the
    /// uploader's `Accept` allows it, else JPEG, or PNG for images with transparency).
    format: Option<String>,
    /// Encoder quality, 1–100 (JPEG and lossy WebP; 80 by default).
    #[param(minimum = 1, maximum = 100)]
    quality: Option<u32>,
    /// Lossless WebP.
    lossless: Option<bool>,
    /// Allow an output larger than the input.
    enlarge: Option<bool>,
    /// Clockwise rotation after EXIF orientation: 0, 90, 180 or 270.
    rotate: Option<u32>,
    /// Mirror: `h`, `v` or `hv`.
    flip: Option<String>,
    /// `x,y,width,height` in pixels of the rotated and flipped image, before resizing.
    crop: Option<String>,
    /// Gray output.
    grayscale: Option<bool>,
    /// Gaussian blur, sigma in output pixels (0.3–100).
    blur: Option<f32>,
    /// Unsharp mask, sigma in output pixels (0.3–10).
    sharpen: Option<f32>,
    /// A named option set of `upload.presets`; options given beside it override it.
    preset: Option<String>,
    /// Named outputs, a saga: `thumb:width=200,format=webp;large:width=1600` (each a name
    /// `[a-z0-9_-]{1,32}`, a colon, its options as `key=value` pairs separated by commas).
    outputs: Option<String>,
}

/// A form upload: one image part (any field name: the one part with a filename or an image
/// content type) and, optionally, the outputs as JSON.
#[derive(Debug, ToSchema)]
#[allow(dead_code)] // read by the OpenAPI derive only
pub struct UploadForm {
    /// The image.
    #[schema(content_media_type = "application/octet-stream")]
    file: Vec<u8>,
    /// Named outputs as JSON: `[{"name":"thumb","width":200,"format":"webp"}]`.
    outputs: Option<String>,
}

/// Answers of `POST /api/upload`, documented once here and referenced by the handler.
#[derive(OpenApi)]
#[openapi(paths(crate::handler::upload), components(schemas(Accepted, ErrorBody)))]
pub struct UploadApi;

/// This role's part of the document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    UploadApi::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_option_is_one_the_handler_reads_and_no_other() {
        let doc = serde_json::to_value(openapi()).unwrap();
        let params = doc["paths"]["/api/upload"]["post"]["parameters"].as_array().unwrap();
        let names: Vec<&str> = params.iter().filter(|p| p["in"] == "query").map(|p| p["name"].as_str().unwrap()).collect();
        let sample = |name: &str| match name {
            "fit" => "cover",
            "gravity" => "north-east",
            "format" => "webp",
            "flip" => "h",
            "crop" => "0,0,10,10",
            "lossless" | "enlarge" | "grayscale" => "true",
            "blur" | "sharpen" => "1.5",
            "rotate" => "90",
            _ => "50",
        };
        for name in names.iter().filter(|n| !matches!(**n, "preset" | "outputs")) {
            let pairs = vec![(name.to_string(), sample(name).to_string())];
            crate::handler::parse_options(&pairs).unwrap_or_else(|e| panic!("{name}: {}", e.message));
        }
        // The handler's list of options, from its own refusal, is the documented one.
        let refusal = crate::handler::parse_options(&[("nope".into(), "1".into())]).unwrap_err().message;
        let allowed: Vec<&str> = refusal.split("allowed: ").nth(1).unwrap().split(", ").collect();
        let documented: Vec<&str> = names.iter().copied().filter(|n| !matches!(*n, "preset" | "outputs")).collect();
        let mut a = allowed.clone();
        let mut d = documented.clone();
        a.sort_unstable();
        d.sort_unstable();
        assert_eq!(a, d);
    }
}
