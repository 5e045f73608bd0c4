//! Serving an axum router on an already-bound listener until shutdown, then draining.

use crate::admin::{self, Readiness};
use crate::announce::Announcement;
use crate::shutdown::Shutdown;
use axum::Router;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Serves `app` on `listener` until `shutdown` fires; in-flight requests then get `grace` to finish.
pub async fn http(name: &'static str, listener: TcpListener, app: Router, shutdown: Shutdown, grace: Duration) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    tracing::info!(listener = name, addr = %local, "serving");
    let stop = shutdown.wait_owned();
    // No Nagle delay: responses are written whole, and small ones must not wait for an ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>()).with_graceful_shutdown(stop);
    let drained = async move { server.await };
    // The server future completes only after in-flight requests finish; bound that by `grace`
    // once shutdown has started.
    tokio::pin!(drained);
    tokio::select! {
        res = &mut drained => res,
        _ = async { shutdown.wait().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(listener = name, grace_ms = grace.as_millis() as u64, "grace period over; closing remaining connections");
            Ok(())
        }
    }
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
    let app = admin::router(role, readiness, shutdown);
    let stop = Shutdown::new();
    let serving = stop.clone();
    let task = tokio::spawn(async move { http("admin", listener, app, serving, Duration::from_millis(100)).await });
    AdminServer { stop, task }
}

/// The whole life of an HTTP role: start its admin listener, build its app (`build` may open
/// stores), announce both addresses, turn ready, serve until `shutdown`, drain within `grace`,
/// then stop the admin listener last.
pub async fn http_role<F, Fut>(
    role: &'static str,
    http_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: Shutdown,
    grace: Duration,
    build: F,
) -> std::io::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Router>>,
{
    http_role_with_checks(role, http_listener, admin_listener, shutdown, grace, |_| build()).await
}

/// [`http_role`] for a role whose readiness also follows checks of its own (its stores can be
/// written): `build` gets the role's [`Readiness`] to keep them up to date.
pub async fn http_role_with_checks<F, Fut>(
    role: &'static str,
    http_listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: Shutdown,
    grace: Duration,
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
    let result = http(role, http_listener, app, shutdown, grace).await;
    admin_server.stop().await;
    result
}
