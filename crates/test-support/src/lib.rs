//! Helpers for pixmesh's integration and end-to-end tests.
//!
//! [`System`] boots the real `pixmesh up` (every role a real process on 127.0.0.1, all ports
//! chosen by the OS) on a data directory and learns where everything listens from the
//! announcement lines `up` prints. Images are generated in code, so tests need no fixtures;
//! [`corpus`] finds the shared corpus when it is there.

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

/// A running `pixmesh up`.
pub struct System {
    up: Child,
    pub gateway: String,
    pub api_key: String,
    pub data_dir: PathBuf,
    children: Arc<Mutex<HashMap<String, ChildInfo>>>,
    client: reqwest::Client,
}

impl System {
    /// Starts `pixmesh up --workers N` on `data_dir`; extra `--set key=value` pairs go to every role.
    pub async fn start(data_dir: &Path, workers: usize, sets: &[&str]) -> anyhow::Result<System> {
        let mut cmd = Command::new(pixmesh_bin());
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
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
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
        let gateway = format!("http://{}", ready["gateway"].as_str().ok_or_else(|| anyhow!("no gateway address"))?);
        let api_key = ready["api_key"].as_str().unwrap_or_default().to_string();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        Ok(System { up, gateway, api_key, data_dir: data_dir.to_path_buf(), children, client })
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

    /// POSTs an image to `/api/upload?{query}` through the gateway.
    pub async fn upload(&self, bytes: Vec<u8>, content_type: &str, query: &str) -> anyhow::Result<(u16, Value)> {
        let res = self
            .client
            .post(format!("{}/api/upload?{query}", self.gateway))
            .header("x-api-key", &self.api_key)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    pub async fn status(&self, id: &str) -> anyhow::Result<(u16, Value)> {
        let res = self.client.get(format!("{}/api/status/{id}", self.gateway)).header("x-api-key", &self.api_key).send().await?;
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
        let res = self.client.get(format!("{}/api/result/{id}", self.gateway)).header("x-api-key", &self.api_key).send().await?;
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        Ok((status, headers, res.bytes().await?.to_vec()))
    }
}

fn record(children: &Mutex<HashMap<String, ChildInfo>>, v: &Value) {
    let (Some(name), Some(pid)) = (v["name"].as_str(), v["pid"].as_str().and_then(|p| p.parse().ok())) else { return };
    let addresses =
        v.as_object().map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect()).unwrap_or_default();
    if let Ok(mut map) = children.lock() {
        map.insert(name.to_string(), ChildInfo { pid, addresses });
    }
}
