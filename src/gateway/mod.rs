//! `rebindgw gateway`: the data plane in front of the Mesh hosts.
//!
//! `core` is the sans-IO packet handler; `run` wires it to sockets, threads, the store and
//! the admin endpoint; `reload` checks a configuration and applies SIGHUP; `store` persists the registry; `ratelimit` and `metrics` serve the
//! core; `tx` is the outgoing-datagram queue the I/O loops drain.
#![forbid(unsafe_code)]

pub mod admin;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod config;
pub mod core;
pub mod metrics;
pub mod ratelimit;
pub mod reload;
pub mod rotate;
pub mod run;
pub mod store;
