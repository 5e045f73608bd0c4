//! Ambassadors: pixmesh's middleware beside applications it does not own.
//!
//! - [`redis`]: `pixmesh ambassador redis`, one Redis address for an application whose keys are
//!   spread over several Redis servers (consistent hashing, pipelining kept, shards ejected).

pub mod instruments;
pub mod redis;
