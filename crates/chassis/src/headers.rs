//! Headers the gateway sets for the services behind it. The gateway removes any client-sent
//! value of each before it sets its own, so a service can trust them: the services listen on
//! loopback (or a private network) and are reached through the gateway only.

/// The name of the authenticated API key. Jobs belong to it; idempotency keys are scoped by it.
pub const CLIENT: &str = "x-pixmesh-client";
/// `true` when the key is an admin key: it may read every client's jobs.
pub const ADMIN: &str = "x-pixmesh-admin";
/// The most pixels an upload by this key may ask the pipeline to produce.
pub const MAX_OUTPUT_PIXELS: &str = "x-pixmesh-max-output-pixels";
/// The longest output side an upload by this key may ask for.
pub const MAX_OUTPUT_SIDE: &str = "x-pixmesh-max-output-side";

/// `true` when the request came with a valid signed URL instead of an API key: it may read the
/// one path it was signed for (see `signed_url.rs`).
pub const SIGNED: &str = "x-pixmesh-signed";

/// The only presets this key may upload with (comma-separated names), when it is limited to
/// presets; absent: any options.
pub const PRESETS: &str = "x-pixmesh-presets";

/// Every header above: what the gateway strips from client requests.
pub const ALL: [&str; 6] = [CLIENT, ADMIN, MAX_OUTPUT_PIXELS, MAX_OUTPUT_SIDE, SIGNED, PRESETS];
