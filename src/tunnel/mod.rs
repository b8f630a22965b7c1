//! Carrying real application traffic: UDP forwarding through a Mesh connection
//! (docs/tunnel.md).
//!
//! A local application sends UDP datagrams to the client's `--local` address; each one
//! travels as DATA over the Mesh connection, framed with a small flow id ([`frame`]), and the
//! host relays it to a backend service from one socket per flow; the answers come back the
//! same way. The cores are sans-IO like the client and host they sit on:
//! - [`client::TunnelClient`] maps local application addresses to flow ids;
//! - [`host::TunnelHost`] maps client flows to backend sockets, with idle expiry and
//!   per-client limits;
//! - [`run`] holds the thin io loops of `rebindgw connect` and `rebindgw host --forward`.
#![forbid(unsafe_code)]

pub mod client;
pub mod frame;
pub mod host;
pub mod run;

pub use client::{TunnelClient, TunnelClientConfig, TunnelClientStats};
pub use frame::{Frame, FrameError, Kind, MAX_APP_PAYLOAD, OVERHEAD};
pub use host::{FlowKey, Service, TunnelHost, TunnelHostConfig, TunnelHostStats, parse_services};

// The frame fills a whole DATA payload, as the client and host cores size it.
const _: () = assert!(frame::MAX_FRAME == crate::client::MAX_PAYLOAD);
const _: () = assert!(frame::MAX_FRAME == crate::host::MAX_SEND_PAYLOAD);
