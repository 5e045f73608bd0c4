//! The pixmesh microservice chassis: what every role shares.
//!
//! - [`config`]: typed configuration from file + environment + flags, unknown keys rejected.
//! - [`error`]: the one table that maps error kinds to HTTP status, gRPC code and retryability.
//! - [`telemetry`]: structured logs and the Prometheus metrics recorder.
//! - [`admin`]: the admin listener with `/healthz`, `/readyz` and `/metrics`.
//! - [`shutdown`]: one shutdown path, driven by SIGINT/SIGTERM or by the caller.
//! - [`announce`]: the line a role prints when it listens, so supervisors and tests learn its ports.
//! - [`serve`]: serving an axum router on an already-bound listener until shutdown, with
//!   header-read and idle timeouts and a connection cap ([`conn`]) and JSON 414/431 refusals
//!   ([`request_limits`]).
//! - [`tls`]: TLS on a listener (rustls), certificates reloaded on change, client certificates.
//! - [`multipart`]: which part of a `multipart/form-data` upload is the image, and the parser that finds it.

pub mod admin;
pub mod announce;
pub mod clock;
pub mod config;
pub mod conn;
pub mod error;
pub mod grpc;
pub mod headers;
pub mod http_span;
pub mod instruments;
pub mod multipart;
pub mod request_limits;
pub mod serve;
pub mod shutdown;
pub mod signed_url;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod trace;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use shutdown::Shutdown;
