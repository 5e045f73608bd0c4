//! Serving an axum router on an already-bound listener until shutdown, then draining.
//!
//! The accept loop is pixmesh's own rather than `axum::serve`: that one has no header-read or
//! idle timeout and no cap on open connections, so a client that opened connections and sent
//! nothing (or one header byte every few seconds) held them until the process ran out of file
//! descriptors. hyper's own HTTP/1 `header_read_timeout` is not used either: its timer also runs
//! while a keep-alive connection waits for its next request, so it would cut every idle
//! keep-alive connection at the header timeout. Here each connection has a small watchdog
//! ([`conn`](crate::conn)) and:
//! - a new connection must deliver its first request head within `header_read_timeout`;
//! - between requests it may stay idle for `idle_timeout` (HTTP/1 keep-alive and HTTP/2 alike),
//!   but once the first byte of the next HTTP/1 request arrives the head must be complete within
//!   `header_read_timeout` (one byte every few seconds does not keep it open);
//! - at most `max_connections` are open. At the cap the connection that has waited longest with
//!   no request in flight is closed to make room (a request in progress is never cut); when every
//!   connection is busy, accepting pauses until one ends, and the kernel's backlog holds the
//!   newcomers. Both are logged (at most once every 10 s) and counted.
//!
//! Oversized request targets and header blocks get the JSON error (414/431) from
//! [`crate::request_limits`]; hyper's own, bare refusals only start at four times those limits.

use crate::admin::{self, Readiness};
use crate::announce::Announcement;
use crate::conn::{Close, ConnTable};
use crate::shutdown::Shutdown;
use crate::tls::{OverTls, PeerIdentity, Tls};
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tower::ServiceExt;

/// What one HTTP listener allows its clients (`[gateway.connections]` for the public port).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// A new connection's first request head, and any later head from its first byte, must
    /// arrive within this time.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in flight is closed after this time.
    pub idle_timeout_ms: u64,
    /// Open connections at most; 0 picks half the process's file-descriptor limit (the other
    /// half stays free for upstream connections, files and the database), at most 16,384.
    pub max_connections: usize,
    /// Longest request target (path + query), in bytes; longer gets 414.
    pub max_uri_bytes: usize,
    /// Largest request header block (names + values), in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 0,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
        }
    }
}

impl ConnectionLimits {
    pub fn validate(&self, section: &str) -> Result<(), String> {
        if self.header_read_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return Err(format!("{section}.header_read_timeout_ms and {section}.idle_timeout_ms must be above 0"));
        }
        if self.max_uri_bytes < 256 || self.max_header_bytes < 1024 || self.max_headers < 8 {
            return Err(format!(
                "{section}: max_uri_bytes must be at least 256, max_header_bytes at least 1024 and max_headers at least 8"
            ));
        }
        if self.max_header_bytes > 4 * 1024 * 1024 {
            return Err(format!("{section}.max_header_bytes must be at most 4 MiB"));
        }
        Ok(())
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// The connection cap in force: the configured one, or derived from the descriptor limit.
    pub fn connection_cap(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let files = crate::conn::raise_file_limit();
        usize::try_from(files / 2).unwrap_or(usize::MAX).clamp(64, 16_384)
    }
}

/// Serves `app` on `listener` with the default [`ConnectionLimits`] until `shutdown` fires;
/// in-flight requests then get `grace` to finish.
pub async fn http(name: &'static str, listener: TcpListener, app: Router, shutdown: Shutdown, grace: Duration) -> std::io::Result<()> {
    serve(name, listener, app, shutdown, grace, ConnectionLimits::default()).await
}

/// Serves `app` on `listener` under `limits` until `shutdown` fires; in-flight requests then get
/// `grace` to finish and the rest are closed.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    shutdown: Shutdown,
    grace: Duration,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    serve_tls(name, listener, app, shutdown, grace, limits, None).await
}

/// [`serve`], speaking TLS when `tls` is given: the handshake runs on the connection's own task
/// and must end within the header-read timeout. Every request of a TLS connection carries
/// [`OverTls`], and a verified client certificate's name as a [`PeerIdentity`].
pub async fn serve_tls(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    shutdown: Shutdown,
    grace: Duration,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let cap = limits.connection_cap();
    tracing::info!(listener = name, addr = %local, max_connections = cap, tls = tls.is_some(), "serving");
    let app = app.layer(crate::request_limits::RequestLimitsLayer::new(&limits));
    let builder = Arc::new(builder(&limits));
    let table = ConnTable::new(name, cap, limits);
    let mut connections = JoinSet::new();
    let mut backoff = crate::conn::AcceptBackoff::default();
    loop {
        while connections.try_join_next().is_some() {}
        if table.is_full() && !table.make_room() {
            // Every connection is busy: stop accepting until one ends (or becomes idle).
            tokio::select! {
                _ = table.freed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.wait() => break,
            }
            continue;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff.accepted();
                pair
            }
            Err(e) => {
                // Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): free what can be
                // freed and back off instead of spinning; other errors concern one connection only.
                table.accept_failed(&e);
                if crate::conn::is_resource_error(&e) {
                    table.make_room();
                }
                backoff.failed(&e).await;
                continue;
            }
        };
        // No Nagle delay: responses are written whole, and small ones must not wait for an ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let conn = table.open();
        let app = app.clone();
        let builder = Arc::clone(&builder);
        let stop = shutdown.clone();
        let table_for_task = Arc::clone(&table);
        let tls = tls.clone();
        let handshake_timeout = limits.header_read_timeout();
        connections.spawn(async move {
            let served = Served { peer, conn: Arc::clone(&conn), app, stop, grace };
            let outcome = match tls {
                None => served.drive(tcp, None, &builder).await,
                Some(tls) => {
                    let handshake = tokio::time::timeout(handshake_timeout, tls.acceptor().accept(tcp));
                    let handshake = tokio::select! {
                        done = handshake => Some(done),
                        _ = conn.close_requested() => None,
                    };
                    match handshake {
                        Some(Ok(Ok(stream))) => {
                            metrics::counter!(crate::instruments::TLS_HANDSHAKES, "outcome" => "ok").increment(1);
                            let identity = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(crate::tls::identity);
                            served.drive(stream, Some(identity), &builder).await
                        }
                        Some(Ok(Err(e))) => {
                            metrics::counter!(crate::instruments::TLS_HANDSHAKES, "outcome" => "failed").increment(1);
                            tracing::debug!(error = %e, %peer, "TLS handshake failed");
                            None
                        }
                        Some(Err(_)) => {
                            metrics::counter!(crate::instruments::TLS_HANDSHAKES, "outcome" => "timeout").increment(1);
                            Some(Close::HeaderTimeout)
                        }
                        None => Some(Close::Evicted),
                    }
                }
            };
            table_for_task.close(&conn, outcome.unwrap_or(Close::Ended));
        });
    }
    drop(listener);
    // In-flight requests get `grace`; what is left after it is cut.
    let started = Instant::now();
    while !connections.is_empty() {
        match tokio::time::timeout(grace.saturating_sub(started.elapsed()), connections.join_next()).await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(listener = name, grace_ms = grace.as_millis() as u64, "grace period over; closing remaining connections");
                connections.shutdown().await;
                break;
            }
        }
    }
    Ok(())
}

/// One accepted connection, to be served once its stream (plain or TLS) is ready.
struct Served {
    peer: std::net::SocketAddr,
    conn: Arc<crate::conn::Conn>,
    app: Router,
    stop: Shutdown,
    grace: Duration,
}

impl Served {
    /// Serves the connection's requests until it ends, the watchdog closes it (the reason is
    /// returned) or shutdown drains it.
    /// `session`: `None` for plain TCP; for TLS, the caller's verified name if it showed a
    /// certificate.
    async fn drive<IO>(self, io: IO, session: Option<Option<PeerIdentity>>, builder: &auto::Builder<TokioExecutor>) -> Option<Close>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Served { peer, conn, app, stop, grace } = self;
        let (io, watch) = crate::conn::watched(io, Arc::clone(&conn));
        let service = hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            if let Some(identity) = &session {
                request.extensions_mut().insert(OverTls);
                if let Some(identity) = identity {
                    request.extensions_mut().insert(identity.clone());
                }
            }
            let busy = conn.request_started();
            let response = app.clone().oneshot(request.map(axum::body::Body::new));
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| axum::body::Body::new(crate::conn::Tracked::new(body, busy))))
            }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(connection);
        let outcome = tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                None
            }
            why = watch.closed() => Some(why),
            _ = stop.wait() => {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(grace, connection.as_mut()).await;
                None
            }
        };
        if let Some(why) = outcome {
            // Dropping the connection closes the socket; nothing was in flight on it.
            tracing::debug!(%peer, reason = why.as_str(), "connection closed");
        }
        outcome
    }
}

/// hyper's connection settings. Its own limits sit at four times ours, so that within them a
/// client gets pixmesh's JSON 414/431 rather than hyper's bare status line.
fn builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let hard = limits.max_header_bytes.saturating_mul(4).max(limits.max_uri_bytes.saturating_mul(4)).max(64 * 1024);
    builder.http1().timer(TokioTimer::new()).header_read_timeout(None).max_buf_size(hard).max_headers(limits.max_headers * 4);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(u32::try_from(hard).unwrap_or(u32::MAX));
    builder
}

/// A running admin listener. It keeps answering while the role drains (with `/readyz` = 503),
/// and stops when the role calls [`AdminServer::stop`] at the very end.
pub struct AdminServer {
    stop: Shutdown,
    task: JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    pub async fn stop(self) {
        self.stop.trigger();
        let _ = self.task.await;
    }
}

/// Spawns the admin listener of a role. `shutdown` is the role's: readiness turns off with it.
pub fn admin(role: &'static str, listener: TcpListener, readiness: Readiness, shutdown: Shutdown) -> AdminServer {
    admin_with(role, listener, readiness, shutdown, axum::Router::new())
}

/// [`admin`], with routes of the role's own beside `/healthz`, `/readyz` and `/metrics` (what
/// an operator, or the gateway's `/api/cluster`, reads of its state).
pub fn admin_with(role: &'static str, listener: TcpListener, readiness: Readiness, shutdown: Shutdown, extra: axum::Router) -> AdminServer {
    let app = admin::router(role, readiness, shutdown).merge(extra);
    let stop = Shutdown::new();
    let serving = stop.clone();
    let task = tokio::spawn(async move { http("admin", listener, app, serving, Duration::from_millis(100)).await });
    AdminServer { stop, task }
}

/// The whole life of an HTTP role: start its admin listener, build its app (`build` may open
/// stores, and gets the role's [`Readiness`] to add checks of its own, e.g. that its stores can
/// be written), announce both addresses, turn ready, serve under `limits` until `shutdown`,
/// drain within `grace`, then stop the admin listener last.
pub async fn http_role<F, Fut>(
    role: &'static str,
    http_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: Shutdown,
    grace: Duration,
    limits: ConnectionLimits,
    build: F,
) -> std::io::Result<()>
where
    F: FnOnce(Readiness) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Router>>,
{
    http_role_tls(role, http_listener, admin_listener, shutdown, grace, limits, None, build).await
}

/// [`http_role`], its HTTP listener speaking TLS when `tls` is given (certificate files
/// reloaded on change while it serves).
#[allow(clippy::too_many_arguments)] // http_role's arguments, plus the TLS
pub async fn http_role_tls<F, Fut>(
    role: &'static str,
    http_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: Shutdown,
    grace: Duration,
    limits: ConnectionLimits,
    tls: Option<Arc<Tls>>,
    build: F,
) -> std::io::Result<()>
where
    F: FnOnce(Readiness) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Router>>,
{
    let readiness = Readiness::new();
    let http_addr = http_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_server = admin(role, admin_listener, readiness.clone(), shutdown.clone());
    let app = match build(readiness.clone()).await {
        Ok(app) => app,
        Err(e) => {
            admin_server.stop().await;
            return Err(e);
        }
    };
    Announcement::new(role).with("http", http_addr).with("admin", admin_addr).print();
    readiness.set_ready(true);
    let reloading = tls.clone().map(|tls| tokio::spawn(tls.watch(shutdown.clone())));
    let result = serve_tls(role, http_listener, app, shutdown, grace, limits, tls).await;
    if let Some(task) = reloading {
        task.abort();
    }
    admin_server.stop().await;
    result
}
