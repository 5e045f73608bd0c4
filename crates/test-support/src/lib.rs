//! Helpers for pixmesh's integration and end-to-end tests.
//!
//! [`System`] boots the real `pixmesh up` (every role a real process on 127.0.0.1, all ports
//! chosen by the OS) on a data directory and learns where everything listens from the
//! announcement lines `up` prints. Images are generated in code, so tests need no fixtures;
//! [`corpus`] finds the shared corpus when it is there.

pub mod echo;
pub mod nats;
pub mod otlp;
pub mod postgres;
pub mod redis;
pub mod s3;
pub mod sse;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `pixmesh` binary under test: `$PIXMESH_BIN`, or the one cargo built next to this test.
pub fn pixmesh_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("PIXMESH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/pixmesh
    exe.parent().and_then(Path::parent).map(|d| d.join("pixmesh")).unwrap_or_else(|| PathBuf::from("pixmesh"))
}

/// `../shared/corpus/<sub>` beside the repository, if present.
pub fn corpus(sub: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus").join(sub);
    root.is_dir().then_some(root)
}

/// A JPEG of `w`×`h` with smooth gradients and some texture.
pub fn jpeg(w: u32, h: u32) -> Vec<u8> {
    encode(w, h, image::ImageFormat::Jpeg)
}

pub fn png(w: u32, h: u32) -> Vec<u8> {
    encode(w, h, image::ImageFormat::Png)
}

/// A `multipart/form-data` body from raw part header blocks, so tests control every byte.
pub fn form(boundary: &str, parts: &[(&str, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (headers, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

/// A `Content-Disposition` part header for [`form`].
pub fn disposition(name: &str, filename: Option<&str>) -> String {
    match filename {
        Some(f) => format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\""),
        None => format!("Content-Disposition: form-data; name=\"{name}\""),
    }
}

/// `jpeg` with `bytes` of metadata inserted before its frame header, in full-size APPn segments
/// (64 KiB each) as cameras write EXIF maker notes and previews. APP3–APP12 are used: no reader
/// gives them a meaning (APP1 is EXIF/XMP, APP2 ICC, APP13/APP14 Photoshop/Adobe).
pub fn with_metadata(jpeg: &[u8], bytes: usize) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let (mut left, mut n) = (bytes, 0usize);
    while left > 0 {
        let payload = left.min(65_533);
        out.extend_from_slice(&[0xFF, 0xE3 + (n % 10) as u8]);
        out.extend_from_slice(&((payload + 2) as u16).to_be_bytes());
        out.extend((0..payload).map(|k| (k * 31 + n) as u8));
        left -= payload;
        n += 1;
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A JPEG with a large embedded ICC profile: the corpus's `edge/icc_profile_big.jpg` (its frame
/// header after 400 KB of profile) when the corpus is there, else one made like it (a 420 KB
/// profile in APP2 `ICC_PROFILE` segments; its content is not a valid profile, which the
/// pipeline ignores).
pub fn icc_profile_big_jpeg() -> Vec<u8> {
    if let Some(bytes) = corpus("edge").and_then(|d| std::fs::read(d.join("icc_profile_big.jpg")).ok()) {
        return bytes;
    }
    let plain = jpeg(500, 426);
    let mut out = plain[..2].to_vec();
    let chunks = 7u8;
    for seq in 1..=chunks {
        let payload = 60_000usize;
        out.extend_from_slice(&[0xFF, 0xE2]);
        out.extend_from_slice(&((payload + 2 + 14) as u16).to_be_bytes());
        out.extend_from_slice(b"ICC_PROFILE\0");
        out.extend_from_slice(&[seq, chunks]);
        out.extend((0..payload).map(|k| (k % 251) as u8));
    }
    out.extend_from_slice(&plain[2..]);
    out
}

fn encode(w: u32, h: u32, format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let t = ((x * 7 + y * 13) % 17) as u8;
        image::Rgb([((x * 255) / w.max(1)) as u8 ^ t, ((y * 255) / h.max(1)) as u8, (((x + y) * 127) / (w + h).max(1)) as u8])
    });
    let mut out = Cursor::new(Vec::new());
    let _ = image::DynamicImage::ImageRgb8(img).write_to(&mut out, format);
    out.into_inner()
}

#[derive(Debug, Clone)]
pub struct ChildInfo {
    pub pid: i32,
    pub addresses: HashMap<String, String>,
}

/// The engines a system runs on.
#[derive(Debug, Clone, Default)]
pub struct Engines {
    /// `store.database`: a SQLite file or a PostgreSQL database.
    pub database: String,
    /// `--queue` and `--registry` (`nats://…`); `None`: polling and the registry role.
    pub queue: Option<String>,
    /// `--blobs` (`s3://…`); `None`: the local directory under the data dir.
    pub blobs: Option<String>,
}

impl Engines {
    /// The test profile's engines for a system on `data_dir`: SQLite, or PostgreSQL
    /// ([`postgres::e2e_on_postgres`]); NATS ([`nats::e2e_on_nats`]); S3 ([`s3::e2e_on_s3`], a
    /// prefix of the shared server named after the data dir, so a restart finds its blobs).
    pub async fn for_profile(data_dir: &Path) -> Engines {
        let database = if postgres::e2e_on_postgres() {
            postgres::database_for(data_dir).await
        } else {
            format!("sqlite:{}", data_dir.join("pixmesh.db").display())
        };
        let queue = if nats::e2e_on_nats() { Some(nats::namespaced_url_for(data_dir).await) } else { None };
        let blobs = s3::e2e_on_s3().then(|| s3::shared().url(&s3::prefix_for(data_dir)));
        Engines { database, queue, blobs }
    }
}

/// A running `pixmesh up`.
pub struct System {
    up: Child,
    pub gateway: String,
    pub api_key: String,
    pub data_dir: PathBuf,
    /// The job store it runs on (`store.database`): its SQLite file, or its PostgreSQL database
    /// when the tests run on that profile ([`postgres::e2e_on_postgres`]).
    pub database: String,
    /// The broker and registry it runs on (`queue.url`) when the tests run on that profile
    /// ([`nats::e2e_on_nats`]).
    pub queue: Option<String>,
    /// The blob store it runs on (`store.blobs`) when not the local default.
    pub blobs: Option<String>,
    /// The development CA its roles' certificates come from, when started with `--tls`
    /// ([`System::start_tls`]); its client trusts it.
    pub ca: Option<PathBuf>,
    children: Arc<Mutex<HashMap<String, ChildInfo>>>,
    client: reqwest::Client,
}

impl System {
    /// Starts `pixmesh up --workers N` on `data_dir`; extra `--set key=value` pairs go to every role.
    /// The result cache is off unless a `--set upload.cache=…` turns it on.
    /// The engines are the profile's ([`Engines::for_profile`]).
    pub async fn start(data_dir: &Path, workers: usize, sets: &[&str]) -> anyhow::Result<System> {
        System::start_on(data_dir, workers, sets, &Engines::for_profile(data_dir).await).await
    }

    /// Starts `pixmesh up` on `engines`.
    pub async fn start_on(data_dir: &Path, workers: usize, sets: &[&str], engines: &Engines) -> anyhow::Result<System> {
        System::start_with_env(data_dir, workers, sets, engines, &[]).await
    }

    /// Starts `pixmesh up --tls` (mTLS between the roles, HTTPS on the gateway) on the
    /// profile's engines, with `env` added to its environment.
    pub async fn start_tls(data_dir: &Path, workers: usize, sets: &[&str], env: &[(&str, &str)]) -> anyhow::Result<System> {
        System::launch(data_dir, workers, sets, &Engines::for_profile(data_dir).await, env, &["--tls"]).await
    }

    /// Starts `pixmesh up` on `engines` with `env` added to its environment (its roles inherit it).
    pub async fn start_with_env(
        data_dir: &Path,
        workers: usize,
        sets: &[&str],
        engines: &Engines,
        env: &[(&str, &str)],
    ) -> anyhow::Result<System> {
        System::launch(data_dir, workers, sets, engines, env, &[]).await
    }

    async fn launch(
        data_dir: &Path,
        workers: usize,
        sets: &[&str],
        engines: &Engines,
        env: &[(&str, &str)],
        up_args: &[&str],
    ) -> anyhow::Result<System> {
        let Engines { database, queue, blobs } = engines.clone();
        let mut cmd = Command::new(pixmesh_bin());
        cmd.envs(env.iter().copied());
        cmd.arg("--database").arg(&database);
        if let Some(url) = &queue {
            cmd.arg("--queue").arg(url).arg("--registry").arg(url);
        }
        if let Some(url) = &blobs {
            cmd.arg("--blobs").arg(url);
        }
        // Tests upload the same few images again and again to watch them being made: the
        // result cache would answer most of them. A test of the cache turns it on (a later
        // `--set` of the same key wins).
        cmd.arg("--set").arg("upload.cache=off");
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        cmd.arg("up")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--workers")
            .arg(workers.to_string())
            .arg("--grace-secs")
            .arg("10")
            .args(up_args);
        quiet_with_announcements(&mut cmd);
        let mut up = cmd.spawn().with_context(|| format!("cannot start {}", pixmesh_bin().display()))?;
        let stdout = up.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let children: Arc<Mutex<HashMap<String, ChildInfo>>> = Arc::default();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                match v["pixmesh"].as_str() {
                    Some("listening") => record(&children, &v),
                    Some("ready") => return Ok(v),
                    _ => {}
                }
            }
            Err(anyhow!("pixmesh up exited before it was ready"))
        })
        .await
        .context("pixmesh up did not become ready within 60 s")??;
        let watched = Arc::clone(&children);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["pixmesh"] == "listening"
                {
                    record(&watched, &v);
                }
            }
        });
        let gateway = ready["url"].as_str().ok_or_else(|| anyhow!("no gateway URL"))?.to_string();
        let api_key = ready["api_key"].as_str().unwrap_or_default().to_string();
        let ca = ready["ca"].as_str().map(PathBuf::from);
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(60));
        if let Some(ca) = &ca {
            client = client.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca)?)?);
        }
        let client = client.build()?;
        Ok(System { up, gateway, api_key, data_dir: data_dir.to_path_buf(), database, queue, blobs, ca, children, client })
    }

    /// The settings that put another role (started with [`Role::start`]) on this system's
    /// stores.
    pub fn store_sets(&self) -> Vec<String> {
        let mut sets = vec![format!("store.data_dir={}", self.data_dir.display()), format!("store.database={}", self.database)];
        if let Some(url) = &self.queue {
            sets.push(format!("queue.url={url}"));
        }
        if let Some(url) = &self.blobs {
            sets.push(format!("store.blobs={url}"));
        }
        sets
    }

    /// The registry its workers register with: the registry role's address, or the NATS URL on
    /// that profile.
    pub fn registry(&self) -> String {
        match &self.queue {
            Some(url) => url.clone(),
            None => self.child("registry").and_then(|c| c.addresses.get("grpc").cloned()).unwrap_or_default(),
        }
    }

    /// What `up` announced for a child (`worker-1`, `upload`, …), as of its latest (re)start.
    pub fn child(&self, name: &str) -> Option<ChildInfo> {
        self.children.lock().ok()?.get(name).cloned()
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Stops the system with SIGTERM and waits for `up` to exit.
    pub async fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.up.id().ok_or_else(|| anyhow!("up already exited"))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
        Ok(tokio::time::timeout(Duration::from_secs(60), self.up.wait()).await.context("up did not stop within 60 s")??)
    }

    /// Sends what `make` builds; a 429 is retried after its `Retry-After`, as a well-behaved
    /// client does (for at most a minute).
    async fn send(&self, make: impl Fn() -> reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let res = make().header("x-api-key", &self.api_key).send().await?;
            if res.status() != reqwest::StatusCode::TOO_MANY_REQUESTS || Instant::now() > deadline {
                return Ok(res);
            }
            let wait = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()).unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(wait.clamp(1, 10))).await;
        }
    }

    /// POSTs an image to `/api/upload?{query}` through the gateway.
    pub async fn upload(&self, bytes: Vec<u8>, content_type: &str, query: &str) -> anyhow::Result<(u16, Value)> {
        let (status, _, body) = self.upload_answer(bytes, content_type, query).await?;
        Ok((status, body))
    }

    /// [`System::upload`], with the answer's `Retry-After` header too.
    pub async fn upload_answer(&self, bytes: Vec<u8>, content_type: &str, query: &str) -> anyhow::Result<(u16, Option<String>, Value)> {
        let url = format!("{}/api/upload?{query}", self.gateway);
        let res = self.send(|| self.client.post(&url).header("content-type", content_type).body(bytes.clone())).await?;
        let status = res.status().as_u16();
        let retry_after = res.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok((status, retry_after, res.json().await.unwrap_or(Value::Null)))
    }

    pub async fn status(&self, id: &str) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/api/status/{id}", self.gateway);
        let res = self.send(|| self.client.get(&url)).await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// Polls the status until the job is `succeeded` or `failed`.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (code, v) = self.status(id).await?;
            if code != 200 {
                bail!("status of {id} answered {code}: {v}");
            }
            if matches!(v["state"].as_str(), Some("succeeded" | "failed")) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("job {id} is still {} after {} s", v["state"], timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GETs the result: status, headers and bytes.
    pub async fn result(&self, id: &str) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
        let url = format!("{}/api/result/{id}", self.gateway);
        let res = self.send(|| self.client.get(&url)).await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        Ok((status, headers, res.bytes().await?.to_vec()))
    }
}

fn record(children: &Mutex<HashMap<String, ChildInfo>>, v: &Value) {
    let (Some(name), Some(pid)) = (v["name"].as_str(), v["pid"].as_str().and_then(|p| p.parse().ok())) else { return };
    if let Ok(mut map) = children.lock() {
        map.insert(name.to_string(), ChildInfo { pid, addresses: addresses(v) });
    }
}

/// The string fields of an announcement line (`http`, `admin`, `grpc`, …).
fn addresses(v: &Value) -> HashMap<String, String> {
    v.as_object().map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()).unwrap_or_default()
}

/// A program on the `PATH` (or in `/usr/sbin`, where Debian puts daemons), when installed.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]).map(|d| d.join(name)).find(|p| p.is_file())
}

/// `promtool check metrics` on `text`: its findings (empty when clean); `None` without promtool
/// outside CI (CI installs it, and there its absence fails the test).
pub fn promtool(text: &str) -> Option<String> {
    use std::io::Write;
    let spawned = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not found ({e}): install Debian's prometheus package to run this check");
            return None;
        }
        Err(e) => panic!("promtool is needed in CI: {e}"),
    };
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(text.as_bytes()));
    let out = match (written, child.wait_with_output()) {
        (Some(Ok(())), Ok(out)) => out,
        (written, waited) => panic!("promtool check metrics could not run: {written:?} {:?}", waited.err()),
    };
    let findings = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some(if out.status.success() { findings.trim().to_string() } else { format!("exit {:?}: {findings}", out.status.code()) })
}

/// A pixmesh process for a test: warnings only (unless `RUST_LOG` says otherwise), stdout
/// piped for its announcement lines, stderr shown, killed with the test.
fn quiet_with_announcements(cmd: &mut Command) {
    cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        // The key pair of the tests' S3 servers: one for the whole test process.
        .envs(s3::credentials_env())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
}

/// One role started as its own `pixmesh <role>` process, with the addresses it announced.
pub struct Role {
    pub child: Child,
    pub addresses: HashMap<String, String>,
}

impl Role {
    /// Starts `pixmesh [--config FILE] [--set …] <role>` and waits for its announcement.
    pub async fn start(role: &str, config: Option<&Path>, sets: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Role> {
        let mut cmd = Command::new(pixmesh_bin());
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        // `role` may be a subcommand with its flags: `ambassador redis --shards …`.
        cmd.args(role.split_whitespace()).envs(env.iter().copied());
        quiet_with_announcements(&mut cmd);
        let mut child = cmd.spawn().with_context(|| format!("cannot start {}", pixmesh_bin().display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let announced = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["pixmesh"] == "listening"
                {
                    return Ok(v);
                }
            }
            Err(anyhow!("pixmesh {role} exited before it announced its addresses"))
        })
        .await
        .with_context(|| format!("pixmesh {role} did not announce within 30 s"))??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Role { child, addresses: addresses(&announced) })
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.id().map(|p| p as i32)
    }
}

/// A third-party Python web application, installed from PyPI into a virtualenv kept in the
/// build directory (made once, reused by later runs) and served by gunicorn on a port the OS
/// picks.
pub struct PythonApp {
    pub child: Child,
    pub url: String,
}

impl PythonApp {
    /// `requirements`: pip specs (gunicorn must be one); `app`: the WSGI app, e.g. `httpbin:app`.
    pub async fn start(venv_name: &str, requirements: &[&str], app: &str) -> anyhow::Result<PythonApp> {
        let exe = std::env::current_exe()?;
        // target/<profile>/deps/<test> → target/python/<venv_name>
        let target = exe.parent().and_then(Path::parent).and_then(Path::parent).ok_or_else(|| anyhow!("no target directory"))?;
        let venv = target.join("python").join(venv_name);
        let stamp = venv.join("installed.txt");
        let wanted = requirements.join("\n");
        // Tests of one process that start the same app make its virtualenv once, one at a time.
        static MAKING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _making = MAKING.lock().await;
        if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
            let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            let ok = Command::new(&python).arg("-m").arg("venv").arg("--clear").arg(&venv).status().await?.success();
            if !ok {
                bail!("{python} -m venv {} failed (is python3-venv installed?)", venv.display());
            }
            let ok = Command::new(venv.join("bin/pip"))
                .args(["install", "-q", "--disable-pip-version-check"])
                .args(requirements)
                .status()
                .await?;
            if !ok.success() {
                bail!("pip install {} failed (PyPI unreachable?)", requirements.join(" "));
            }
            std::fs::write(&stamp, &wanted)?;
        }
        let mut child = Command::new(venv.join("bin/gunicorn"))
            .args(["--bind", "127.0.0.1:0", "--workers", "2", "--threads", "4", "--no-control-socket", app])
            .current_dir(&venv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start gunicorn")?;
        let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line.find("Listening at: ") {
                    let rest = &line[at + "Listening at: ".len()..];
                    return Ok(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
            Err(anyhow!("gunicorn exited before listening"))
        })
        .await
        .context("gunicorn did not start within 30 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(PythonApp { child, url })
    }
}
