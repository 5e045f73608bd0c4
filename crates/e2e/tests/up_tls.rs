//! `pixmesh up --tls`: a development CA in the data dir, a certificate per role, mTLS on every
//! hop between roles and HTTPS on the gateway. A job goes through it end to end; every role's
//! port refuses plaintext, a client without a certificate, one with a certificate from another
//! CA and one of the system's roles not allowed to call it, and takes the role that calls it;
//! a killed worker comes back on its certificate; a second start keeps the CA clients trust.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use pixmesh_chassis::grpc::Dialer;
use pixmesh_chassis::tls::{ClientTlsConfig, DevCa};
use pixmesh_proto::v1::image_worker_client::ImageWorkerClient;
use pixmesh_proto::v1::registry_client::RegistryClient;
use pixmesh_proto::v1::{ListRequest, ProcessRequest};
use pixmesh_test_support::{System, corpus, jpeg, pixmesh_bin};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ADMIN_KEY: &str = "tls-admin-key";

/// Who calls a role's port in these checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// No TLS at all.
    Plain,
    /// TLS trusting the system's CA, without a certificate.
    NoCertificate,
    /// TLS with a certificate from a CA of its own (naming the gateway).
    Stranger,
    /// TLS with the certificate `up` gave this role child (`gateway`, `distributor`, …).
    Role(&'static str),
}

/// Every kind of caller, for a port that `member` may call and `other` (a role of the same
/// system) may not: only `member` gets in.
fn callers(member: &'static str, other: &'static str) -> [(Caller, bool); 5] {
    [
        (Caller::Plain, false),
        (Caller::NoCertificate, false),
        (Caller::Stranger, false),
        (Caller::Role(other), false),
        (Caller::Role(member), true),
    ]
}

struct Identities {
    ca: PathBuf,
    roles: PathBuf,
    stranger: (PathBuf, PathBuf),
}

impl Identities {
    fn new(system: &System, dir: &Path) -> Identities {
        let other = DevCa::new("someone else's CA").unwrap();
        let issued = other.issue(&["gateway.pixmesh", "localhost", "127.0.0.1"], true, true).unwrap();
        let stranger = (dir.join("stranger.pem"), dir.join("stranger-key.pem"));
        std::fs::write(&stranger.0, &issued.cert_pem).unwrap();
        std::fs::write(&stranger.1, &issued.key_pem).unwrap();
        Identities { ca: system.ca.clone().expect("up --tls announces its CA"), roles: system.data_dir.join("tls"), stranger }
    }

    fn identity(&self, caller: Caller) -> Option<(PathBuf, PathBuf)> {
        match caller {
            Caller::Plain | Caller::NoCertificate => None,
            Caller::Stranger => Some(self.stranger.clone()),
            Caller::Role(name) => Some((self.roles.join(format!("{name}.pem")), self.roles.join(format!("{name}-key.pem")))),
        }
    }

    fn client_tls(&self, caller: Caller) -> ClientTlsConfig {
        if caller == Caller::Plain {
            return ClientTlsConfig::default();
        }
        let (cert, key) = self.identity(caller).unzip();
        ClientTlsConfig { ca: Some(self.ca.clone()), cert, key }
    }

    fn http(&self, caller: Caller) -> reqwest::Client {
        let mut builder = reqwest::Client::builder().use_rustls_tls().tls_built_in_root_certs(false).timeout(Duration::from_secs(10));
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap());
        if let Some((cert, key)) = self.identity(caller) {
            let pem = [std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()].concat();
            builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        builder.build().unwrap()
    }
}

fn address(system: &System, child: &str, port: &str) -> String {
    system
        .child(child)
        .unwrap_or_else(|| panic!("no {child}"))
        .addresses
        .get(port)
        .unwrap_or_else(|| panic!("{child} has no {port}"))
        .clone()
}

/// Whether `caller` gets an HTTP answer from the role at `addr` (`GET /api/status/{id}`: the
/// job's status from the status service, a 404 from upload).
async fn http_answers(ids: &Identities, caller: Caller, addr: &str, id: &str) -> bool {
    let scheme = if caller == Caller::Plain { "http" } else { "https" };
    match ids.http(caller).get(format!("{scheme}://{addr}/api/status/{id}")).send().await {
        Ok(res) => {
            assert!([200, 404].contains(&res.status().as_u16()), "{caller:?} was let in: {}", res.status());
            true
        }
        Err(_) => false,
    }
}

/// Whether `caller` gets an answer from the registry at `addr` (`List`), and how many workers.
async fn registry_answers(ids: &Identities, caller: Caller, addr: &str) -> Option<usize> {
    let dialer = Dialer::new(&ids.client_tls(caller)).unwrap();
    let endpoint = dialer.endpoint(addr).unwrap().connect_timeout(Duration::from_secs(3)).timeout(Duration::from_secs(5));
    let mut client = RegistryClient::new(dialer.connect_lazy(endpoint));
    let answer = client.list(ListRequest { service: "worker".into() }).await;
    answer.ok().map(|r| r.into_inner().instances.len())
}

/// Whether `caller` gets an answer from the worker at `addr`: a call without an image is
/// refused by the worker itself (InvalidArgument), which only a caller let in can hear.
async fn worker_answers(ids: &Identities, caller: Caller, addr: &str) -> bool {
    let dialer = Dialer::new(&ids.client_tls(caller)).unwrap();
    let endpoint = dialer.endpoint(addr).unwrap().connect_timeout(Duration::from_secs(3)).timeout(Duration::from_secs(5));
    let mut client = ImageWorkerClient::new(dialer.connect_lazy(endpoint));
    match client.process(ProcessRequest::default()).await {
        Ok(_) => panic!("a call without an image cannot succeed"),
        // Refused callers see the connection fail (Unavailable, or Cancelled when it closes
        // during the handshake), never the worker's own answer.
        Err(status) => status.code() == tonic::Code::InvalidArgument,
    }
}

async fn metric(admin: &str, name: &str, label: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name) && l.contains(label)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

async fn upload_and_wait(system: &System, photo: &[u8]) -> String {
    let (code, body) = system.upload(photo.to_vec(), "image/jpeg", "width=320&format=webp").await.unwrap();
    assert_eq!(code, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let done = system.wait_terminal(&id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_tls_runs_every_hop_over_mtls_and_lets_in_only_the_role_that_calls_each_port() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let system = System::start_tls(&data, 2, &[], &[("PIXMESH_ADMIN_API_KEY", ADMIN_KEY)]).await.unwrap();
    assert!(system.gateway.starts_with("https://"), "{}", system.gateway);
    let ids = Identities::new(&system, dir.path());

    // A job end to end: the gateway over HTTPS, then upload, distributor → worker, status, each
    // hop over mTLS.
    let photo = corpus("photos").map(|d| std::fs::read(d.join("ladybird-2560x1600.jpg")).unwrap()).unwrap_or_else(|| jpeg(1600, 1000));
    let id = upload_and_wait(&system, &photo).await;
    let (code, headers, bytes) = system.result(&id).await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(headers["content-type"], "image/webp");
    assert_eq!(image::load_from_memory(&bytes).unwrap().width(), 320);

    // The gateway reads the status service over mTLS for the cluster view, and every role is
    // ready.
    let res = system.client().get(format!("{}/api/cluster", system.gateway)).header("x-api-key", ADMIN_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let view: serde_json::Value = res.json().await.unwrap();
    let status_source = view["sources"].as_array().unwrap().iter().find(|s| s["name"] == "status /api/jobs").unwrap();
    assert_eq!(status_source["ok"], true, "{view}");
    for role in view["roles"].as_array().unwrap() {
        assert_eq!(role["state"], "ready", "{role}");
    }

    // The command-line client trusts the CA it is given, and nothing else.
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::write(photos.join("small.jpg"), jpeg(120, 80)).unwrap();
    let submit = |extra: &[&str]| {
        std::process::Command::new(pixmesh_bin())
            .arg("submit")
            .args(["--url", &system.gateway, "--key", &system.api_key, "-q", "width=60&format=png", "-o"])
            .arg(dir.path().join("out"))
            .args(extra)
            .arg(&photos)
            .output()
            .unwrap()
    };
    let untrusting = submit(&[]);
    assert!(!untrusting.status.success(), "a client that does not trust the development CA must not get through");
    let trusting = submit(&["--cacert", system.ca.as_ref().unwrap().to_str().unwrap()]);
    assert!(trusting.status.success(), "{}", String::from_utf8_lossy(&trusting.stderr));
    assert!(dir.path().join("out/small.png").exists());

    // The gateway's public port speaks TLS only.
    let gateway = system.gateway.trim_start_matches("https://").to_string();
    assert!(!http_answers(&ids, Caller::Plain, &gateway, &id).await, "the gateway must not answer plaintext");

    // Every role's port: only a certificate from the system's CA that names a role allowed to
    // call it gets in (upload and status: the gateway; workers: the distributor; the registry:
    // the distributor and the workers).
    for role in ["upload", "status"] {
        let addr = address(&system, role, "http");
        for (caller, allowed) in callers("gateway", "worker-1") {
            assert_eq!(http_answers(&ids, caller, &addr, &id).await, allowed, "{role} and {caller:?}");
        }
    }
    // pixmesh's registry (on the NATS profile, workers register in NATS KV: no registry role).
    let registry = system.queue.is_none().then(|| address(&system, "registry", "grpc"));
    if let Some(registry) = &registry {
        for member in ["distributor", "worker-2"] {
            for (caller, allowed) in callers(member, "gateway") {
                let answer = registry_answers(&ids, caller, registry).await;
                assert_eq!(answer, allowed.then_some(2), "the registry and {caller:?} (both workers registered over mTLS)");
            }
        }
    }
    for worker in ["worker-1", "worker-2"] {
        let addr = address(&system, worker, "grpc");
        for (caller, allowed) in callers("distributor", "gateway") {
            assert_eq!(worker_answers(&ids, caller, &addr).await, allowed, "{worker} and {caller:?}");
        }
    }
    // The refusals are counted where they happened.
    let upload_admin = address(&system, "upload", "admin");
    assert!(metric(&upload_admin, "pixmesh_tls_handshakes_total", "outcome=\"failed\"").await >= 4.0);
    assert!(metric(&upload_admin, "pixmesh_tls_handshakes_total", "outcome=\"ok\"").await >= 2.0);
    let worker_admin = address(&system, "worker-1", "admin");
    assert!(metric(&worker_admin, "pixmesh_tls_handshakes_total", "outcome=\"failed\"").await >= 3.0);

    // A worker killed outright comes back on its certificate, registers again over mTLS and
    // takes the distributor's calls over mTLS.
    let registry_admin = system.queue.is_none().then(|| address(&system, "registry", "admin"));
    let registry_handshakes = match &registry_admin {
        Some(admin) => metric(admin, "pixmesh_tls_handshakes_total", "outcome=\"ok\"").await,
        None => 0.0,
    };
    let victim = system.child("worker-1").unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim.pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while system.child("worker-1").unwrap().pid == victim.pid {
        assert!(Instant::now() < deadline, "worker-1 was not restarted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new process's metrics start at zero: a Process call it counts came from the
    // distributor. Bursts of uploads, so that the two choices spread them over both workers.
    let worker_admin = address(&system, "worker-1", "admin");
    let process = "rpc_method=\"pixmesh.v1.ImageWorker/Process\"";
    let deadline = Instant::now() + Duration::from_secs(90);
    while metric(&worker_admin, "rpc_server_call_duration_seconds_count", process).await < 1.0 {
        assert!(Instant::now() < deadline, "the restarted worker-1 never got a call from the distributor");
        futures_util::future::join_all((0..6).map(|_| upload_and_wait(&system, &photo))).await;
    }
    if let Some(admin) = &registry_admin {
        assert!(
            metric(admin, "pixmesh_tls_handshakes_total", "outcome=\"ok\"").await > registry_handshakes,
            "the restarted worker registered over a new mTLS connection"
        );
    }
    let ca_before = std::fs::read(system.ca.as_ref().unwrap()).unwrap();
    assert!(system.stop().await.unwrap().success());

    // A second start on the same data dir keeps the CA: what clients trust stays valid.
    let again = System::start_tls(&data, 1, &[], &[]).await.unwrap();
    assert_eq!(std::fs::read(again.ca.as_ref().unwrap()).unwrap(), ca_before);
    let (code, body) = again.status(&id).await.unwrap();
    assert_eq!(code, 200, "{body}");
    upload_and_wait(&again, &photo).await;
    assert!(again.stop().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_up_makes_no_ca_and_serves_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let system = System::start(dir.path(), 1, &[]).await.unwrap();
    assert!(system.gateway.starts_with("http://"), "{}", system.gateway);
    assert!(system.ca.is_none());
    assert!(!dir.path().join("tls").exists(), "no CA is made without --tls");
    assert!(system.stop().await.unwrap().success());
}
