//! End-to-end tests live in `tests/`: they boot the real `pixmesh up` (every role a separate
//! process on 127.0.0.1, ports chosen by the OS) and drive it over HTTP like a client would.
//!
//! They run on the embedded SQLite store, or with `PIXMESH_E2E_DATABASE=postgres` on
//! PostgreSQL (see `pixmesh_test_support::postgres`); this crate holds what the tests share.

use pixmesh_store::{JobStore, StoreConfig, Stores};
use pixmesh_test_support::System;
use std::sync::Arc;

/// The job store of a running system, opened as another process would (to read jobs and
/// events behind the API).
pub async fn job_store(system: &System) -> Arc<dyn JobStore> {
    let config = StoreConfig::default().with_data_dir(&system.data_dir).with_database(&system.database);
    match Stores::open(&config).await {
        Ok(stores) => stores.jobs,
        Err(e) => panic!("cannot open the system's job store ({}): {e}", system.database),
    }
}

/// Every blob a running system holds, as paths under its blob store (`blobs/…` for
/// content-addressed ones, `outputs/<job>/<output>/<attempt>` for the outputs of sagas): read
/// from the local blob directory, or from the S3 test server's directory on the S3 profile.
/// Temporary, staging and probe objects are left out.
pub fn blob_files(system: &System) -> Vec<String> {
    let root = match &system.blobs {
        Some(_) => pixmesh_test_support::s3::shared().bucket_dir().join(pixmesh_test_support::s3::prefix_for(&system.data_dir)),
        None => system.data_dir.join("blobs"),
    };
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

fn walk(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let top = dir == root;
        if name.starts_with('.') || (top && matches!(name.as_str(), "tmp" | "staging" | "probe")) {
            continue;
        }
        if path.is_dir() {
            walk(&path, root, out);
        } else if let Ok(relative) = path.strip_prefix(root) {
            out.push(relative.display().to_string());
        }
    }
}
