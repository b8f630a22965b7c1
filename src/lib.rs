//! Mesh rebind gateway: a sans-IO protocol core (PROTOCOL.md v1), the batched trial-decryption
//! engine, and the gateway, client, host and load generator built on them.
//!
//! Unsafe code lives only in `crypto` and `engine` (SIMD), `io` (io_uring, socket batching)
//! and the load generator's `loadgen::sys` (epoll, setrlimit); the other modules carry
//! `#![forbid(unsafe_code)]`.
//!
//! The modules form layers that only import downwards (docs/architecture.md, "Layers";
//! `scripts/check-layers.py` checks it): `time`/`logging`/`replay` → `crypto` →
//! `wire`/`engine` → `keys`/`rebind`/`hostlink` → `registry`/`verify` → `table` →
//! `io`/`secrets` → `gateway`/`host`/`client` → `loadgen`/`conformance`/`bench`/`demo`.
#![deny(unsafe_code)]

pub mod bench;
pub mod client;
pub mod conformance;
pub mod crypto;
pub mod demo;
pub mod engine;
pub mod gateway;
pub mod host;
pub mod hostlink;
pub mod io;
pub mod keys;
pub mod loadgen;
pub mod logging;
pub mod rebind;
pub mod registry;
pub mod replay;
pub mod secrets;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod table;
pub mod time;
pub mod verify;
pub mod wire;
