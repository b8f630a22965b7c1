//! The tools of the rebind gateway, built only on the `rebindgw` library's public API: the
//! load generator (`loadgen`), the system benchmarks (`bench`), the loopback demo (`demo`) and
//! the known-answer vector checker (`conformance`). The `rebindgw` command (`main.rs`) wires
//! them and the library's gateway, host and client into one CLI.
//!
//! Unsafe code lives only in `loadgen::sys` (epoll, setrlimit).
#![deny(unsafe_code)]

pub mod bench;
pub mod conformance;
pub mod demo;
pub mod loadgen;
