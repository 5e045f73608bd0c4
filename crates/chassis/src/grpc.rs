//! gRPC over TLS without tonic's own TLS: the server side takes connections from a listener
//! through the same [`Tls`] as the HTTP roles (certificate files reloaded on change, client
//! certificates verified, handshakes counted), and the client side dials through hyper-rustls
//! with a role's [`ClientTlsConfig`]. One TLS stack for the whole tree, and one set of
//! settings and metrics for every listener.

use crate::shutdown::Shutdown;
use crate::tls::{ClientTlsConfig, PeerIdentity, Tls, TlsError};
use futures_util::Stream;
use hyper_util::client::legacy::connect::HttpConnector;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections whose handshake is done and that tonic has not taken yet.
const READY_QUEUE: usize = 64;

/// One accepted gRPC connection: plain TCP, or TLS over it.
pub enum GrpcConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// What a gRPC handler can read of its caller (a request extension).
#[derive(Debug, Clone)]
pub struct GrpcPeer {
    pub remote: Option<SocketAddr>,
    /// The name in the caller's verified client certificate (mTLS).
    pub identity: Option<PeerIdentity>,
}

impl tonic::transport::server::Connected for GrpcConn {
    type ConnectInfo = GrpcPeer;

    fn connect_info(&self) -> GrpcPeer {
        match self {
            GrpcConn::Plain(tcp) => GrpcPeer { remote: tcp.peer_addr().ok(), identity: None },
            GrpcConn::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let identity = session.peer_certificates().and_then(|c| c.first()).and_then(crate::tls::identity);
                GrpcPeer { remote: tcp.peer_addr().ok(), identity }
            }
        }
    }
}

impl AsyncRead for GrpcConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            GrpcConn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for GrpcConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            GrpcConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            GrpcConn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(s) => Pin::new(s).poll_flush(cx),
            GrpcConn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            GrpcConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            GrpcConn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            GrpcConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            GrpcConn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            GrpcConn::Plain(s) => s.is_write_vectored(),
            GrpcConn::Tls(s) => s.is_write_vectored(),
        }
    }
}

type Incoming = Pin<Box<dyn Stream<Item = std::io::Result<GrpcConn>> + Send>>;

/// The connections of `listener` for tonic's `serve_with_incoming*`: TCP as it comes, or, with
/// `tls`, each after its handshake, which runs on a task of its own (a slow or silent client
/// holds up nobody) and must end within 10 s. A failed handshake is logged, counted in
/// `pixmesh_tls_handshakes_total` and dropped; it never ends the server. The certificate
/// files are watched until `shutdown`, which also ends the stream.
pub fn incoming(listener: TcpListener, tls: Option<Arc<Tls>>, shutdown: Shutdown) -> Incoming {
    let Some(tls) = tls else {
        return Box::pin(futures_util::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |tcp| {
            let tcp = tcp?;
            let _ = tcp.set_nodelay(true);
            Ok(GrpcConn::Plain(tcp))
        }));
    };
    let (ready, taken) = mpsc::channel::<GrpcConn>(READY_QUEUE);
    tokio::spawn(Arc::clone(&tls).watch(shutdown.clone()));
    tokio::spawn(async move {
        let mut backoff = crate::conn::AcceptBackoff::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = ready.closed() => return,
                _ = shutdown.wait() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => {
                    backoff.accepted();
                    pair
                }
                Err(e) => {
                    tracing::warn!(error = %e, "gRPC accept failed");
                    backoff.failed(&e).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let (ready, stop) = (ready.clone(), shutdown.clone());
            tokio::spawn(async move {
                let outcome = tokio::select! {
                    outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => outcome,
                    // Handshakes under way are dropped at shutdown: the stream ends at once.
                    _ = stop.wait() => return,
                };
                let stream = match outcome {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        metrics::counter!(crate::instruments::TLS_HANDSHAKES, "outcome" => "failed").increment(1);
                        tracing::info!(%peer, error = %e, "gRPC TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics::counter!(crate::instruments::TLS_HANDSHAKES, "outcome" => "timeout").increment(1);
                        tracing::info!(%peer, "gRPC TLS handshake timed out");
                        return;
                    }
                };
                metrics::counter!(crate::instruments::TLS_HANDSHAKES, "outcome" => "ok").increment(1);
                let _ = ready.send(GrpcConn::Tls(Box::new(stream))).await;
            });
        }
    });
    Box::pin(futures_util::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(taken), Ok))
}

/// How a role dials gRPC servers: plaintext, or TLS (h2 by ALPN) with its
/// [`ClientTlsConfig`]: the servers' CA, and its own certificate for mTLS.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer").field("tls", &self.tls.is_some()).finish()
    }
}

impl Dialer {
    /// Plaintext when `config` names no CA.
    pub fn new(config: &ClientTlsConfig) -> Result<Dialer, TlsError> {
        if !config.enabled() {
            return Ok(Dialer::default());
        }
        Ok(Dialer::with_config(config.client_config()?))
    }

    /// TLS with a configuration built already (to share one [`ClientTlsConfig::client_config`],
    /// and its file watch, with other clients of the role).
    pub fn with_config(config: rustls::ClientConfig) -> Dialer {
        Dialer { tls: Some(Arc::new(config)) }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint for `address` (`host:port`, or a URL whose scheme is replaced by this
    /// dialer's): `https://` with TLS, else `http://`.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, tonic::transport::Error> {
        let bare = address.strip_prefix("http://").or_else(|| address.strip_prefix("https://")).unwrap_or(address);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Endpoint::from_shared(format!("{scheme}://{bare}"))
    }

    /// A channel on `endpoint` that connects on first use (and again after a failure). The
    /// endpoint's connect timeout applies; TCP_NODELAY is set.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        match &self.tls {
            None => endpoint.tcp_nodelay(true).connect_lazy(),
            Some(config) => {
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config((**config).clone())
                    .https_only()
                    .enable_http2()
                    .wrap_connector(http);
                endpoint.connect_with_connector_lazy(https)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
    use super::*;
    use crate::tls::{ClientAuth, DevCa, TlsConfig};
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;

    fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_dialer_picks_the_scheme_whatever_the_address_says() {
        let plain = Dialer::default();
        assert!(!plain.is_tls());
        assert_eq!(plain.endpoint("127.0.0.1:7000").unwrap().uri().to_string(), "http://127.0.0.1:7000/");
        assert_eq!(plain.endpoint("https://127.0.0.1:7000").unwrap().uri().to_string(), "http://127.0.0.1:7000/");
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let config = ClientTlsConfig { ca: Some(write(dir.path(), "ca.pem", &ca.cert_pem())), ..ClientTlsConfig::default() };
        let tls = Dialer::new(&config).unwrap();
        assert!(tls.is_tls());
        assert_eq!(tls.endpoint("http://worker:7100").unwrap().uri().to_string(), "https://worker:7100/");
        let missing = ClientTlsConfig { ca: Some(dir.path().join("nope.pem")), ..ClientTlsConfig::default() };
        assert!(Dialer::new(&missing).unwrap_err().to_string().contains("nope.pem"));
    }

    #[tokio::test]
    async fn a_silent_or_failed_handshake_holds_up_nobody_and_the_callers_name_is_read_from_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("test CA").unwrap();
        let server = ca.issue(&["localhost", "127.0.0.1"], true, false).unwrap();
        let client = ca.issue(&["distributor.pixmesh"], false, true).unwrap();
        let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem());
        let config = TlsConfig {
            cert: Some(write(dir.path(), "server.pem", &server.cert_pem)),
            key: Some(write(dir.path(), "server-key.pem", &server.key_pem)),
            client_ca: Some(ca_file.clone()),
            client_auth: ClientAuth::Required,
            allowed_names: vec!["distributor.pixmesh".into()],
        };
        let tls = Tls::load(&config).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        let mut incoming = incoming(listener, tls, shutdown.clone());

        // One client connects and says nothing; another speaks plaintext and is refused.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();

        // A certificate from the CA that carries a name not allowed: its handshake fails (the
        // server's alert reaches it at its first read).
        let other = ca.issue(&["gateway.pixmesh"], false, true).unwrap();
        let connector_for = |cert: &str, key: &str, tag: &str| {
            let config = ClientTlsConfig {
                ca: Some(ca_file.clone()),
                cert: Some(write(dir.path(), &format!("{tag}.pem"), cert)),
                key: Some(write(dir.path(), &format!("{tag}-key.pem"), key)),
            };
            tokio_rustls::TlsConnector::from(Arc::new(config.client_config().unwrap()))
        };
        let refused = connector_for(&other.cert_pem, &other.key_pem, "other");
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let outcome = async {
            let mut stream = refused.connect(name, tcp).await?;
            stream.write_all(b"ping").await?;
            let mut byte = [0u8; 1];
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await
        };
        let outcome = tokio::time::timeout(Duration::from_secs(5), outcome).await.unwrap();
        assert!(!matches!(outcome, Ok(n) if n > 0), "a name not allowed got a session: {outcome:?}");

        // A client with a certificate from the CA and an allowed name gets through at once all
        // the same: nothing of the others came out of the stream before it.
        let connector = connector_for(&client.cert_pem, &client.key_pem, "client");
        let dialing = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut stream = connector.connect(name, tcp).await.unwrap();
            stream.write_all(b"ping").await.unwrap();
            stream
        });
        let conn = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await.expect("the good client waited").unwrap().unwrap();
        let peer = tonic::transport::server::Connected::connect_info(&conn);
        assert_eq!(peer.identity, Some(PeerIdentity(Arc::from("distributor.pixmesh"))));
        assert!(peer.remote.is_some());
        assert!(matches!(conn, GrpcConn::Tls(_)));
        let _client = dialing.await.unwrap();

        // Shutdown ends the stream.
        shutdown.trigger();
        let ended = tokio::time::timeout(Duration::from_secs(5), async { while incoming.next().await.is_some() {} }).await;
        assert!(ended.is_ok(), "the stream did not end at shutdown");
    }
}
