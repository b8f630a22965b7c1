//! Thin wrappers over the primitives of PROTOCOL.md §2: AES-128 blocks, AES-128-GCM with the
//! protocol's fixed nonces, HKDF-SHA256, constant-time comparison and the OS RNG.
#![forbid(unsafe_code)]

use aes::Aes128;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes_gcm::Aes128Gcm;
use aes_gcm::aead::AeadInOut;
use hkdf::Hkdf;
use sha2::Sha256;
use subtle::ConstantTimeEq;

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

/// `AES(K, B)` for one block.
pub fn aes_encrypt_block(cipher: &Aes128, block: &mut [u8; 16]) {
    cipher.encrypt_block(block.into());
}

/// A new AES-128 cipher; the `aes` crate zeroizes its round keys on drop.
pub fn aes128(key: &[u8; 16]) -> Aes128 {
    Aes128::new(key.into())
}

/// AES-128-GCM under `key`; zeroized on drop.
pub fn gcm(key: &[u8; 16]) -> Aes128Gcm {
    Aes128Gcm::new(key.into())
}

/// Seals `buf[..len-16]` in place and writes the tag into the last 16 bytes of `buf`.
/// `buf.len()` must be at least `TAG_LEN` (callers size it from the wire layout).
pub fn seal_in_place(cipher: &Aes128Gcm, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
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
    cipher: &Aes128Gcm,
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
        assert_eq!(open_to(&c, &ACK_NONCE, b"aad", &buf, &mut out), Err(AuthError));
        assert_eq!(open_to(&c, &ZERO_NONCE, b"aae", &buf, &mut out), Err(AuthError));
        buf[3] ^= 1;
        assert_eq!(open_to(&c, &ZERO_NONCE, b"aad", &buf, &mut out), Err(AuthError));
        assert_eq!(open_to(&c, &ZERO_NONCE, b"aad", &buf[..5], &mut out), Err(AuthError));
    }

    #[test]
    fn ct_eq_lengths() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
