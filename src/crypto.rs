//! Thin wrappers over the primitives of PROTOCOL.md §2: AES-128 blocks, AES-128-GCM with the
//! protocol's fixed nonces, HKDF-SHA256, constant-time comparison and the OS RNG.
#![forbid(unsafe_code)]

pub use crate::engine::block::FastAes128;
use aes::cipher::consts::U12;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes_gcm::AesGcm;
use aes_gcm::aead::AeadInOut;
use hkdf::Hkdf;
use sha2::Sha256;
use sha2::block_api::compress256;
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
    /// Keys with a key of at most 64 bytes (ours are 32).
    pub fn new(key: &[u8]) -> Self {
        assert!(key.len() <= 64, "HMAC key longer than the SHA-256 block");
        let mut block = Wiped::<64>::zeroed();
        block[..key.len()].copy_from_slice(key);
        block.iter_mut().for_each(|b| *b ^= 0x36);
        let mut inner = SHA256_IV;
        compress256(&mut inner, std::slice::from_ref(&block.0));
        block.iter_mut().for_each(|b| *b ^= 0x36 ^ 0x5c);
        let mut outer = SHA256_IV;
        compress256(&mut outer, std::slice::from_ref(&block.0));
        HmacSha256Midstate { inner, outer }
    }

    /// HMAC over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> Wiped<32> {
        let inner = sha256_from(self.inner, 64, parts);
        sha256_from(self.outer, 64, &[&inner[..]])
    }
}

/// SHA-256 continued from `state` after `done` bytes (a multiple of 64) over `parts`.
fn sha256_from(mut state: [u32; 8], done: u64, parts: &[&[u8]]) -> Wiped<32> {
    let mut buf = Wiped::<64>::zeroed();
    let mut fill = 0usize;
    let mut total = done;
    for part in parts {
        let mut p = *part;
        total += p.len() as u64;
        if fill == 0 {
            // Whole blocks straight from the input, no copy.
            let (blocks, rest) = p.as_chunks::<64>();
            if !blocks.is_empty() {
                compress256(&mut state, blocks);
            }
            p = rest;
        }
        while !p.is_empty() {
            let n = (64 - fill).min(p.len());
            buf[fill..fill + n].copy_from_slice(&p[..n]);
            fill += n;
            p = &p[n..];
            if fill == 64 {
                compress256(&mut state, std::slice::from_ref(&buf.0));
                fill = 0;
            }
        }
    }
    buf[fill] = 0x80;
    buf[fill + 1..].fill(0);
    if fill + 1 > 56 {
        compress256(&mut state, std::slice::from_ref(&buf.0));
        buf.0 = [0; 64];
    }
    buf[56..].copy_from_slice(&(total * 8).to_be_bytes());
    compress256(&mut state, std::slice::from_ref(&buf.0));
    let mut out = Wiped::<32>::zeroed();
    for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    state.fill(0);
    std::hint::black_box(&mut state);
    out
}

/// Constant-time equality of two byte strings of equal length.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
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

    #[test]
    fn ct_eq_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
