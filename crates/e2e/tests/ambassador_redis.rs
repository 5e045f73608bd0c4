//! `pixmesh ambassador redis` as its own process, driven by the stock Redis tools: a
//! `redis-benchmark` pipeline, a `redis-cli --pipe` mass insert, twemproxy (`nutcracker`)
//! placing the same keys on the same shards, and `/metrics` clean for promtool.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_test_support::redis::{RedisServer, Reply, Resp};
use pixmesh_test_support::{Role, pixmesh_bin, promtool};
use std::process::Stdio;
use std::time::{Duration, Instant};

fn shard_list(shards: &[RedisServer]) -> String {
    shards.iter().map(RedisServer::addr).collect::<Vec<_>>().join(",")
}

async fn ambassador(shards: &[RedisServer], sets: &[&str]) -> (Role, u16) {
    let role = format!("ambassador redis --listen 127.0.0.1:0 --shards {}", shard_list(shards));
    let amb = Role::start(&role, None, sets, &[]).await.unwrap();
    let port = amb.addresses["redis"].rsplit(':').next().unwrap().parse().unwrap();
    // Ready once its shards are connected.
    let ready = format!("http://{}/readyz", amb.addresses["admin"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while reqwest::get(&ready).await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (amb, port)
}

async fn dbsizes(shards: &[RedisServer]) -> Vec<i64> {
    let mut out = Vec::new();
    for s in shards {
        let Reply::Int(n) = s.client().await.unwrap().cmd(&["DBSIZE"]).await.unwrap() else { panic!("DBSIZE") };
        out.push(n);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_and_redis_cli_run_through_it_and_keys_spread_over_the_shards() {
    let shards = RedisServer::start_many(3).await.unwrap();
    let (amb, port) = ambassador(&shards, &[]).await;

    // A pipeline of 16 from 20 clients: every reply an answer, none an error.
    let bench = tokio::process::Command::new("redis-benchmark")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "set,get,incr,lpush,mset", "-n", "20000", "-r", "30000", "-P", "16"])
        .args(["-c", "20", "--csv"])
        .output()
        .await
        .expect("redis-benchmark (Debian's redis-tools)");
    let out = String::from_utf8_lossy(&bench.stdout);
    let err = String::from_utf8_lossy(&bench.stderr);
    assert!(bench.status.success(), "{out}{err}");
    for test in ["\"SET\"", "\"GET\"", "\"INCR\"", "\"LPUSH\"", "\"MSET (10 keys)\""] {
        let line = out.lines().find(|l| l.starts_with(test)).unwrap_or_else(|| panic!("no {test} in {out}"));
        let rps: f64 = line.split(',').nth(1).unwrap().trim_matches('"').parse().unwrap();
        assert!(rps > 0.0, "{line}");
    }
    assert!(!err.contains("ERR") && !out.contains("ERR"), "no command failed: {err}");
    let sizes = dbsizes(&shards).await;
    let total: i64 = sizes.iter().sum();
    assert!(sizes.iter().all(|&n| n as f64 > total as f64 * 0.2), "every shard holds its share: {sizes:?}");

    // A mass insert with `redis-cli --pipe` (it ends with an ECHO of a random marker).
    let mut commands = Vec::new();
    for i in 0..5000 {
        commands.extend_from_slice(&pixmesh_test_support::redis::encode(&["SET", &format!("pipe:{i}"), &i.to_string()]));
    }
    let mut cli = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut cli.stdin.take().unwrap(), &commands).await.unwrap();
    let done = cli.wait_with_output().await.unwrap();
    let report = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success() && report.contains("errors: 0, replies: 5000"), "{report}");
    let mget = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "MGET", "pipe:1", "pipe:4999", "pipe:none"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mget.stdout), "1\n4999\n\n");

    // Its metrics: clean for promtool, with a series per shard.
    let metrics = reqwest::get(format!("http://{}/metrics", amb.addresses["admin"])).await.unwrap().text().await.unwrap();
    if let Some(findings) = promtool(&metrics) {
        assert_eq!(findings, "", "promtool check metrics");
    }
    for s in &shards {
        let series = format!("pixmesh_ambassador_redis_commands_total{{role=\"ambassador\",shard=\"{}\"}}", s.addr());
        assert!(metrics.contains(&series), "{series} in {metrics}");
    }
    assert!(metrics.contains("# HELP pixmesh_ambassador_redis_client_connections"), "{metrics}");
}

/// The keys twemproxy places are found where the ambassador looks, for each hash both have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_places_keys_where_twemproxy_does() {
    let Some(nutcracker) = pixmesh_test_support::which("nutcracker") else {
        assert!(std::env::var_os("CI").is_none(), "CI needs nutcracker (.ci/run installs Debian's package)");
        eprintln!("skipped: needs twemproxy (Debian's nutcracker package)");
        return;
    };
    let shards = RedisServer::start_many(3).await.unwrap();
    for hash in ["fnv1a_32", "fnv1a_64", "md5"] {
        for s in &shards {
            s.client().await.unwrap().cmd(&["FLUSHALL"]).await.unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let stats = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let servers: String = shards.iter().map(|s| format!("    - {}:1\n", s.addr())).collect();
        let conf = format!(
            "pool:\n  listen: 127.0.0.1:{port}\n  hash: {hash}\n  hash_tag: \"{{}}\"\n  distribution: ketama\n  redis: true\n  servers:\n{servers}"
        );
        std::fs::write(dir.path().join("nutcracker.yml"), conf).unwrap();
        let _twemproxy = tokio::process::Command::new(&nutcracker)
            .arg("-c")
            .arg(dir.path().join("nutcracker.yml"))
            .args(["-s", &stats.to_string(), "-o"])
            .arg(dir.path().join("nutcracker.log"))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut via_twemproxy = loop {
            if let Ok(c) = Resp::connect(&format!("127.0.0.1:{port}")).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let keys: Vec<String> = (0..2000).map(|i| if i % 10 == 0 { format!("{{tag{i}}}:k") } else { format!("user:{i}:name") }).collect();
        let sets: Vec<Vec<&str>> = keys.iter().map(|k| vec!["SET", k.as_str(), k.as_str()]).collect();
        via_twemproxy.send(&sets.iter().map(Vec::as_slice).collect::<Vec<_>>()).await.unwrap();
        for _ in &keys {
            assert_eq!(via_twemproxy.read().await.unwrap(), Reply::Status("OK".into()));
        }
        let sizes = dbsizes(&shards).await;
        assert_eq!(sizes.iter().sum::<i64>(), 2000);

        let (_amb, amb_port) = ambassador(&shards, &[&format!("ambassador.redis.hash=\"{hash}\"")]).await;
        let mut via_ambassador = Resp::connect(&format!("127.0.0.1:{amb_port}")).await.unwrap();
        let gets: Vec<Vec<&str>> = keys.iter().map(|k| vec!["GET", k.as_str()]).collect();
        via_ambassador.send(&gets.iter().map(Vec::as_slice).collect::<Vec<_>>()).await.unwrap();
        for k in &keys {
            assert_eq!(via_ambassador.read().await.unwrap(), Reply::bulk(k), "{hash}: {k} is where twemproxy put it ({sizes:?})");
        }
        eprintln!("{hash}: 2,000 keys on the shards as {sizes:?}, found by both");
    }
}

#[tokio::test]
async fn a_bad_shard_list_stops_it_before_it_listens() {
    for (shards, why) in [("", "ambassador.redis.shards is empty"), ("a:1,a:1", "given twice"), ("host-without-port", "expected HOST:PORT")]
    {
        let out = tokio::process::Command::new(pixmesh_bin())
            .args(["ambassador", "redis", "--listen", "127.0.0.1:0"])
            .args((!shards.is_empty()).then_some(format!("--shards={shards}")))
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{shards}: {err}");
        assert!(err.contains(why), "{shards}: {err}");
    }
    let out = tokio::process::Command::new(pixmesh_bin())
        .args(["--set", "ambassador.redis.hash=\"murmur\"", "ambassador", "redis", "--shards", "a:1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("use fnv1a_32, fnv1a_64 or md5"));
}
