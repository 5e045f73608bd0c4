//! The values that cross pixmesh's role boundaries, and the store traits.
//!
//! The upload service, the status service, the distributor and the workers agree on these
//! types and on nothing else: a job and its options, its result or error, its events, the
//! store's errors. Nothing here knows a database, a broker or an image codec, so every backend
//! (`pixmesh-store`: SQLite, PostgreSQL, local files, …) and every role depends on this crate
//! and not on each other.

pub mod blob;
pub mod event;
pub mod hlc;
pub mod job;
pub mod options;
pub mod store;
pub mod tail;

pub use blob::{BlobRef, is_output_key, output_key};
pub use event::{EVENT_VERSION, Event, EventKind, JobEvent, JobView, apply, fold};
pub use hlc::Hlc;
pub use job::{CacheKey, CacheOutcome, Created, DEFAULT_MAX_OUTPUTS, Job, JobError, JobResult, JobState, NewJob, Output, Step};
pub use options::Options;
pub use store::{
    BlobStore, BlobStream, ClaimById, JobStore, Notify, Outbox, OutboxEvent, Presign, QueueStats, StoreError, StoreKind, StoredView, Views,
    ViewsAfter,
};
