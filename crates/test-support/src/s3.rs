//! A real S3-compatible server for the tests: `s3s-fs` (objects in a temporary directory) with
//! signature checking on (SigV4 headers and presigned URLs, a random key pair), on an ephemeral
//! port of 127.0.0.1, in a runtime of its own so it can be stopped and started again on the same
//! port (the "S3 outage" fault tests) while the processes under test keep running.

use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The bucket every test server has.
pub const BUCKET: &str = "pixmesh";

pub struct S3Server {
    addr: SocketAddr,
    root: tempfile::TempDir,
    access_key: String,
    secret_key: String,
    /// Added before every request is answered (see [`S3Server::start_with_latency`]).
    latency: std::time::Duration,
    runtime: Option<tokio::runtime::Runtime>,
    /// Set by [`S3Server::stop`] before the runtime goes: see there.
    stopping: Arc<AtomicBool>,
}

/// The key pair of every server of this test process (one pair, so that one set of `AWS_*`
/// variables fits every process the tests start), made at random once.
fn key_pair() -> &'static (String, String) {
    static PAIR: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    PAIR.get_or_init(|| (format!("AK{}", random_hex(8)).to_uppercase(), random_hex(20)))
}

/// The `AWS_*` variables that sign requests to the servers of this test process; given to
/// every pixmesh process the tests start.
pub fn credentials_env() -> [(&'static str, &'static str); 2] {
    let (access, secret) = key_pair();
    [("AWS_ACCESS_KEY_ID", access.as_str()), ("AWS_SECRET_ACCESS_KEY", secret.as_str())]
}

/// Whether the end-to-end suite runs on S3 blobs (`PIXMESH_E2E_BLOBS=s3`; default `file`).
pub fn e2e_on_s3() -> bool {
    match std::env::var("PIXMESH_E2E_BLOBS").unwrap_or_default().as_str() {
        "" | "file" => false,
        "s3" => true,
        other => panic!("PIXMESH_E2E_BLOBS={other:?}: use file or s3"),
    }
}

/// One server for the whole test process (the S3 profile of the e2e suite): each system gets a
/// prefix of its own.
pub fn shared() -> &'static S3Server {
    static SERVER: std::sync::OnceLock<S3Server> = std::sync::OnceLock::new();
    SERVER.get_or_init(S3Server::start)
}

/// A key prefix for a system on `data_dir`: `e2e/<the data dir's name>`.
pub fn prefix_for(data_dir: &Path) -> String {
    let name: String = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect())
        .unwrap_or_default();
    format!("e2e/{}", if name.is_empty() { "root".into() } else { name })
}

impl S3Server {
    /// Starts a server with an empty bucket [`BUCKET`].
    pub fn start() -> S3Server {
        S3Server::start_with_latency(std::time::Duration::ZERO)
    }

    /// A server that answers every request `latency` late, as a remote S3 does (AWS S3 takes
    /// tens of milliseconds to a first byte; this server, on the same host, well under one).
    pub fn start_with_latency(latency: std::time::Duration) -> S3Server {
        let root = tempfile::Builder::new().prefix("pixmesh-s3-").tempdir().unwrap_or_else(|e| panic!("temp dir for the S3 server: {e}"));
        std::fs::create_dir_all(root.path().join(BUCKET)).unwrap_or_else(|e| panic!("bucket dir: {e}"));
        let (access_key, secret_key) = key_pair().clone();
        let mut server = S3Server {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            root,
            access_key,
            secret_key,
            latency,
            runtime: None,
            stopping: Default::default(),
        };
        server.serve();
        server
    }

    fn serve(&mut self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-test-server")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("S3 server runtime: {e}"));
        let listener = {
            let _guard = runtime.enter();
            let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("socket: {e}"));
            socket.set_reuseaddr(true).unwrap_or_else(|e| panic!("SO_REUSEADDR: {e}"));
            socket.bind(self.addr).unwrap_or_else(|e| panic!("bind the S3 server's port: {e}"));
            socket.listen(1024).unwrap_or_else(|e| panic!("listen: {e}"))
        };
        self.addr = listener.local_addr().unwrap_or_else(|e| panic!("local addr: {e}"));
        let fs = s3s_fs::FileSystem::new(self.root.path()).unwrap_or_else(|e| panic!("s3s-fs root: {e:?}"));
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(self.access_key.clone(), self.secret_key.clone()));
        let s3 = builder.build();
        let latency = self.latency;
        let stopping = Arc::new(AtomicBool::new(false));
        self.stopping = Arc::clone(&stopping);
        let service = hyper::service::service_fn(move |request| {
            let (s3, stopping) = (s3.clone(), Arc::clone(&stopping));
            async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let answer = hyper::service::Service::call(&s3, request).await.map_err(|e| format!("{e:?}"))?;
                // An answer made while the server stops may come from a file operation that the
                // runtime's shutdown cut short, which s3s-fs reports as NoSuchKey: not sent (the
                // connection is cut instead, as a server that goes away cuts it).
                if stopping.load(Ordering::SeqCst) {
                    return Err("the server is stopping".to_string());
                }
                Ok(answer)
            }
        });
        runtime.spawn(async move {
            let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                // As S3 servers do: a response's head and body are not held back for an ACK
                // (Nagle), which would add the client's delayed-ACK time to small requests.
                let _ = socket.set_nodelay(true);
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        self.runtime = Some(runtime);
    }

    /// Stops answering: the port is closed and every open connection is cut. Objects stay.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// Serves again on the same port, with the objects it had.
    pub fn start_again(&mut self) {
        self.stop();
        self.serve();
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `--blobs` URL of a prefix of the bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}?endpoint={}&region=us-east-1", self.endpoint())
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// The environment a pixmesh process needs to use this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()), ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone())]
    }

    /// Where the bucket's objects are on disk (`<root>/pixmesh/<key>`).
    pub fn bucket_dir(&self) -> std::path::PathBuf {
        self.root.path().join(BUCKET)
    }

    /// The keys under `prefix/area` (`blobs`, `staging`), read from the server's directory.
    pub fn keys(&self, prefix: &str, area: &str) -> Vec<String> {
        let dir = self.bucket_dir().join(prefix).join(area);
        let mut keys: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| !is_internal(n)).collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

/// s3s-fs keeps its own metadata and partial files under dot names.
fn is_internal(name: &str) -> bool {
    name.starts_with('.')
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand_byte())).collect()
}

fn rand_byte() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() as u8
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
