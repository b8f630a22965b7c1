//! Datagram layouts of PROTOCOL.md §4–7: length-checked views for untrusted bytes and
//! builders that write into caller-owned buffers. Nothing here allocates or panics on input.
#![forbid(unsafe_code)]

mod data;
mod delivery;
mod handshake;
mod rebind;
mod tuple;
mod unrecognized;

pub use data::{DATA_HEADER_LEN, DATA_OVERHEAD, DataView, data_nonce, seal_data};
pub use delivery::{
    DELIVERY_HEADER_LEN, DeliveryError, EpochKeysEntry, KEYS_ACK_LEN, KEYS_ACK_TYPE, KEYS_TYPE,
    NewKeys, delivery_nonce, emit_epoch_keys, emit_keys_delivered, epoch_keys_entry_len,
    keys_body_len, keys_len, open_keys, open_keys_ack, parse_epoch_keys, parse_keys_delivered,
    seal_keys, seal_keys_ack,
};
pub use handshake::{
    ClientCredentials, HANDSHAKE_LEN, HandshakeReply, HandshakeView, ReplyError, build_handshake,
    build_handshake_reply, handshake_reply_len, open_handshake, open_handshake_reply,
};
pub use rebind::{
    REBIND_ACK_LEN, REBIND_FIXED_LEN, REBIND_SLOTS_AT, RebindAckView, RebindView, build_rebind_ack,
    emit_rebind_prefix, rebind_len, slots_for_rebind_len,
};
pub use tuple::{
    MAX_TUPLE_LEN, TUPLE_V4_LEN, TUPLE_V6_LEN, addr16, canonical, emit_tuple, parse_tuple,
    tuple_len,
};
pub use unrecognized::{UNRECOGNIZED_V4_LEN, UNRECOGNIZED_V6_LEN, Unrecognized, unrecognized_len};

/// Smallest and largest slot counts `S` (§2).
pub const MIN_SLOTS: usize = 1;
pub const MAX_SLOTS: usize = 32;

/// The first byte of every datagram (§4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    Handshake = 0x48,
    HandshakeReply = 0x68,
    Data = 0x44,
    Unrecognized = 0x55,
    Rebind = 0x52,
    RebindAck = 0x72,
}

impl MsgType {
    pub const ALL: [MsgType; 6] = [
        MsgType::Handshake,
        MsgType::HandshakeReply,
        MsgType::Data,
        MsgType::Unrecognized,
        MsgType::Rebind,
        MsgType::RebindAck,
    ];

    pub fn from_byte(b: u8) -> Option<MsgType> {
        MsgType::ALL.into_iter().find(|t| *t as u8 == b)
    }

    /// Classifies a datagram by its first byte.
    pub fn of(datagram: &[u8]) -> Result<MsgType, WireError> {
        let first = *datagram.first().ok_or(WireError::Empty)?;
        MsgType::from_byte(first).ok_or(WireError::UnknownType(first))
    }

    /// A short lowercase name for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Handshake => "handshake",
            MsgType::HandshakeReply => "handshake_reply",
            MsgType::Data => "data",
            MsgType::Unrecognized => "unrecognized",
            MsgType::Rebind => "rebind",
            MsgType::RebindAck => "rebind_ack",
        }
    }
}

/// Why bytes do not parse as the expected datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty datagram")]
    Empty,
    #[error("unknown datagram type 0x{0:02x}")]
    UnknownType(u8),
    #[error("expected a {expected:?} datagram, got type 0x{got:02x}")]
    WrongType { expected: MsgType, got: u8 },
    #[error("{what}: expected {expected} bytes, got {got}")]
    BadLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: expected at least {min} bytes, got {got}")]
    TooShort {
        what: &'static str,
        min: usize,
        got: usize,
    },
    #[error("unknown address family {0} (expected 4 or 6)")]
    BadFamily(u8),
    #[error("slot count {0} outside 1..=32")]
    BadSlots(usize),
    #[error("handshake padding is not zero")]
    BadPadding,
}

/// Checks the type byte and exact length.
fn check_exact(
    buf: &[u8],
    ty: MsgType,
    what: &'static str,
    expected: usize,
) -> Result<(), WireError> {
    check_type(buf, ty)?;
    if buf.len() != expected {
        return Err(WireError::BadLength {
            what,
            expected,
            got: buf.len(),
        });
    }
    Ok(())
}

fn check_type(buf: &[u8], ty: MsgType) -> Result<(), WireError> {
    let first = *buf.first().ok_or(WireError::Empty)?;
    if first != ty as u8 {
        return Err(WireError::WrongType {
            expected: ty,
            got: first,
        });
    }
    Ok(())
}

/// Reads a big-endian u64 at `at`; callers have checked the length.
fn be_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

fn array<const N: usize>(buf: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&buf[at..at + N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_bytes() {
        assert_eq!(MsgType::of(b"H..."), Ok(MsgType::Handshake));
        assert_eq!(MsgType::of(b"h"), Ok(MsgType::HandshakeReply));
        assert_eq!(MsgType::of(b"D"), Ok(MsgType::Data));
        assert_eq!(MsgType::of(b"U"), Ok(MsgType::Unrecognized));
        assert_eq!(MsgType::of(b"R"), Ok(MsgType::Rebind));
        assert_eq!(MsgType::of(b"r"), Ok(MsgType::RebindAck));
        assert_eq!(MsgType::of(b"x"), Err(WireError::UnknownType(b'x')));
        assert_eq!(MsgType::of(b""), Err(WireError::Empty));
    }
}
