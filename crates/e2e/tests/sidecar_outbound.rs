//! `pixmesh sidecar outbound`, the ambassador an application calls on localhost for its remote
//! services: balancing over instances from a static list or pixmesh's registry, retries of
//! what is safe to retry (and of nothing else), breakers, deadlines, and mTLS to a remote
//! `pixmesh sidecar inbound`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_chassis::tls::DevCa;
use pixmesh_test_support::Role;
use pixmesh_test_support::echo::{Behaviour, Seen, echo};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

async fn instance(name: &'static str, behaviour: Behaviour) -> (SocketAddr, Seen) {
    echo(name, behaviour).await.unwrap()
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// An address whose connections are refused: a socket bound and never listening holds the
/// port (a port merely freed could be handed to the next process that binds port 0, such as
/// the sidecar itself).
fn dead_port() -> (SocketAddr, tokio::net::TcpSocket) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balances_retries_what_is_safe_and_holds_the_deadline() {
    let (a, seen_a) = instance("a", Behaviour::Answer).await;
    let (b, seen_b) = instance("b", Behaviour::Answer).await;
    let (c, seen_c) = instance("c", Behaviour::Unavailable).await;
    let (slow, _) = instance("slow", Behaviour::Sleep(Duration::from_secs(5))).await;
    let (dead, _held) = dead_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pixmesh.toml");
    write(
        &config,
        &format!(
            "[[sidecar.outbound.services]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\ninstances = [\"{a}\", \"{b}\", \"{dead}\"]\n\
             retry_budget_per_second = 1000\n\
             [[sidecar.outbound.services]]\nname = \"flaky\"\nlisten = \"127.0.0.1:0\"\ninstances = [\"{a}\", \"{c}\"]\n\
             retry_budget_per_second = 1000\nbreaker = {{ consecutive_failures = 0, min_calls = 1000 }}\n\
             [[sidecar.outbound.services]]\nname = \"slow\"\nlisten = \"127.0.0.1:0\"\ninstances = [\"{slow}\"]\ntimeout_ms = 500\n"
        ),
    );
    let sidecar = Role::start("sidecar outbound", Some(&config), &[], &[]).await.unwrap();
    let [api, flaky, slow_service] = ["api", "flaky", "slow"].map(|s| format!("http://{}", sidecar.addresses[s]));
    let admin = sidecar.addresses["admin"].clone();
    let client = reqwest::Client::new();

    // Every GET answered though one instance refuses connections: a GET that met it is retried
    // elsewhere, and its breaker opens; the two live ones share the load. (Bursts of 40 at
    // once: one by one, the two choices would mostly pass over an instance never heard from.)
    for burst in 0..5 {
        let gets = (0..40).map(|i| {
            let client = client.clone();
            let url = format!("{api}/items/{burst}-{i}");
            async move { client.get(url).send().await.unwrap() }
        });
        for res in futures_util::future::join_all(gets).await {
            assert_eq!(res.status(), 200);
            let body: Value = res.json().await.unwrap();
            assert!(body["headers"].get("host").is_some(), "{body}");
        }
    }
    let (on_a, on_b) = (seen_a.lock().unwrap().len(), seen_b.lock().unwrap().len());
    assert_eq!(on_a + on_b, 200, "each GET reached one live instance once");
    assert!(on_a >= 40 && on_b >= 40, "shared: a {on_a}, b {on_b}");
    let services: Value = reqwest::get(format!("http://{admin}/services")).await.unwrap().json().await.unwrap();
    let api_instances = &services["services"][0]["instances"];
    let dead_state = api_instances.as_array().unwrap().iter().find(|i| i["address"] == dead.to_string()).unwrap();
    assert_ne!(dead_state["breaker"], "closed", "{services}");
    // A POST body reaches the instance whole (a body is kept for a retry when it is small).
    let res = client.put(format!("{api}/items/x")).body(vec![b'p'; 10_000]).send().await.unwrap();
    assert_eq!(res.status(), 200);

    // A 503 from one instance: a GET goes to the other; a POST is never sent twice.
    seen_a.lock().unwrap().clear();
    for i in 0..40 {
        assert_eq!(client.get(format!("{flaky}/g/{i}")).send().await.unwrap().status(), 200, "GET {i} retried on a");
    }
    let (mut unavailable, mut sent) = (0, 0);
    while unavailable == 0 && sent < 200 {
        let posts = (sent..sent + 40).map(|i| client.post(format!("{flaky}/p/{i}")).body("once").send());
        for res in futures_util::future::join_all(posts).await {
            match res.unwrap().status().as_u16() {
                200 => {}
                503 => unavailable += 1,
                other => panic!("POST: {other}"),
            }
        }
        sent += 40;
    }
    assert!(unavailable > 0, "some POSTs met c and got its answer");
    let mut posts: HashMap<String, usize> = HashMap::new();
    for line in seen_a.lock().unwrap().iter().chain(seen_c.lock().unwrap().iter()).filter(|l| l.starts_with("POST")) {
        *posts.entry(line.clone()).or_default() += 1;
    }
    assert_eq!(posts.len(), sent, "every POST reached one instance");
    assert!(posts.values().all(|n| *n == 1), "no POST was sent twice: {posts:?}");

    // The deadline: an instance that takes 5 s gets 504 at 500 ms.
    let started = Instant::now();
    let res = client.get(format!("{slow_service}/x")).send().await.unwrap();
    assert_eq!(res.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    let body: Value = res.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("slow"), "{body}");

    let metrics = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    let line = |name: &str, labels: &[&str]| {
        metrics.lines().find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x))).map(str::to_string)
    };
    assert!(line("pixmesh_sidecar_outbound_retries_total", &["service=\"api\""]).is_some(), "{metrics}");
    assert!(line("pixmesh_sidecar_outbound_breaker_transitions_total", &["service=\"api\"", "to=\"open\""]).is_some(), "{metrics}");
    let timeouts = line("pixmesh_sidecar_outbound_requests_total", &["service=\"slow\"", "outcome=\"timeout\""]);
    assert!(timeouts.is_some_and(|l| l.ends_with(" 1")), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_mtls_to_a_remote_inbound_sidecar_that_names_the_caller() {
    let (app, _) = instance("remote-app", Behaviour::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("mesh CA").unwrap();
    let server = ca.issue(&["localhost", "127.0.0.1"], true, false).unwrap();
    let client_cert = ca.issue(&["billing.internal"], false, true).unwrap();
    let path = |name: &str| dir.path().join(name);
    write(&path("ca.crt"), &ca.cert_pem());
    write(&path("server.crt"), &server.cert_pem);
    write(&path("server.key"), &server.key_pem);
    write(&path("client.crt"), &client_cert.cert_pem);
    write(&path("client.key"), &client_cert.key_pem);
    write(
        &path("remote.toml"),
        &format!(
            "[sidecar.inbound]\nlisten = \"127.0.0.1:0\"\napp = \"http://{app}\"\nrate = \"off\"\n\
             api_keys = [{{ name = \"billing\", tls_name = \"billing.internal\" }}]\n\
             [sidecar.inbound.tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nclient_auth = \"required\"\n",
            path("server.crt"),
            path("server.key"),
            path("ca.crt")
        ),
    );
    let remote = Role::start("sidecar inbound", Some(&path("remote.toml")), &[], &[]).await.unwrap();
    let remote_addr = remote.addresses["http"].clone();
    write(
        &path("local.toml"),
        &format!(
            "[sidecar.outbound.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [[sidecar.outbound.services]]\nname = \"remote\"\nlisten = \"127.0.0.1:0\"\ninstances = [\"{remote_addr}\"]\ntls = true\n\
             [[sidecar.outbound.services]]\nname = \"by-name\"\nlisten = \"127.0.0.1:0\"\ninstances = [\"{remote_addr}\"]\ntls = true\n\
             server_name = \"localhost\"\n\
             [[sidecar.outbound.services]]\nname = \"wrong-name\"\nlisten = \"127.0.0.1:0\"\ninstances = [\"{remote_addr}\"]\ntls = true\n\
             server_name = \"elsewhere.example\"\nretries = 0\n",
            path("ca.crt"),
            path("client.crt"),
            path("client.key")
        ),
    );
    let local = Role::start("sidecar outbound", Some(&path("local.toml")), &[], &[]).await.unwrap();
    let client = reqwest::Client::new();
    for service in ["remote", "by-name"] {
        let res = client.get(format!("http://{}/hello", local.addresses[service])).send().await.unwrap();
        assert_eq!(res.status(), 200, "{service}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["who"], "remote-app");
        assert_eq!(body["headers"]["x-pixmesh-client"], "billing", "the remote sidecar knew the caller by its certificate: {body}");
    }
    // A certificate that does not carry the name asked for: no session, a clear 503 at once.
    let started = Instant::now();
    let res = client.get(format!("http://{}/hello", local.addresses["wrong-name"])).send().await.unwrap();
    assert_eq!(res.status(), 503);
    assert!(started.elapsed() < Duration::from_secs(3), "not at the deadline: {:?}", started.elapsed());
    let body: Value = res.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("wrong-name"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_come_and_go_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Role::start("registry", None, &["registry.listen=\"127.0.0.1:0\""], &[]).await.unwrap();
    let registry_addr = registry.addresses["grpc"].clone();
    let (one, seen_one) = instance("one", Behaviour::Answer).await;
    let (two, seen_two) = instance("two", Behaviour::Answer).await;
    let register = |addr: SocketAddr, id: &str| {
        let instance = pixmesh_proto::v1::Instance {
            id: id.into(),
            service: "echo".into(),
            address: addr.to_string(),
            capacity: 16,
            ..Default::default()
        };
        pixmesh_registry::client::Registration::start(
            pixmesh_registry::client::channel(&registry_addr, &Default::default()).unwrap(),
            instance,
            Duration::from_millis(200),
        )
    };
    let first = register(one, "one");
    let second = register(two, "two");
    let config = dir.path().join("pixmesh.toml");
    write(&config, &format!("[[sidecar.outbound.services]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nregistry = \"{registry_addr}\"\n"));
    let sidecar = Role::start("sidecar outbound", Some(&config), &[], &[]).await.unwrap();
    let echo = format!("http://{}", sidecar.addresses["echo"]);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen_one.lock().unwrap().is_empty() || seen_two.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "both registered instances get requests");
        // Twenty at once: busy instances are what makes the two choices spread the load.
        let gets = (0..20).map(|_| client.get(format!("{echo}/x")).send());
        for res in futures_util::future::join_all(gets).await {
            assert_eq!(res.unwrap().status(), 200);
        }
    }
    // One deregisters: the requests go to the other only.
    first.deregister().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = seen_one.lock().unwrap().len();
    for _ in 0..50 {
        assert_eq!(client.get(format!("{echo}/y")).send().await.unwrap().status(), 200);
    }
    assert_eq!(seen_one.lock().unwrap().len(), before, "a deregistered instance gets nothing");
    second.deregister().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_watched_over_mtls_when_it_asks_for_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let ca = DevCa::new("registry CA").unwrap();
    let server = ca.issue(&["localhost", "127.0.0.1"], true, false).unwrap();
    let member = ca.issue(&["echo.internal"], false, true).unwrap();
    for (name, text) in [
        ("ca.crt", ca.cert_pem()),
        ("server.crt", server.cert_pem),
        ("server.key", server.key_pem),
        ("member.crt", member.cert_pem),
        ("member.key", member.key_pem),
    ] {
        write(&path(name), &text);
    }
    let setting = |key: &str, file: &str| format!("registry.tls.{key}={:?}", path(file).display().to_string());
    let sets = [
        "registry.listen=\"127.0.0.1:0\"".to_string(),
        setting("cert", "server.crt"),
        setting("key", "server.key"),
        setting("client_ca", "ca.crt"),
        "registry.tls.client_auth=\"required\"".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let registry = Role::start("registry", None, &sets, &[]).await.unwrap();
    let registry_addr = registry.addresses["grpc"].clone();
    let (one, seen) = instance("one", Behaviour::Answer).await;
    let client_tls =
        pixmesh_chassis::tls::ClientTlsConfig { ca: Some(path("ca.crt")), cert: Some(path("member.crt")), key: Some(path("member.key")) };
    let dialer = pixmesh_chassis::grpc::Dialer::new(&client_tls).unwrap();
    let instance = pixmesh_proto::v1::Instance {
        id: "one".into(),
        service: "echo".into(),
        address: one.to_string(),
        capacity: 16,
        ..Default::default()
    };
    let registration = pixmesh_registry::client::Registration::start(
        pixmesh_registry::client::channel(&registry_addr, &dialer).unwrap(),
        instance,
        Duration::from_millis(200),
    );
    // Two sidecars: one dials the registry over mTLS, one in plaintext.
    let tls =
        format!("[sidecar.outbound.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n", path("ca.crt"), path("member.crt"), path("member.key"));
    let service = format!("[[sidecar.outbound.services]]\nname = \"echo\"\nlisten = \"127.0.0.1:0\"\nregistry = \"{registry_addr}\"\n");
    write(&path("mtls.toml"), &format!("{tls}{service}registry_tls = true\n"));
    write(&path("plain.toml"), &format!("{tls}{service}"));
    let with_tls = Role::start("sidecar outbound", Some(&path("mtls.toml")), &[], &[]).await.unwrap();
    let without = Role::start("sidecar outbound", Some(&path("plain.toml")), &[], &[]).await.unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = client.get(format!("http://{}/x", with_tls.addresses["echo"])).send().await.unwrap();
        if res.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the instance registered over mTLS was never reached: {}", res.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!seen.lock().unwrap().is_empty());
    // The sidecar that dials in plaintext learns no instance: it is not ready and answers 503.
    let admin = without.addresses["admin"].clone();
    let ready = reqwest::get(format!("http://{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let res = client.get(format!("http://{}/x", without.addresses["echo"])).send().await.unwrap();
    assert_eq!(res.status(), 503);
    registration.deregister().await;
}
