//! The S3 blob store against a real S3-compatible server (s3s-fs, signatures checked):
//! content-addressed create-only writes, presigned URLs that open exactly one object with one
//! method for a bounded time, adoption of a worker's staged output, refusals at open, and an
//! outage that ends.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use bytes::Bytes;
use futures_util::StreamExt;
use pixmesh_store::{BlobRef, BlobStore, S3BlobStore, S3Credentials, S3Limits, S3Url, StoreError, StoreErrorExt, StoreKind};
use pixmesh_test_support::s3::S3Server;
use std::path::Path;
use std::time::{Duration, Instant};

fn limits() -> S3Limits {
    S3Limits { timeout: Duration::from_secs(5), connect_timeout: Duration::from_secs(1), retry_for: Duration::from_millis(500) }
}

fn keys(server: &S3Server) -> S3Credentials {
    S3Credentials::Keys { access_key_id: server.access_key().into(), secret_access_key: server.secret_key().into() }
}

fn url_of(server: &S3Server, prefix: &str) -> S3Url {
    match pixmesh_store::BlobsUrl::parse(&server.url(prefix), Path::new("/")).unwrap() {
        pixmesh_store::BlobsUrl::S3(url) => url,
        other => panic!("{other:?}"),
    }
}

async fn open(server: &S3Server, prefix: &str) -> S3BlobStore {
    S3BlobStore::open(&url_of(server, prefix), limits(), keys(server)).await.unwrap()
}

/// The staging area of `prefix` is empty within a second (adopted objects are deleted in the
/// background).
async fn staging_empties(server: &S3Server, prefix: &str) {
    let started = Instant::now();
    while !server.keys(prefix, "staging").is_empty() {
        assert!(started.elapsed() < Duration::from_secs(1), "staging objects left: {:?}", server.keys(prefix, "staging"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn blobs_are_content_addressed_and_written_once() {
    let server = S3Server::start();
    let store = open(&server, "t/one").await;
    let bytes = Bytes::from(vec![7u8; 3 * 1024 * 1024 + 17]);
    let blob = store.put(bytes.clone()).await.unwrap();
    assert_eq!(blob, BlobRef::of(&bytes));
    assert_eq!(store.put(bytes.clone()).await.unwrap(), blob, "a second put of the same bytes is a no-op");
    // Bodies large enough that the server answers a create-only PUT before reading them.
    let big = Bytes::from(vec![9u8; 8 * 1024 * 1024]);
    let first = store.put(big.clone()).await.unwrap();
    assert_eq!(store.put(big).await.unwrap(), first);
    assert_eq!(store.get(&blob.digest).await.unwrap().unwrap(), bytes);
    let mut both = vec![blob.digest.clone(), first.digest.clone()];
    both.sort();
    assert_eq!(server.keys("t/one", "blobs"), both);

    // Streamed: in chunks, the size known first, the same bytes.
    let stream = store.stream(&blob.digest).await.unwrap().unwrap();
    assert_eq!(stream.size, bytes.len() as u64);
    let chunks: Vec<Bytes> = stream.chunks.map(|c| c.unwrap()).collect().await;
    assert_eq!(chunks.concat(), bytes.to_vec());

    // Create-only: what is at a blob's address is never overwritten (If-None-Match: *).
    let other = Bytes::from_static(b"first");
    let small = store.put(other.clone()).await.unwrap();
    let object = server.bucket_dir().join("t/one/blobs").join(&small.digest);
    std::fs::write(&object, b"changed behind our back").unwrap();
    store.put(other).await.unwrap();
    assert_eq!(std::fs::read(&object).unwrap(), b"changed behind our back", "a put must not overwrite");

    store.delete(&blob.digest).await.unwrap();
    assert_eq!(store.get(&blob.digest).await.unwrap(), None);
    assert!(store.stream(&blob.digest).await.unwrap().is_none());
    store.delete(&blob.digest).await.unwrap();
    assert!(matches!(store.get("../../etc/passwd").await, Err(StoreError::Invalid(_))));
    store.probe(true).await.unwrap();
    store.probe(false).await.unwrap();
    assert!(server.keys("t/one", "probe").is_empty(), "probes leave nothing behind");
}

#[tokio::test]
async fn presigned_urls_open_one_object_with_one_method_for_a_while() {
    let server = S3Server::start();
    let store = open(&server, "t/urls").await;
    let presign = store.presign().expect("S3 presigns");
    let http = reqwest::Client::new();
    let input = store.put(Bytes::from_static(b"the input image")).await.unwrap();

    let get = presign.get_url(&input.digest, Duration::from_secs(30)).await.unwrap();
    let response = http.get(&get).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), "the input image");
    // The GET URL does not PUT, and does not open another key.
    assert_eq!(http.put(&get).body("x").send().await.unwrap().status(), 403);
    let elsewhere = get.replace(&input.digest, &"0".repeat(64));
    assert_eq!(http.get(&elsewhere).send().await.unwrap().status(), 403);
    // Not signed by the server's keys: refused.
    let at = get.find("X-Amz-Signature=").unwrap() + "X-Amz-Signature=".len();
    let flipped = if &get[at..at + 1] == "0" { "1" } else { "0" };
    let forged = format!("{}{flipped}{}", &get[..at], &get[at + 1..]);
    assert_eq!(http.get(&forged).send().await.unwrap().status(), 403);

    // The worker's side: PUT to its staging object, then the distributor adopts it.
    let output = Bytes::from(vec![42u8; 2 * 1024 * 1024]);
    let blob = BlobRef::of(&output);
    let put = presign.staging_url("job1-1-1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(http.put(&put).body(output.clone()).send().await.unwrap().status(), 200);
    assert_eq!(server.keys("t/urls", "staging"), vec!["job1-1-1".to_string()]);
    presign.adopt("job1-1-1", &blob).await.unwrap();
    assert_eq!(store.get(&blob.digest).await.unwrap().unwrap(), output);
    staging_empties(&server, "t/urls").await;
    // The same output again (another job): the copy finds it there, nothing changes.
    let again = presign.staging_url("job2-1-1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(http.put(&again).body(output.clone()).send().await.unwrap().status(), 200);
    presign.adopt("job2-1-1", &blob).await.unwrap();
    staging_empties(&server, "t/urls").await;

    // A worker that says another size than it put, or put nothing: refused, nothing adopted.
    let lying = presign.staging_url("job3-1-1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(http.put(&lying).body("short").send().await.unwrap().status(), 200);
    let claimed = BlobRef::at_digest("a".repeat(64), 999);
    assert!(matches!(presign.adopt("job3-1-1", &claimed).await, Err(StoreError::Invalid(_))));
    assert!(store.get(&claimed.digest).await.unwrap().is_none());
    staging_empties(&server, "t/urls").await;
    assert!(matches!(presign.adopt("job4-1-1", &blob).await, Err(StoreError::Invalid(_))));
    presign.discard("job4-1-1").await.unwrap();
    assert!(matches!(presign.staging_url("../blobs/x", Duration::from_secs(5)).await, Err(StoreError::Invalid(_))));

    // A staging object left by a distributor that died: swept once it is old enough.
    let left = presign.staging_url("job5-1-1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(http.put(&left).body("left").send().await.unwrap().status(), 200);
    assert_eq!(presign.sweep_staging(Duration::from_secs(3600)).await.unwrap(), 0, "a young one stays");
    assert_eq!(presign.sweep_staging(Duration::ZERO).await.unwrap(), 1);
    assert!(server.keys("t/urls", "staging").is_empty());

    // Short-lived: a URL past its time is refused.
    let brief = presign.get_url(&input.digest, Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(http.get(&brief).send().await.unwrap().status(), 403, "an expired URL is refused");
}

#[tokio::test]
async fn saga_outputs_live_at_their_keys_apart_from_the_content_addresses() {
    let server = S3Server::start();
    let store = open(&server, "t/out").await;
    let presign = store.presign().expect("S3 presigns");
    let http = reqwest::Client::new();
    let key = pixmesh_store::output_key("job-9", "thumb", 1);
    let written = store.put_at(&key, Bytes::from_static(b"thumb bytes")).await.unwrap();
    assert_eq!((written.name(), written.digest.as_str()), (key.as_str(), BlobRef::of(b"thumb bytes").digest.as_str()));
    assert_eq!(store.get(&key).await.unwrap().unwrap(), "thumb bytes");
    // A worker's staged output, adopted at a key: at that key, not at its digest.
    let output = Bytes::from_static(b"large output");
    let put = presign.staging_url("job-9-1-large-1", Duration::from_secs(30)).await.unwrap();
    assert_eq!(http.put(&put).body(output.clone()).send().await.unwrap().status(), 200);
    let large = pixmesh_store::output_key("job-9", "large", 1);
    let blob = BlobRef { key: Some(large.clone()), ..BlobRef::of(&output) };
    presign.adopt("job-9-1-large-1", &blob).await.unwrap();
    assert_eq!(store.get(&large).await.unwrap().unwrap(), output);
    assert!(store.get(&blob.digest).await.unwrap().is_none(), "nothing at the content address");
    let mut stream = store.stream(&large).await.unwrap().unwrap();
    assert_eq!((stream.size, stream.chunks.next().await.unwrap().unwrap()), (12, output));
    assert!(server.keys("t/out", "blobs").is_empty());
    store.delete(&key).await.unwrap();
    store.delete(&key).await.unwrap();
    store.delete(&large).await.unwrap();
    assert_eq!(store.get(&large).await.unwrap(), None);
    for bad in ["job-9/thumb", "../x/y/1", &"a".repeat(64)] {
        assert!(matches!(store.put_at(bad, Bytes::from_static(b"x")).await, Err(StoreError::Invalid(_))), "{bad}");
    }
}

#[tokio::test]
async fn bad_credentials_a_missing_bucket_and_no_server_are_refused_at_open() {
    let server = S3Server::start();
    let wrong = S3Credentials::Keys { access_key_id: server.access_key().into(), secret_access_key: "not-the-secret".into() };
    let err = S3BlobStore::open(&url_of(&server, "t"), limits(), wrong).await.unwrap_err();
    println!("wrong secret: {err}");
    assert!(err.contains("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{err}");
    assert!(err.contains("403") || err.to_lowercase().contains("signature") || err.to_lowercase().contains("denied"), "{err}");

    let mut missing = url_of(&server, "t");
    missing.bucket = "no-such-bucket".into();
    let err = S3BlobStore::open(&missing, limits(), keys(&server)).await.unwrap_err();
    println!("missing bucket: {err}");
    assert!(err.contains("no-such-bucket"), "{err}");

    let mut nowhere = url_of(&server, "t");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    nowhere.endpoint = Some(format!("http://{closed}"));
    let started = Instant::now();
    let err = S3BlobStore::open(&nowhere, limits(), keys(&server)).await.unwrap_err();
    println!("no server: {err}");
    assert!(err.contains(&closed.to_string()), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "refused after {:?}", started.elapsed());
}

#[tokio::test]
async fn no_credentials_in_the_environment_are_refused_before_any_request() {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() || std::env::var_os("AWS_WEB_IDENTITY_TOKEN_FILE").is_some() {
        return; // this environment has credentials of its own
    }
    let url = S3Url { bucket: "bucket".into(), prefix: String::new(), endpoint: Some("http://127.0.0.1:9".into()), region: None };
    let err = S3BlobStore::open(&url, limits(), S3Credentials::Environment).await.unwrap_err();
    assert!(err.starts_with("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), "{err}");
}

#[tokio::test]
async fn an_outage_fails_fast_as_the_blob_store_and_ends_by_itself() {
    let mut server = S3Server::start();
    let store = open(&server, "t/outage").await;
    let kept = store.put(Bytes::from_static(b"kept")).await.unwrap();
    server.stop();
    let started = Instant::now();
    let err = store.put(Bytes::from_static(b"during")).await.unwrap_err();
    assert_eq!(err.failed_store(), Some(StoreKind::Blobs), "{err}");
    assert_eq!(err.api_error().message, "the blob store is unavailable; retry later");
    assert!(started.elapsed() < Duration::from_secs(4), "failed after {:?}", started.elapsed());
    assert_eq!(store.get(&kept.digest).await.unwrap_err().failed_store(), Some(StoreKind::Blobs));
    store.probe(false).await.unwrap_err();
    server.start_again();
    store.probe(true).await.unwrap();
    assert_eq!(store.get(&kept.digest).await.unwrap().unwrap(), "kept");
    store.put(Bytes::from_static(b"after")).await.unwrap();
}
