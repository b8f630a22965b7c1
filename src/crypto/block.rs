//! A keyed AES-128 encryptor for the short per-packet work around the engine: the
//! UNRECOGNIZED cookie, and the block cipher under the `aes-gcm` crate's GCM
//! ([`crate::crypto::Gcm`]) of HANDSHAKE, DATA and host-link packets. The REBIND session
//! key's GCM is [`super::gcm::SessionGcm`], which has its own AES-NI key schedule and only
//! uses this type for its portable fallback.
//!
//! Why not the `aes` crate alone: on CPUs with AVX-512 its autodetected VAES-512 path
//! broadcasts all round keys into zmm registers on every call, so one `encrypt_block` costs
//! tens of nanoseconds (≈ 44 ns measured here) where AES-NI needs a few. This type keeps
//! AES-NI round keys ready and falls back to the `aes` crate without AES-NI, or when the
//! process backend ([`super::process_backend`], `REBINDGW_AES_BACKEND`) is `portable`.
#![allow(unsafe_code)]

use aes::cipher::consts::{U8, U16};
use aes::cipher::{
    Block, BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, InOut,
    Key, KeyInit, KeySizeUser, ParBlocks, ParBlocksSizeUser,
};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::Backend;

/// AES-128 encryption, AES-NI when the CPU has it (detected once) and the backend allows it,
/// else the `aes` crate. Round keys are zeroized on drop.
#[derive(Clone)]
pub struct FastAes128 {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    #[cfg(target_arch = "x86_64")]
    Ni(ni::EncKeys),
    Soft(aes::Aes128),
}

impl Drop for FastAes128 {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if let Inner::Ni(k) = &mut self.inner {
            k.zeroize();
        }
        // The `aes` crate zeroizes its own keys (feature "zeroize").
    }
}

impl ZeroizeOnDrop for FastAes128 {}

impl std::fmt::Debug for FastAes128 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FastAes128(..)")
    }
}

impl FastAes128 {
    /// With AES-NI only if `backend` is not `Portable` and the CPU has it. [`KeyInit::new`]
    /// passes [`super::process_backend`].
    pub fn with_backend(key: &[u8; 16], backend: Backend) -> Self {
        #[cfg(target_arch = "x86_64")]
        if super::fast_paths_allowed(backend) && Backend::AesNi.is_supported() {
            // SAFETY: AES-NI support was just checked (cached runtime detection).
            return FastAes128 {
                inner: Inner::Ni(unsafe { ni::EncKeys::new(key) }),
            };
        }
        let _ = backend;
        FastAes128 {
            inner: Inner::Soft(<aes::Aes128 as KeyInit>::new(key.into())),
        }
    }

    pub fn is_accelerated(&self) -> bool {
        !matches!(self.inner, Inner::Soft(_))
    }
}

impl KeySizeUser for FastAes128 {
    type KeySize = U16;
}

impl KeyInit for FastAes128 {
    fn new(key: &Key<Self>) -> Self {
        let k: [u8; 16] = (*key).into();
        FastAes128::with_backend(&k, super::process_backend())
    }
}

impl BlockSizeUser for FastAes128 {
    type BlockSize = U16;
}

impl BlockCipherEncrypt for FastAes128 {
    fn encrypt_with_backend(&self, f: impl BlockCipherEncClosure<BlockSize = U16>) {
        match &self.inner {
            #[cfg(target_arch = "x86_64")]
            Inner::Ni(k) => f.call(&ni::NiBackend(k)),
            Inner::Soft(a) => a.encrypt_with_backend(f),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod ni {
    use core::arch::x86_64::*;

    use super::*;

    /// The 11 encryption round keys, 16-aligned. Held as `u128` so zeroizing them on drop
    /// is 11 volatile stores rather than 176.
    #[derive(Clone, Zeroize)]
    #[repr(C, align(16))]
    pub(super) struct EncKeys([u128; 11]);

    impl EncKeys {
        /// # Safety
        /// The CPU must support AES-NI.
        pub(super) unsafe fn new(key: &[u8; 16]) -> EncKeys {
            // SAFETY: the caller guarantees AES-NI.
            let ek = unsafe { super::super::aes_ni::expand_enc(key) };
            let mut out = EncKeys([0; 11]);
            for (dst, k) in out.0.iter_mut().zip(ek) {
                // SAFETY: `dst` is valid for a 16-byte write; storeu has no alignment need.
                unsafe { _mm_storeu_si128((dst as *mut u128).cast(), k) };
            }
            out
        }

        #[inline(always)]
        fn get(&self, r: usize) -> __m128i {
            // SAFETY: 16-byte aligned (repr align(16), 16-byte elements), valid for reads.
            unsafe { _mm_load_si128((&self.0[r] as *const u128).cast()) }
        }
    }

    pub(super) struct NiBackend<'a>(pub(super) &'a EncKeys);

    impl BlockSizeUser for NiBackend<'_> {
        type BlockSize = U16;
    }

    impl ParBlocksSizeUser for NiBackend<'_> {
        type ParBlocksSize = U8;
    }

    impl BlockCipherEncBackend for NiBackend<'_> {
        #[inline]
        fn encrypt_block(&self, mut block: InOut<'_, '_, Block<Self>>) {
            // SAFETY: an `EncKeys` exists only when AES-NI was detected.
            let out = unsafe { encrypt1(self.0, block.get_in()) };
            *block.get_out() = out;
        }

        #[inline]
        fn encrypt_par_blocks(&self, mut blocks: InOut<'_, '_, ParBlocks<Self>>) {
            // SAFETY: as above.
            let out = unsafe { encrypt8(self.0, blocks.get_in()) };
            *blocks.get_out() = out;
        }
    }

    #[inline]
    #[target_feature(enable = "aes,sse2")]
    fn encrypt1(k: &EncKeys, b: &Block<NiBackend<'_>>) -> Block<NiBackend<'static>> {
        // SAFETY: `b` is 16 readable bytes; loadu has no alignment need.
        let mut x = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
        x = _mm_xor_si128(x, k.get(0));
        for r in 1..10 {
            x = _mm_aesenc_si128(x, k.get(r));
        }
        x = _mm_aesenclast_si128(x, k.get(10));
        let mut out = Block::<NiBackend<'static>>::default();
        // SAFETY: `out` is 16 writable bytes; storeu has no alignment need.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), x) };
        out
    }

    #[inline]
    #[target_feature(enable = "aes,sse2")]
    fn encrypt8(k: &EncKeys, b: &ParBlocks<NiBackend<'_>>) -> ParBlocks<NiBackend<'static>> {
        // Eight independent chains hide the aesenc latency. Unrolled over blocks by the
        // compiler: the arrays have a fixed length.
        let mut x = [_mm_setzero_si128(); 8];
        for (xi, bi) in x.iter_mut().zip(b.iter()) {
            // SAFETY: 16 readable bytes; loadu has no alignment need.
            *xi = _mm_xor_si128(unsafe { _mm_loadu_si128(bi.as_ptr().cast()) }, k.get(0));
        }
        for r in 1..10 {
            let rk = k.get(r);
            for xi in x.iter_mut() {
                *xi = _mm_aesenc_si128(*xi, rk);
            }
        }
        let last = k.get(10);
        let mut out = ParBlocks::<NiBackend<'static>>::default();
        for (o, xi) in out.iter_mut().zip(x) {
            // SAFETY: 16 writable bytes; storeu has no alignment need.
            unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), _mm_aesenclast_si128(xi, last)) };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::consts::U12;
    use aes_gcm::aead::AeadInOut;
    use proptest::prelude::*;

    /// The backends whose AES-NI path this CPU can run; prints why when it can't.
    fn fast_backends() -> Vec<Backend> {
        if Backend::AesNi.is_supported() {
            vec![Backend::AesNi]
        } else {
            eprintln!(
                "skipped: FastAes128's AES-NI path (this CPU lacks {}); only the portable path is tested",
                Backend::AesNi.missing_features().join(", ")
            );
            Vec::new()
        }
    }

    /// `REBINDGW_AES_BACKEND=portable` must reach this type: with `Portable` it is the `aes`
    /// crate, with another backend it is the AES-NI code (where the CPU has it).
    #[test]
    fn backend_choice_reaches_fast_aes() {
        let key = [0x2b; 16];
        assert!(!FastAes128::with_backend(&key, Backend::Portable).is_accelerated());
        for backend in fast_backends() {
            assert!(
                FastAes128::with_backend(&key, backend).is_accelerated(),
                "{backend}"
            );
        }
        // The override as the process reads it: a value, not the environment (no races).
        let portable = super::super::process_backend_from_value(Some("portable"));
        assert!(!FastAes128::with_backend(&key, portable).is_accelerated());
    }

    proptest! {
        /// Both paths against the `aes` crate, one block and 8 in flight.
        #[test]
        fn matches_the_aes_crate(key in any::<[u8; 16]>(), blocks in proptest::collection::vec(any::<[u8; 16]>(), 0..40)) {
            let reference = <aes::Aes128 as KeyInit>::new(&key.into());
            let mut backends = fast_backends();
            backends.push(Backend::Portable);
            for backend in backends {
                let fast = FastAes128::with_backend(&key, backend);
                let mut a: Vec<Block<aes::Aes128>> = blocks.iter().map(|b| (*b).into()).collect();
                let mut b = a.clone();
                reference.encrypt_blocks(&mut a);
                fast.encrypt_blocks(&mut b);
                prop_assert_eq!(&a, &b);
                for blk in &blocks {
                    let mut x: Block<aes::Aes128> = (*blk).into();
                    let mut y = x;
                    reference.encrypt_block(&mut x);
                    fast.encrypt_block(&mut y);
                    prop_assert_eq!(x, y);
                }
            }
        }

        /// The project's GCM ([`crate::crypto::Gcm`]: `aes-gcm` over this type) on each path,
        /// against `aes-gcm` over the `aes` crate: seal equal, open of a flipped tag refused.
        #[test]
        fn gcm_over_fast_aes_matches_aes_gcm(key in any::<[u8; 16]>(), nonce in any::<[u8; 12]>(), aad in proptest::collection::vec(any::<u8>(), 0..300), msg in proptest::collection::vec(any::<u8>(), 0..300), flip in 0usize..128) {
            let reference = <aes_gcm::Aes128Gcm as KeyInit>::new(&key.into());
            let mut a = msg.clone();
            let ta = reference.encrypt_inout_detached(&nonce.into(), &aad, a.as_mut_slice().into()).unwrap();
            let mut backends = fast_backends();
            backends.push(Backend::Portable);
            for backend in backends {
                let fast = aes_gcm::AesGcm::<FastAes128, U12>::from(FastAes128::with_backend(&key, backend));
                let mut b = msg.clone();
                let tb = fast.encrypt_inout_detached(&nonce.into(), &aad, b.as_mut_slice().into()).unwrap();
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(ta, tb);
                let mut bad_tag = tb;
                bad_tag[flip / 8] ^= 1 << (flip % 8);
                let mut c = b.clone();
                prop_assert!(fast.decrypt_inout_detached(&nonce.into(), &aad, c.as_mut_slice().into(), &bad_tag).is_err());
                fast.decrypt_inout_detached(&nonce.into(), &aad, b.as_mut_slice().into(), &tb).unwrap();
                prop_assert_eq!(&b, &msg);
            }
        }
    }
}
