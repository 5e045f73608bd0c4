//! The gRPC contracts between pixmesh roles.
//!
//! `pixmesh.v1.ImageWorker` is what the distributor calls on image workers;
//! `pixmesh.v1.Registry` is how workers announce themselves and how the distributor finds them.

#![allow(clippy::all, missing_docs, rust_2018_idioms)]

pub mod v1 {
    tonic::include_proto!("pixmesh.v1");
}

/// Largest gRPC message pixmesh accepts or sends: a 50 MB image plus its envelope.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Calls with presigned URLs a worker takes per CPU slot, unless configured (`worker.transfers`
/// for a worker; `distributor.worker_transfers` for workers found by DNS or a static list):
/// such a call spends most of its time waiting on the blob store, not on the worker's CPUs.
pub const TRANSFERS_PER_SLOT: u32 = 4;

/// Metadata key that carries the machine-readable pixmesh error code on a gRPC error.
pub const ERROR_CODE_METADATA: &str = "x-pixmesh-error";
