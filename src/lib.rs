//! Mesh rebind gateway: a sans-IO protocol core (PROTOCOL.md v1.1), the batched trial-decryption
//! engine, and the gateway, client and host built on them. The `rebindgw` command and the tools
//! (load generator, benchmarks, demo, conformance) are the `rebindgw-tools` crate in `tools/`,
//! which uses only this library's public API.
//!
//! Unsafe code lives only in `crypto` and `engine` (SIMD) and `io` (io_uring, socket
//! batching); the other modules carry `#![forbid(unsafe_code)]`.
//!
//! The modules form layers that only import downwards (docs/architecture.md, "Layers";
//! `scripts/check-layers.py` checks it): `time`/`logging`/`replay` → `crypto` →
//! `wire`/`engine` → `keys`/`rebind`/`hostlink` → `registry`/`verify` → `table` →
//! `io`/`secrets` → `gateway`/`host`/`client` → `tunnel` (applications) (→ `sim`, the test
//! harness, and the tools crate).
#![deny(unsafe_code)]

pub mod client;
pub mod cluster;
pub mod crypto;
pub mod engine;
pub mod gateway;
pub mod host;
pub mod hostlink;
pub mod io;
pub mod keys;
pub mod logging;
pub mod rebind;
pub mod registry;
pub mod replay;
pub mod secrets;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod table;
pub mod time;
pub mod tunnel;
pub mod verify;
pub mod wire;
