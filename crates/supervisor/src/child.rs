//! One supervised child process: start, announce, restart with backoff, stop.

use crate::SUPERVISED_ENV;
use anyhow::{Context, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pixmesh_chassis::Shutdown;
use pixmesh_chassis::announce::Announcement;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(30);
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A child that ran this long is healthy again: its backoff starts over.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// This many exits within the window is a crash loop.
const CRASH_LOOP_COUNT: usize = 5;
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub name: String,
    pub role: String,
    pub exe: PathBuf,
    pub args: Vec<String>,
    pub grace: Duration,
}

pub struct Supervised {
    name: String,
    announcement: Announcement,
    stop: Shutdown,
    task: JoinHandle<()>,
}

impl Supervised {
    /// Starts the child and supervises it until [`Supervised::stop`]. (Its stop is separate from
    /// `up`'s shutdown, so `up` can stop children one by one, in order.)
    pub async fn start(spec: ChildSpec) -> anyhow::Result<Supervised> {
        let (child, announcement) = spawn(&spec, &[]).await?;
        report(&spec.name, &child.child, &announcement);
        let stop = Shutdown::new();
        let name = spec.name.clone();
        let task = tokio::spawn(supervise(spec, child, announcement.clone(), stop.clone()));
        Ok(Supervised { name, announcement, stop, task })
    }

    /// Its name under `up` (`worker-1`, `distributor`, …).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn announcement(&self) -> &Announcement {
        &self.announcement
    }

    /// Stops the child (SIGTERM, then SIGKILL after its grace period) and waits for it.
    pub async fn stop(self) {
        self.stop.trigger();
        let _ = self.task.await;
    }
}

/// Prints where a child listens: a line for people and a JSON line for programs.
fn report(name: &str, child: &Child, a: &Announcement) {
    let pid = child.id().unwrap_or(0);
    let addrs: Vec<String> = a.addresses.iter().filter(|(k, _)| k.as_str() != "id").map(|(k, v)| format!("{k} {v}")).collect();
    println!("  {name:<12} {}  (pid {pid})", addrs.join("  "));
    let mut line = a.clone().with("pid", pid).with("name", name);
    line.role = a.role.clone();
    line.print();
}

/// A started child and the write end of its stdin pipe. The pipe is held (never written) for
/// as long as the child should run: when this process dies, the child sees EOF and stops.
/// It must live outside `Child`, whose `wait()` closes stdin first.
struct Running {
    child: Child,
    _stdin: Option<tokio::process::ChildStdin>,
}

async fn spawn(spec: &ChildSpec, pinned: &[String]) -> anyhow::Result<(Running, Announcement)> {
    let mut command = Command::new(&spec.exe);
    command
        .args(&spec.args)
        .args(pinned)
        .arg(&spec.role)
        .env(SUPERVISED_ENV, "1")
        // Its own process group: a Ctrl-C on the terminal reaches `up` only, which then stops
        // the children in order.
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command.spawn().with_context(|| format!("cannot start {} ({})", spec.name, spec.exe.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("{}: no stdout pipe", spec.name))?;
    let mut lines = BufReader::new(stdout).lines();
    let waited = tokio::time::timeout(ANNOUNCE_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(a) = Announcement::parse(&line) {
                return Ok(a);
            }
        }
        Err(anyhow!("{} exited before it was ready", spec.name))
    })
    .await;
    let announcement = match waited {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            let status = child.wait().await.ok();
            return Err(e.context(format!("exit status: {}", status.map(|s| s.to_string()).unwrap_or_default())));
        }
        Err(_) => {
            let _ = child.kill().await;
            return Err(anyhow!("{} did not become ready within {} s", spec.name, ANNOUNCE_TIMEOUT.as_secs()));
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stdin = child.stdin.take();
    Ok((Running { child, _stdin: stdin }, announcement))
}

/// `--set` arguments that make a restarted child bind the same addresses as before, so the
/// roles that call it keep working.
fn pinned_addresses(role: &str, a: &Announcement) -> Vec<String> {
    let mut out = Vec::new();
    for (name, key) in [("http", "listen"), ("grpc", "listen"), ("admin", "admin_listen")] {
        if let Some(addr) = a.get(name) {
            out.push("--set".to_string());
            out.push(format!("{role}.{key}=\"{addr}\""));
        }
    }
    out
}

async fn terminate(name: &str, child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(_) => {}
        Err(_) => {
            eprintln!("pixmesh up: {name} did not stop within {} s; killing it", grace.as_secs());
            let _ = child.kill().await;
        }
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("unknown ({e})"),
    }
}

async fn supervise(spec: ChildSpec, mut running: Running, announcement: Announcement, stop: Shutdown) {
    let pinned = pinned_addresses(&spec.role, &announcement);
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let mut backoff = INITIAL_BACKOFF;
    let mut started = Instant::now();
    loop {
        let status = tokio::select! {
            status = running.child.wait() => status,
            _ = stop.wait() => {
                terminate(&spec.name, &mut running.child, spec.grace).await;
                return;
            }
        };
        if stop.is_triggered() {
            return;
        }
        let now = Instant::now();
        if now.duration_since(started) >= STABLE_AFTER {
            backoff = INITIAL_BACKOFF;
        }
        crashes.push_back(now);
        while crashes.front().is_some_and(|t| now.duration_since(*t) > CRASH_LOOP_WINDOW) {
            crashes.pop_front();
        }
        let status = describe(status);
        eprintln!("pixmesh up: {} exited unexpectedly ({status}); restarting in {} ms", spec.name, backoff.as_millis());
        if crashes.len() >= CRASH_LOOP_COUNT {
            eprintln!(
                "pixmesh up: ERROR: {} is crash-looping: {} exits in the last {} s (last: {status}); still retrying, every {} s at most. Check its log above.",
                spec.name,
                crashes.len(),
                CRASH_LOOP_WINDOW.as_secs(),
                MAX_BACKOFF.as_secs()
            );
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.wait() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match spawn(&spec, &pinned).await {
                Ok((r, a)) => {
                    running = r;
                    started = Instant::now();
                    eprintln!("pixmesh up: {} restarted", spec.name);
                    report(&spec.name, &running.child, &a);
                    break;
                }
                Err(e) => eprintln!("pixmesh up: restarting {} failed: {e:#}; next try in {} ms", spec.name, backoff.as_millis()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_pin_the_announced_addresses() {
        let a = Announcement::new("worker").with("grpc", "127.0.0.1:5000").with("admin", "127.0.0.1:5001").with("id", "w1");
        assert_eq!(
            pinned_addresses("worker", &a),
            vec!["--set", "worker.listen=\"127.0.0.1:5000\"", "--set", "worker.admin_listen=\"127.0.0.1:5001\""]
        );
    }
}
