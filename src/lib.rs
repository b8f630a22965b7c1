//! Mesh rebind gateway: a sans-IO protocol core (PROTOCOL.md v1), the batched trial-decryption
//! engine, and the gateway, client, host and load generator built on them.
//!
//! Unsafe code lives only in `engine` (SIMD backends) and `io` (io_uring, socket batching);
//! every other module carries `#![forbid(unsafe_code)]`.
#![deny(unsafe_code)]

pub mod crypto;
pub mod engine;
pub mod keys;
pub mod registry;
pub mod replay;
pub mod time;
pub mod verify;
pub mod wire;
pub mod rebind;
pub mod conformance;
pub mod hostlink;
pub mod table;
pub mod client;
pub mod gateway;
pub mod secrets;
