//! Every metric this role records: its name, kind, unit and help, in one place. Names follow
//! the OpenTelemetry semantic conventions where one exists (`http.server.request.duration` in
//! seconds is `http_server_request_duration_seconds`), and are `pixmesh_*` otherwise; units
//! are in the name (`_seconds`), counters end in `_total`.

use metrics::Unit;

/// Time to answer a request of an HTTP role (upload, status), from its headers to its response headers; labels http_route, http_request_method, http_response_status_code (OpenTelemetry http.server.request.duration).
pub const HTTP_SERVER_REQUEST_DURATION: &str = "http_server_request_duration_seconds";
/// Connections open on this listener.
pub const HTTP_CONNECTIONS: &str = "pixmesh_http_connections";
/// Most connections this listener keeps open.
pub const HTTP_CONNECTION_LIMIT: &str = "pixmesh_http_connection_limit";
/// Connections accepted while at the limit (the longest-idle one was closed for them).
pub const HTTP_CONNECTION_LIMIT_REACHED: &str = "pixmesh_http_connection_limit_reached_total";
/// Connections closed by pixmesh, by reason.
pub const HTTP_CONNECTIONS_CLOSED: &str = "pixmesh_http_connections_closed_total";
/// Failed accepts (out of file descriptors, ...), each followed by a back-off.
pub const HTTP_ACCEPT_ERRORS: &str = "pixmesh_http_accept_errors_total";
/// Requests refused before routing (target or header block too large), by reason.
pub const HTTP_REQUESTS_REFUSED: &str = "pixmesh_http_requests_refused_total";
/// Hybrid-logical-clock times received too far ahead to adopt, by peer.
pub const CLOCK_OFFSET_REJECTED: &str = "pixmesh_clock_offset_rejected_total";
/// TLS handshakes on a listener, by outcome (ok, failed, timeout).
pub const TLS_HANDSHAKES: &str = "pixmesh_tls_handshakes_total";
/// Reloads of TLS certificate files, by side (listener, caller) and outcome (ok, failed).
pub const TLS_RELOADS: &str = "pixmesh_tls_reloads_total";

/// Every name above (the dashboard in `deploy/grafana` may use no other).
pub const NAMES: &[&str] = &[
    HTTP_SERVER_REQUEST_DURATION,
    HTTP_CONNECTIONS,
    HTTP_CONNECTION_LIMIT,
    HTTP_CONNECTION_LIMIT_REACHED,
    HTTP_CONNECTIONS_CLOSED,
    HTTP_ACCEPT_ERRORS,
    HTTP_REQUESTS_REFUSED,
    CLOCK_OFFSET_REJECTED,
    TLS_HANDSHAKES,
    TLS_RELOADS,
];

/// Gives each metric its help text and unit (the `# HELP` lines of the exposition).
pub fn describe() {
    metrics::describe_histogram!(
        HTTP_SERVER_REQUEST_DURATION,
        Unit::Seconds,
        "Time to answer a request of an HTTP role (upload, status), from its headers to its response headers; labels http_route, http_request_method, http_response_status_code (OpenTelemetry http.server.request.duration)"
    );
    metrics::describe_gauge!(HTTP_CONNECTIONS, Unit::Count, "Connections open on this listener");
    metrics::describe_gauge!(HTTP_CONNECTION_LIMIT, Unit::Count, "Most connections this listener keeps open");
    metrics::describe_counter!(
        HTTP_CONNECTION_LIMIT_REACHED,
        Unit::Count,
        "Connections accepted while at the limit (the longest-idle one was closed for them)"
    );
    metrics::describe_counter!(HTTP_CONNECTIONS_CLOSED, Unit::Count, "Connections closed by pixmesh, by reason");
    metrics::describe_counter!(
        HTTP_ACCEPT_ERRORS,
        Unit::Count,
        "Failed accepts (out of file descriptors, ...), each followed by a back-off"
    );
    metrics::describe_counter!(
        HTTP_REQUESTS_REFUSED,
        Unit::Count,
        "Requests refused before routing (target or header block too large), by reason"
    );
    metrics::describe_counter!(CLOCK_OFFSET_REJECTED, Unit::Count, "Hybrid-logical-clock times received too far ahead to adopt, by peer");
    metrics::describe_counter!(TLS_HANDSHAKES, Unit::Count, "TLS handshakes on a listener, by outcome (ok, failed, timeout)");
    metrics::describe_counter!(
        TLS_RELOADS,
        Unit::Count,
        "Reloads of TLS certificate files, by side (listener, caller) and outcome (ok, failed)"
    );
}

/// A gRPC status code as the `rpc_grpc_status_code` label: its number, as OpenTelemetry has it.
pub fn grpc_status_code(code: tonic::Code) -> &'static str {
    const CODES: [&str; 17] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
    CODES.get(code as usize).copied().unwrap_or("2")
}
