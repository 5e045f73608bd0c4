//! Splitting and mirroring per route, in the real `pixmesh gateway` process: httpbin (a
//! third-party app from PyPI) is the legacy upstream, pixmesh's own status service the new one;
//! the mirror's shadow is a server of the test's own that answers late or never.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use pixmesh_test_support::{PythonApp, Role, System};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REQUIREMENTS: [&str; 2] = ["httpbin==0.10.4", "gunicorn==27.0.1"];
const KEY: &str = "split-key";

fn write_config(path: &std::path::Path, upstreams: &str, routes: &str) {
    let text = format!("[gateway]\nlisten = \"127.0.0.1:0\"\nrate = \"off\"\n[gateway.upstreams]\n{upstreams}\n{routes}");
    // Written whole and renamed: a reload never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Who answered `GET /api/openapi.json`: pixmesh's status service serves the document, httpbin
/// has no such page.
async fn who(client: &reqwest::Client, gateway: &str, path: &str) -> &'static str {
    let res = client.get(format!("{gateway}{path}")).header("x-api-key", KEY).send().await.unwrap();
    match res.status().as_u16() {
        200 => "new",
        404 => "legacy",
        other => panic!("{path}: unexpected {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_moves_a_route_from_the_legacy_app_to_pixmesh_by_reload() {
    let legacy = PythonApp::start("httpbin", &REQUIREMENTS, "httpbin:app").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 1, &[]).await.unwrap();
    let new = format!("http://{}", system.child("status").unwrap().addresses["http"]);
    let config = dir.path().join("gateway.toml");
    let upstreams = format!("legacy = {:?}\nnew = {new:?}", legacy.url);
    let routes = |weights: &str| {
        format!(
            "[[gateway.routes]]\nprefix = \"/api/openapi.json\"\nsplit = {{ {weights} }}\n\
             [[gateway.routes]]\nprefix = \"/sticky\"\nstrip_prefix = true\n\
             split = {{ legacy = 50, new = 50 }}\nsplit_by = \"client\"\n"
        )
    };
    write_config(&config, &upstreams, &routes("legacy = 90, new = 10"));
    let gateway = Role::start("gateway", Some(&config), &[], &[("PIXMESH_API_KEY", KEY)]).await.unwrap();
    let gw = format!("http://{}", gateway.addresses["http"]);
    let client = reqwest::Client::new();

    // 90 / 10: about a tenth reaches pixmesh.
    let mut to_new = 0;
    for _ in 0..400 {
        if who(&client, &gw, "/api/openapi.json").await == "new" {
            to_new += 1;
        }
    }
    assert!((16..=72).contains(&to_new), "about 40 of 400 to the new service: {to_new}");

    // The migration goes on by reload: 0 / 100, and the legacy app gets nothing more.
    write_config(&config, &upstreams, &routes("legacy = 0, new = 100"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut in_a_row = 0;
    while in_a_row < 50 {
        assert!(Instant::now() < deadline, "the reload never moved the route");
        in_a_row = if who(&client, &gw, "/api/openapi.json").await == "new" { in_a_row + 1 } else { 0 };
    }
    for _ in 0..100 {
        assert_eq!(who(&client, &gw, "/api/openapi.json").await, "new");
    }

    // By client: one key always lands on the same side.
    let first = who(&client, &gw, "/sticky/api/openapi.json").await;
    for _ in 0..30 {
        assert_eq!(who(&client, &gw, "/sticky/api/openapi.json").await, first, "the same key, the same upstream");
    }
    let metrics = client.get(format!("http://{}/metrics", gateway.addresses["admin"])).send().await.unwrap().text().await.unwrap();
    let split_to_new = metrics.lines().any(|l| {
        l.starts_with("pixmesh_gateway_split_requests_total{")
            && l.contains("http_route=\"/api/openapi.json\"")
            && l.contains("upstream=\"new\"")
    });
    assert!(split_to_new, "{metrics}");

    // Bad splits are refused at start with the reason.
    for (bad, why) in [
        ("[[gateway.routes]]\nprefix = \"/x\"\n", "needs an upstream (or a split)"),
        ("[[gateway.routes]]\nprefix = \"/x\"\nupstream = \"legacy\"\nsplit = { new = 1 }\n", "both upstream and split"),
        ("[[gateway.routes]]\nprefix = \"/x\"\nsplit = { nope = 1 }\n", "unknown upstream \"nope\""),
        ("[[gateway.routes]]\nprefix = \"/x\"\nsplit = { legacy = 0 }\n", "no weight above 0"),
        (
            "[[gateway.routes]]\nprefix = \"/x\"\nupstream = \"legacy\"\nmirror = { upstream = \"new\", percent = 120 }\n",
            "between 0 and 100",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        write_config(&path, &upstreams, bad);
        let out = tokio::process::Command::new(pixmesh_test_support::pixmesh_bin())
            .arg("--config")
            .arg(&path)
            .arg("gateway")
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{bad}: {}", String::from_utf8_lossy(&out.stderr));
    }
    system.stop().await.unwrap();
}

/// What the shadow received: method, path, the shadow header, the body.
type Seen = Arc<Mutex<Vec<(String, String, bool, Bytes)>>>;

/// A shadow upstream that records each request, then answers after `delay` (or never).
async fn shadow(delay: Option<Duration>) -> (SocketAddr, Seen, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let recorded = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let recorded = Arc::clone(&recorded);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let shadowed = parts.headers.get("x-pixmesh-shadow").is_some_and(|v| v == "true");
                        recorded.lock().unwrap().push((parts.method.to_string(), parts.uri.to_string(), shadowed, body));
                        match delay {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending::<()>().await,
                        }
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(b"shadow"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), service).await;
            });
        }
    });
    (addr, seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_copies_requests_to_a_shadow_that_never_answers_and_the_client_never_waits() {
    let legacy = PythonApp::start("httpbin", &REQUIREMENTS, "httpbin:app").await.unwrap();
    let (shadow_addr, seen, shadow_task) = shadow(None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    write_config(
        &config,
        &format!("legacy = {:?}\nshadow = \"http://{shadow_addr}\"", legacy.url),
        "[[gateway.routes]]\nprefix = \"/legacy\"\nupstream = \"legacy\"\nstrip_prefix = true\nmax_body_bytes = 1048576\n\
         mirror = { upstream = \"shadow\", percent = 100, max_body_bytes = 65536, max_in_flight = 4, timeout_ms = 6000 }\n",
    );
    let gateway = Role::start("gateway", Some(&config), &[], &[("PIXMESH_API_KEY", KEY)]).await.unwrap();
    let gw = format!("http://{}/legacy", gateway.addresses["http"]);
    let admin = format!("http://{}/metrics", gateway.addresses["admin"]);
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>| client.post(format!("{gw}/post?x=1")).header("x-api-key", KEY).body(body).send();
    let mirrored = |outcome: &'static str| {
        let (client, admin) = (client.clone(), admin.clone());
        async move { mirror_count(&client.get(admin).send().await.unwrap().text().await.unwrap(), outcome) }
    };
    // The copies travel on tasks of their own: they reach the shadow in their own time and
    // order, so the test waits (bounded) for what it expects rather than for a fixed time.
    let seen_reaches = |n: usize| {
        let seen = Arc::clone(&seen);
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.lock().unwrap().len() < n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Ten POSTs while the shadow never answers: each answered by httpbin at once, its body
    // whole; four copies are outstanding at most (the first four, which hold their places for
    // the mirror's 6 s timeout), the rest skipped.
    for i in 0..10u8 {
        let body = vec![b'a' + i; 1000];
        let started = Instant::now();
        let res = post(body.clone()).await.unwrap();
        assert_eq!(res.status(), 200);
        let echoed: Value = res.json().await.unwrap();
        assert_eq!(echoed["data"].as_str().unwrap().as_bytes(), &body[..], "the primary gets the whole body");
        assert!(started.elapsed() < Duration::from_secs(2), "the client never waits for the shadow: {:?}", started.elapsed());
    }
    seen_reaches(4).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4, "max_in_flight copies, the rest skipped");
        let mut bodies: Vec<Vec<u8>> = seen.iter().map(|(_, _, _, body)| body.to_vec()).collect();
        bodies.sort();
        for (i, (method, uri, shadowed, _)) in seen.iter().enumerate() {
            assert_eq!((method.as_str(), uri.as_str(), *shadowed), ("POST", "/post?x=1", true));
            assert_eq!(bodies[i], vec![b'a' + i as u8; 1000], "the copies have the client's bodies");
        }
    }
    assert!(mirrored("skipped").await >= 6.0, "six over max_in_flight");

    // After their timeout the copies give their places back; a body over the mirror's limit
    // reaches the primary whole and is not copied.
    let deadline = Instant::now() + Duration::from_secs(15);
    while mirrored("failed").await < 4.0 {
        assert!(Instant::now() < deadline, "the four copies never timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let big = vec![b'z'; 100_000];
    let res = post(big.clone()).await.unwrap();
    let echoed: Value = res.json().await.unwrap();
    assert_eq!(echoed["data"].as_str().unwrap().len(), big.len());
    let res = post(b"small".to_vec()).await.unwrap();
    assert_eq!(res.status(), 200);
    seen_reaches(5).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 5, "the big body was not mirrored, the small one was");
        assert_eq!(&seen[4].3[..], b"small");
    }
    assert!(mirrored("skipped").await >= 7.0, "six over max_in_flight and the big body");

    // The shadow gone: the client does not notice.
    shadow_task.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(client.get(format!("{gw}/get")).header("x-api-key", KEY).send().await.unwrap().status(), 200);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Five GETs found the shadow gone (refused, or ejected after failures): none answered.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mirrored("failed").await + mirrored("skipped").await < 4.0 + 7.0 + 5.0 {
        assert!(Instant::now() < deadline, "the copies of the five GETs never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(mirrored("answered").await, 0.0);
}

/// A `pixmesh_gateway_mirror_requests_total` count from a `/metrics` text, by outcome.
fn mirror_count(metrics: &str, outcome: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with("pixmesh_gateway_mirror_requests_total") && l.contains(&format!("outcome=\"{outcome}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}
