//! The 16-byte stamp at the front of every load-generator DATA payload. The reference host
//! echoes payloads verbatim, so the echo brings the stamp back:
//!
//! ```text
//! u16 magic 0x4c47 ("LG") || u16 gen || u32 client || u32 seq || u32 sent_us
//! ```
//!
//! - `gen`: the client's move count when it sent the packet, so an echo can be told to belong
//!   to a packet sent after the latest move (traffic recovery).
//! - `client`: the global client number; an echo delivered to another client is a bug.
//! - `sent_us`: microseconds since the run's base instant, wrapping (RTTs are differences).
//!
//! The rest of the payload is filler. The magic is non-zero, so a stamped payload is never
//! the client library's keepalive (24 zero bytes).
#![forbid(unsafe_code)]

/// Stamp length; the smallest payload the generator sends.
pub const STAMP_LEN: usize = 16;
pub const MAGIC: u16 = 0x4c47;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub gen_: u16,
    pub client: u32,
    pub seq: u32,
    pub sent_us: u32,
}

impl Stamp {
    /// Writes the stamp into the first 16 bytes of `payload` (which must be that long) and
    /// fills the rest with a pattern derived from `seq`.
    pub fn emit(&self, payload: &mut [u8]) {
        payload[0..2].copy_from_slice(&MAGIC.to_be_bytes());
        payload[2..4].copy_from_slice(&self.gen_.to_be_bytes());
        payload[4..8].copy_from_slice(&self.client.to_be_bytes());
        payload[8..12].copy_from_slice(&self.seq.to_be_bytes());
        payload[12..16].copy_from_slice(&self.sent_us.to_be_bytes());
        let fill = (self.seq as u8) | 1;
        for b in &mut payload[STAMP_LEN..] {
            *b = fill;
        }
    }

    /// Reads a stamp back; `None` if the payload is too short or the magic is wrong.
    pub fn parse(payload: &[u8]) -> Option<Stamp> {
        let p: &[u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
        let u16_at = |i: usize| u16::from_be_bytes([p[i], p[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        (u16_at(0) == MAGIC).then(|| Stamp {
            gen_: u16_at(2),
            client: u32_at(4),
            seq: u32_at(8),
            sent_us: u32_at(12),
        })
    }

    /// Round-trip time in microseconds, given the receive time on the same clock.
    pub fn rtt_us(&self, now_us: u32) -> u32 {
        now_us.wrapping_sub(self.sent_us)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_known_bytes() {
        let s = Stamp {
            gen_: 0x0102,
            client: 0x0304_0506,
            seq: 0x0708_090a,
            sent_us: 0xfffffff0,
        };
        let mut p = [0u8; 20];
        s.emit(&mut p);
        assert_eq!(
            p[..16],
            [
                0x4c, 0x47, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xff, 0xff, 0xff, 0xf0
            ]
        );
        assert_eq!(p[16..], [0x0b; 4]);
        assert_eq!(Stamp::parse(&p), Some(s));
        // Wrapping RTT across the u32 boundary.
        assert_eq!(s.rtt_us(0x10), 0x20);
    }

    #[test]
    fn rejects_short_and_foreign_payloads() {
        assert_eq!(Stamp::parse(&[0x4c, 0x47, 0, 0]), None);
        assert_eq!(Stamp::parse(&[0u8; 24]), None, "a keepalive is not a stamp");
        let mut p = [0u8; 16];
        Stamp {
            gen_: 0,
            client: 0,
            seq: 0,
            sent_us: 0,
        }
        .emit(&mut p);
        assert!(p.iter().any(|b| *b != 0));
        p[0] ^= 1;
        assert_eq!(Stamp::parse(&p), None);
    }
}
