//! One shutdown path for every role.
//!
//! A [`Shutdown`] is a cancellation token. `main` ties it to SIGINT/SIGTERM with
//! [`Shutdown::on_signals`]; tests cancel it directly. Listeners stop accepting when it fires,
//! and in-flight work drains within the role's grace period.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown { token: CancellationToken::new() }
    }

    /// Starts shutdown.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when shutdown starts.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    /// A future that completes when shutdown starts, owning its token (for `'static` APIs).
    pub fn wait_owned(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }

    /// Triggers this shutdown on SIGINT or SIGTERM. Must be called inside a tokio runtime.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let token = self.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown requested"),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "shutdown requested"),
                _ = token.cancelled() => return,
            }
            token.cancel();
        });
        Ok(())
    }
}

/// Waits for `fut`, but at most `grace`; logs when the grace period runs out.
pub async fn drain_within<F: std::future::Future>(what: &str, grace: Duration, fut: F) -> Option<F::Output> {
    match tokio::time::timeout(grace, fut).await {
        Ok(out) => Some(out),
        Err(_) => {
            tracing::warn!(what, grace_ms = grace.as_millis() as u64, "grace period over; stopping anyway");
            None
        }
    }
}
