//! `rebindgw gateway`: the data plane in front of the Mesh hosts.
//!
//! `core` is the sans-IO packet handler; `store` persists the registry; `ratelimit` and
//! `metrics` serve it; `tx` is the outgoing-datagram queue the I/O loops drain.

pub mod admin;

pub mod core;
pub mod metrics;
pub mod ratelimit;
pub mod store;
pub mod tx;
