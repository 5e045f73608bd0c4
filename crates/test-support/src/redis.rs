//! Redis for the tests: `redis-server` processes of a test's own on free ports (killed,
//! restarted on the same port, paused), and a small RESP2 client that can also send raw bytes.

use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A `redis-server` of a test's own (nothing kept on disk).
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    password: Option<String>,
}

impl RedisServer {
    pub async fn start() -> anyhow::Result<RedisServer> {
        RedisServer::start_with_password(None).await
    }

    /// `n` servers, e.g. the shards of a test.
    pub async fn start_many(n: usize) -> anyhow::Result<Vec<RedisServer>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(RedisServer::start().await?);
        }
        Ok(out)
    }

    pub async fn start_with_password(password: Option<&str>) -> anyhow::Result<RedisServer> {
        let mut last = anyhow!("no port tried");
        // A free port is found by binding it; another process may take it before the server
        // does, so a few are tried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let mut server = RedisServer { child: None, port, password: password.map(str::to_string) };
            match server.restart().await {
                Ok(()) => return Ok(server),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on its port and waits until it answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server (Debian's redis-server package)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = Resp::connect(&self.addr()).await {
                if let Some(p) = &self.password {
                    c.cmd(&["AUTH", p]).await?;
                }
                if c.cmd(&["PING"]).await.ok() == Some(Reply::Status("PONG".into())) {
                    return Ok(());
                }
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server on port {} exited: {status}", self.port);
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not answer within 10 s", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills it (SIGKILL) and waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Freezes it (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// A client straight to this server (authenticated when it has a password).
    pub async fn client(&self) -> anyhow::Result<Resp> {
        let mut c = Resp::connect(&self.addr()).await?;
        if let Some(p) = &self.password {
            c.cmd(&["AUTH", p]).await?;
        }
        Ok(c)
    }
}

/// A RESP2 reply, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Reply::Error(_))
    }

    pub fn error_text(&self) -> &str {
        match self {
            Reply::Error(e) => e,
            _ => "",
        }
    }
}

/// A RESP2 client over one connection.
pub struct Resp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Resp {
    pub async fn connect(addr: &str) -> anyhow::Result<Resp> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Resp { stream, buf: Vec::new() })
    }

    /// Sends one command and reads its reply.
    pub async fn cmd(&mut self, args: &[&str]) -> anyhow::Result<Reply> {
        self.send(&[args]).await?;
        self.read().await
    }

    /// Sends every command in one write (a pipeline).
    pub async fn send(&mut self, commands: &[&[&str]]) -> anyhow::Result<()> {
        let mut out = Vec::new();
        for args in commands {
            out.extend_from_slice(&encode(args));
        }
        self.send_raw(&out).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        Ok(())
    }

    /// Reads one reply (within 10 s).
    pub async fn read(&mut self) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((reply, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(reply);
            }
            self.buf.reserve(64 * 1024);
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, self.stream.read_buf(&mut self.buf)).await.context("no reply within 10 s")??;
            if n == 0 {
                bail!("the connection was closed");
            }
        }
    }

    /// True when the server closes the connection (within 5 s) with nothing more to read.
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::with_capacity(1024);
        matches!(tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut rest)).await, Ok(Ok(0)) | Ok(Err(_)))
    }
}

/// One command as a RESP array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn decode(buf: &[u8]) -> anyhow::Result<Option<(Reply, usize)>> {
    let Some(nl) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let line = std::str::from_utf8(&buf[1..nl])?;
    let next = nl + 2;
    Ok(match buf[0] {
        b'+' => Some((Reply::Status(line.to_string()), next)),
        b'-' => Some((Reply::Error(line.to_string()), next)),
        b':' => Some((Reply::Int(line.parse()?), next)),
        b'$' => {
            let len: i64 = line.parse()?;
            if len < 0 {
                return Ok(Some((Reply::Bulk(None), next)));
            }
            let end = next + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            Some((Reply::Bulk(Some(buf[next..end].to_vec())), end + 2))
        }
        b'*' => {
            let count: i64 = line.parse()?;
            if count < 0 {
                return Ok(Some((Reply::Array(None), next)));
            }
            let mut pos = next;
            let mut items = Vec::new();
            for _ in 0..count {
                let Some((item, used)) = decode(&buf[pos..])? else { return Ok(None) };
                items.push(item);
                pos += used;
            }
            Some((Reply::Array(Some(items)), pos))
        }
        other => bail!("not RESP: {:?}", other as char),
    })
}
