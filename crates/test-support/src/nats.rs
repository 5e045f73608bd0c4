//! NATS for the tests: a namespace of a test's own on the machine's server (the streams and the
//! bucket of a namespace are separate from every other's), or a `nats-server` of a test's own
//! on an ephemeral port, for fault tests that restart it or wipe its store.
//!
//! The machine's server is `$PIXMESH_TEST_NATS`, by default `nats://127.0.0.1:4222`; the
//! `nats-server` binary is `$PIXMESH_NATS_SERVER`, by default `nats-server` on the `PATH` (or
//! `/usr/sbin/nats-server`).

use anyhow::{Context, anyhow};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const DEFAULT_SERVER: &str = "nats://127.0.0.1:4222";

/// The machine's NATS server for tests.
pub fn server_url() -> String {
    std::env::var("PIXMESH_TEST_NATS").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_SERVER.to_string())
}

/// True when the e2e suite runs with the broker and the NATS registry
/// (`PIXMESH_E2E_QUEUE=nats`).
pub fn e2e_on_nats() -> bool {
    match std::env::var("PIXMESH_E2E_QUEUE").unwrap_or_default().as_str() {
        "" | "none" => false,
        "nats" => true,
        other => panic!("PIXMESH_E2E_QUEUE={other:?}: use none or nats"),
    }
}

/// A namespace of this test process's own: `t<pid>x<n>`.
pub fn namespace() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("t{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A URL of the machine's server with a namespace of this test's own.
pub fn namespaced_url() -> String {
    format!("{}/{}", server_url(), namespace())
}

fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PIXMESH_NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let sbin = PathBuf::from("/usr/sbin/nats-server");
    if sbin.exists() { sbin } else { PathBuf::from("nats-server") }
}

/// A `nats-server -js` of a test's own, its store in a temp dir.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: tempfile::TempDir,
}

impl NatsServer {
    pub async fn start() -> anyhow::Result<NatsServer> {
        let store = tempfile::tempdir()?;
        let mut server = NatsServer { child: None, port: 0, store };
        server.spawn(None).await?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self, port: Option<u16>) -> anyhow::Result<()> {
        let port_arg = port.map(|p| p.to_string()).unwrap_or_else(|| "-1".into());
        let mut cmd = Command::new(binary());
        cmd.args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("cannot start {} (set PIXMESH_NATS_SERVER)", binary().display()))?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let found = tokio::time::timeout(Duration::from_secs(20), async {
            let mut port = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port = rest.trim().rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    return Ok::<_, anyhow::Error>(port);
                }
            }
            Err(anyhow!("nats-server exited before it was ready"))
        })
        .await
        .context("nats-server did not become ready within 20 s")??;
        self.port = found.ok_or_else(|| anyhow!("nats-server did not say its port"))?;
        // Keep reading its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    /// Kills the server (SIGKILL) without touching its store.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts it again on the same port with the same store.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        let port = self.port;
        // The port may take a moment to be free again.
        let mut last = None;
        for _ in 0..20 {
            match self.spawn(Some(port)).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last.unwrap_or_else(|| anyhow!("cannot start nats-server again")))
    }

    /// Kills the server, deletes everything it stored, and starts it again empty.
    pub async fn wipe_and_start_again(&mut self) -> anyhow::Result<()> {
        self.kill().await;
        for entry in std::fs::read_dir(self.store.path())? {
            let path = entry?.path();
            if path.is_dir() { std::fs::remove_dir_all(&path)? } else { std::fs::remove_file(&path)? }
        }
        self.start_again().await
    }
}

/// The namespace of the system on `data_dir`: one per data dir for the life of the test
/// process, so a system restarted on the same data dir finds its streams. The first call also
/// deletes the streams of namespaces whose test process is gone.
pub async fn namespaced_url_for(data_dir: &std::path::Path) -> String {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static URLS: OnceLock<tokio::sync::Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let mut urls = URLS.get_or_init(Default::default).lock().await;
    if let Some(url) = urls.get(data_dir) {
        return url.clone();
    }
    if urls.is_empty() {
        drop_stale().await;
    }
    let url = namespaced_url();
    urls.insert(data_dir.to_path_buf(), url.clone());
    url
}

/// Deletes the streams (and KV buckets) of test namespaces `t<pid>x<n>` whose process is gone.
pub async fn drop_stale() {
    let Ok(client) = async_nats::connect(server_url()).await else { return };
    let js = async_nats::jetstream::new(client);
    let mut names = js.stream_names();
    let mut stale = Vec::new();
    use futures_util::StreamExt;
    while let Some(Ok(name)) = names.next().await {
        let lower = name.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("pixmesh_t").or_else(|| lower.strip_prefix("kv_pixmesh_t")) else { continue };
        let Some((pid, _)) = rest.split_once('x') else { continue };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            stale.push(name);
        }
    }
    for name in stale {
        let _ = js.delete_stream(&name).await;
    }
}

/// Deletes the streams and the bucket of the namespace in `url`.
pub async fn drop_namespace(url: &str) {
    let Some((server, ns)) = url.rsplit_once('/').filter(|(s, _)| s.contains("://")) else { return };
    let Ok(client) = async_nats::connect(server).await else { return };
    let js = async_nats::jetstream::new(client);
    let upper = ns.to_ascii_uppercase().replace('-', "_");
    for name in [
        format!("PIXMESH_{upper}_WAKE"),
        format!("PIXMESH_{upper}_EVENTS"),
        format!("PIXMESH_{upper}_DEAD"),
        format!("KV_pixmesh_{ns}_workers"),
    ] {
        let _ = js.delete_stream(&name).await;
    }
}
