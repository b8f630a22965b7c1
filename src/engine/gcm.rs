//! AES-128-GCM for the REBIND session key `k` (PROTOCOL.md §6): 8-byte messages under the
//! two fixed nonces, `12 zero bytes` (REBIND) and `11 zero bytes || 0x01` (REBIND_ACK).
//!
//! The gateway makes a fresh key per REBIND and uses it twice (open the REBIND, seal the
//! ACK), so key setup dominates: through `aes-gcm` it costs ~0.3 µs (a key schedule, then
//! five single-block AES calls one after another, GHASH block by block). Here, with AES-NI
//! and PCLMULQDQ, [`SessionGcm::new`] runs the key schedule once and encrypts all five
//! blocks either message needs (`H`, and `J0`, `J0 + 1` of both nonces) in parallel, and
//! GHASH runs as POLYVAL (RFC 8452 Appendix A) four blocks per reduction with `H^1..H^4`.
//! The multiplication is the polyval crate's R/F method. Without those CPU features, the
//! `aes-gcm` crate does the work.
#![allow(unsafe_code)]

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::{self, ACK_NONCE, AuthError, Gcm, TAG_LEN, ZERO_NONCE};

/// An 8-byte message sealed: ciphertext || tag.
pub const SEALED8_LEN: usize = 8 + TAG_LEN;

/// The two nonces a session key is used with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionNonce {
    /// 12 zero bytes: the REBIND's conn_id.
    Rebind,
    /// `11 zero bytes || 0x01`: the REBIND_ACK's conn_id.
    Ack,
}

impl SessionNonce {
    fn bytes(self) -> &'static [u8; 12] {
        match self {
            SessionNonce::Rebind => &ZERO_NONCE,
            SessionNonce::Ack => &ACK_NONCE,
        }
    }
}

/// AES-128-GCM under one REBIND session key, for 8-byte messages. Zeroized on drop.
pub struct SessionGcm {
    inner: Inner,
}

enum Inner {
    #[cfg(target_arch = "x86_64")]
    Clmul(clmul::State),
    Soft(Box<Gcm>),
}

impl Drop for SessionGcm {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Inner::Clmul(s) = &mut self.inner {
            s.zeroize();
        }
        // `Gcm` zeroizes itself (aes-gcm feature "zeroize").
    }
}

impl ZeroizeOnDrop for SessionGcm {}

impl std::fmt::Debug for SessionGcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionGcm(..)")
    }
}

/// Whether the CPU has AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 (the engine's one probe).
#[cfg(target_arch = "x86_64")]
fn clmul_supported() -> bool {
    super::cpu_features().clmul
}

impl SessionGcm {
    /// The fastest implementation this CPU has.
    pub fn new(key: &[u8; 16]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if clmul_supported() {
            return SessionGcm {
                // SAFETY: the required CPU features were just detected.
                inner: Inner::Clmul(unsafe { clmul::State::new(key) }),
            };
        }
        Self::portable(key)
    }

    /// Always the `aes-gcm` crate (tests compare the two).
    pub fn portable(key: &[u8; 16]) -> Self {
        SessionGcm {
            inner: Inner::Soft(Box::new(crypto::gcm(key))),
        }
    }

    pub fn is_accelerated(&self) -> bool {
        !matches!(self.inner, Inner::Soft(_))
    }

    /// `GCM-Seal(k, nonce, aad, msg)`: ciphertext || tag.
    pub fn seal8(&self, nonce: SessionNonce, aad: &[u8], msg: &[u8; 8]) -> [u8; SEALED8_LEN] {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Clmul` state exists only after `clmul_supported()`.
            Inner::Clmul(s) => unsafe { s.seal8(nonce, aad, msg) },
            Inner::Soft(gcm) => {
                let mut out = [0u8; SEALED8_LEN];
                out[..8].copy_from_slice(msg);
                crypto::seal_in_place(gcm, nonce.bytes(), aad, &mut out);
                out
            }
        }
    }

    /// `GCM-Open(k, nonce, aad, sealed)`; the tag is compared in constant time.
    pub fn open8(
        &self,
        nonce: SessionNonce,
        aad: &[u8],
        sealed: &[u8; SEALED8_LEN],
    ) -> Result<[u8; 8], AuthError> {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Clmul` state exists only after `clmul_supported()`.
            Inner::Clmul(s) => unsafe { s.open8(nonce, aad, sealed) },
            Inner::Soft(gcm) => {
                let mut out = [0u8; 8];
                crypto::open_to(gcm, nonce.bytes(), aad, sealed, &mut out)?;
                Ok(out)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod clmul {
    use core::arch::x86_64::*;

    use zeroize::Zeroize;

    use super::SessionNonce;
    use crate::crypto::AuthError;

    /// POLYVAL's reduction constant `x^63 + x^62 + x^57`.
    const P1: u64 = 0xc200_0000_0000_0000;

    /// Key material of one session key, as `u128` so zeroizing is a few wide stores.
    /// `h[i]`, `d[i]`: `H^(i+1)` in the POLYVAL domain and its R/F companion
    /// `swap(H) ^ H0 * P1`; `ks`: `E(J0)`, `E(J0 + 1)` of the REBIND nonce, then of the ACK
    /// nonce.
    #[derive(Zeroize)]
    #[repr(C, align(16))]
    pub(super) struct State {
        h: [u128; 4],
        d: [u128; 4],
        ks: [u128; 4],
    }

    #[inline(always)]
    fn load(x: &u128) -> __m128i {
        // SAFETY: `x` is valid for a 16-byte read; `loadu` has no alignment requirement.
        unsafe { _mm_loadu_si128((x as *const u128).cast()) }
    }

    #[inline(always)]
    fn store(x: __m128i) -> u128 {
        let mut out = 0u128;
        // SAFETY: `out` is valid for a 16-byte write; `storeu` has no alignment requirement.
        unsafe { _mm_storeu_si128((&mut out as *mut u128).cast(), x) };
        out
    }

    /// A 16-byte GHASH block, byte-reversed into the POLYVAL domain.
    #[inline]
    #[target_feature(enable = "ssse3")]
    fn load_reversed(bytes: &[u8; 16]) -> __m128i {
        // SAFETY: `bytes` is valid for a 16-byte read; `loadu` has no alignment need.
        reverse_bytes(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) })
    }

    #[inline]
    #[target_feature(enable = "ssse3")]
    fn reverse_bytes(x: __m128i) -> __m128i {
        let reverse = _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        _mm_shuffle_epi8(x, reverse)
    }

    /// `D = swap(H) ^ H0 * P1`.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn companion(h: __m128i) -> __m128i {
        let p = _mm_set_epi64x(P1 as i64, 0);
        _mm_xor_si128(_mm_shuffle_epi32(h, 0x4e), _mm_clmulepi64_si128(h, p, 0x10))
    }

    /// `M * H` unreduced, as the R and F terms.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn mul_unreduced(m: __m128i, h: __m128i, d: __m128i) -> (__m128i, __m128i) {
        let r = _mm_xor_si128(
            _mm_clmulepi64_si128(m, d, 0x10),
            _mm_clmulepi64_si128(m, h, 0x11),
        );
        let f = _mm_xor_si128(
            _mm_clmulepi64_si128(m, d, 0x00),
            _mm_clmulepi64_si128(m, h, 0x01),
        );
        (r, f)
    }

    /// `R ^ F1 ^ x^64 * F0 ^ P1 * F0`.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn reduce(r: __m128i, f: __m128i) -> __m128i {
        let p1 = _mm_set_epi64x(0, P1 as i64);
        let x = _mm_xor_si128(r, _mm_srli_si128(f, 8));
        let x = _mm_xor_si128(x, _mm_slli_si128(f, 8));
        _mm_xor_si128(x, _mm_clmulepi64_si128(f, p1, 0x00))
    }

    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn mul(m: __m128i, h: __m128i, d: __m128i) -> __m128i {
        let (r, f) = mul_unreduced(m, h, d);
        reduce(r, f)
    }

    /// `mulX_POLYVAL`: the GHASH key in the POLYVAL domain is `mulX(reverse(H))`.
    fn mulx(v: u128) -> u128 {
        let top = v >> 127;
        (v << 1) ^ top ^ (top << 127) ^ (top << 126) ^ (top << 121)
    }

    /// A GCM counter block: `nonce || be32(counter)`.
    fn counter_block(nonce: SessionNonce, counter: u8) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..12].copy_from_slice(nonce.bytes());
        b[15] = counter;
        b
    }

    /// Runs `blocks` through GHASH after `acc` with one reduction; at most 4 blocks.
    #[inline]
    #[target_feature(enable = "pclmulqdq,sse2")]
    fn absorb(s: &State, acc: __m128i, blocks: &[__m128i]) -> __m128i {
        let n = blocks.len();
        debug_assert!((1..=4).contains(&n));
        let mut r = _mm_setzero_si128();
        let mut f = _mm_setzero_si128();
        for (i, &b) in blocks.iter().enumerate() {
            let m = if i == 0 { _mm_xor_si128(acc, b) } else { b };
            let power = n - 1 - i;
            let (ri, fi) = mul_unreduced(m, load(&s.h[power]), load(&s.d[power]));
            r = _mm_xor_si128(r, ri);
            f = _mm_xor_si128(f, fi);
        }
        reduce(r, f)
    }

    impl State {
        /// # Safety
        /// The CPU must have AES-NI, PCLMULQDQ, SSSE3 and SSE4.1.
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3")]
        pub(super) unsafe fn new(key: &[u8; 16]) -> State {
            let mut rk = crate::engine::aesni::expand_enc(key);
            let inputs = [
                [0u8; 16],
                counter_block(SessionNonce::Rebind, 1),
                counter_block(SessionNonce::Rebind, 2),
                counter_block(SessionNonce::Ack, 1),
                counter_block(SessionNonce::Ack, 2),
            ];
            // Five independent chains: the latency of one.
            let mut x = inputs.map(|b| {
                // SAFETY: `b` is valid for a 16-byte read; `loadu` has no alignment need.
                _mm_xor_si128(unsafe { _mm_loadu_si128(b.as_ptr().cast()) }, rk[0])
            });
            for k in &rk[1..10] {
                x = x.map(|xi| _mm_aesenc_si128(xi, *k));
            }
            let [h, j0, c1, aj0, ac1] = x.map(|xi| _mm_aesenclast_si128(xi, rk[10]));
            rk.iter_mut().for_each(|k| *k = _mm_setzero_si128());
            core::hint::black_box(&mut rk);

            // `u128` and the register share byte order, so this is `mulX(reverse(H))`.
            let h1 = load(&mulx(store(reverse_bytes(h))));
            let d1 = companion(h1);
            let h2 = mul(h1, h1, d1);
            let d2 = companion(h2);
            let h3 = mul(h2, h1, d1);
            let h4 = mul(h2, h2, d2);
            State {
                h: [store(h1), store(h2), store(h3), store(h4)],
                d: [
                    store(d1),
                    store(d2),
                    store(companion(h3)),
                    store(companion(h4)),
                ],
                ks: [store(j0), store(c1), store(aj0), store(ac1)],
            }
        }

        /// `E(J0)` and `E(J0 + 1)` of `nonce`.
        fn keystream(&self, nonce: SessionNonce) -> (__m128i, __m128i) {
            match nonce {
                SessionNonce::Rebind => (load(&self.ks[0]), load(&self.ks[1])),
                SessionNonce::Ack => (load(&self.ks[2]), load(&self.ks[3])),
            }
        }

        /// GHASH of `aad` and an 8-byte ciphertext, in the POLYVAL domain.
        #[target_feature(enable = "pclmulqdq,sse2,ssse3")]
        fn ghash(&self, aad: &[u8], ct: &[u8; 8]) -> __m128i {
            let mut acc = _mm_setzero_si128();
            let (quads, rest) = aad.as_chunks::<64>();
            for q in quads {
                let (b, _) = q.as_chunks::<16>();
                let blocks = [
                    load_reversed(&b[0]),
                    load_reversed(&b[1]),
                    load_reversed(&b[2]),
                    load_reversed(&b[3]),
                ];
                acc = absorb(self, acc, &blocks);
            }
            // At most 3 whole AAD blocks, a padded partial one, the ciphertext and the
            // lengths: 6 blocks.
            let mut tail = [_mm_setzero_si128(); 6];
            let mut n = 0;
            let (whole, partial) = rest.as_chunks::<16>();
            for b in whole {
                tail[n] = load_reversed(b);
                n += 1;
            }
            if !partial.is_empty() {
                let mut b = [0u8; 16];
                b[..partial.len()].copy_from_slice(partial);
                tail[n] = load_reversed(&b);
                n += 1;
            }
            let mut c = [0u8; 16];
            c[..8].copy_from_slice(ct);
            tail[n] = load_reversed(&c);
            n += 1;
            let mut lengths = [0u8; 16];
            lengths[..8].copy_from_slice(&(aad.len() as u64 * 8).to_be_bytes());
            lengths[8..].copy_from_slice(&64u64.to_be_bytes());
            tail[n] = load_reversed(&lengths);
            n += 1;
            for chunk in tail[..n].chunks(4) {
                acc = absorb(self, acc, chunk);
            }
            acc
        }

        /// # Safety
        /// The CPU must have AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 (true once a `State` exists).
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3")]
        pub(super) unsafe fn seal8(
            &self,
            nonce: SessionNonce,
            aad: &[u8],
            msg: &[u8; 8],
        ) -> [u8; super::SEALED8_LEN] {
            let (j0, c1) = self.keystream(nonce);
            let ct = (u64::from_le_bytes(*msg) ^ store(c1) as u64).to_le_bytes();
            let tag = _mm_xor_si128(j0, reverse_bytes(self.ghash(aad, &ct)));
            let mut out = [0u8; super::SEALED8_LEN];
            out[..8].copy_from_slice(&ct);
            out[8..].copy_from_slice(&store(tag).to_le_bytes());
            out
        }

        /// # Safety
        /// The CPU must have AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 (true once a `State` exists).
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
        pub(super) unsafe fn open8(
            &self,
            nonce: SessionNonce,
            aad: &[u8],
            sealed: &[u8; super::SEALED8_LEN],
        ) -> Result<[u8; 8], AuthError> {
            let (ct, tag) = sealed.split_at(8);
            let ct: &[u8; 8] = ct.try_into().map_err(|_| AuthError)?;
            let tag: &[u8; 16] = tag.try_into().map_err(|_| AuthError)?;
            let (j0, c1) = self.keystream(nonce);
            let expected = _mm_xor_si128(j0, reverse_bytes(self.ghash(aad, ct)));
            // SAFETY: `tag` is valid for a 16-byte read; `loadu` has no alignment need.
            let got = unsafe { _mm_loadu_si128(tag.as_ptr().cast()) };
            // Constant time: one OR-reduction of the whole difference, then one branch.
            let diff = _mm_xor_si128(expected, got);
            if _mm_testz_si128(diff, diff) == 0 {
                return Err(AuthError);
            }
            Ok((u64::from_le_bytes(*ct) ^ store(c1) as u64).to_le_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference_seal(key: &[u8; 16], nonce: SessionNonce, aad: &[u8], msg: &[u8; 8]) -> [u8; 24] {
        let mut out = [0u8; 24];
        out[..8].copy_from_slice(msg);
        crypto::seal_in_place(&crypto::gcm(key), nonce.bytes(), aad, &mut out);
        out
    }

    #[test]
    fn accelerated_where_the_cpu_allows() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            SessionGcm::new(&[1; 16]).is_accelerated(),
            clmul_supported()
        );
        assert!(!SessionGcm::portable(&[1; 16]).is_accelerated());
    }

    #[test]
    fn rebind_and_ack_shapes_match_aes_gcm() {
        // A REBIND head for S = 16 (282 bytes) and the ACK's 9-byte AAD.
        for (aad_len, nonce) in [(282, SessionNonce::Rebind), (9, SessionNonce::Ack)] {
            let aad: Vec<u8> = (0..aad_len).map(|i| (i * 7 + 3) as u8).collect();
            let key = [0x42; 16];
            let msg = 0x0102_0304_0506_0708u64.to_be_bytes();
            let want = reference_seal(&key, nonce, &aad, &msg);
            for gcm in [SessionGcm::new(&key), SessionGcm::portable(&key)] {
                assert_eq!(gcm.seal8(nonce, &aad, &msg), want);
                assert_eq!(gcm.open8(nonce, &aad, &want), Ok(msg));
            }
        }
    }

    proptest! {
        #[test]
        fn every_backend_matches_aes_gcm(
            key in any::<[u8; 16]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..600),
            msg in any::<[u8; 8]>(),
            ack in any::<bool>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let nonce = if ack { SessionNonce::Ack } else { SessionNonce::Rebind };
            let want = reference_seal(&key, nonce, &aad, &msg);
            for gcm in [SessionGcm::new(&key), SessionGcm::portable(&key)] {
                prop_assert_eq!(gcm.seal8(nonce, &aad, &msg), want);
                prop_assert_eq!(gcm.open8(nonce, &aad, &want), Ok(msg));
                let other = if ack { SessionNonce::Rebind } else { SessionNonce::Ack };
                prop_assert_eq!(gcm.open8(other, &aad, &want), Err(AuthError));
                // One flipped bit anywhere in the AAD, ciphertext or tag is refused.
                let bits = 8 * (aad.len() + want.len());
                let bit = flip.index(bits);
                let (mut aad2, mut sealed2) = (aad.clone(), want);
                if bit < 8 * aad.len() {
                    aad2[bit / 8] ^= 1 << (bit % 8);
                } else {
                    let b = bit - 8 * aad.len();
                    sealed2[b / 8] ^= 1 << (b % 8);
                }
                prop_assert_eq!(gcm.open8(nonce, &aad2, &sealed2), Err(AuthError));
            }
        }
    }
}
