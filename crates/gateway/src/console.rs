//! The web console at `/console`: one HTML page, its script and its stylesheet, built into the
//! binary (`include_str!`), so `cargo run` serves it with no build step and it loads nothing
//! from elsewhere (a Content-Security-Policy of `self` only says so to the browser). The page
//! itself is public, like a login form: everything it shows comes from the API with the key
//! pasted into it.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");
const ICON: &str = include_str!("../console/icon.svg");

/// What the page may load and talk to: this origin, nothing else.
const CSP: &str = "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; style-src 'self'; script-src 'self'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// `/console` (and `/console/`), `/console/console.js`, `/console/console.css`,
/// `/console/icon.svg`.
pub fn routes() -> Router {
    Router::new()
        .route("/console", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/console/", get(|| async { Redirect::permanent("/console") }))
        .route("/console/console.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/console/console.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
        .route("/console/icon.svg", get(|| async { asset(ICON, "image/svg+xml") }))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The assets change with the binary only: a revalidation per load is cheap and never stale.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets() {
        for asset in [INDEX, SCRIPT, STYLE] {
            assert!(!asset.contains("http://") && !asset.contains("https://") && !asset.contains("//cdn"), "no external resource");
        }
        assert!(INDEX.contains("/console/icon.svg"), "its own icon: no /favicon.ico request");
        assert!(INDEX.contains("/console/console.js") && INDEX.contains("/console/console.css"));
        // The first load is the three files: far under the 200 KB budget.
        assert!(INDEX.len() + SCRIPT.len() + STYLE.len() + ICON.len() < 200_000);
    }
}
