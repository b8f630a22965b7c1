//! The tunnel's framing inside a DATA payload (docs/tunnel.md, "Framing"): one 4-byte
//! header, then the application datagram.
//!
//! ```text
//! 0       1         2               4
//! +-------+---------+---------------+---------------- - -
//! | kind  | service | flow (u16 BE) | payload (DATA only)
//! +-------+---------+---------------+---------------- - -
//! ```
//!
//! - `kind` 0x01 DATA: an application datagram of flow `flow` to (client → host) or from
//!   (host → client) service `service`.
//! - `kind` 0x02 CLOSE (host → client, no payload): the host refused or dropped the flow
//!   (flow limit, no such service, backend error); the client forgets it.
//! - `kind` 0x03 ACK (host → client, no payload): sent when a client sends and nothing went
//!   back for a while, so a one-way flow still gives the client authenticated traffic and
//!   its silent-path probe (PROTOCOL.md §6, cookie request) stays quiet.
//!
//! The whole frame is the DATA payload, sealed end to end (PROTOCOL.md §7): the gateway sees
//! neither the flow nor the service. No frame is 24 zero bytes (the keepalive payload): the
//! kind byte is never zero.
#![forbid(unsafe_code)]

/// Frame header length: the tunnel's own overhead per datagram.
pub const HEADER_LEN: usize = 4;
/// Largest DATA payload a connection carries: the client's `MAX_PAYLOAD` (checked at
/// compile time in `tunnel/mod.rs`).
pub const MAX_FRAME: usize = 1200;
/// Largest application datagram the tunnel carries.
pub const MAX_APP_PAYLOAD: usize = MAX_FRAME - HEADER_LEN;
/// Bytes added to each application datagram on the client ↔ gateway path: the frame
/// header plus a DATA's header and tag (25; PROTOCOL.md §7). The gateway ↔ host link adds
/// its own 9-byte header on top.
pub const OVERHEAD: usize = HEADER_LEN + crate::wire::DATA_OVERHEAD;

/// A frame's kind byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Data = 0x01,
    Close = 0x02,
    Ack = 0x03,
}

/// Why a frame did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is shorter than its 4-byte header")]
    Short(usize),
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{0:?} frame carries {1} payload bytes (it has none)")]
    UnexpectedPayload(Kind, usize),
    #[error("payload of {0} bytes exceeds the maximum of {MAX_APP_PAYLOAD}")]
    TooLarge(usize),
}

/// A parsed frame, borrowing its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: Kind,
    pub service: u8,
    pub flow: u16,
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Parses a frame; length-checked, never panics.
    pub fn parse(b: &'a [u8]) -> Result<Frame<'a>, FrameError> {
        let Some((head, payload)) = b.split_first_chunk::<HEADER_LEN>() else {
            return Err(FrameError::Short(b.len()));
        };
        let kind = match head[0] {
            0x01 => Kind::Data,
            0x02 => Kind::Close,
            0x03 => Kind::Ack,
            k => return Err(FrameError::UnknownKind(k)),
        };
        if kind != Kind::Data && !payload.is_empty() {
            return Err(FrameError::UnexpectedPayload(kind, payload.len()));
        }
        if payload.len() > MAX_APP_PAYLOAD {
            return Err(FrameError::TooLarge(payload.len()));
        }
        Ok(Frame {
            kind,
            service: head[1],
            flow: u16::from_be_bytes([head[2], head[3]]),
            payload,
        })
    }

    /// The frame's length on the wire.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Never true: a frame has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the frame into `out` and returns its length; `None` if `out` is too short or
    /// the payload too large.
    pub fn emit(&self, out: &mut [u8]) -> Option<usize> {
        if self.payload.len() > MAX_APP_PAYLOAD {
            return None;
        }
        let out = out.get_mut(..self.len())?;
        out[0] = self.kind as u8;
        out[1] = self.service;
        out[2..4].copy_from_slice(&self.flow.to_be_bytes());
        out[HEADER_LEN..].copy_from_slice(self.payload);
        Some(self.len())
    }

    /// The frame as an owned buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        let n = self.emit(&mut v);
        debug_assert_eq!(n, Some(v.len()));
        v
    }

    /// A DATA frame.
    pub fn data(service: u8, flow: u16, payload: &'a [u8]) -> Frame<'a> {
        Frame {
            kind: Kind::Data,
            service,
            flow,
            payload,
        }
    }

    /// A CLOSE or ACK frame (no payload).
    pub fn control(kind: Kind, service: u8, flow: u16) -> Frame<'static> {
        Frame {
            kind,
            service,
            flow,
            payload: &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_layout() {
        let f = Frame::data(7, 0x1234, b"hi");
        assert_eq!(f.to_vec(), [1, 7, 0x12, 0x34, b'h', b'i']);
        assert_eq!(Frame::parse(&f.to_vec()), Ok(f));
        let c = Frame::control(Kind::Close, 1, 2);
        assert_eq!(Frame::parse(&c.to_vec()), Ok(c));
        assert_eq!(OVERHEAD, 29);
    }

    #[test]
    fn rejects() {
        assert_eq!(Frame::parse(&[1, 0, 0]), Err(FrameError::Short(3)));
        assert_eq!(Frame::parse(&[0; 24]), Err(FrameError::UnknownKind(0)));
        assert_eq!(
            Frame::parse(&[3, 0, 0, 0, 9]),
            Err(FrameError::UnexpectedPayload(Kind::Ack, 1))
        );
        let big = vec![1u8; HEADER_LEN + MAX_APP_PAYLOAD + 1];
        assert_eq!(
            Frame::parse(&big),
            Err(FrameError::TooLarge(MAX_APP_PAYLOAD + 1))
        );
        assert_eq!(Frame::data(0, 0, &big).emit(&mut [0u8; 4096]), None);
        assert_eq!(Frame::data(0, 0, b"xy").emit(&mut [0u8; 5]), None);
    }

    proptest! {
        /// Arbitrary bytes never panic, and whatever parses emits back to the same bytes.
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..1300)) {
            if let Ok(f) = Frame::parse(&b) {
                prop_assert_eq!(f.to_vec(), b);
            }
        }
    }
}
