//! The host link: datagrams between gateway workers and Mesh hosts (see `docs/hostlink.md`).
//!
//! ```text
//! data plane (plain; each side takes host-link datagrams only from the peers it is configured with)
//!   0x01 TO_HOST_DATA       gateway -> host   u64 conn_id || client DATA datagram
//!   0x02 TO_CLIENT_DATA     host -> gateway   u64 conn_id || DATA datagram for that client
//!   0x03 TO_HOST_HANDSHAKE  gateway -> host   Tuple(client) || HANDSHAKE datagram || mac(16)
//!   0x04 TO_CLIENT_REPLY    host -> gateway   Tuple(client) || HANDSHAKE_REPLY datagram
//! control plane (sealed: type || nonce(12) || AES-128-GCM(link key, nonce, aad = type, u64 sent || body))
//!   0x10 REGISTER           host -> gateway   u64 boot || u64 request || u64 conn_id || Tuple(client)
//!   0x11 REGISTERED         gateway -> host   u64 request || u64 conn_id || u32 epoch || u8 S || u32 x || R(32) || keys(16*S)
//!   0x12 REGISTER_FAILED    gateway -> host   u64 request || u64 conn_id || u8 reason
//!   0x13 CLOSE              host -> gateway   u64 boot || u64 request || u64 conn_id
//!   0x14 CLOSED             gateway -> host   u64 request || u64 conn_id || u8 found
//!   0x15 REBOUND            gateway -> host   u64 conn_id || u64 t || u8 had_old || Tuple(old)? || Tuple(new)
//!   0x16 EXPIRED            gateway -> host   u64 conn_id
//!   0x17 HELLO              host -> gateway   u64 boot
//!   0x18 HELLO_ACK          gateway -> host   u64 boot || u32 released
//!   0x19 EPOCH_KEYS         gateway -> host   u32 e' || u8 S || u16 n || n x (u64 conn_id || u32 x' || R'(32) || keys(16*S))
//!   0x1A KEYS_DELIVERED     host -> gateway   u32 e' || u16 n || n x u64 conn_id
//! ```
//!
//! Control messages carry secrets (`R`, slot keys), so they are encrypted and authenticated
//! under a per-host 16-byte link key, with a random 96-bit nonce per message. Every one carries
//! the sender's clock (`sent`); the receiver refuses it more than [`CONTROL_WINDOW`] from its
//! own clock, and a [`ReplayGuard`] refuses a nonce it has already accepted within that time.
//! `mac` on TO_HOST_HANDSHAKE is HMAC-SHA256 under a key derived from the link key, cut to 16
//! bytes, over everything before it.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use crate::crypto::{Gcm, HmacSha256Midstate};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::{self, TAG_LEN};
use crate::time::{TICKS_PER_SECOND, Ticks};
use crate::wire::{
    EpochKeysEntry, MAX_SLOTS, MAX_TUPLE_LEN, MIN_SLOTS, emit_epoch_keys, emit_keys_delivered,
    emit_tuple, parse_epoch_keys, parse_keys_delivered, parse_tuple,
};

/// Control messages sent longer ago (or further ahead) than this, by the receiver's clock,
/// are refused: 60 s.
pub const CONTROL_WINDOW: u64 = 60 * TICKS_PER_SECOND;
/// Nonces a [`ReplayGuard`] remembers at most. Only authentic messages are remembered, so
/// this bounds what an honest peer can send within two windows; when full, new messages
/// are refused rather than old nonces forgotten early.
pub const REPLAY_GUARD_CAP: usize = 1 << 20;
/// Bytes of the MAC that ends a TO_HOST_HANDSHAKE.
pub const HANDSHAKE_MAC_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// Bytes a sealed control message adds to its body (type, nonce, `sent`, tag).
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + 8 + TAG_LEN;
/// Bytes the data-plane headers add before a datagram: type + conn_id.
pub const DATA_HEADER_LEN: usize = 9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkType {
    ToHostData = 0x01,
    ToClientData = 0x02,
    ToHostHandshake = 0x03,
    ToClientReply = 0x04,
    Register = 0x10,
    Registered = 0x11,
    RegisterFailed = 0x12,
    Close = 0x13,
    Closed = 0x14,
    Rebound = 0x15,
    Expired = 0x16,
    Hello = 0x17,
    HelloAck = 0x18,
    EpochKeys = 0x19,
    KeysDelivered = 0x1A,
}

impl LinkType {
    pub fn from_byte(b: u8) -> Option<LinkType> {
        use LinkType::*;
        [
            ToHostData,
            ToClientData,
            ToHostHandshake,
            ToClientReply,
            Register,
            Registered,
            RegisterFailed,
            Close,
            Closed,
            Rebound,
            Expired,
            Hello,
            HelloAck,
            EpochKeys,
            KeysDelivered,
        ]
        .into_iter()
        .find(|t| *t as u8 == b)
    }

    pub fn is_control(self) -> bool {
        (self as u8) >= 0x10
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("empty host-link datagram")]
    Empty,
    #[error("unknown host-link type 0x{0:02x}")]
    UnknownType(u8),
    #[error("host-link {0:?} message is truncated or has trailing bytes")]
    Malformed(LinkType),
    #[error("host-link control message failed authentication")]
    BadTag,
    #[error("host-link control message is {0} s away from our clock")]
    Stale(u64),
    #[error("host-link control message was seen before (replay)")]
    Replay,
    #[error("host-link replay guard is full")]
    GuardFull,
}

/// A host's 16-byte link key. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct LinkKey(pub [u8; 16]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(..)")
    }
}

impl LinkKey {
    pub fn generate() -> Self {
        LinkKey(crypto::random_array())
    }

    pub fn cipher(&self) -> Gcm {
        crypto::gcm(&self.0)
    }

    /// The TO_HOST_HANDSHAKE MAC key: derived, so the link key itself only keys GCM.
    pub fn handshake_mac(&self) -> HandshakeMac {
        let mut k = Zeroizing::new([0u8; 32]);
        crypto::hkdf(
            b"",
            &self.0,
            &[b"rebindgw host-link handshake mac v1"],
            &mut k[..],
        );
        HandshakeMac(HmacSha256Midstate::new(&k[..]))
    }
}

/// The keyed MAC of TO_HOST_HANDSHAKE (see [`LinkKey::handshake_mac`]). Zeroized on drop.
#[derive(Clone)]
pub struct HandshakeMac(HmacSha256Midstate);

impl std::fmt::Debug for HandshakeMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandshakeMac(..)")
    }
}

impl HandshakeMac {
    fn tag(&self, framed: &[u8]) -> [u8; HANDSHAKE_MAC_LEN] {
        let full = self.0.mac(&[framed]);
        let mut t = [0u8; HANDSHAKE_MAC_LEN];
        t.copy_from_slice(&full[..HANDSHAKE_MAC_LEN]);
        t
    }
}

/// Why a registration failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RegisterFailure {
    Full = 1,
    DuplicateConnId = 2,
    Refused = 3,
}

/// A control message, decoded.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub enum Control {
    Register {
        boot: u64,
        request: u64,
        conn_id: u64,
        #[zeroize(skip)]
        client: SocketAddr,
    },
    Registered {
        request: u64,
        conn_id: u64,
        epoch: u32,
        index: u32,
        rebind_secret: [u8; 32],
        slot_keys: Vec<[u8; 16]>,
    },
    RegisterFailed {
        request: u64,
        conn_id: u64,
        reason: u8,
    },
    Close {
        boot: u64,
        request: u64,
        conn_id: u64,
    },
    Closed {
        request: u64,
        conn_id: u64,
        found: bool,
    },
    Rebound {
        conn_id: u64,
        #[zeroize(skip)]
        t: Ticks,
        #[zeroize(skip)]
        old: Option<SocketAddr>,
        #[zeroize(skip)]
        new: SocketAddr,
    },
    /// The gateway dropped an idle connection.
    Expired { conn_id: u64 },
    /// A host announces its boot id (at start, until acknowledged).
    Hello { boot: u64 },
    /// The gateway took `boot` and released `released` connections of earlier boots.
    HelloAck { boot: u64, released: u32 },
    /// Keys of a new epoch for connections the host owns (PROTOCOL-EXT.md "Key delivery").
    EpochKeys {
        epoch: u32,
        slots: u8,
        /// Zeroized on drop by `NewKeys` itself.
        #[zeroize(skip)]
        entries: Vec<EpochKeysEntry>,
    },
    /// Clients that acknowledged their keys of `epoch`.
    KeysDelivered { epoch: u32, conn_ids: Vec<u64> },
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Registered {
                request,
                conn_id,
                epoch,
                index,
                slot_keys,
                ..
            } => f
                .debug_struct("Registered")
                .field("request", request)
                .field("conn_id", conn_id)
                .field("epoch", epoch)
                .field("index", index)
                .field("slots", &slot_keys.len())
                .finish_non_exhaustive(),
            Control::Register {
                boot,
                request,
                conn_id,
                client,
            } => write!(
                f,
                "Register {{ boot: {boot}, request: {request}, conn_id: {conn_id}, client: {client} }}"
            ),
            Control::RegisterFailed {
                request,
                conn_id,
                reason,
            } => write!(
                f,
                "RegisterFailed {{ request: {request}, conn_id: {conn_id}, reason: {reason} }}"
            ),
            Control::Close {
                boot,
                request,
                conn_id,
            } => write!(
                f,
                "Close {{ boot: {boot}, request: {request}, conn_id: {conn_id} }}"
            ),
            Control::Closed {
                request,
                conn_id,
                found,
            } => write!(
                f,
                "Closed {{ request: {request}, conn_id: {conn_id}, found: {found} }}"
            ),
            Control::Rebound {
                conn_id,
                t,
                old,
                new,
            } => write!(
                f,
                "Rebound {{ conn_id: {conn_id}, t: {}, old: {old:?}, new: {new} }}",
                t.0
            ),
            Control::Expired { conn_id } => write!(f, "Expired {{ conn_id: {conn_id} }}"),
            Control::Hello { boot } => write!(f, "Hello {{ boot: {boot} }}"),
            Control::HelloAck { boot, released } => {
                write!(f, "HelloAck {{ boot: {boot}, released: {released} }}")
            }
            Control::EpochKeys { epoch, entries, .. } => {
                write!(
                    f,
                    "EpochKeys {{ epoch: {epoch}, entries: {} }}",
                    entries.len()
                )
            }
            Control::KeysDelivered { epoch, conn_ids } => {
                write!(
                    f,
                    "KeysDelivered {{ epoch: {epoch}, conn_ids: {} }}",
                    conn_ids.len()
                )
            }
        }
    }
}

impl Control {
    pub fn link_type(&self) -> LinkType {
        match self {
            Control::Register { .. } => LinkType::Register,
            Control::Registered { .. } => LinkType::Registered,
            Control::RegisterFailed { .. } => LinkType::RegisterFailed,
            Control::Close { .. } => LinkType::Close,
            Control::Closed { .. } => LinkType::Closed,
            Control::Rebound { .. } => LinkType::Rebound,
            Control::Expired { .. } => LinkType::Expired,
            Control::Hello { .. } => LinkType::Hello,
            Control::HelloAck { .. } => LinkType::HelloAck,
            Control::EpochKeys { .. } => LinkType::EpochKeys,
            Control::KeysDelivered { .. } => LinkType::KeysDelivered,
        }
    }

    fn encode_body(&self, sent: Ticks) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(64));
        b.extend_from_slice(&sent.0.to_be_bytes());
        let tuple = |b: &mut Vec<u8>, a: &SocketAddr| {
            let mut t = [0u8; MAX_TUPLE_LEN];
            let n = emit_tuple(a, &mut t);
            b.extend_from_slice(&t[..n]);
        };
        match self {
            Control::Register {
                boot,
                request,
                conn_id,
                client,
            } => {
                b.extend_from_slice(&boot.to_be_bytes());
                b.extend_from_slice(&request.to_be_bytes());
                b.extend_from_slice(&conn_id.to_be_bytes());
                tuple(&mut b, client);
            }
            Control::Registered {
                request,
                conn_id,
                epoch,
                index,
                rebind_secret,
                slot_keys,
            } => {
                b.extend_from_slice(&request.to_be_bytes());
                b.extend_from_slice(&conn_id.to_be_bytes());
                b.extend_from_slice(&epoch.to_be_bytes());
                b.push(slot_keys.len() as u8);
                b.extend_from_slice(&index.to_be_bytes());
                b.extend_from_slice(rebind_secret);
                for k in slot_keys {
                    b.extend_from_slice(k);
                }
            }
            Control::RegisterFailed {
                request,
                conn_id,
                reason,
            } => {
                b.extend_from_slice(&request.to_be_bytes());
                b.extend_from_slice(&conn_id.to_be_bytes());
                b.push(*reason);
            }
            Control::Close {
                boot,
                request,
                conn_id,
            } => {
                b.extend_from_slice(&boot.to_be_bytes());
                b.extend_from_slice(&request.to_be_bytes());
                b.extend_from_slice(&conn_id.to_be_bytes());
            }
            Control::Closed {
                request,
                conn_id,
                found,
            } => {
                b.extend_from_slice(&request.to_be_bytes());
                b.extend_from_slice(&conn_id.to_be_bytes());
                b.push(u8::from(*found));
            }
            Control::Rebound {
                conn_id,
                t,
                old,
                new,
            } => {
                b.extend_from_slice(&conn_id.to_be_bytes());
                b.extend_from_slice(&t.0.to_be_bytes());
                b.push(u8::from(old.is_some()));
                if let Some(old) = old {
                    tuple(&mut b, old);
                }
                tuple(&mut b, new);
            }
            Control::Expired { conn_id } => b.extend_from_slice(&conn_id.to_be_bytes()),
            Control::Hello { boot } => b.extend_from_slice(&boot.to_be_bytes()),
            Control::HelloAck { boot, released } => {
                b.extend_from_slice(&boot.to_be_bytes());
                b.extend_from_slice(&released.to_be_bytes());
            }
            Control::EpochKeys {
                epoch,
                slots,
                entries,
            } => {
                let body = Zeroizing::new(emit_epoch_keys(*epoch, usize::from(*slots), entries));
                b.extend_from_slice(&body);
            }
            Control::KeysDelivered { epoch, conn_ids } => {
                b.extend_from_slice(&emit_keys_delivered(*epoch, conn_ids));
            }
        }
        b
    }

    /// `(sent, message)` from a decrypted body.
    fn decode_body(ty: LinkType, b: &[u8]) -> Option<(Ticks, Control)> {
        let mut r = Reader { b, at: 0 };
        let sent = Ticks(r.u64()?);
        let msg = match ty {
            LinkType::Register => Control::Register {
                boot: r.u64()?,
                request: r.u64()?,
                conn_id: r.u64()?,
                client: r.tuple()?,
            },
            LinkType::Registered => {
                let request = r.u64()?;
                let conn_id = r.u64()?;
                let epoch = r.u32()?;
                let slots = usize::from(r.u8()?);
                if !(MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
                    return None;
                }
                let index = r.u32()?;
                let rebind_secret = r.array::<32>()?;
                let mut slot_keys = Vec::with_capacity(slots);
                for _ in 0..slots {
                    slot_keys.push(r.array::<16>()?);
                }
                Control::Registered {
                    request,
                    conn_id,
                    epoch,
                    index,
                    rebind_secret,
                    slot_keys,
                }
            }
            LinkType::RegisterFailed => Control::RegisterFailed {
                request: r.u64()?,
                conn_id: r.u64()?,
                reason: r.u8()?,
            },
            LinkType::Close => Control::Close {
                boot: r.u64()?,
                request: r.u64()?,
                conn_id: r.u64()?,
            },
            LinkType::Closed => Control::Closed {
                request: r.u64()?,
                conn_id: r.u64()?,
                found: r.u8()? != 0,
            },
            LinkType::Rebound => {
                let conn_id = r.u64()?;
                let t = Ticks(r.u64()?);
                let old = match r.u8()? {
                    0 => None,
                    1 => Some(r.tuple()?),
                    _ => return None,
                };
                Control::Rebound {
                    conn_id,
                    t,
                    old,
                    new: r.tuple()?,
                }
            }
            LinkType::Expired => Control::Expired { conn_id: r.u64()? },
            LinkType::Hello => Control::Hello { boot: r.u64()? },
            LinkType::HelloAck => Control::HelloAck {
                boot: r.u64()?,
                released: r.u32()?,
            },
            // These bodies fill the rest of the message; their parsers check the length.
            LinkType::EpochKeys => {
                let rest = r.take(b.len().saturating_sub(r.at))?;
                let (epoch, entries) = parse_epoch_keys(rest).ok()?;
                Control::EpochKeys {
                    epoch,
                    slots: *rest.get(4)?,
                    entries,
                }
            }
            LinkType::KeysDelivered => {
                let rest = r.take(b.len().saturating_sub(r.at))?;
                let (epoch, conn_ids) = parse_keys_delivered(rest).ok()?;
                Control::KeysDelivered { epoch, conn_ids }
            }
            _ => return None,
        };
        (r.at == b.len()).then_some((sent, msg))
    }

    /// Seals the message under `key` with a fresh random nonce, stamped with the sender's
    /// clock `now`.
    pub fn seal(&self, key: &Gcm, now: Ticks) -> Vec<u8> {
        let body = self.encode_body(now);
        let mut out = vec![0u8; 1 + NONCE_LEN + body.len() + TAG_LEN];
        out[0] = self.link_type() as u8;
        crypto::random_bytes(&mut out[1..1 + NONCE_LEN]);
        out[1 + NONCE_LEN..1 + NONCE_LEN + body.len()].copy_from_slice(&body);
        let (head, sealed) = out.split_at_mut(1 + NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = head[1..].try_into().expect("12-byte nonce");
        crypto::seal_in_place(key, &nonce, &head[..1], sealed);
        out
    }

    /// Opens a sealed control message sent within [`CONTROL_WINDOW`] of `now`. This alone
    /// does not refuse replays: receivers use [`Control::open_fresh`].
    pub fn open(datagram: &[u8], key: &Gcm, now: Ticks) -> Result<Control, LinkError> {
        Self::open_parts(datagram, key, now).map(|(_, _, m)| m)
    }

    /// Like [`Control::open`], and refuses a message `guard` has accepted before.
    pub fn open_fresh(
        datagram: &[u8],
        key: &Gcm,
        now: Ticks,
        guard: &mut ReplayGuard,
    ) -> Result<Control, LinkError> {
        let o = Self::open_with_nonce(datagram, key, now)?;
        guard.accept(&o, now)?;
        Ok(o.msg)
    }

    /// Opens without the replay check, for a receiver that checks later with
    /// [`ReplayGuard::accept`] (e.g. outside and inside a lock).
    pub fn open_with_nonce(datagram: &[u8], key: &Gcm, now: Ticks) -> Result<Opened, LinkError> {
        let (nonce, sent, msg) = Self::open_parts(datagram, key, now)?;
        Ok(Opened { nonce, sent, msg })
    }

    fn open_parts(
        datagram: &[u8],
        key: &Gcm,
        now: Ticks,
    ) -> Result<([u8; NONCE_LEN], Ticks, Control), LinkError> {
        let ty = link_type(datagram)?;
        if !ty.is_control() || datagram.len() < SEAL_OVERHEAD {
            return Err(LinkError::Malformed(ty));
        }
        let nonce: [u8; NONCE_LEN] = datagram[1..1 + NONCE_LEN]
            .try_into()
            .map_err(|_| LinkError::Malformed(ty))?;
        let sealed = &datagram[1 + NONCE_LEN..];
        let mut body = Zeroizing::new(vec![0u8; sealed.len() - TAG_LEN]);
        crypto::open_to(key, &nonce, &datagram[..1], sealed, &mut body)
            .map_err(|_| LinkError::BadTag)?;
        let (sent, msg) = Control::decode_body(ty, &body).ok_or(LinkError::Malformed(ty))?;
        let off = sent.abs_diff(now);
        if off > CONTROL_WINDOW {
            return Err(LinkError::Stale(off / TICKS_PER_SECOND));
        }
        Ok((nonce, sent, msg))
    }
}

/// An authentic control message, not yet checked for replay.
#[derive(Debug)]
pub struct Opened {
    nonce: [u8; NONCE_LEN],
    /// The sender's clock when it sealed the message.
    pub sent: Ticks,
    pub msg: Control,
}

/// Refuses replayed control messages: the nonce of every accepted message is kept until its
/// `sent` time leaves [`CONTROL_WINDOW`], after which the window check refuses it anyway.
/// Works across any number of sockets on either side (nonces are random, not per-socket
/// counters), and needs no state shared between sender and receiver. A receiver that starts
/// afresh has no memory of earlier nonces, so it refuses messages sent before it started.
#[derive(Debug)]
pub struct ReplayGuard {
    /// Nonce -> when it may be forgotten.
    seen: HashMap<[u8; NONCE_LEN], Ticks>,
    order: VecDeque<(Ticks, [u8; NONCE_LEN])>,
    /// The receiver's start: what was sent before it may have been accepted by an earlier
    /// run of the receiver, so it is refused.
    not_before: Option<Ticks>,
    cap: usize,
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard::new(REPLAY_GUARD_CAP)
    }
}

impl ReplayGuard {
    pub fn new(cap: usize) -> Self {
        ReplayGuard {
            seen: HashMap::new(),
            order: VecDeque::new(),
            not_before: None,
            cap,
        }
    }

    /// Refuses, from now on, messages sent before `start` (the receiver's start).
    pub fn set_start(&mut self, start: Ticks) {
        self.not_before = Some(start);
    }

    /// Nonces remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Accepts `o` unless it was sent before the receiver started or was accepted before.
    pub fn accept(&mut self, o: &Opened, now: Ticks) -> Result<(), LinkError> {
        self.check(o.nonce, o.sent, now)
    }

    fn check(&mut self, nonce: [u8; NONCE_LEN], sent: Ticks, now: Ticks) -> Result<(), LinkError> {
        if let Some(start) = self.not_before
            && sent < start
        {
            return Err(LinkError::Stale(
                start.0.saturating_sub(sent.0) / TICKS_PER_SECOND,
            ));
        }
        while let Some(&(until, n)) = self.order.front() {
            if until >= now {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&n).is_some_and(|u| *u < now) {
                self.seen.remove(&n);
            }
        }
        if self.seen.contains_key(&nonce) {
            return Err(LinkError::Replay);
        }
        if self.seen.len() >= self.cap {
            return Err(LinkError::GuardFull);
        }
        let until = Ticks(sent.0.saturating_add(CONTROL_WINDOW));
        self.seen.insert(nonce, until);
        // `order` is by insertion; an entry behind a later-expiring one waits for it, which
        // only keeps it longer.
        self.order.push_back((until, nonce));
        Ok(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.array()?))
    }
    fn tuple(&mut self) -> Option<SocketAddr> {
        let (a, n) = parse_tuple(self.b.get(self.at..)?).ok()?;
        self.at += n;
        Some(a)
    }
}

/// The type of a host-link datagram.
pub fn link_type(datagram: &[u8]) -> Result<LinkType, LinkError> {
    let b = *datagram.first().ok_or(LinkError::Empty)?;
    LinkType::from_byte(b).ok_or(LinkError::UnknownType(b))
}

/// Writes `type || u64 conn_id || datagram` into `out`; returns the length.
/// `out` must hold `DATA_HEADER_LEN + datagram.len()` bytes.
pub fn emit_conn_data(ty: LinkType, conn_id: u64, datagram: &[u8], out: &mut [u8]) -> usize {
    out[0] = ty as u8;
    out[1..9].copy_from_slice(&conn_id.to_be_bytes());
    out[9..9 + datagram.len()].copy_from_slice(datagram);
    DATA_HEADER_LEN + datagram.len()
}

/// Splits a TO_HOST_DATA / TO_CLIENT_DATA datagram into `(conn_id, inner datagram)`.
pub fn parse_conn_data(datagram: &[u8]) -> Result<(u64, &[u8]), LinkError> {
    let ty = link_type(datagram)?;
    if !matches!(ty, LinkType::ToHostData | LinkType::ToClientData)
        || datagram.len() <= DATA_HEADER_LEN
    {
        return Err(LinkError::Malformed(ty));
    }
    let id = u64::from_be_bytes(
        datagram[1..9]
            .try_into()
            .map_err(|_| LinkError::Malformed(ty))?,
    );
    Ok((id, &datagram[DATA_HEADER_LEN..]))
}

/// Writes `type || Tuple(client) || datagram`; `out` must hold `1 + 19 + datagram.len()`.
pub fn emit_tuple_data(
    ty: LinkType,
    client: &SocketAddr,
    datagram: &[u8],
    out: &mut [u8],
) -> usize {
    out[0] = ty as u8;
    let n = emit_tuple(client, &mut out[1..]);
    out[1 + n..1 + n + datagram.len()].copy_from_slice(datagram);
    1 + n + datagram.len()
}

/// Splits a TO_HOST_HANDSHAKE / TO_CLIENT_REPLY datagram into `(client tuple, inner datagram)`.
pub fn parse_tuple_data(datagram: &[u8]) -> Result<(SocketAddr, &[u8]), LinkError> {
    let ty = link_type(datagram)?;
    if !matches!(ty, LinkType::ToHostHandshake | LinkType::ToClientReply) {
        return Err(LinkError::Malformed(ty));
    }
    let (client, n) = parse_tuple(&datagram[1..]).map_err(|_| LinkError::Malformed(ty))?;
    let inner = &datagram[1 + n..];
    if inner.is_empty() {
        return Err(LinkError::Malformed(ty));
    }
    Ok((client, inner))
}

/// Writes `0x03 || Tuple(client) || handshake || mac`; returns the length, or 0 when `out`
/// is too small (it needs `1 + 19 + handshake.len() + 16`).
pub fn emit_handshake(
    mac: &HandshakeMac,
    client: &SocketAddr,
    handshake: &[u8],
    out: &mut [u8],
) -> usize {
    if out.len() < 1 + MAX_TUPLE_LEN + handshake.len() + HANDSHAKE_MAC_LEN {
        return 0;
    }
    let n = emit_tuple_data(LinkType::ToHostHandshake, client, handshake, out);
    let tag = mac.tag(&out[..n]);
    out[n..n + HANDSHAKE_MAC_LEN].copy_from_slice(&tag);
    n + HANDSHAKE_MAC_LEN
}

/// Checks the MAC of a TO_HOST_HANDSHAKE (in constant time) and returns the datagram
/// without it, for [`parse_tuple_data`].
pub fn verify_handshake<'a>(mac: &HandshakeMac, datagram: &'a [u8]) -> Result<&'a [u8], LinkError> {
    let ty = link_type(datagram)?;
    if ty != LinkType::ToHostHandshake || datagram.len() <= HANDSHAKE_MAC_LEN {
        return Err(LinkError::Malformed(ty));
    }
    let (framed, tag) = datagram.split_at(datagram.len() - HANDSHAKE_MAC_LEN);
    if !crypto::ct_eq(&mac.tag(framed), tag) {
        return Err(LinkError::BadTag);
    }
    Ok(framed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Control> {
        let a: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let b: SocketAddr = "[2001:db8::5]:443".parse().unwrap();
        vec![
            Control::Register {
                boot: 11,
                request: 1,
                conn_id: 7,
                client: b,
            },
            Control::Registered {
                request: 1,
                conn_id: 7,
                epoch: 300,
                index: 65535,
                rebind_secret: [9; 32],
                slot_keys: vec![[1; 16]; 16],
            },
            Control::RegisterFailed {
                request: 2,
                conn_id: 8,
                reason: RegisterFailure::Full as u8,
            },
            Control::Close {
                boot: 11,
                request: 3,
                conn_id: 7,
            },
            Control::Closed {
                request: 3,
                conn_id: 7,
                found: true,
            },
            Control::Rebound {
                conn_id: 7,
                t: Ticks(5),
                old: Some(a),
                new: b,
            },
            Control::Rebound {
                conn_id: 7,
                t: Ticks(5),
                old: None,
                new: a,
            },
            Control::Expired { conn_id: 7 },
            Control::Hello { boot: 11 },
            Control::HelloAck {
                boot: 11,
                released: 3,
            },
        ]
    }

    #[test]
    fn control_roundtrip_and_tamper() {
        let key = LinkKey([3; 16]).cipher();
        let other = LinkKey([4; 16]).cipher();
        for m in samples() {
            let sealed = m.seal(&key, Ticks(1000));
            assert_eq!(Control::open(&sealed, &key, Ticks(1000)).unwrap(), m);
            assert_eq!(
                Control::open(&sealed, &other, Ticks(1000)),
                Err(LinkError::BadTag)
            );
            let mut bad = sealed.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert_eq!(
                Control::open(&bad, &key, Ticks(1000)),
                Err(LinkError::BadTag)
            );
            for cut in 0..sealed.len() {
                assert!(Control::open(&sealed[..cut], &key, Ticks(1000)).is_err());
            }
        }
    }

    #[test]
    fn stale_messages_refused_whatever_their_type() {
        let key = LinkKey([3; 16]).cipher();
        let late = Ticks(1000 + CONTROL_WINDOW + TICKS_PER_SECOND);
        for m in samples() {
            let sealed = m.seal(&key, Ticks(1000));
            assert_eq!(
                Control::open(&sealed, &key, late),
                Err(LinkError::Stale(61))
            );
        }
    }

    #[test]
    fn replay_guard_refuses_a_second_copy_within_the_window() {
        let key = LinkKey([3; 16]).cipher();
        let mut guard = ReplayGuard::default();
        let m = Control::Expired { conn_id: 9 };
        let a = m.seal(&key, Ticks(1000));
        let b = m.seal(&key, Ticks(1000));
        assert_eq!(
            Control::open_fresh(&a, &key, Ticks(1000), &mut guard),
            Ok(m.clone())
        );
        assert_eq!(
            Control::open_fresh(&b, &key, Ticks(1000), &mut guard),
            Ok(m.clone())
        );
        let later = Ticks(1000 + CONTROL_WINDOW);
        assert_eq!(
            Control::open_fresh(&a, &key, later, &mut guard),
            Err(LinkError::Replay)
        );
        // Past the window the copy is stale, and its nonce is forgotten.
        let gone = Ticks(later.0 + 1);
        assert!(matches!(
            Control::open_fresh(&a, &key, gone, &mut guard),
            Err(LinkError::Stale(_))
        ));
        let c = m.seal(&key, gone);
        assert!(Control::open_fresh(&c, &key, gone, &mut guard).is_ok());
        assert_eq!(guard.len(), 1);
        // A receiver that started after a message was sent refuses it.
        let mut fresh = ReplayGuard::default();
        fresh.set_start(Ticks(1001));
        assert!(matches!(
            Control::open_fresh(&b, &key, Ticks(1001), &mut fresh),
            Err(LinkError::Stale(_))
        ));
        // Full: refuse rather than forget early.
        let mut tiny = ReplayGuard::new(1);
        assert!(Control::open_fresh(&a, &key, Ticks(1000), &mut tiny).is_ok());
        assert_eq!(
            Control::open_fresh(&b, &key, Ticks(1000), &mut tiny),
            Err(LinkError::GuardFull)
        );
    }

    #[test]
    fn handshake_mac_binds_tuple_and_bytes() {
        let mac = LinkKey([3; 16]).handshake_mac();
        let other = LinkKey([4; 16]).handshake_mac();
        let a: SocketAddr = "10.0.0.9:77".parse().unwrap();
        let mut out = [0u8; 128];
        let n = emit_handshake(&mac, &a, &[b'H'; 40], &mut out);
        let framed = verify_handshake(&mac, &out[..n]).unwrap();
        assert_eq!(parse_tuple_data(framed), Ok((a, &[b'H'; 40][..])));
        assert_eq!(verify_handshake(&other, &out[..n]), Err(LinkError::BadTag));
        for i in 0..n {
            let mut bad = out;
            bad[i] ^= 1;
            assert!(verify_handshake(&mac, &bad[..n]).is_err(), "byte {i}");
        }
        assert_eq!(emit_handshake(&mac, &a, &[0; 100], &mut out[..100]), 0);
    }

    #[test]
    fn data_framing() {
        let mut out = [0u8; 64];
        let n = emit_conn_data(LinkType::ToHostData, 42, b"Dxyz", &mut out);
        assert_eq!(parse_conn_data(&out[..n]), Ok((42, &b"Dxyz"[..])));
        assert!(parse_conn_data(&out[..9]).is_err());
        let a: SocketAddr = "10.0.0.9:77".parse().unwrap();
        let n = emit_tuple_data(LinkType::ToClientReply, &a, b"hrep", &mut out);
        assert_eq!(parse_tuple_data(&out[..n]), Ok((a, &b"hrep"[..])));
        assert!(parse_tuple_data(&out[..8]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let key = LinkKey([3; 16]).cipher();
            let _ = Control::open(&bytes, &key, Ticks(0));
            let _ = verify_handshake(&LinkKey([3; 16]).handshake_mac(), &bytes);
            let _ = parse_conn_data(&bytes);
            let _ = parse_tuple_data(&bytes);
        }
    }
}
