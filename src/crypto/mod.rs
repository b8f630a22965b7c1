//! Thin wrappers over the primitives of PROTOCOL.md §2: AES-128 blocks, AES-128-GCM with the
//! protocol's fixed nonces, HKDF-SHA256, constant-time comparison and the OS RNG.
//!
//! Beside them live the hand-written SIMD paths of these primitives, each with a portable
//! fallback: [`block::FastAes128`] (AES-NI blocks for the cookie and for the `aes-gcm` crate's
//! GCM of HANDSHAKE, DATA and host-link packets), [`gcm::SessionGcm`] (the REBIND session
//! key's GCM: AES-NI + PCLMULQDQ), [`sha256::compress_x2`] (two SHA-NI compressions
//! interleaved, for the KDF) and [`sha256_x16`] (the KDFs of a batch, 16 at a time across
//! AVX-512 lanes; [`KdfPath`] and `REBINDGW_KDF` choose between the two), and the CPU probe
//! and backend choice they and the trial engine ([`crate::engine`]) share ([`cpu`]). Each takes a [`Backend`] explicitly (`with_backend`,
//! or [`sha256::compress_x2_with`]); their plain constructors use [`process_backend`], so
//! `REBINDGW_AES_BACKEND=portable` switches every fast path of the process off, not only the
//! trial engine's, without a rebuild.
//!
//! `unsafe` is confined to `aes_ni.rs`, `block.rs`, `gcm.rs`, `sha256.rs` and `sha256_x16.rs`
//! (intrinsics, unaligned loads and stores, gathers).

// `forbid` would also bind the SIMD child modules, which need `allow(unsafe_code)`;
// `deny` keeps this file free of unsafe code while letting them opt in.
#![deny(unsafe_code)]

#[cfg(target_arch = "x86_64")]
pub(crate) mod aes_ni;
pub mod block;
pub mod cpu;
pub mod gcm;
pub mod sha256;
pub mod sha256_x16;

use aes::cipher::consts::U12;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes_gcm::AesGcm;
use aes_gcm::aead::AeadInOut;
pub use block::FastAes128;
pub use cpu::{
    BACKEND_ENV, Backend, EngineError, KDF_ENV, KdfPath, backend_from_env, backend_from_value,
    kdf_path_from_value, process_backend, process_backend_from_value, process_kdf_path,
};
use cpu::{cpu_features, fast_paths_allowed};
use hkdf::Hkdf;
use sha2::Sha256;
use sha2::block_api::compress256;
use sha256::compress_x2;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// GCM tag length.
pub const TAG_LEN: usize = 16;

/// The all-zero 12-byte nonce used by REBIND, HANDSHAKE and HANDSHAKE_REPLY.
pub const ZERO_NONCE: [u8; 12] = [0; 12];
/// `11 zero bytes || 0x01`, the REBIND_ACK nonce (§6).
pub const ACK_NONCE: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An AEAD tag did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct AuthError;

/// AES-128-GCM (the `aes-gcm` crate) over [`FastAes128`]. Zeroized on drop.
pub type Gcm = AesGcm<FastAes128, U12>;

/// `AES(K, B)` for one block.
pub fn aes_encrypt_block(cipher: &FastAes128, block: &mut [u8; 16]) {
    cipher.encrypt_block(block.into());
}

/// A new AES-128 encryptor (AES-NI when present); round keys are zeroized on drop.
pub fn aes128(key: &[u8; 16]) -> FastAes128 {
    FastAes128::new(key.into())
}

/// AES-128-GCM under `key`; zeroized on drop.
pub fn gcm(key: &[u8; 16]) -> Gcm {
    Gcm::new(key.into())
}

/// Seals `buf[..len-16]` in place and writes the tag into the last 16 bytes of `buf`.
/// `buf.len()` must be at least `TAG_LEN` (callers size it from the wire layout).
pub fn seal_in_place(cipher: &Gcm, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
    let split = buf.len() - TAG_LEN;
    let (msg, tag_out) = buf.split_at_mut(split);
    let tag = cipher
        .encrypt_inout_detached(nonce.into(), aad, msg.into())
        // GCM only fails for messages over 2^36 bytes; ours are tiny.
        .expect("GCM plaintext length within limits");
    tag_out.copy_from_slice(&tag);
}

/// Opens `sealed` (ciphertext || tag) into `out`, which must be `sealed.len() - 16` long.
/// The tag comparison is constant time (done by `aes-gcm`).
pub fn open_to(
    cipher: &Gcm,
    nonce: &[u8; 12],
    aad: &[u8],
    sealed: &[u8],
    out: &mut [u8],
) -> Result<(), AuthError> {
    let Some(split) = sealed.len().checked_sub(TAG_LEN) else {
        return Err(AuthError);
    };
    if out.len() != split {
        return Err(AuthError);
    }
    let (ct, tag) = sealed.split_at(split);
    out.copy_from_slice(ct);
    let tag: &[u8; TAG_LEN] = tag.try_into().map_err(|_| AuthError)?;
    cipher
        .decrypt_inout_detached(nonce.into(), aad, out.into(), tag.into())
        .map_err(|_| AuthError)
}

/// `Expand(Extract(salt, ikm), info, L)` with SHA-256 into `okm`.
pub fn hkdf(salt: &[u8], ikm: &[u8], info: &[&[u8]], okm: &mut [u8]) {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    hk.expand_multi_info(info, okm)
        // Only fails for okm longer than 255*32 bytes.
        .expect("HKDF output length within limits");
}

/// HMAC-SHA256 keyed once: the SHA-256 states after the `key ^ ipad` and `key ^ opad` blocks
/// (64 bytes in all). Each MAC then skips those two compressions. The `hmac` crate keeps a
/// 150-byte buffered state instead; the gateway holds one of these per connection.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct HmacSha256Midstate {
    inner: [u32; 8],
    outer: [u32; 8],
}

/// A short-lived secret byte buffer on the per-REBIND path, wiped on drop with one `fill` that
/// `black_box` keeps the optimizer from dropping. `Zeroizing` writes byte by byte with volatile
/// stores, which cost ~150 ns per verify across the KDF's buffers; long-lived keys keep
/// `zeroize`.
pub struct Wiped<const N: usize>(pub [u8; N]);

impl<const N: usize> Wiped<N> {
    pub fn zeroed() -> Self {
        Wiped([0; N])
    }
}

impl<const N: usize> Drop for Wiped<N> {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&mut self.0);
    }
}

impl<const N: usize> std::ops::Deref for Wiped<N> {
    type Target = [u8; N];
    fn deref(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> std::ops::DerefMut for Wiped<N> {
    fn deref_mut(&mut self) -> &mut [u8; N] {
        &mut self.0
    }
}

const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

impl HmacSha256Midstate {
    /// Keys with a key of at most 64 bytes (ours are 32). The ipad and opad compressions
    /// are independent, so they run as one [`compress_x2`].
    pub fn new(key: &[u8]) -> Self {
        assert!(key.len() <= 64, "HMAC key longer than the SHA-256 block");
        let mut ipad = Wiped::<64>::zeroed();
        ipad[..key.len()].copy_from_slice(key);
        let mut opad = Wiped::<64>(ipad.0);
        ipad.iter_mut().for_each(|b| *b ^= 0x36);
        opad.iter_mut().for_each(|b| *b ^= 0x5c);
        let (mut inner, mut outer) = (SHA256_IV, SHA256_IV);
        compress_x2(&mut inner, &ipad, &mut outer, &opad);
        HmacSha256Midstate { inner, outer }
    }

    /// HMAC over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> Wiped<32> {
        let mut inner = self.inner;
        sha256_blocks(&mut inner, 64, parts);
        let block = outer_block(&mut inner);
        let mut outer = self.outer;
        compress256(&mut outer, std::slice::from_ref(&block.0));
        digest_and_wipe(&mut outer)
    }

    /// Two independent HMACs (`(key, parts)` each) in lockstep: every step with a block for
    /// both is one [`compress_x2`], so two MACs of equal length cost about one.
    pub fn mac_x2(a: (&Self, &[&[u8]]), b: (&Self, &[&[u8]])) -> [Wiped<32>; 2] {
        let (mut inner_a, mut inner_b) = (a.0.inner, b.0.inner);
        sha256_blocks_x2(&mut inner_a, &mut inner_b, 64, a.1, b.1);
        let (block_a, block_b) = (outer_block(&mut inner_a), outer_block(&mut inner_b));
        let (mut outer_a, mut outer_b) = (a.0.outer, b.0.outer);
        compress_x2(&mut outer_a, &block_a, &mut outer_b, &block_b);
        [digest_and_wipe(&mut outer_a), digest_and_wipe(&mut outer_b)]
    }
}

/// HMAC's outer block: the 32-byte inner digest, padded as a 96-byte message (after the opad
/// block). Wipes `inner`.
fn outer_block(inner: &mut [u32; 8]) -> Wiped<64> {
    let mut block = Wiped::<64>::zeroed();
    for (chunk, word) in block[..32].chunks_exact_mut(4).zip(*inner) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    block[32] = 0x80;
    block[56..].copy_from_slice(&(96u64 * 8).to_be_bytes());
    wipe_state(inner);
    block
}

fn wipe_state(state: &mut [u32; 8]) {
    state.fill(0);
    std::hint::black_box(state);
}

/// The big-endian digest of `state`, which is then wiped.
fn digest_and_wipe(state: &mut [u32; 8]) -> Wiped<32> {
    let mut out = Wiped::<32>::zeroed();
    for (chunk, word) in out.chunks_exact_mut(4).zip(*state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    wipe_state(state);
    out
}

/// The padded SHA-256 blocks of the concatenation of `parts`, hashed after `done` bytes (a
/// multiple of 64), one at a time.
struct PaddedBlocks<'a> {
    parts: &'a [&'a [u8]],
    /// Position of the next unread byte: `parts[part][offset]`.
    part: usize,
    offset: usize,
    bit_len: u64,
    /// The 0x80 byte is written (the message is all consumed).
    padded: bool,
    /// The length is written: no blocks left.
    finished: bool,
}

impl<'a> PaddedBlocks<'a> {
    fn new(done: u64, parts: &'a [&'a [u8]]) -> Self {
        let len = done + parts.iter().map(|p| p.len() as u64).sum::<u64>();
        PaddedBlocks {
            parts,
            part: 0,
            offset: 0,
            bit_len: len * 8,
            padded: false,
            finished: false,
        }
    }

    /// The next block: straight from the input when a whole one is there, else assembled in
    /// `buf` (the caller wipes it). `None` when there is none left.
    #[inline]
    fn next<'s>(&'s mut self, buf: &'s mut [u8; 64]) -> Option<&'s [u8; 64]> {
        if self.finished {
            return None;
        }
        if let Some(part) = self.parts.get(self.part)
            && let Some((whole, _)) = part[self.offset..].split_first_chunk::<64>()
        {
            self.offset += 64;
            if self.offset == part.len() {
                self.part += 1;
                self.offset = 0;
            }
            return Some(whole);
        }
        let mut fill = 0;
        while fill < 64 && self.part < self.parts.len() {
            let rest = &self.parts[self.part][self.offset..];
            let n = rest.len().min(64 - fill);
            buf[fill..fill + n].copy_from_slice(&rest[..n]);
            fill += n;
            self.offset += n;
            if self.offset == self.parts[self.part].len() {
                self.part += 1;
                self.offset = 0;
            }
        }
        if fill == 64 {
            return Some(buf);
        }
        buf[fill..].fill(0);
        if !self.padded {
            buf[fill] = 0x80;
            self.padded = true;
            if fill + 1 > 56 {
                // No room for the length: it goes in one more block.
                return Some(buf);
            }
        }
        buf[56..].copy_from_slice(&self.bit_len.to_be_bytes());
        self.finished = true;
        Some(buf)
    }
}

/// Continues SHA-256 `state` after `done` bytes (a multiple of 64) over `parts`, padding
/// included: `state` is then the digest.
fn sha256_blocks(state: &mut [u32; 8], done: u64, parts: &[&[u8]]) {
    let mut blocks = PaddedBlocks::new(done, parts);
    let mut buf = Wiped::<64>::zeroed();
    while let Some(block) = blocks.next(&mut buf) {
        compress256(state, std::slice::from_ref(block));
    }
}

/// [`sha256_blocks`] for two independent messages, one [`compress_x2`] per block they both
/// still have; the longer one's extra blocks run alone.
fn sha256_blocks_x2(
    state_a: &mut [u32; 8],
    state_b: &mut [u32; 8],
    done: u64,
    parts_a: &[&[u8]],
    parts_b: &[&[u8]],
) {
    let (mut blocks_a, mut blocks_b) = (
        PaddedBlocks::new(done, parts_a),
        PaddedBlocks::new(done, parts_b),
    );
    let (mut buf_a, mut buf_b) = (Wiped::<64>::zeroed(), Wiped::<64>::zeroed());
    loop {
        match (blocks_a.next(&mut buf_a), blocks_b.next(&mut buf_b)) {
            (Some(a), Some(b)) => compress_x2(state_a, a, state_b, b),
            (Some(a), None) => compress256(state_a, std::slice::from_ref(a)),
            (None, Some(b)) => compress256(state_b, std::slice::from_ref(b)),
            (None, None) => break,
        }
    }
}

/// Constant-time equality of two byte strings of equal length: the OR of the bytes' XORs,
/// then one constant-time comparison with zero. (`subtle`'s slice `ct_eq` runs one
/// optimization barrier per byte: 2.5% of the verify pipeline, for its 16-byte cookies.)
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    bool::from(std::hint::black_box(diff).ct_eq(&0))
}

/// Fills `buf` from the OS RNG.
pub fn random_bytes(buf: &mut [u8]) {
    // The OS RNG failing is unrecoverable: continuing would issue predictable secrets.
    getrandom::fill(buf).expect("OS random number generator failed");
}

/// A random array.
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut a = [0u8; N];
    random_bytes(&mut a);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_fips197_vector() {
        // FIPS-197 Appendix C.1.
        let key: [u8; 16] = hex::decode("000102030405060708090a0b0c0d0e0f")
            .unwrap()
            .try_into()
            .unwrap();
        let mut b: [u8; 16] = hex::decode("00112233445566778899aabbccddeeff")
            .unwrap()
            .try_into()
            .unwrap();
        aes_encrypt_block(&aes128(&key), &mut b);
        assert_eq!(hex::encode(b), "69c4e0d86a7b0430d8cdb78070b4c55a");
    }

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let c = gcm(&[7; 16]);
        let mut buf = [0u8; 8 + TAG_LEN];
        buf[..8].copy_from_slice(&42u64.to_be_bytes());
        seal_in_place(&c, &ZERO_NONCE, b"aad", &mut buf);
        let mut out = [0u8; 8];
        open_to(&c, &ZERO_NONCE, b"aad", &buf, &mut out).unwrap();
        assert_eq!(u64::from_be_bytes(out), 42);
        assert_eq!(
            open_to(&c, &ACK_NONCE, b"aad", &buf, &mut out),
            Err(AuthError)
        );
        assert_eq!(
            open_to(&c, &ZERO_NONCE, b"aae", &buf, &mut out),
            Err(AuthError)
        );
        buf[3] ^= 1;
        assert_eq!(
            open_to(&c, &ZERO_NONCE, b"aad", &buf, &mut out),
            Err(AuthError)
        );
        assert_eq!(
            open_to(&c, &ZERO_NONCE, b"aad", &buf[..5], &mut out),
            Err(AuthError)
        );
    }

    proptest::proptest! {
        #[test]
        fn midstate_hmac_matches_hmac_crate(
            key in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=64),
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..70),
        ) {
            use hmac::{Hmac, KeyInit, Mac};
            let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).unwrap();
            m.update(&a);
            m.update(&b);
            let want = m.finalize().into_bytes();
            let got = HmacSha256Midstate::new(&key).mac(&[&a, &b]);
            proptest::prop_assert_eq!(&want[..], &got[..]);
        }
    }

    proptest::proptest! {
        #[test]
        fn mac_x2_matches_two_macs(
            key_a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=64),
            key_b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=64),
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            split in 0usize..300,
        ) {
            let (ka, kb) = (HmacSha256Midstate::new(&key_a), HmacSha256Midstate::new(&key_b));
            let (a0, a1) = a.split_at(split.min(a.len()));
            let [got_a, got_b] = HmacSha256Midstate::mac_x2((&ka, &[a0, a1]), (&kb, &[&b]));
            proptest::prop_assert_eq!(&got_a[..], &ka.mac(&[&a])[..]);
            proptest::prop_assert_eq!(&got_b[..], &kb.mac(&[&b])[..]);
        }
    }

    #[test]
    fn sha256_blocks_padding_boundaries() {
        use sha2::Digest;
        // Lengths around the 55/56/64-byte padding edges, split into uneven parts.
        for len in [0usize, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 200] {
            let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let (x, y) = msg.split_at(len / 3);
            let mut single = SHA256_IV;
            sha256_blocks(&mut single, 0, &[x, &[], y]);
            let (mut a, mut b) = (SHA256_IV, SHA256_IV);
            sha256_blocks_x2(&mut a, &mut b, 0, &[x, y], &[&msg[..]]);
            let (got, got_a, got_b) = (
                digest_and_wipe(&mut single),
                digest_and_wipe(&mut a),
                digest_and_wipe(&mut b),
            );
            let want = Sha256::digest(&msg);
            assert_eq!(&got[..], &want[..], "len {len}");
            assert_eq!(&got_a[..], &want[..], "len {len}");
            assert_eq!(&got_b[..], &want[..], "len {len}");
        }
    }

    #[test]
    fn ct_eq_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }

    proptest::proptest! {
        #[test]
        fn ct_eq_matches_subtle(
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            flip in proptest::prelude::any::<Option<(usize, u8)>>(),
        ) {
            let mut b = a.clone();
            if let Some((i, x)) = flip && !b.is_empty() {
                let i = i % b.len();
                b[i] ^= x;
            }
            proptest::prop_assert_eq!(ct_eq(&a, &b), bool::from(a.ct_eq(&b[..])));
            proptest::prop_assert_eq!(ct_eq(&a, &b), a == b);
        }
    }
}
