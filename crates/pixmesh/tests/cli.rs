//! The command line: subcommands exist, and bad configuration fails fast with exit status 64
//! and a message that names the problem, before any port is bound.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::process::Command;

fn pixmesh(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pixmesh")).args(args).env_remove("RUST_LOG").output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn help_lists_every_role() {
    let (code, text) = pixmesh(&["--help"]);
    assert_eq!(code, 0);
    for role in ["up", "gateway", "upload", "status", "distributor", "worker", "registry"] {
        assert!(text.contains(role), "{role} missing from:\n{text}");
    }
}

#[test]
fn bad_configuration_exits_64_before_binding() {
    let check = |args: &[&str], needle: &str| {
        let (code, text) = pixmesh(args);
        assert_eq!(code, 64, "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: expected {needle:?} in {text}");
    };
    check(&["--set", "worker.threadz=2", "worker"], "threadz");
    check(&["--set", "registry.missed_heartbeats=0", "registry"], "missed_heartbeats");
    check(&["--set", "nonsense", "upload"], "key=value");
    check(
        &["--set", "distributor.retry_budget_percent=5000", "--set", "distributor.workers=[\"127.0.0.1:1\"]", "distributor"],
        "retry_budget_percent",
    );
    check(
        &["--set", "distributor.breaker.failure_rate_percent=0", "--set", "distributor.workers=[\"127.0.0.1:1\"]", "distributor"],
        "rate thresholds",
    );
    check(&["--set", "distributor.breaker.windw_ms=5", "distributor"], "windw_ms");
    check(&["--set", "worker.deregister_grace_ms=600000", "worker"], "deregister_grace_ms");
    check(&["--config", "/nonexistent/pixmesh.toml", "status"], "cannot read config file");
    // The brokers' URLs: a registry flag that is not NATS is refused, not ignored; so are bad
    // queue URLs and a worker that would register an address no one can call.
    check(&["--registry", "http://127.0.0.1:7000", "up"], "--registry");
    check(&["--registry", "nats://127.0.0.1", "worker"], "no port");
    check(&["--queue", "redis://127.0.0.1:6379", "distributor"], "queue.url");
    check(&["--blobs", "s3://Not_A_Bucket", "upload"], "store.blobs");
    check(&["--blobs", "s3://bucket?endpoint=127.0.0.1:9000", "status"], "endpoint=http://HOST:PORT");
    check(&["--blobs", "gs://bucket", "up"], "use file:DIR or s3://");
    check(&["--queue", "nats://127.0.0.1:4222/a.b", "upload"], "namespace");
    check(&["--set", "worker.listen=0.0.0.0:0", "--set", "worker.registry=127.0.0.1:7000", "worker"], "worker.advertise");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[gateway]\nlisten = \"127.0.0.1:1\"\n[gatewy]\n").unwrap();
    check(&["--config", file.to_str().unwrap(), "gateway"], "gatewy");
}

#[test]
fn an_unreachable_broker_is_refused_before_binding_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("store.data_dir=\"{}\"", dir.path().display());
    // Port 1: nothing listens there.
    let (code, text) =
        pixmesh(&["--set", &data, "--queue", "nats://127.0.0.1:1", "--set", "distributor.workers=[\"127.0.0.1:2\"]", "distributor"]);
    assert_ne!(code, 0);
    assert!(text.contains("queue.url") && text.contains("nats-server"), "{text}");
    assert!(!text.contains("\"listening\""), "nothing was bound: {text}");
    let (code, text) = pixmesh(&["--registry", "nats://127.0.0.1:1", "worker"]);
    assert_ne!(code, 0);
    assert!(text.contains("worker.registry"), "{text}");
    assert!(!text.contains("\"listening\""), "nothing was bound: {text}");
}

#[test]
fn the_distributor_refuses_to_start_without_workers_to_find() {
    let dir = tempfile::tempdir().unwrap();
    let data = format!("store.data_dir=\"{}\"", dir.path().display());
    let (code, text) = pixmesh(&["--set", &data, "distributor"]);
    assert_ne!(code, 0);
    assert!(text.contains("distributor.registry"), "{text}");
}

#[test]
fn a_blob_store_without_credentials_or_with_wrong_ones_is_refused_before_binding() {
    let server = pixmesh_test_support::s3::S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let data = format!("store.data_dir=\"{}\"", dir.path().display());
    let blobs = server.url("cli");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixmesh"));
        cmd.args(["--set", &data, "--blobs", &blobs, "upload"]).env_remove("RUST_LOG");
        for var in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE"] {
            cmd.env_remove(var);
        }
        let out = cmd.envs(env.iter().copied()).output().unwrap();
        (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let (code, text) = run(&[]);
    assert_ne!(code, 0);
    assert!(text.contains("store.blobs") && text.contains("no S3 credentials: set AWS_ACCESS_KEY_ID"), "{text}");
    assert!(!text.contains("\"listening\""), "nothing was bound: {text}");
    let (code, text) = run(&[("AWS_ACCESS_KEY_ID", server.access_key()), ("AWS_SECRET_ACCESS_KEY", "wrong")]);
    assert_ne!(code, 0);
    assert!(text.contains("store.blobs") && text.contains("SignatureDoesNotMatch"), "{text}");
    assert!(!text.contains("\"listening\""), "nothing was bound: {text}");
}
