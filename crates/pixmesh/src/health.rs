//! `pixmesh health`: the container's health check. GETs an admin endpoint and exits 0 on a 2xx,
//! 1 otherwise (refused, timed out, or answered 503 while the role is not ready), so an image
//! needs no shell or curl for its `HEALTHCHECK`.

use clap::Args;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// The endpoint to check (a role's admin `/readyz` or `/healthz`).
    #[arg(long, env = "PIXMESH_HEALTH_URL", default_value = "http://127.0.0.1:9090/readyz")]
    pub url: String,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// Whether the endpoint answered 2xx; what it answered otherwise.
pub async fn check(args: &HealthArgs) -> Result<(), String> {
    let client = reqwest::Client::builder().timeout(Duration::from_millis(args.timeout_ms)).build().map_err(|e| e.to_string())?;
    let response = client.get(&args.url).send().await.map_err(|e| format!("{}: {e}", args.url))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    Err(format!("{}: {status} {}", args.url, body.trim()))
}
