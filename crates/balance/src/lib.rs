//! The smart client's balancing, generic over how an instance is reached: the distributor
//! calls image workers over gRPC with it, `pixmesh sidecar outbound` calls an application's
//! remote services over HTTP(S).
//!
//! - [`set`]: the instances a client knows ([`set::EndpointSet`]), each with a slot limit (its
//!   bulkhead), a peak-EWMA latency estimate and a circuit breaker; a call takes a slot by the
//!   power of two choices; a [`set::Transport`] says how a call reaches an instance.
//! - [`breaker`]: the per-instance circuit breaker (failure rate, slow-call rate, failures in a
//!   row; half-open trials with backoff).
//! - [`budget`]: the retry budget (a share of first tries plus a floor per second).
//! - [`discovery`]: where instances come from (pixmesh's registry, DNS, a static list), and the
//!   task that keeps a set in line with it.

pub mod breaker;
pub mod budget;
pub mod discovery;
pub mod set;

pub use breaker::BreakerConfig;
pub use set::{EndpointSet, MetricNames, Transport};
