//! The one error table.
//!
//! Every error a client or a peer role can see has an [`ErrorCode`]. This table is the only place
//! that decides its HTTP status, its gRPC code and whether a retry can help. Clients get
//! `{"error":{"code":"…","message":"…"}}`; internal details stay in the log.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::{Deserialize, Serialize};

/// Machine-readable error kinds, stable on the wire (their `as_str` is part of the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (bad query parameter, bad multipart body, …).
    BadRequest,
    /// No or unknown API key.
    Unauthorized,
    /// The key is known but may not do this.
    Forbidden,
    /// No such job, result or route.
    NotFound,
    /// The method is not allowed on this route.
    MethodNotAllowed,
    /// The resource exists but is not in the right state (e.g. result not ready yet).
    NotReady,
    /// An idempotency key was reused with a different request.
    IdempotencyConflict,
    /// An upload named its image by digest only (`Repr-Digest`, no body), and there is no
    /// result of that image with these options to give: send the image.
    NotCached,
    /// The request body is larger than allowed.
    PayloadTooLarge,
    /// The request target (path and query) is longer than allowed.
    UriTooLong,
    /// The request's header fields are larger than allowed.
    HeadersTooLarge,
    /// The image has more pixels or a longer side than allowed.
    ImageTooLarge,
    /// The bytes are not an image format pixmesh accepts.
    UnsupportedFormat,
    /// The image could not be decoded (corrupt, truncated).
    CorruptImage,
    /// The image is decodable but breaks a processing limit (frames, scans, …).
    LimitExceeded,
    /// Too many requests for this key.
    RateLimited,
    /// A dependency is down; retry later.
    Unavailable,
    /// The client did not send its request (body) within the time allowed.
    RequestTimeout,
    /// A store's disk is full (the message names which store); retry once space is freed.
    InsufficientStorage,
    /// The work did not finish within its deadline.
    Timeout,
    /// A bug or an unexpected failure inside pixmesh.
    Internal,
}

/// Whether trying again (on another instance) can help, and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The same request fails the same way everywhere (the request's fault).
    Never,
    /// Either the instance's fault or the request's (a bug that one input triggers, a panic):
    /// tried once more on another instance, and that answer is final. An input that crashes
    /// the code must not be sent round every instance.
    Once,
    /// The instance's or the moment's fault: tried again (within the caller's retry budget).
    Yes,
}

/// One row of the table.
struct Row {
    code: ErrorCode,
    name: &'static str,
    http: StatusCode,
    grpc: tonic::Code,
    retry: Retry,
}

const TABLE: &[Row] = &[
    Row {
        code: ErrorCode::BadRequest,
        name: "bad_request",
        http: StatusCode::BAD_REQUEST,
        grpc: tonic::Code::InvalidArgument,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::Unauthorized,
        name: "unauthorized",
        http: StatusCode::UNAUTHORIZED,
        grpc: tonic::Code::Unauthenticated,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::Forbidden,
        name: "forbidden",
        http: StatusCode::FORBIDDEN,
        grpc: tonic::Code::PermissionDenied,
        retry: Retry::Never,
    },
    Row { code: ErrorCode::NotFound, name: "not_found", http: StatusCode::NOT_FOUND, grpc: tonic::Code::NotFound, retry: Retry::Never },
    Row {
        code: ErrorCode::MethodNotAllowed,
        name: "method_not_allowed",
        http: StatusCode::METHOD_NOT_ALLOWED,
        grpc: tonic::Code::Unimplemented,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::NotReady,
        name: "not_ready",
        http: StatusCode::CONFLICT,
        grpc: tonic::Code::FailedPrecondition,
        retry: Retry::Yes,
    },
    Row {
        code: ErrorCode::IdempotencyConflict,
        name: "idempotency_conflict",
        http: StatusCode::UNPROCESSABLE_ENTITY,
        grpc: tonic::Code::AlreadyExists,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::NotCached,
        name: "not_cached",
        http: StatusCode::PRECONDITION_FAILED,
        grpc: tonic::Code::FailedPrecondition,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::PayloadTooLarge,
        name: "payload_too_large",
        http: StatusCode::PAYLOAD_TOO_LARGE,
        grpc: tonic::Code::OutOfRange,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::UriTooLong,
        name: "uri_too_long",
        http: StatusCode::URI_TOO_LONG,
        grpc: tonic::Code::OutOfRange,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::HeadersTooLarge,
        name: "headers_too_large",
        http: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        grpc: tonic::Code::OutOfRange,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::ImageTooLarge,
        name: "image_too_large",
        http: StatusCode::PAYLOAD_TOO_LARGE,
        grpc: tonic::Code::OutOfRange,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::UnsupportedFormat,
        name: "unsupported_format",
        http: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        grpc: tonic::Code::InvalidArgument,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::CorruptImage,
        name: "corrupt_image",
        http: StatusCode::UNPROCESSABLE_ENTITY,
        grpc: tonic::Code::InvalidArgument,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::LimitExceeded,
        name: "limit_exceeded",
        http: StatusCode::UNPROCESSABLE_ENTITY,
        grpc: tonic::Code::FailedPrecondition,
        retry: Retry::Never,
    },
    Row {
        code: ErrorCode::RateLimited,
        name: "rate_limited",
        http: StatusCode::TOO_MANY_REQUESTS,
        grpc: tonic::Code::ResourceExhausted,
        retry: Retry::Yes,
    },
    Row {
        code: ErrorCode::Unavailable,
        name: "unavailable",
        http: StatusCode::SERVICE_UNAVAILABLE,
        grpc: tonic::Code::Unavailable,
        retry: Retry::Yes,
    },
    Row {
        code: ErrorCode::RequestTimeout,
        name: "request_timeout",
        http: StatusCode::REQUEST_TIMEOUT,
        grpc: tonic::Code::DeadlineExceeded,
        retry: Retry::Yes,
    },
    Row {
        code: ErrorCode::InsufficientStorage,
        name: "insufficient_storage",
        http: StatusCode::INSUFFICIENT_STORAGE,
        grpc: tonic::Code::ResourceExhausted,
        retry: Retry::Yes,
    },
    Row {
        code: ErrorCode::Timeout,
        name: "timeout",
        http: StatusCode::GATEWAY_TIMEOUT,
        grpc: tonic::Code::DeadlineExceeded,
        retry: Retry::Yes,
    },
    Row {
        code: ErrorCode::Internal,
        name: "internal",
        http: StatusCode::INTERNAL_SERVER_ERROR,
        grpc: tonic::Code::Internal,
        retry: Retry::Once,
    },
];

impl ErrorCode {
    /// Every code, in table order.
    pub fn all() -> impl Iterator<Item = ErrorCode> {
        TABLE.iter().map(|row| row.code)
    }

    fn row(self) -> &'static Row {
        // The table has exactly one row per variant (checked by a test); fall back to the
        // `internal` row rather than panicking in service code.
        TABLE.iter().find(|row| row.code == self).unwrap_or(&TABLE[TABLE.len() - 1])
    }

    /// The stable wire name, e.g. `image_too_large`.
    pub fn as_str(self) -> &'static str {
        self.row().name
    }

    /// Parses a wire name back into a code.
    pub fn parse(name: &str) -> Option<ErrorCode> {
        TABLE.iter().find(|row| row.name == name).map(|row| row.code)
    }

    pub fn http_status(self) -> StatusCode {
        self.row().http
    }

    pub fn grpc_code(self) -> tonic::Code {
        self.row().grpc
    }

    /// True when a retry (possibly on another instance) can succeed.
    pub fn is_retryable(self) -> bool {
        self.row().retry != Retry::Never
    }

    /// How often a failure with this code is tried again.
    pub fn retry(self) -> Retry {
        self.row().retry
    }

    /// The code to assume for a gRPC status that carries no pixmesh code
    /// (transport failures, deadline exceeded, a crashed peer).
    pub fn from_grpc(code: tonic::Code) -> ErrorCode {
        match code {
            tonic::Code::DeadlineExceeded => ErrorCode::Timeout,
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown | tonic::Code::Aborted => ErrorCode::Unavailable,
            tonic::Code::ResourceExhausted => ErrorCode::RateLimited,
            tonic::Code::InvalidArgument => ErrorCode::BadRequest,
            tonic::Code::NotFound => ErrorCode::NotFound,
            tonic::Code::Unauthenticated => ErrorCode::Unauthorized,
            tonic::Code::PermissionDenied => ErrorCode::Forbidden,
            tonic::Code::OutOfRange => ErrorCode::PayloadTooLarge,
            tonic::Code::FailedPrecondition => ErrorCode::LimitExceeded,
            _ => ErrorCode::Internal,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as a client sees it: a code from the table and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds after which a retry makes sense (sent as `Retry-After`).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), retry_after_secs: None }
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The JSON body: `{"error":{"code":"…","message":"…"}}`.
    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: ErrorDetail { code: self.code, message: self.message.clone() } }
    }

    /// As a gRPC status, with the pixmesh code in the `x-pixmesh-error` metadata entry.
    pub fn to_grpc_status(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.code.grpc_code(), self.message.clone());
        if let Ok(value) = self.code.as_str().parse() {
            status.metadata_mut().insert(GRPC_ERROR_METADATA, value);
        }
        status
    }

    /// Reads a gRPC status back into an [`ApiError`], preferring the pixmesh code it carries.
    pub fn from_grpc_status(status: &tonic::Status) -> ApiError {
        let code = status
            .metadata()
            .get(GRPC_ERROR_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::parse)
            .unwrap_or_else(|| ErrorCode::from_grpc(status.code()));
        ApiError::new(code, status.message().to_string())
    }
}

/// Metadata key that carries the pixmesh error code on a gRPC error.
pub const GRPC_ERROR_METADATA: &str = "x-pixmesh-error";

/// The body of every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, for programs: stable on the wire.
    pub code: ErrorCode,
    /// What went wrong and what to do, for people.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.code.http_status(), Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs
            && let Ok(value) = http::HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(http::header::RETRY_AFTER, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn table_has_one_row_per_code_and_unique_names() {
        let codes: HashSet<_> = TABLE.iter().map(|r| r.code).collect();
        let names: HashSet<_> = TABLE.iter().map(|r| r.name).collect();
        assert_eq!(codes.len(), TABLE.len());
        assert_eq!(names.len(), TABLE.len());
        for row in TABLE {
            assert_eq!(row.code.as_str(), row.name);
            assert_eq!(ErrorCode::parse(row.name), Some(row.code));
            // serde and the table agree on the wire name.
            assert_eq!(serde_json::to_value(row.code).unwrap(), serde_json::Value::String(row.name.into()));
        }
    }

    /// The README's error table lists every code with its status and retry rule.
    #[test]
    fn the_readme_error_table_is_the_table() {
        let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let Ok(text) = std::fs::read_to_string(readme) else { return };
        for row in TABLE {
            let retry = match row.retry {
                Retry::Never => "no",
                Retry::Once => "once",
                Retry::Yes => "yes",
            };
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", row.name)))
                .unwrap_or_else(|| panic!("README's error table has no row for {}", row.name));
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(cells[2], row.http.as_str(), "README: HTTP status of {}", row.name);
            assert_eq!(cells[4], retry, "README: retry of {}", row.name);
        }
    }

    #[test]
    fn image_errors_map_to_client_statuses() {
        let check = |code: ErrorCode, http: u16, retry: bool| {
            assert_eq!(code.http_status().as_u16(), http, "{code}");
            assert_eq!(code.is_retryable(), retry, "{code}");
        };
        check(ErrorCode::UnsupportedFormat, 415, false);
        check(ErrorCode::ImageTooLarge, 413, false);
        check(ErrorCode::CorruptImage, 422, false);
        check(ErrorCode::Unavailable, 503, true);
        check(ErrorCode::InsufficientStorage, 507, true);
        check(ErrorCode::NotReady, 409, true);
        // A failure inside pixmesh may be the instance's or the input's: one more try, no more.
        assert_eq!(ErrorCode::Internal.retry(), Retry::Once);
        assert!(ErrorCode::Internal.is_retryable());
        assert_eq!(ErrorCode::Unavailable.retry(), Retry::Yes);
        assert_eq!(ErrorCode::CorruptImage.retry(), Retry::Never);
        // A client too slow to send its body is not an upstream timeout.
        check(ErrorCode::RequestTimeout, 408, true);
        check(ErrorCode::Timeout, 504, true);
    }

    #[test]
    fn grpc_round_trip_keeps_the_pixmesh_code() {
        let err = ApiError::new(ErrorCode::CorruptImage, "truncated JPEG");
        let back = ApiError::from_grpc_status(&err.to_grpc_status());
        assert_eq!(back, err);
        // A status without metadata falls back on its gRPC code.
        let bare = tonic::Status::unavailable("connection reset");
        assert_eq!(ApiError::from_grpc_status(&bare).code, ErrorCode::Unavailable);
    }
}
