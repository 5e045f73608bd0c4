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
