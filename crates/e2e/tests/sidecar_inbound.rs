//! `pixmesh sidecar inbound` in front of applications it does not own: httpbin (a third-party
//! app from PyPI) and small servers of the test's own. TLS with certificates from a development
//! CA, reloaded while serving; API keys and client certificates (mTLS); rate and body limits;
//! a split and a mirror in the sidecar.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_chassis::tls::{DevCa, Issued};
use pixmesh_test_support::echo::{Behaviour, Seen};
use pixmesh_test_support::{PythonApp, Role};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const REQUIREMENTS: [&str; 2] = ["httpbin==0.10.4", "gunicorn==27.0.1"];
const KEY: &str = "sidecar-key";

/// Writes `text` whole and renames it into place: a reload never reads half a file.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The server's certificate and key for 127.0.0.1, written in `dir`.
fn server_files(dir: &Path, ca: &DevCa) -> (PathBuf, PathBuf) {
    let issued = ca.issue(&["localhost", "127.0.0.1"], true, false).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    write(&cert, &issued.cert_pem);
    write(&key, &issued.key_pem);
    (cert, key)
}

/// A client trusting `ca` only, presenting `identity` if given. Each client has its own
/// connections, so a new one sees the certificate served now.
fn https_client(ca: &DevCa, identity: Option<&Issued>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some(issued) = identity {
        let pem = format!("{}{}", issued.cert_pem, issued.key_pem);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    builder.build().unwrap()
}

fn port_of(address: &str) -> u16 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

async fn metric(admin: &str, name: &str, label: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name) && l.contains(label)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_keys_and_limits_guard_an_unchanged_app_and_a_new_certificate_serves_without_a_restart() {
    let app = PythonApp::start("httpbin", &REQUIREMENTS, "httpbin:app").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("sidecar test CA").unwrap();
    let (cert, key) = server_files(dir.path(), &ca);
    let config = dir.path().join("pixmesh.toml");
    write(
        &config,
        &format!(
            "[sidecar.inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nrate = \"off\"\nmax_body_bytes = 4096\n\
             api_keys = [{{ name = \"metered\", sha256 = \"{}\", rate = \"2/m\", burst = 2 }}]\n\
             [sidecar.inbound.tls]\ncert = {cert:?}\nkey = {key:?}\n",
            app.url,
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"k-metered")),
        ),
    );
    let sidecar = Role::start("sidecar inbound", Some(&config), &[], &[("PIXMESH_API_KEY", KEY)]).await.unwrap();
    let port = port_of(&sidecar.addresses["http"]);
    let admin = sidecar.addresses["admin"].to_string();
    let base = format!("https://127.0.0.1:{port}");
    let client = https_client(&ca, None);

    // The app sees who called and the trace; never the key. (httpbin hides X-Request-Id from
    // what it echoes; the mTLS test checks it.)
    let res = client.get(format!("{base}/headers")).header("x-api-key", KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-request-id"));
    let seen: Value = res.json().await.unwrap();
    let headers = &seen["headers"];
    assert_eq!(headers["X-Pixmesh-Client"], "env", "{seen}");
    assert!(headers.get("X-Api-Key").is_none(), "the key stays with the sidecar: {seen}");
    assert!(headers.get("Traceparent").is_some(), "{seen}");
    // A caller's own x-pixmesh-client is not trusted.
    let res = client.get(format!("{base}/headers")).header("x-api-key", KEY).header("x-pixmesh-client", "admin").send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["headers"]["X-Pixmesh-Client"], "env");

    // No key, a wrong key, several keys: refused by the sidecar with a JSON reason.
    for (keys, status, reason) in
        [(vec![], 401, "missing X-API-KEY"), (vec!["nope"], 401, "unknown API key"), (vec![KEY, KEY], 400, "several X-API-KEY")]
    {
        let mut req = client.get(format!("{base}/anything"));
        for k in keys {
            req = req.header("x-api-key", k);
        }
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), status);
        let body: Value = res.json().await.unwrap();
        assert!(body["error"]["message"].as_str().unwrap().contains(reason), "{body}");
    }

    // Plain HTTP on the TLS port gets no answer from the app.
    let plain = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/get")).header("x-api-key", KEY).send().await;
    assert!(plain.is_err() || plain.unwrap().status() != 200);

    // Bodies: at the limit forwarded whole, over it 413 (by Content-Length and chunked alike).
    let res = client.post(format!("{base}/post")).header("x-api-key", KEY).body(vec![b'a'; 4096]).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["data"].as_str().unwrap().len(), 4096);
    let res = client.post(format!("{base}/post")).header("x-api-key", KEY).body(vec![b'a'; 4097]).send().await.unwrap();
    assert_eq!(res.status(), 413);
    let chunks = futures_util::stream::iter((0..5).map(|_| Ok::<_, std::io::Error>(vec![b'b'; 1000])));
    let res = client.post(format!("{base}/post")).header("x-api-key", KEY).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    assert_eq!(res.status(), 413);

    // Per caller: "metered" gets its burst of two, then 429 with Retry-After; "env" goes on.
    for _ in 0..2 {
        assert_eq!(client.get(format!("{base}/get")).header("x-api-key", "k-metered").send().await.unwrap().status(), 200);
    }
    let res = client.get(format!("{base}/get")).header("x-api-key", "k-metered").send().await.unwrap();
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(client.get(format!("{base}/get")).header("x-api-key", KEY).send().await.unwrap().status(), 200);

    // A certificate from another CA, written over the files: new connections get it within
    // a few seconds, with no restart; clients trusting only the old CA now fail.
    let ca2 = DevCa::new("sidecar test CA 2").unwrap();
    server_files(dir.path(), &ca2);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = https_client(&ca2, None);
        if let Ok(res) = fresh.get(format!("{base}/get")).header("x-api-key", KEY).send().await {
            assert_eq!(res.status(), 200);
            break;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(https_client(&ca, None).get(format!("{base}/get")).header("x-api-key", KEY).send().await.is_err());
    assert!(metric(&admin, "pixmesh_tls_reloads_total", "outcome=\"ok\"").await >= 1.0);

    // A broken file is refused and counted; the certificate in force stays.
    write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&admin, "pixmesh_tls_reloads_total", "outcome=\"failed\"").await < 1.0 {
        assert!(Instant::now() < deadline, "the broken certificate was never noticed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let res = https_client(&ca2, None).get(format!("{base}/get")).header("x-api-key", KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(metric(&admin, "pixmesh_tls_handshakes_total", "outcome=\"ok\"").await >= 3.0);
    assert!(metric(&admin, "pixmesh_tls_handshakes_total", "outcome=\"failed\"").await >= 1.0);
    assert!(metric(&admin, "pixmesh_gateway_responses_total", "").await >= 10.0, "the gateway's metrics, per route");
}

/// An application of the test's own that echoes what it got (see `pixmesh_test_support::echo`).
async fn echo(name: &'static str) -> (SocketAddr, Seen) {
    pixmesh_test_support::echo::echo(name, Behaviour::Answer).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_the_caller_and_strangers_are_refused() {
    let (app, _) = echo("app").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("mtls test CA").unwrap();
    let (cert, key) = server_files(dir.path(), &ca);
    let ca_file = dir.path().join("ca.crt");
    write(&ca_file, &ca.cert_pem());
    let config = |mode: &str| {
        let path = dir.path().join(format!("{mode}.toml"));
        write(
            &path,
            &format!(
                "[sidecar.inbound]\nlisten = \"127.0.0.1:0\"\napp = \"http://{app}\"\nrate = \"off\"\n\
                 api_keys = [{{ name = \"billing\", tls_name = \"billing.internal\" }},\n\
                             {{ name = \"ops\", tls_name = \"spiffe://pixmesh.test/ops\", rate = \"1/m\", burst = 1 }}]\n\
                 [sidecar.inbound.tls]\ncert = {cert:?}\nkey = {key:?}\nclient_ca = {ca_file:?}\nclient_auth = \"{mode}\"\n"
            ),
        );
        path
    };
    let billing = ca.issue(&["billing.internal"], false, true).unwrap();
    let ops = ca.issue(&["spiffe://pixmesh.test/ops"], false, true).unwrap();
    let stranger = ca.issue(&["stranger.internal"], false, true).unwrap();
    let other_ca = DevCa::new("someone else's CA").unwrap();
    let forged = other_ca.issue(&["billing.internal"], false, true).unwrap();

    let required = Role::start("sidecar inbound", Some(&config("required")), &[], &[("PIXMESH_API_KEY", KEY)]).await.unwrap();
    let base = format!("https://127.0.0.1:{}", port_of(&required.addresses["http"]));
    let get = |client: reqwest::Client, path: &str| client.get(format!("{base}{path}")).send();

    // The certificate is the credential: the app learns the caller's name from it.
    let res = get(https_client(&ca, Some(&billing)), "/whoami").await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["x-pixmesh-client"], "billing", "{body}");
    assert!(body["headers"]["x-request-id"].is_string() && body["headers"]["traceparent"].is_string(), "{body}");
    // Per caller's rate: ops has one request a minute.
    assert_eq!(get(https_client(&ca, Some(&ops)), "/a").await.unwrap().status(), 200);
    assert_eq!(get(https_client(&ca, Some(&ops)), "/a").await.unwrap().status(), 429);
    assert_eq!(get(https_client(&ca, Some(&billing)), "/a").await.unwrap().status(), 200, "billing is not slowed by ops");
    // Verified but unknown: 401 naming the certificate.
    let res = get(https_client(&ca, Some(&stranger)), "/a").await.unwrap();
    assert_eq!(res.status(), 401);
    assert!(res.text().await.unwrap().contains("stranger.internal"));
    // No certificate, or one from another CA: no TLS session at all (with a key or not).
    assert!(get(https_client(&ca, None), "/a").await.is_err());
    assert!(https_client(&ca, None).get(format!("{base}/a")).header("x-api-key", KEY).send().await.is_err());
    assert!(get(https_client(&ca, Some(&forged)), "/a").await.is_err());

    // `optional`: a certificate, or else a key.
    let optional = Role::start("sidecar inbound", Some(&config("optional")), &[], &[("PIXMESH_API_KEY", KEY)]).await.unwrap();
    let base = format!("https://127.0.0.1:{}", port_of(&optional.addresses["http"]));
    let who = |res: Value| res["headers"]["x-pixmesh-client"].as_str().unwrap_or("-").to_string();
    let res = https_client(&ca, Some(&billing)).get(format!("{base}/a")).send().await.unwrap();
    assert_eq!(who(res.json().await.unwrap()), "billing");
    let res = https_client(&ca, None).get(format!("{base}/a")).header("x-api-key", KEY).send().await.unwrap();
    assert_eq!(who(res.json().await.unwrap()), "env");
    let res = https_client(&ca, None).get(format!("{base}/a")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    // A key, when sent, decides over the certificate.
    let res = https_client(&ca, Some(&billing)).get(format!("{base}/a")).header("x-api-key", KEY).send().await.unwrap();
    assert_eq!(who(res.json().await.unwrap()), "env");
    assert!(https_client(&ca, Some(&forged)).get(format!("{base}/a")).header("x-api-key", KEY).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_splits_and_mirrors_an_apps_traffic_like_the_gateway() {
    let (app, _) = echo("app").await;
    let (v2, _) = echo("v2").await;
    let (shadow, shadowed) = echo("shadow").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pixmesh.toml");
    write(
        &config,
        &format!(
            "[sidecar.inbound]\nlisten = \"127.0.0.1:0\"\napp = \"http://{app}\"\nrate = \"off\"\n\
             upstreams = {{ v2 = \"http://{v2}\", shadow = \"http://{shadow}\" }}\n\
             [[sidecar.inbound.routes]]\nprefix = \"/\"\nsplit = {{ app = 75, v2 = 25 }}\n\
             mirror = {{ upstream = \"shadow\", percent = 100 }}\n"
        ),
    );
    // Plain HTTP (no [tls]): the sidecar may also sit behind a mesh that terminates TLS.
    let sidecar = Role::start("sidecar inbound", Some(&config), &[], &[("PIXMESH_API_KEY", KEY)]).await.unwrap();
    let base = format!("http://{}", sidecar.addresses["http"]);
    let client = reqwest::Client::new();
    let mut to_v2 = 0;
    for i in 0..400 {
        let res = client.get(format!("{base}/item/{i}")).header("x-api-key", KEY).send().await.unwrap();
        let body: Value = res.json().await.unwrap();
        if body["who"] == "v2" {
            to_v2 += 1;
        }
    }
    assert!((60..=140).contains(&to_v2), "about a quarter to v2: {to_v2} of 400");
    let deadline = Instant::now() + Duration::from_secs(10);
    while shadowed.lock().unwrap().len() < 400 {
        assert!(Instant::now() < deadline, "every request is copied to the shadow: {}", shadowed.lock().unwrap().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
