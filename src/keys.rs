//! Gateway secrets and the key schedule of PROTOCOL.md §3, and the UNRECOGNIZED cookie (§5).
//!
//! ```text
//! PRK        = Extract("mesh-rebind/v1", M)
//! K[e][i][b] = Expand(PRK, "slot"   || u32(e) || u8(i) || u8(b), 16)
//! Kc[e]      = Expand(PRK, "cookie" || u32(e), 16)
//! ```
#![forbid(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;

use aes::cipher::{Block, BlockCipherEncrypt};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::crypto;
use crate::time::Ticks;
use crate::wire::{MAX_SLOTS, MIN_SLOTS, addr16};

/// Length of the master secret `M`.
pub const MASTER_LEN: usize = 32;
const PRK_SALT: &[u8] = b"mesh-rebind/v1";

/// The gateway's 32-byte master secret `M`. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterSecret([u8; MASTER_LEN]);

impl MasterSecret {
    pub fn from_bytes(bytes: [u8; MASTER_LEN]) -> Self {
        MasterSecret(bytes)
    }

    /// A fresh secret from the OS RNG.
    pub fn generate() -> Self {
        MasterSecret(crypto::random_array())
    }

    pub fn expose(&self) -> &[u8; MASTER_LEN] {
        &self.0
    }
}

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

/// A slot count outside `1..=32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("slot count S = {0} is outside 1..=32")]
pub struct BadSlotCount(pub usize);

pub fn check_slots(slots: usize) -> Result<usize, BadSlotCount> {
    if (MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
        Ok(slots)
    } else {
        Err(BadSlotCount(slots))
    }
}

fn prk(master: &MasterSecret) -> Hkdf<Sha256> {
    Hkdf::<Sha256>::new(Some(PRK_SALT), master.expose())
}

fn cookie_key(prk: &Hkdf<Sha256>, epoch: u32) -> Zeroizing<[u8; 16]> {
    let mut kc = Zeroizing::new([0u8; 16]);
    prk.expand_multi_info(&[b"cookie", &epoch.to_be_bytes()], &mut *kc)
        .expect("16-byte HKDF output");
    kc
}

/// Every key of one epoch: the 2·S slot keys and the cookie key.
pub struct EpochKeys {
    epoch: u32,
    /// `slot_keys[i][b] = K[e][i][b]`.
    slot_keys: Zeroizing<Vec<[[u8; 16]; 2]>>,
    /// `Kc[e]`, expanded once; the `aes` crate zeroizes it on drop.
    cookie: crypto::FastAes128,
}

impl fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochKeys")
            .field("epoch", &self.epoch)
            .field("slots", &self.slots())
            .finish_non_exhaustive()
    }
}

impl EpochKeys {
    /// Derives epoch `epoch` with `slots` slot pairs from `master`.
    pub fn derive(master: &MasterSecret, epoch: u32, slots: usize) -> Result<Self, BadSlotCount> {
        check_slots(slots)?;
        let hk = prk(master);
        let e = epoch.to_be_bytes();
        let slot_keys = (0..slots)
            .map(|i| {
                [0u8, 1u8].map(|b| {
                    let mut k = [0u8; 16];
                    hk.expand_multi_info(&[b"slot", &e, &[i as u8], &[b]], &mut k)
                        .expect("16-byte HKDF output");
                    k
                })
            })
            .collect();
        Ok(EpochKeys {
            epoch,
            slot_keys: Zeroizing::new(slot_keys),
            cookie: crypto::aes128(&cookie_key(&hk, epoch)),
        })
    }

    /// `Kc[e]` as bytes, for conformance checks; the gateway keeps only the expanded cipher.
    pub fn cookie_key_bytes(master: &MasterSecret, epoch: u32) -> Zeroizing<[u8; 16]> {
        cookie_key(&prk(master), epoch)
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// `e mod 256`, as carried in packets.
    pub fn epoch_byte(&self) -> u8 {
        self.epoch as u8
    }

    /// S.
    pub fn slots(&self) -> usize {
        self.slot_keys.len()
    }

    /// Number of indexes, `2^S`.
    pub fn index_space(&self) -> u64 {
        1u64 << self.slots()
    }

    /// Both keys of every slot, `[i][b]`; for the trial engine.
    pub fn slot_key_pairs(&self) -> &[[[u8; 16]; 2]] {
        &self.slot_keys
    }

    /// The S keys `K[e][i][b_i]` issued to connection index `x`, slot 0 first.
    pub fn client_keys(&self, index: u32) -> Zeroizing<Vec<[u8; 16]>> {
        let s = self.slots();
        Zeroizing::new(
            (0..s)
                .map(|i| self.slot_keys[i][((index >> (s - 1 - i)) & 1) as usize])
                .collect(),
        )
    }

    /// The UNRECOGNIZED cookie for `(observed, t)` (§5): a two-block CBC-MAC under `Kc[e]`.
    ///
    /// ```text
    /// B0 = addr16(observed)
    /// B1 = u16(port) || u8(family) || 5 zero bytes || u64(t)
    /// cookie = AES(Kc, AES(Kc, B0) XOR B1)
    /// ```
    pub fn cookie(&self, observed: &SocketAddr, t: Ticks) -> [u8; 16] {
        let mut block = addr16(observed);
        crypto::aes_encrypt_block(&self.cookie, &mut block);
        xor_cookie_b1(&mut block, observed, t);
        crypto::aes_encrypt_block(&self.cookie, &mut block);
        block
    }

    /// [`Self::cookie`] for each `(observed, t)` into `out` (same length): eight CBC-MACs
    /// run abreast, so eight cost about what one costs alone (two block latencies).
    pub fn cookies(&self, inputs: &[(&SocketAddr, Ticks)], out: &mut [[u8; 16]]) {
        for (group, dst) in inputs.chunks(8).zip(out.chunks_mut(8)) {
            // Always 8 blocks, so the AES-NI path takes its 8-wide route; padding is unread.
            let mut blocks = [Block::<crypto::FastAes128>::default(); 8];
            for (b, (observed, _)) in blocks.iter_mut().zip(group) {
                *b = addr16(observed).into();
            }
            self.cookie.encrypt_blocks(&mut blocks);
            for (b, (observed, t)) in blocks.iter_mut().zip(group) {
                let mut x: [u8; 16] = (*b).into();
                xor_cookie_b1(&mut x, observed, *t);
                *b = x.into();
            }
            self.cookie.encrypt_blocks(&mut blocks);
            for (d, b) in dst.iter_mut().zip(&blocks) {
                *d = (*b).into();
            }
        }
    }

    /// Constant-time check of a presented cookie.
    pub fn cookie_matches(&self, observed: &SocketAddr, t: Ticks, presented: &[u8; 16]) -> bool {
        crypto::ct_eq(&self.cookie(observed, t), presented)
    }
}

/// `block ^= B1`, the cookie's second block: `u16(port) || u8(family) || 5 zero bytes || u64(t)`.
fn xor_cookie_b1(block: &mut [u8; 16], observed: &SocketAddr, t: Ticks) {
    let mut b1 = [0u8; 16];
    b1[0..2].copy_from_slice(&observed.port().to_be_bytes());
    b1[2] = if observed.is_ipv4() { 4 } else { 6 };
    b1[8..16].copy_from_slice(&t.0.to_be_bytes());
    for (a, b) in block.iter_mut().zip(b1) {
        *a ^= b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_cookies_equal_single_ones() {
        let k = EpochKeys::derive(&MasterSecret::from_bytes([5; 32]), 2, 16).unwrap();
        let addrs: Vec<SocketAddr> = (0..19u16)
            .map(|i| {
                if i % 3 == 0 {
                    SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, i], 1000 + i))
                } else {
                    SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 1000 + i))
                }
            })
            .collect();
        // Every group size 0..=19 covers full, partial and empty groups of 8.
        for n in 0..=addrs.len() {
            let inputs: Vec<(&SocketAddr, Ticks)> = addrs[..n]
                .iter()
                .enumerate()
                .map(|(i, a)| (a, Ticks(1_000_000 + i as u64)))
                .collect();
            let mut out = vec![[0u8; 16]; n];
            k.cookies(&inputs, &mut out);
            for ((a, t), got) in inputs.iter().zip(&out) {
                assert_eq!(*got, k.cookie(a, *t));
            }
        }
    }

    #[test]
    fn slot_zero_is_msb() {
        let k = EpochKeys::derive(&MasterSecret::from_bytes([1; 32]), 3, 4).unwrap();
        let pairs = k.slot_key_pairs();
        let x = 0b1010;
        let ck = k.client_keys(x);
        assert_eq!(ck[0], pairs[0][1]);
        assert_eq!(ck[1], pairs[1][0]);
        assert_eq!(ck[2], pairs[2][1]);
        assert_eq!(ck[3], pairs[3][0]);
        assert_eq!(k.index_space(), 16);
    }

    #[test]
    fn slot_bounds() {
        let m = MasterSecret::from_bytes([1; 32]);
        assert!(EpochKeys::derive(&m, 0, 0).is_err());
        assert!(EpochKeys::derive(&m, 0, 33).is_err());
        assert!(EpochKeys::derive(&m, 0, 32).is_ok());
    }

    #[test]
    fn cookie_binds_tuple_and_time() {
        let k = EpochKeys::derive(&MasterSecret::from_bytes([1; 32]), 3, 4).unwrap();
        let a: SocketAddr = "10.0.0.1:5".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:6".parse().unwrap();
        let c = k.cookie(&a, Ticks(1));
        assert!(k.cookie_matches(&a, Ticks(1), &c));
        assert!(!k.cookie_matches(&b, Ticks(1), &c));
        assert!(!k.cookie_matches(&a, Ticks(2), &c));
    }

    #[test]
    fn debug_hides_secrets() {
        let m = MasterSecret::from_bytes([0xAB; 32]);
        assert!(!format!("{m:?}").contains("ab"));
        let k = EpochKeys::derive(&m, 3, 4).unwrap();
        assert!(!format!("{k:?}").to_lowercase().contains("abab"));
    }
}
