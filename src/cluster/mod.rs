//! Cluster mode: several gateways behind ECMP share one connection registry in etcd.
//!
//! - [`record`]: a connection as stored (its rebind secret sealed under a key derived from the
//!   master secret, so etcd and its backups hold no usable secret) and the key layout;
//! - [`mirror`]: the sans-IO local copy each gateway keeps from a range read and the etcd
//!   watch, which says when another gateway took a connection; the packet path reads only it;
//! - `etcd` (feature `cluster`): the etcd v3 client side: race-free index allocation
//!   (a transaction per REGISTER), one compare-and-swap per accepted REBIND, the lease that
//!   tells the others this gateway is alive;
//! - `sync` (feature `cluster`): the link thread the gateway talks to without waiting:
//!   requests in, responses and registry events out, reconnect and reload when etcd returns.
//!
//! Not yet wired into the gateway (docs/cluster.md says what is missing).
#![forbid(unsafe_code)]

#[cfg(feature = "cluster")]
pub mod etcd;
pub mod mirror;
pub mod record;
#[cfg(feature = "cluster")]
pub mod sync;
