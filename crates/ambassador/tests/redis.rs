//! The Redis ambassador against three real `redis-server` processes: routing, pipelines, split
//! and refused commands, bad clients, and shards that die, freeze and come back.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_ambassador::redis::ketama::{self, Ring};
use pixmesh_ambassador::redis::{RedisConfig, run};
use pixmesh_chassis::Shutdown;
use pixmesh_test_support::redis::{RedisServer, Reply, Resp, encode};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

struct Ambassador {
    addr: String,
    admin: String,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Ambassador {
    async fn start(shards: &[&RedisServer], tweak: impl FnOnce(&mut RedisConfig)) -> Ambassador {
        let amb = Ambassador::spawn(shards, tweak).await;
        // Ready once a shard is connected.
        let deadline = Instant::now() + Duration::from_secs(10);
        while amb.http("/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "the ambassador never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        amb
    }

    async fn spawn(shards: &[&RedisServer], tweak: impl FnOnce(&mut RedisConfig)) -> Ambassador {
        let mut config = RedisConfig { shards: shards.iter().map(|s| s.addr()).collect(), ..RedisConfig::default() };
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap().to_string(), admin.local_addr().unwrap().to_string());
        let shutdown = Shutdown::new();
        let task = tokio::spawn(run(config, listener, admin, shutdown.clone()));
        Ambassador { addr, admin: admin_addr, shutdown, task }
    }

    async fn client(&self) -> Resp {
        Resp::connect(&self.addr).await.unwrap()
    }

    async fn http(&self, path: &str) -> (u16, serde_json::Value) {
        let Ok(res) = reqwest::get(format!("http://{}{path}", self.admin)).await else { return (0, serde_json::Value::Null) };
        let code = res.status().as_u16();
        (code, res.json().await.unwrap_or_default())
    }

    async fn shard_state(&self, index: usize) -> String {
        self.http("/shards").await.1["shards"][index]["state"].as_str().unwrap_or_default().to_string()
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.unwrap().unwrap().unwrap();
    }
}

fn ring_of(shards: &[RedisServer]) -> Ring {
    let names: Vec<String> = shards.iter().map(|s| s.addr()).collect();
    Ring::new(names.iter().enumerate().map(|(i, n)| (i, n.as_str(), 1)))
}

fn shard_of(ring: &Ring, key: &str) -> usize {
    ring.shard(ketama::Hash::default().of(ketama::hashed_part(key.as_bytes(), Some((b'{', b'}'))))).unwrap()
}

fn ok() -> Reply {
    Reply::Status("OK".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_on_the_shard_the_ring_names_and_a_pipeline_keeps_its_order() {
    let shards = RedisServer::start_many(3).await.unwrap();
    let amb = Ambassador::start(&shards.iter().collect::<Vec<_>>(), |_| {}).await;
    let ring = ring_of(&shards);
    let mut c = amb.client().await;

    // 3,000 SETs in one write, then 3,000 GETs interleaved with INCRs, local commands and errors.
    let keys: Vec<String> = (0..3000).map(|i| format!("key:{i}")).collect();
    let sets: Vec<Vec<&str>> = keys.iter().map(|k| vec!["SET", k.as_str(), k.as_str()]).collect();
    c.send(&sets.iter().map(Vec::as_slice).collect::<Vec<_>>()).await.unwrap();
    for _ in &keys {
        assert_eq!(c.read().await.unwrap(), ok());
    }
    let mut pipeline: Vec<Vec<&str>> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        pipeline.push(vec!["GET", k.as_str()]);
        match i % 4 {
            0 => pipeline.push(vec!["INCR", "counter"]),
            1 => pipeline.push(vec!["PING"]),
            2 => pipeline.push(vec!["NOSUCHCOMMAND", k.as_str()]),
            _ => pipeline.push(vec!["ECHO", k.as_str()]),
        }
    }
    c.send(&pipeline.iter().map(Vec::as_slice).collect::<Vec<_>>()).await.unwrap();
    let mut counter = 0;
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(c.read().await.unwrap(), Reply::bulk(k), "reply {i} in order");
        let second = c.read().await.unwrap();
        match i % 4 {
            0 => {
                counter += 1;
                assert_eq!(second, Reply::Int(counter));
            }
            1 => assert_eq!(second, Reply::Status("PONG".into())),
            2 => assert_eq!(second.error_text(), "ERR unknown command 'nosuchcommand'"),
            _ => assert_eq!(second, Reply::bulk(k)),
        }
    }

    // Every key is on the shard the ring names, and only there; every shard has its share.
    let mut per_shard = [0usize; 3];
    let mut direct = Vec::new();
    for s in &shards {
        direct.push(s.client().await.unwrap());
    }
    for k in &keys {
        let home = shard_of(&ring, k);
        per_shard[home] += 1;
        for (i, d) in direct.iter_mut().enumerate() {
            let found = d.cmd(&["EXISTS", k]).await.unwrap();
            assert_eq!(found, Reply::Int(i64::from(i == home)), "{k} on shard {i}");
        }
    }
    assert!(per_shard.iter().all(|&n| n > 600), "{per_shard:?}");

    // The same commands, a byte at a time: whole commands only are routed.
    let mut slow = amb.client().await;
    let bytes = [encode(&["SET", "slow", "v"]), encode(&["GET", "slow"])].concat();
    for b in &bytes {
        slow.send_raw(std::slice::from_ref(b)).await.unwrap();
    }
    assert_eq!(slow.read().await.unwrap(), ok());
    assert_eq!(slow.read().await.unwrap(), Reply::bulk("v"));
    // Inline commands, as telnet sends them.
    slow.send_raw(b"SET inline value\r\nGET inline\r\n").await.unwrap();
    assert_eq!(slow.read().await.unwrap(), ok());
    assert_eq!(slow.read().await.unwrap(), Reply::bulk("value"));
    amb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_key_commands_are_split_merged_or_refused_with_a_reason() {
    let shards = RedisServer::start_many(3).await.unwrap();
    let amb = Ambassador::start(&shards.iter().collect::<Vec<_>>(), |_| {}).await;
    let ring = ring_of(&shards);
    let mut c = amb.client().await;
    // Keys on every shard.
    let keys: Vec<String> = (0..40).map(|i| format!("m:{i}")).collect();
    assert!((0..3).all(|s| keys.iter().any(|k| shard_of(&ring, k) == s)), "the keys cover the shards");
    let mut mset = vec!["MSET"];
    for k in &keys {
        mset.extend([k.as_str(), k.as_str()]);
    }
    assert_eq!(c.cmd(&mset).await.unwrap(), ok());
    let mut mget = vec!["MGET", "missing"];
    mget.extend(keys.iter().map(String::as_str));
    mget.push(keys[0].as_str());
    let Reply::Array(Some(values)) = c.cmd(&mget).await.unwrap() else { panic!("MGET is an array") };
    assert_eq!(values.len(), keys.len() + 2);
    assert_eq!(values[0], Reply::Bulk(None));
    for (k, v) in keys.iter().zip(&values[1..]) {
        assert_eq!(*v, Reply::bulk(k), "MGET keeps the keys' order");
    }
    assert_eq!(values[keys.len() + 1], Reply::bulk(&keys[0]));
    let mut exists = vec!["EXISTS"];
    exists.extend(keys.iter().map(String::as_str));
    exists.extend(["nope", keys[1].as_str()]);
    assert_eq!(c.cmd(&exists).await.unwrap(), Reply::Int(41), "EXISTS counts a repeated key twice, as Redis does");
    let mut del = vec!["DEL"];
    del.extend(keys[..6].iter().map(String::as_str));
    del.push("nope");
    assert_eq!(c.cmd(&del).await.unwrap(), Reply::Int(6));
    assert_eq!(c.cmd(&["UNLINK", &keys[6], &keys[7]]).await.unwrap(), Reply::Int(2));

    // Keys with one hash tag live on one shard: RENAME, SUNIONSTORE, EVAL work on them.
    assert_eq!(c.cmd(&["SET", "{user7}:a", "1"]).await.unwrap(), ok());
    assert_eq!(c.cmd(&["RENAME", "{user7}:a", "{user7}:b"]).await.unwrap(), ok());
    assert_eq!(c.cmd(&["GET", "{user7}:b"]).await.unwrap(), Reply::bulk("1"));
    assert_eq!(c.cmd(&["SADD", "{s}1", "a", "b"]).await.unwrap(), Reply::Int(2));
    assert_eq!(c.cmd(&["SADD", "{s}2", "c"]).await.unwrap(), Reply::Int(1));
    assert_eq!(c.cmd(&["SUNIONSTORE", "{s}3", "{s}1", "{s}2"]).await.unwrap(), Reply::Int(3));
    let script = "return redis.call('GET', KEYS[1]) .. ARGV[1]";
    assert_eq!(c.cmd(&["EVAL", script, "1", "{user7}:b", "!"]).await.unwrap(), Reply::bulk("1!"));

    // Keys on different shards: refused, with the way out.
    let (a, b) = {
        let a = &keys[0];
        let b = keys.iter().find(|k| shard_of(&ring, k) != shard_of(&ring, a)).unwrap();
        (a.clone(), b.clone())
    };
    let refused = c.cmd(&["RENAME", &a, &b]).await.unwrap();
    assert!(refused.error_text().contains("are on different shards; give them one hash tag"), "{refused:?}");
    let refused = c.cmd(&["EVAL", "return 1", "0"]).await.unwrap();
    assert!(refused.error_text().contains("cannot route 'eval': it has no key to route by"), "{refused:?}");
    for (cmd, why) in [
        (&["KEYS", "*"][..], "it has no key to route by"),
        (&["MULTI"], "it needs a connection of its own"),
        (&["BLPOP", "q", "0"], "it needs a connection of its own"),
    ] {
        let r = c.cmd(cmd).await.unwrap();
        assert!(r.error_text().contains(why), "{cmd:?}: {r:?}");
    }
    assert_eq!(c.cmd(&["GET"]).await.unwrap().error_text(), "ERR wrong number of arguments for 'get' command");
    assert_eq!(c.cmd(&["MSET", "a"]).await.unwrap().error_text(), "ERR wrong number of arguments for 'mset' command");
    assert_eq!(c.cmd(&["SELECT", "0"]).await.unwrap(), ok());
    assert!(c.cmd(&["SELECT", "1"]).await.unwrap().is_error());
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "app"]).await.unwrap(), ok());
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]).await.unwrap(), Reply::bulk("app"));
    // A RESP3 client's HELLO is unknown, so it stays on RESP2.
    assert!(c.cmd(&["HELLO", "3"]).await.unwrap().error_text().starts_with("ERR unknown command"));
    // A shard's own error comes back as it is.
    assert_eq!(c.cmd(&["SET", "str", "x"]).await.unwrap(), ok());
    assert!(c.cmd(&["LPUSH", "str", "x"]).await.unwrap().error_text().starts_with("WRONGTYPE"));
    assert_eq!(c.cmd(&["QUIT"]).await.unwrap(), ok());
    assert!(c.closed().await, "QUIT closes the connection");
    amb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_an_error_and_nobody_else_notices() {
    let shards = RedisServer::start_many(3).await.unwrap();
    let amb = Ambassador::start(&shards.iter().collect::<Vec<_>>(), |c| {
        c.max_command_bytes = 4096;
        c.max_clients = 4;
    })
    .await;
    let mut good = amb.client().await;
    assert_eq!(good.cmd(&["SET", "k", "v"]).await.unwrap(), ok());
    // A whole command, then garbage: the command is answered, then the error, then the close.
    for garbage in [&b"*1\r\n:1\r\n"[..], b"*x\r\n", b"*1\r\n$3\r\nGETxx", b"*1\r\n$999999\r\n"] {
        let mut bad = amb.client().await;
        let mut bytes = encode(&["GET", "k"]);
        bytes.extend_from_slice(garbage);
        bad.send_raw(&bytes).await.unwrap();
        assert_eq!(bad.read().await.unwrap(), Reply::bulk("v"));
        let error = bad.read().await.unwrap();
        assert!(error.error_text().starts_with("ERR Protocol error"), "{garbage:?}: {error:?}");
        assert!(bad.closed().await, "{garbage:?}");
    }
    // A client that leaves in the middle of its pipeline.
    {
        let mut leaving = amb.client().await;
        let many: Vec<Vec<&str>> = (0..2000).map(|_| vec!["INCR", "left"]).collect();
        leaving.send(&many.iter().map(Vec::as_slice).collect::<Vec<_>>()).await.unwrap();
    }
    // More clients than allowed: the extra one is told why.
    // (The leaving client's session may still be counted for a moment: at most 3 more fit.)
    let mut held = Vec::new();
    let refusal = loop {
        let mut c = amb.client().await;
        let reply = c.cmd(&["PING"]).await.unwrap();
        if reply != Reply::Status("PONG".into()) {
            break reply;
        }
        held.push(c);
        assert!(held.len() <= 3, "max_clients = 4 lets in 3 more than the good client");
    };
    assert_eq!(refusal.error_text(), "ERR max number of clients reached");
    drop(held);
    assert_eq!(good.cmd(&["GET", "k"]).await.unwrap(), Reply::bulk("v"), "the good client never noticed");
    amb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_fails_only_its_keys_and_comes_back_without_ejection() {
    let mut shards = RedisServer::start_many(3).await.unwrap();
    let amb = Ambassador::start(&shards.iter().collect::<Vec<_>>(), |c| c.eject_after = 0).await;
    let ring = ring_of(&shards);
    let keys: Vec<String> = (0..300).map(|i| format!("d:{i}")).collect();
    let mut c = amb.client().await;
    shards[1].kill().await;
    for k in &keys {
        let r = c.cmd(&["SET", k, "v"]).await.unwrap();
        if shard_of(&ring, k) == 1 {
            let text = r.error_text();
            assert!(text.starts_with(&format!("ERR pixmesh ambassador: shard {}", shards[1].addr())), "{text}");
        } else {
            assert_eq!(r, ok(), "{k}: the other shards' keys are untouched");
        }
    }
    assert_eq!(amb.shard_state(1).await, "down");
    shards[1].restart().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let back = keys.iter().find(|k| shard_of(&ring, k) == 1).unwrap();
    while c.cmd(&["SET", back, "v"]).await.unwrap() != ok() {
        assert!(Instant::now() < deadline, "the shard never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(amb.shard_state(1).await, "up");
    amb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shard_is_ejected_its_keys_move_and_it_rejoins_after_the_backoff() {
    let mut shards = RedisServer::start_many(3).await.unwrap();
    let amb = Ambassador::start(&shards.iter().collect::<Vec<_>>(), |c| {
        c.eject_after = 2;
        c.retry_after_ms = 1500;
        c.timeout_ms = 300;
    })
    .await;
    let ring = ring_of(&shards);
    let keys: Vec<String> = (0..300).map(|i| format!("e:{i}")).collect();
    let on_one: Vec<&String> = keys.iter().filter(|k| shard_of(&ring, k) == 1).collect();
    let mut c = amb.client().await;

    // Frozen: no answer within timeout_ms fails the batch, and two failures eject it.
    shards[1].pause();
    let started = Instant::now();
    let r = c.cmd(&["SET", on_one[0], "v"]).await.unwrap();
    assert!(r.error_text().contains("no reply within"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "a frozen shard costs its timeout: {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(10);
    while amb.shard_state(1).await != "ejected" {
        let _ = c.cmd(&["SET", on_one[1], "v"]).await.unwrap();
        assert!(Instant::now() < deadline, "the shard was never ejected");
    }
    // Its keys now live on the others, and every command succeeds.
    for k in &keys {
        assert_eq!(c.cmd(&["SET", k, "moved"]).await.unwrap(), ok(), "{k}");
    }
    let (mut zero, mut two) = (shards[0].client().await.unwrap(), shards[2].client().await.unwrap());
    for k in &on_one {
        let found = [zero.cmd(&["GET", k]).await.unwrap(), two.cmd(&["GET", k]).await.unwrap()];
        assert!(found.contains(&Reply::bulk("moved")), "{k} went to another shard: {found:?}");
    }
    shards[1].resume();
    // Back after retry_after_ms, once it answers: its keys are its own again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while amb.shard_state(1).await != "up" {
        assert!(Instant::now() < deadline, "the shard never rejoined: {:?}", amb.http("/shards").await.1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.cmd(&["SET", on_one[0], "home"]).await.unwrap(), ok());
    let mut home = shards[1].client().await.unwrap();
    assert_eq!(home.cmd(&["GET", on_one[0]]).await.unwrap(), Reply::bulk("home"));
    shards[1].kill().await;
    amb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_dies_while_idle_is_found_and_ejected_without_traffic() {
    let mut shards = RedisServer::start_many(3).await.unwrap();
    let amb = Ambassador::start(&shards.iter().collect::<Vec<_>>(), |c| {
        c.eject_after = 2;
        c.retry_after_ms = 60_000;
    })
    .await;
    assert_eq!(amb.shard_state(2).await, "up");
    shards[2].kill().await;
    // No client sends anything: the connection's own PINGs find it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while amb.shard_state(2).await != "ejected" {
        assert!(Instant::now() < deadline, "never found: {}", amb.http("/shards").await.1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its keys are served by the others at once.
    let mut c = amb.client().await;
    for i in 0..100 {
        assert_eq!(c.cmd(&["SET", &format!("idle:{i}"), "v"]).await.unwrap(), ok());
    }
    amb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_authenticate_and_shards_are_authenticated() {
    let shard = RedisServer::start_with_password(Some("shard-secret")).await.unwrap();
    let amb = Ambassador::start(&[&shard], |c| {
        c.password = "client-secret".into();
        c.shard_password = "shard-secret".into();
    })
    .await;
    let mut c = amb.client().await;
    assert_eq!(c.cmd(&["GET", "k"]).await.unwrap().error_text(), "NOAUTH Authentication required.");
    assert!(c.cmd(&["AUTH", "wrong"]).await.unwrap().error_text().starts_with("WRONGPASS"));
    assert_eq!(c.cmd(&["AUTH", "default", "client-secret"]).await.unwrap(), ok());
    assert_eq!(c.cmd(&["SET", "k", "v"]).await.unwrap(), ok());
    amb.stop().await;

    // A wrong shard password: the shard is down, with the shard's own answer as the reason.
    let amb = Ambassador::spawn(&[&shard], |c| {
        c.shard_password = "wrong".into();
        c.eject_after = 0;
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, shards) = amb.http("/shards").await;
        if let Some(error) = shards["shards"][0]["last_error"].as_str() {
            assert!(error.contains("WRONGPASS"), "{error}");
            break;
        }
        assert!(Instant::now() < deadline, "no error recorded: {shards}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(amb.http("/readyz").await.0, 503, "not ready: no shard accepts it");
    let mut c = amb.client().await;
    let r = c.cmd(&["GET", "k"]).await.unwrap();
    assert!(r.error_text().contains("unavailable: answered -WRONGPASS"), "{r:?}");
    amb.stop().await;
}
