//! What the targets over `rebindgw::sim::World` share: reading sources, bytes and times from
//! the input, the ops every world takes (clients, payloads, NAT moves, network weather, time),
//! and the invariants every client must keep.
#![allow(dead_code)]

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use rebindgw::client::{ClientState, MAX_DATAGRAM_LEN};
use rebindgw::sim::{SimConfig, World};
use rebindgw::time::Ticks;
use rebindgw::wire::{KEYS_ACK_TYPE, MsgType, canonical};

pub const MAX_CLIENTS: usize = 6;

/// `FUZZ_TRACE=1` prints each op (to read a crash input).
pub fn trace(what: std::fmt::Arguments<'_>) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("FUZZ_TRACE").is_some()) {
        eprintln!("{what}");
    }
}

/// A world with up to [`MAX_CLIENTS`] enrolled clients, recording the wire.
pub fn world(u: &mut Unstructured<'_>) -> Result<World> {
    let slots = 1 + usize::from(u.int_in_range(0..=15u8)?);
    let mut core = rebindgw::gateway::core::CoreConfig::new(slots);
    core.limiter_slots = 64;
    let mut host = rebindgw::host::HostConfig::default();
    if u.ratio(1, 4)? {
        // Tiny caps, to reach the host's refusals.
        host.max_nonces = u.int_in_range(0..=4)?;
        host.max_pending = u.int_in_range(0..=4)?;
        host.max_nonces_per_client = u.int_in_range(0..=4)?;
    }
    let mut w = World::new(SimConfig {
        seed: u.arbitrary()?,
        slots,
        core,
        enrolled: MAX_CLIENTS,
        host,
        ..SimConfig::default()
    });
    w.record = true;
    Ok(w)
}

/// Up to `max` bytes (fewer when the input runs out).
pub fn bytes(u: &mut Unstructured<'_>, max: usize) -> Result<Vec<u8>> {
    let n = u.int_in_range(0..=max)?.min(u.len());
    Ok(u.bytes(n)?.to_vec())
}

/// A time near `now`, on one of several scales.
pub fn ticks_near(u: &mut Unstructured<'_>, now: Ticks) -> Result<Ticks> {
    let off: i32 = u.arbitrary()?;
    let scale = [1u64, 1_000, 10_000_000, 1 << 32][usize::from(u.int_in_range(0..=3u8)?)];
    Ok(Ticks(now.0.wrapping_add_signed(i64::from(off).wrapping_mul(scale as i64))))
}

/// A source tuple: a client's, a fixed pool's, or any.
pub fn source(u: &mut Unstructured<'_>, w: &World) -> Result<SocketAddr> {
    let n = w.clients.len();
    Ok(canonical(match u.int_in_range(0..=7u8)? {
        0..=2 if n > 0 => w.clients[u.choose_index(n)?].tuple,
        3 => SocketAddr::from((Ipv4Addr::from(u.arbitrary::<u32>()?), u.arbitrary()?)),
        4 => SocketAddr::from((Ipv6Addr::from(u.arbitrary::<u128>()?), u.arbitrary()?)),
        5 => SocketAddr::from((Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0xc633, 0x6401), 4000)),
        _ => SocketAddr::from(([198, 51, 100, u.arbitrary()?], 4000)),
    }))
}

/// What the harness knows about the clients, for the invariants.
#[derive(Default)]
pub struct Track {
    /// Payloads each client sent (the host only echoes them back to it).
    pub sent: Vec<HashSet<Vec<u8>>>,
    /// Other payloads a client may receive (host DATA a target sealed itself).
    pub extra: Vec<HashSet<Vec<u8>>>,
    pub was_connected: Vec<bool>,
    pub failed: Vec<bool>,
    /// The client core's own re-handshakes (a rebind that ran out) seen so far.
    pub rehandshakes: Vec<u64>,
}

impl Track {
    pub fn add(&mut self) {
        self.sent.push(HashSet::new());
        self.extra.push(HashSet::new());
        self.was_connected.push(false);
        self.failed.push(false);
        self.rehandshakes.push(0);
    }

    /// The clients' invariants: what they receive is what was sent to them, `Failed` is
    /// final, a connected client goes back to `Handshaking` only by its own re-handshake, what they send is of a
    /// known type and fits, and every datagram delivered was counted.
    pub fn check(&mut self, w: &World) {
        for (i, c) in w.clients.iter().enumerate() {
            for p in &c.received {
                assert!(
                    self.sent[i].contains(p) || self.extra[i].contains(p),
                    "client {i} received a payload nobody sent it"
                );
            }
            let state = c.core.state();
            assert!(
                !self.failed[i] || matches!(state, ClientState::Failed(_)),
                "Failed is final"
            );
            self.failed[i] |= matches!(state, ClientState::Failed(_));
            // Only through the core's own re-handshake (ClientEvent::Reconnecting).
            let rehandshakes = c.core.stats().rehandshakes;
            if rehandshakes > self.rehandshakes[i] {
                self.rehandshakes[i] = rehandshakes;
                self.was_connected[i] = false;
            }
            assert!(
                !self.was_connected[i] || state != ClientState::Handshaking,
                "client {i} went back to Handshaking"
            );
            self.was_connected[i] |= matches!(state, ClientState::Connected | ClientState::Rebinding);
            for d in &c.sent {
                assert!(d.len() <= MAX_DATAGRAM_LEN);
                // PROTOCOL.md's types, and the KEYS_ACK of key delivery (PROTOCOL-EXT.md).
                assert!(
                    MsgType::of(d).is_ok() || d.first() == Some(&KEYS_ACK_TYPE),
                    "client {i} sent an unknown type"
                );
            }
            assert_eq!(c.core.stats().datagrams_received, c.delivered.len() as u64);
        }
    }
}

/// The ops every target shares; returns false if `op` is not one of them.
pub fn shared_op(op: u8, u: &mut Unstructured<'_>, w: &mut World, t: &mut Track) -> Result<bool> {
    let n = w.clients.len();
    match op {
        0 if n < MAX_CLIENTS => {
            w.add_client();
            t.add();
        }
        1 if n > 0 => {
            let i = u.choose_index(n)?;
            let p = bytes(u, 200)?;
            if w.clients[i].core.send(&p).is_ok() {
                t.sent[i].insert(p);
            }
        }
        2 if n > 0 => {
            let i = u.choose_index(n)?;
            if u.arbitrary()? {
                w.move_client(i);
            } else {
                let j = u.choose_index(n)?;
                let to = w.clients[j].tuple;
                if i != j {
                    w.move_client(j);
                }
                w.move_client_to(i, to);
            }
        }
        3 => {
            w.cfg.loss = f64::from(u.int_in_range(0..=30u8)?) / 100.0;
            w.cfg.jitter = Duration::from_millis(u.int_in_range(0..=50u64)?);
        }
        4 => {
            let ms = u64::from(u.arbitrary::<u16>()?) % 3_000;
            w.run_for(Duration::from_millis(ms));
        }
        _ => return Ok(false),
    }
    Ok(true)
}
