//! The host link: datagrams between gateway workers and Mesh hosts (see `docs/hostlink.md`).
//!
//! ```text
//! data plane (plain; the gateway takes host-link datagrams only from configured host addresses)
//!   0x01 TO_HOST_DATA       gateway -> host   u64 conn_id || client DATA datagram
//!   0x02 TO_CLIENT_DATA     host -> gateway   u64 conn_id || DATA datagram for that client
//!   0x03 TO_HOST_HANDSHAKE  gateway -> host   Tuple(client) || HANDSHAKE datagram
//!   0x04 TO_CLIENT_REPLY    host -> gateway   Tuple(client) || HANDSHAKE_REPLY datagram
//! control plane (sealed: type || nonce(12) || AES-128-GCM(link key, nonce, aad = type, body))
//!   0x10 REGISTER           host -> gateway   u64 request || u64 ticks || u64 conn_id || Tuple(client)
//!   0x11 REGISTERED         gateway -> host   u64 request || u64 conn_id || u32 epoch || u8 S || u32 x || R(32) || keys(16*S)
//!   0x12 REGISTER_FAILED    gateway -> host   u64 request || u64 conn_id || u8 reason
//!   0x13 CLOSE              host -> gateway   u64 request || u64 ticks || u64 conn_id
//!   0x14 CLOSED             gateway -> host   u64 request || u64 conn_id || u8 found
//!   0x15 REBOUND            gateway -> host   u64 conn_id || u64 t || u8 had_old || Tuple(old)? || Tuple(new)
//! ```
//!
//! Control messages carry secrets (`R`, slot keys), so they are encrypted and authenticated
//! under a per-host 16-byte link key, with a random 96-bit nonce per message. Requests carry
//! the sender's ticks; the receiver refuses those outside [`CONTROL_WINDOW`] of its clock.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crate::crypto::Gcm;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto::{self, TAG_LEN};
use crate::time::{TICKS_PER_SECOND, Ticks};
use crate::wire::{MAX_SLOTS, MAX_TUPLE_LEN, MIN_SLOTS, emit_tuple, parse_tuple};

/// Requests older or newer than this (in ticks) are refused: 60 s.
pub const CONTROL_WINDOW: u64 = 60 * TICKS_PER_SECOND;
const NONCE_LEN: usize = 12;
/// Bytes a sealed control message adds to its body.
pub const SEAL_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
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
        request: u64,
        #[zeroize(skip)]
        ticks: Ticks,
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
        request: u64,
        #[zeroize(skip)]
        ticks: Ticks,
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
                request,
                conn_id,
                client,
                ..
            } => write!(
                f,
                "Register {{ request: {request}, conn_id: {conn_id}, client: {client} }}"
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
                request, conn_id, ..
            } => write!(f, "Close {{ request: {request}, conn_id: {conn_id} }}"),
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
        }
    }

    fn encode_body(&self) -> Zeroizing<Vec<u8>> {
        let mut b = Zeroizing::new(Vec::with_capacity(64));
        let tuple = |b: &mut Vec<u8>, a: &SocketAddr| {
            let mut t = [0u8; MAX_TUPLE_LEN];
            let n = emit_tuple(a, &mut t);
            b.extend_from_slice(&t[..n]);
        };
        match self {
            Control::Register {
                request,
                ticks,
                conn_id,
                client,
            } => {
                b.extend_from_slice(&request.to_be_bytes());
                b.extend_from_slice(&ticks.0.to_be_bytes());
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
                request,
                ticks,
                conn_id,
            } => {
                b.extend_from_slice(&request.to_be_bytes());
                b.extend_from_slice(&ticks.0.to_be_bytes());
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
        }
        b
    }

    fn decode_body(ty: LinkType, b: &[u8]) -> Option<Control> {
        let mut r = Reader { b, at: 0 };
        let msg = match ty {
            LinkType::Register => Control::Register {
                request: r.u64()?,
                ticks: Ticks(r.u64()?),
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
                request: r.u64()?,
                ticks: Ticks(r.u64()?),
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
            _ => return None,
        };
        (r.at == b.len()).then_some(msg)
    }

    /// Seals the message under `key` with a fresh random nonce.
    pub fn seal(&self, key: &Gcm) -> Vec<u8> {
        let body = self.encode_body();
        let mut out = vec![0u8; SEAL_OVERHEAD + body.len()];
        out[0] = self.link_type() as u8;
        crypto::random_bytes(&mut out[1..1 + NONCE_LEN]);
        out[1 + NONCE_LEN..1 + NONCE_LEN + body.len()].copy_from_slice(&body);
        let (head, sealed) = out.split_at_mut(1 + NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = head[1..].try_into().expect("12-byte nonce");
        crypto::seal_in_place(key, &nonce, &head[..1], sealed);
        out
    }

    /// Opens a sealed control message. Requests (REGISTER, CLOSE) whose ticks are more than
    /// [`CONTROL_WINDOW`] from `now` are refused.
    pub fn open(datagram: &[u8], key: &Gcm, now: Ticks) -> Result<Control, LinkError> {
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
        let msg = Control::decode_body(ty, &body).ok_or(LinkError::Malformed(ty))?;
        if let Control::Register { ticks, .. } | Control::Close { ticks, .. } = &msg {
            let off = ticks.abs_diff(now);
            if off > CONTROL_WINDOW {
                return Err(LinkError::Stale(off / TICKS_PER_SECOND));
            }
        }
        Ok(msg)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Control> {
        let a: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let b: SocketAddr = "[2001:db8::5]:443".parse().unwrap();
        vec![
            Control::Register {
                request: 1,
                ticks: Ticks(1000),
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
                request: 3,
                ticks: Ticks(1000),
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
        ]
    }

    #[test]
    fn control_roundtrip_and_tamper() {
        let key = LinkKey([3; 16]).cipher();
        let other = LinkKey([4; 16]).cipher();
        for m in samples() {
            let sealed = m.seal(&key);
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
    fn stale_requests_refused() {
        let key = LinkKey([3; 16]).cipher();
        let m = &samples()[0];
        let sealed = m.seal(&key);
        let late = Ticks(1000 + CONTROL_WINDOW + TICKS_PER_SECOND);
        assert_eq!(
            Control::open(&sealed, &key, late),
            Err(LinkError::Stale(61))
        );
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
            let _ = parse_conn_data(&bytes);
            let _ = parse_tuple_data(&bytes);
        }
    }
}
