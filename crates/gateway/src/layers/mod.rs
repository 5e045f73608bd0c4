//! The gateway's interceptors: one tower `Layer` + `Service` per file.
//! The order they run in is decided in one place, [`crate::stack::app`].

pub mod api_key;
pub mod request_id;

pub use api_key::ApiKeyLayer;
pub use request_id::RequestIdLayer;
