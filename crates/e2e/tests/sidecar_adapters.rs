//! `pixmesh sidecar metrics|logs|health` as their own processes beside real applications:
//! redis-server and nginx scraped (and checked by promtool), a log file followed through
//! renames, truncation and half-written lines, and checks that fail and recover.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::redis::RedisServer;
use pixmesh_test_support::{Role, pixmesh_bin, promtool};
use serde_json::Value;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(res) => (res.status().as_u16(), res.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Waits until `/metrics` at `url` has a line equal to `line`; returns the page.
async fn wait_for_line(url: &str, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, text) = get(url).await;
        if text.lines().any(|l| l == line) {
            return text;
        }
        assert!(Instant::now() < deadline, "no `{line}` in {url}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn value(text: &str, name: &str) -> f64 {
    text.lines().find(|l| l.split([' ', '{']).next() == Some(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_info_is_served_as_prometheus_metrics_and_a_dead_redis_is_up_0() {
    let mut redis = RedisServer::start().await.unwrap();
    let mut c = redis.client().await.unwrap();
    for i in 0..25 {
        c.cmd(&["SET", &format!("k{i}"), "v"]).await.unwrap();
    }
    c.cmd(&["SET", "short", "v", "EX", "100"]).await.unwrap();
    let role = format!("sidecar metrics --listen 127.0.0.1:0 --source redis://{}", redis.addr());
    let adapter = Role::start(&role, None, &["sidecar.metrics.interval_ms=200"], &[]).await.unwrap();
    let url = format!("http://{}/metrics", adapter.addresses["http"]);
    let text = wait_for_line(&url, "redis_db_keys{db=\"db0\"} 26").await;
    assert!(text.lines().any(|l| l == "redis_db_keys_expiring{db=\"db0\"} 1"), "{text}");
    assert_eq!(value(&text, "redis_up"), 1.0);
    assert!(value(&text, "redis_commands_processed_total") >= 26.0, "{text}");
    assert!(text.contains("# TYPE redis_keyspace_hits_total counter") && text.contains("# TYPE redis_memory_used_bytes gauge"));
    if let Some(findings) = promtool(&text) {
        assert_eq!(findings, "", "promtool check metrics");
    }
    // Redis gone: up 0, and /metrics still answers at once.
    redis.kill().await;
    let started = Instant::now();
    wait_for_line(&url, "redis_up 0").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    redis.restart().await.unwrap();
    wait_for_line(&url, "redis_up 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_stub_status_is_served_as_prometheus_metrics() {
    let Some(nginx) = pixmesh_test_support::which("nginx") else {
        assert!(std::env::var_os("CI").is_none(), "CI needs nginx (.ci/run installs Debian's package)");
        eprintln!("skipped: needs nginx (Debian's package)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let prefix = dir.path().display();
    let conf = format!(
        "worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log;\n{user}events {{}}\nhttp {{\n\
         access_log {prefix}/access.log;\nclient_body_temp_path {prefix}/body;\nproxy_temp_path {prefix}/proxy;\n\
         fastcgi_temp_path {prefix}/fastcgi;\nuwsgi_temp_path {prefix}/uwsgi;\nscgi_temp_path {prefix}/scgi;\n\
         server {{\nlisten 127.0.0.1:{port};\nlocation /nginx_status {{ stub_status; }}\nlocation / {{ return 200 'hi'; }}\n}}\n}}\n",
        user = if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0 { "user root;\n" } else { "" }
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let _nginx = Nginx(
        tokio::process::Command::new(&nginx)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&format!("http://127.0.0.1:{port}/")).await.0 != 200 {
        assert!(Instant::now() < deadline, "nginx did not start: {:?}", std::fs::read_to_string(dir.path().join("error.log")));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..30 {
        get(&format!("http://127.0.0.1:{port}/")).await;
    }
    let role = format!("sidecar metrics --listen 127.0.0.1:0 --source nginx+http://127.0.0.1:{port}/nginx_status");
    let adapter = Role::start(&role, None, &["sidecar.metrics.interval_ms=200"], &[]).await.unwrap();
    let url = format!("http://{}/metrics", adapter.addresses["http"]);
    let text = wait_for_line(&url, "nginx_up 1").await;
    assert!(value(&text, "nginx_http_requests_total") >= 30.0, "{text}");
    assert!(value(&text, "nginx_connections_active") >= 1.0, "{text}");
    assert!(text.contains("# TYPE nginx_connections_accepted_total counter"));
    if let Some(findings) = promtool(&text) {
        assert_eq!(findings, "", "promtool check metrics");
    }
    // A page that is not stub_status: up 0, with the reason in the adapter's log.
    let role = format!("sidecar metrics --listen 127.0.0.1:0 --source nginx+http://127.0.0.1:{port}/");
    let wrong = Role::start(&role, None, &["sidecar.metrics.interval_ms=200"], &[]).await.unwrap();
    wait_for_line(&format!("http://{}/metrics", wrong.addresses["http"]), "nginx_up 0").await;
}

/// nginx's master, stopped with SIGTERM (it stops its workers; a SIGKILL would leave them).
struct Nginx(tokio::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_is_followed_through_rotations_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let line = |i: usize| format!("10.0.0.{i} - - [10/Oct/2000:13:55:36 -0700] \"GET /page/{i} HTTP/1.1\" 200 {i} \"-\" \"agent\"\n");
    let append = |text: &str| {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    };
    append(&line(0)); // there before the adapter: not read (it starts at the end)
    let mut adapter = tokio::process::Command::new(pixmesh_bin())
        .args([
            "--set",
            "sidecar.logs.poll_ms=50",
            "--set",
            "sidecar.logs.fields.app=\"web\"",
            "sidecar",
            "logs",
            "--format",
            "nginx",
            "--path",
        ])
        .arg(&log)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = BufReader::new(adapter.stdout.take().unwrap()).lines();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(10), out.next_line()).await.expect("a line within 10 s").unwrap().unwrap();
        serde_json::from_str(&line).unwrap()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New lines, one written in two halves.
    append(&line(1));
    let half = line(2);
    append(&half[..20]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    append(&half[20..]);
    for i in 1..=2 {
        let v = next().await;
        assert_eq!(
            (v["path"].as_str(), v["status"].as_u64(), v["body_bytes_sent"].as_u64()),
            (Some(&*format!("/page/{i}")), Some(200), Some(i as u64)),
            "{v}"
        );
        assert_eq!(v["app"], "web");
        assert_eq!(v["time"], "2000-10-10T13:55:36-07:00");
        assert!(v["observed_time"].is_string());
    }

    // Rotation by rename; the writer still writes to the old file for a moment, then to a new one.
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    {
        let mut old = std::fs::OpenOptions::new().append(true).open(dir.path().join("access.log.1")).unwrap();
        old.write_all(line(3).as_bytes()).unwrap();
    }
    append(&line(4));
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let mut old = std::fs::OpenOptions::new().append(true).open(dir.path().join("access.log.1")).unwrap();
        old.write_all(line(5).as_bytes()).unwrap();
    }
    let mut got: Vec<String> = Vec::new();
    for _ in 3..=5 {
        got.push(next().await["path"].as_str().unwrap().to_string());
    }
    got.sort();
    assert_eq!(got, ["/page/3", "/page/4", "/page/5"], "nothing lost across the rename, late writes to the old file included");

    // copytruncate: the file is emptied in place and written again.
    append(&line(6));
    assert_eq!(next().await["path"], "/page/6");
    std::fs::OpenOptions::new().write(true).truncate(true).open(&log).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    append(&line(7));
    assert_eq!(next().await["path"], "/page/7");

    // A line that is not nginx's: kept, with the reason.
    append("garbage\n");
    let v = next().await;
    assert_eq!((v["message"].as_str(), v["parse_error"].as_str()), (Some("garbage"), Some("not nginx's combined format")));
    adapter.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_of_every_kind_are_served_as_readyz_and_follow_their_dependency() {
    let mut redis = RedisServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("app.db");
    std::fs::File::create(&sqlite).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    // An HTTP endpoint: the metrics adapter's /healthz, over the same Redis.
    let metrics =
        Role::start(&format!("sidecar metrics --listen 127.0.0.1:0 --source redis://{}", redis.addr()), None, &[], &[]).await.unwrap();
    let checks = [
        format!("cache=redis://{}", redis.addr()),
        format!("port=tcp://{tcp_addr}"),
        format!("web=http://{}/healthz", metrics.addresses["http"]),
        format!("db=sqlite:{}", sqlite.display()),
        format!("pg={}", pixmesh_test_support::postgres::server_url()),
        "script=cmd:true".to_string(),
    ];
    let mut role = "sidecar health --listen 127.0.0.1:0".to_string();
    for c in &checks {
        role.push_str(&format!(" --check {c}"));
    }
    let health = Role::start(&role, None, &["sidecar.health.interval_ms=100"], &[]).await.unwrap();
    let readyz = format!("http://{}/readyz", health.addresses["http"]);
    let wait = async |want: u16| -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (code, body) = get(&readyz).await;
            if code == want {
                return serde_json::from_str(&body).unwrap();
            }
            assert!(Instant::now() < deadline, "/readyz never answered {want}: {code} {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let ok = wait(200).await;
    let names: Vec<&str> = ok["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cache", "port", "web", "db", "pg", "script"]);
    assert!(ok["checks"].as_array().unwrap().iter().all(|c| c["ok"] == true), "{ok}");

    // Redis dies: not ready, and the answer names it and why; back when Redis is.
    redis.kill().await;
    let failing = wait(503).await;
    let cache = failing["checks"].as_array().unwrap().iter().find(|c| c["name"] == "cache").unwrap();
    assert_eq!(cache["ok"], false);
    assert!(cache["detail"].as_str().unwrap().contains("cannot connect"), "{cache}");
    assert_eq!(get(&format!("http://{}/healthz", health.addresses["http"])).await.0, 200, "alive: a restart does not mend Redis");
    redis.restart().await.unwrap();
    wait(200).await;
    drop(tcp);

    // A failing command and a bad check spec.
    let bad =
        Role::start("sidecar health --listen 127.0.0.1:0 --check cmd:false", None, &["sidecar.health.interval_ms=100"], &[]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = get(&format!("http://{}/readyz", bad.addresses["http"])).await;
        if code == 503 && body.contains("exit status: 1") {
            break;
        }
        assert!(Instant::now() < deadline, "{code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tokio::process::Command::new(pixmesh_bin()).args(["sidecar", "health", "--check", "ftp://x"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use tcp://, http://, redis://, postgres://, sqlite: or cmd:"));
    let out = tokio::process::Command::new(pixmesh_bin()).args(["sidecar", "health"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(64));
}
