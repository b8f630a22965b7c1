//! Two SHA-256 compressions in lockstep (SHA-NI), for the per-REBIND session-key KDF.
//!
//! `sha256rnds2` is latency-bound (one compression is a chain of 32 of them), so a single
//! stream leaves the SHA unit mostly idle; two independent chains interleaved cost about the
//! same as one. SHA instructions are legacy-SSE encoded (xmm0-15 only), which fits 2 streams
//! but not more. Without SHA-NI (or off x86_64) this is two `sha2` compressions.
//!
//! That holds where `sha256rnds2` has a long latency (Zen 3: one compression 41 ns, two
//! interleaved 48 ns). On the Intel Xeon (AVX-512, SHA-NI) these machines now are, the SHA
//! unit's throughput is the bound instead: [`compress_xn`] with 1, 2, 4 or 8 streams costs
//! 40, 31.5, 31.8 and 34 ns per compression (`cargo bench --bench kdf -- sha256_block`), so
//! the KDF of a batch runs across AVX-512 lanes there ([`super::sha256_x16`]).
#![allow(unsafe_code)]

use sha2::block_api::compress256;

/// `a = compress(a, a_block)` and `b = compress(b, b_block)`: two independent SHA-256
/// compressions, run interleaved when the CPU has SHA-NI and the process backend
/// ([`super::process_backend`], `REBINDGW_AES_BACKEND`) is not `portable`.
#[inline]
pub fn compress_x2(a: &mut [u32; 8], a_block: &[u8; 64], b: &mut [u32; 8], b_block: &[u8; 64]) {
    compress_x2_with(super::process_backend(), a, a_block, b, b_block);
}

/// [`compress_x2`] with the backend given: SHA-NI unless `backend` is `Portable` or the CPU
/// lacks it.
#[inline]
pub fn compress_x2_with(
    backend: super::Backend,
    a: &mut [u32; 8],
    a_block: &[u8; 64],
    b: &mut [u32; 8],
    b_block: &[u8; 64],
) {
    #[cfg(target_arch = "x86_64")]
    if uses_sha_ni(backend) {
        // SAFETY: `uses_sha_ni` checked that the CPU has every feature `shani::compress_x2`
        // is compiled with (sha, sse2, ssse3, sse4.1).
        unsafe { shani::compress_x2(a, a_block, b, b_block) };
        return;
    }
    let _ = backend;
    compress_x2_portable(a, a_block, b, b_block);
}

/// [`compress_x2`] as two `sha2` calls, one after the other; public so that tests and
/// benches can compare the backends.
#[doc(hidden)]
pub fn compress_x2_portable(
    a: &mut [u32; 8],
    a_block: &[u8; 64],
    b: &mut [u32; 8],
    b_block: &[u8; 64],
) {
    compress256(a, std::slice::from_ref(a_block));
    compress256(b, std::slice::from_ref(b_block));
}

/// `states[i] = compress(states[i], blocks[i])` for `N` independent streams (2, 4 or 8):
/// SHA-NI with the `N` chains interleaved when the CPU has it and `backend` is not
/// `Portable`, else `N` `sha2` compressions. With SHA-NI, one chain is bound by the latency of
/// `sha256rnds2`, so `N` chains in flight cost about one until the SHA unit's throughput is
/// reached: see `cargo bench --bench kdf` (`sha256_block`) for where that is on this CPU.
#[inline]
pub fn compress_xn_with<const N: usize>(
    backend: super::Backend,
    states: &mut [[u32; 8]; N],
    blocks: [&[u8; 64]; N],
) {
    #[cfg(target_arch = "x86_64")]
    if uses_sha_ni(backend) {
        // SAFETY: `uses_sha_ni` checked that the CPU has every feature `shani::compress_xn`
        // is compiled with (sha, sse2, ssse3, sse4.1).
        unsafe { shani::compress_xn(states, blocks) };
        return;
    }
    let _ = backend;
    compress_xn_portable(states, blocks);
}

/// [`compress_xn_with`] under the process backend ([`super::process_backend`]).
#[inline]
pub fn compress_xn<const N: usize>(states: &mut [[u32; 8]; N], blocks: [&[u8; 64]; N]) {
    compress_xn_with(super::process_backend(), states, blocks);
}

/// [`compress_xn_with`] as `N` `sha2` calls; public so that tests and benches can compare.
#[doc(hidden)]
pub fn compress_xn_portable<const N: usize>(states: &mut [[u32; 8]; N], blocks: [&[u8; 64]; N]) {
    for (state, block) in states.iter_mut().zip(blocks) {
        compress256(state, std::slice::from_ref(block));
    }
}

/// Whether the SHA-NI path runs under `backend` (the one CPU probe, [`super::cpu`]; SSE2 is
/// x86_64's baseline).
#[cfg(target_arch = "x86_64")]
fn uses_sha_ni(backend: super::Backend) -> bool {
    super::fast_paths_allowed(backend) && super::cpu_features().sha_ni
}

/// The SHA-NI instruction sequence of the `sha2` crate (`src/sha256/x86_sha.rs`), with two
/// streams interleaved instruction by instruction.
#[cfg(target_arch = "x86_64")]
mod shani {
    use core::arch::x86_64::*;

    /// SHA-256 round constants.
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// One stream's state as `sha256rnds2` wants it: `[ABEF, CDGH]`.
    type Lanes = [__m128i; 2];

    /// `K[4r..4r + 4]`.
    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn round_constants(r: usize) -> __m128i {
        _mm_set_epi32(
            K[4 * r + 3] as i32,
            K[4 * r + 2] as i32,
            K[4 * r + 1] as i32,
            K[4 * r] as i32,
        )
    }

    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn load_state(state: &[u32; 8]) -> Lanes {
        let ptr: *const __m128i = state.as_ptr().cast();
        // SAFETY: `state` is 32 readable bytes: two unaligned 16-byte loads.
        let (dcba, hgfe) = unsafe { (_mm_loadu_si128(ptr), _mm_loadu_si128(ptr.add(1))) };
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        [
            _mm_alignr_epi8(cdab, efgh, 8),
            _mm_blend_epi16(efgh, cdab, 0xF0),
        ]
    }

    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn store_state(state: &mut [u32; 8], [abef, cdgh]: Lanes) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
        let hgef = _mm_alignr_epi8(dchg, feba, 8);
        let ptr: *mut __m128i = state.as_mut_ptr().cast();
        // SAFETY: `state` is 32 writable bytes: two unaligned 16-byte stores.
        unsafe {
            _mm_storeu_si128(ptr, dcba);
            _mm_storeu_si128(ptr.add(1), hgef);
        }
    }

    /// The block's 16 big-endian message words, 4 per register.
    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn load_block(block: &[u8; 64]) -> [__m128i; 4] {
        let ptr: *const __m128i = block.as_ptr().cast();
        let byte_swap = _mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203);
        core::array::from_fn(|i| {
            // SAFETY: `i < 4`, so the 16 bytes at `16 * i` are inside the 64-byte block.
            let words = unsafe { _mm_loadu_si128(ptr.add(i)) };
            _mm_shuffle_epi8(words, byte_swap)
        })
    }

    /// The next 4 message words from the previous 16 (`w0` oldest).
    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn schedule(w0: __m128i, w1: __m128i, w2: __m128i, w3: __m128i) -> __m128i {
        let sigma0 = _mm_sha256msg1_epu32(w0, w1);
        let summed = _mm_add_epi32(sigma0, _mm_alignr_epi8(w3, w2, 4));
        _mm_sha256msg2_epu32(summed, w3)
    }

    /// Compresses one block into each state, alternating the two streams' instructions so
    /// that each `sha256rnds2` chain runs while the other waits on its latency.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) fn compress_x2(
        a: &mut [u32; 8],
        a_block: &[u8; 64],
        b: &mut [u32; 8],
        b_block: &[u8; 64],
    ) {
        let [mut a_abef, mut a_cdgh] = load_state(a);
        let [mut b_abef, mut b_cdgh] = load_state(b);
        let (a_saved, b_saved) = ([a_abef, a_cdgh], [b_abef, b_cdgh]);
        let mut a_w = load_block(a_block);
        let mut b_w = load_block(b_block);

        // Macros, not a loop: constant indices keep the message words in registers (a
        // rolled loop indexes them in memory, and LLVM does not unroll it).
        macro_rules! rounds_x2 {
            ($r:literal, $i:literal) => {{
                let k = round_constants($r);
                let a_wk = _mm_add_epi32(a_w[$i], k);
                let b_wk = _mm_add_epi32(b_w[$i], k);
                a_cdgh = _mm_sha256rnds2_epu32(a_cdgh, a_abef, a_wk);
                b_cdgh = _mm_sha256rnds2_epu32(b_cdgh, b_abef, b_wk);
                a_abef = _mm_sha256rnds2_epu32(a_abef, a_cdgh, _mm_shuffle_epi32(a_wk, 0x0E));
                b_abef = _mm_sha256rnds2_epu32(b_abef, b_cdgh, _mm_shuffle_epi32(b_wk, 0x0E));
            }};
        }
        macro_rules! scheduled_rounds_x2 {
            ($r:literal, $i0:literal, $i1:literal, $i2:literal, $i3:literal) => {{
                a_w[$i0] = schedule(a_w[$i0], a_w[$i1], a_w[$i2], a_w[$i3]);
                b_w[$i0] = schedule(b_w[$i0], b_w[$i1], b_w[$i2], b_w[$i3]);
                rounds_x2!($r, $i0);
            }};
        }
        rounds_x2!(0, 0);
        rounds_x2!(1, 1);
        rounds_x2!(2, 2);
        rounds_x2!(3, 3);
        scheduled_rounds_x2!(4, 0, 1, 2, 3);
        scheduled_rounds_x2!(5, 1, 2, 3, 0);
        scheduled_rounds_x2!(6, 2, 3, 0, 1);
        scheduled_rounds_x2!(7, 3, 0, 1, 2);
        scheduled_rounds_x2!(8, 0, 1, 2, 3);
        scheduled_rounds_x2!(9, 1, 2, 3, 0);
        scheduled_rounds_x2!(10, 2, 3, 0, 1);
        scheduled_rounds_x2!(11, 3, 0, 1, 2);
        scheduled_rounds_x2!(12, 0, 1, 2, 3);
        scheduled_rounds_x2!(13, 1, 2, 3, 0);
        scheduled_rounds_x2!(14, 2, 3, 0, 1);
        scheduled_rounds_x2!(15, 3, 0, 1, 2);

        store_state(
            a,
            [
                _mm_add_epi32(a_abef, a_saved[0]),
                _mm_add_epi32(a_cdgh, a_saved[1]),
            ],
        );
        store_state(
            b,
            [
                _mm_add_epi32(b_abef, b_saved[0]),
                _mm_add_epi32(b_cdgh, b_saved[1]),
            ],
        );
    }

    /// [`compress_x2`] for `N` streams: each step of the compression is issued for every
    /// stream before the next step, so up to `N` `sha256rnds2` chains are in flight. With
    /// `N > 2` the message words do not all fit in xmm0-15 (SHA-NI is legacy-SSE encoded) and
    /// some live on the stack; the loads and stores hide behind the rounds' latency.
    #[inline]
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub(super) fn compress_xn<const N: usize>(states: &mut [[u32; 8]; N], blocks: [&[u8; 64]; N]) {
        let mut abef = [_mm_setzero_si128(); N];
        let mut cdgh = [_mm_setzero_si128(); N];
        let mut w = [[_mm_setzero_si128(); 4]; N];
        for s in 0..N {
            [abef[s], cdgh[s]] = load_state(&states[s]);
            w[s] = load_block(blocks[s]);
        }
        let (abef_saved, cdgh_saved) = (abef, cdgh);

        // Constant round and word indices (macros, not a loop over rounds), see compress_x2;
        // the loops over streams have a constant trip count and are unrolled.
        macro_rules! rounds_xn {
            ($r:literal, $i:literal) => {{
                let k = round_constants($r);
                let mut wk = [_mm_setzero_si128(); N];
                for s in 0..N {
                    wk[s] = _mm_add_epi32(w[s][$i], k);
                }
                for s in 0..N {
                    cdgh[s] = _mm_sha256rnds2_epu32(cdgh[s], abef[s], wk[s]);
                }
                for s in 0..N {
                    abef[s] =
                        _mm_sha256rnds2_epu32(abef[s], cdgh[s], _mm_shuffle_epi32(wk[s], 0x0E));
                }
            }};
        }
        macro_rules! scheduled_rounds_xn {
            ($r:literal, $i0:literal, $i1:literal, $i2:literal, $i3:literal) => {{
                for s in 0..N {
                    w[s][$i0] = schedule(w[s][$i0], w[s][$i1], w[s][$i2], w[s][$i3]);
                }
                rounds_xn!($r, $i0);
            }};
        }
        rounds_xn!(0, 0);
        rounds_xn!(1, 1);
        rounds_xn!(2, 2);
        rounds_xn!(3, 3);
        scheduled_rounds_xn!(4, 0, 1, 2, 3);
        scheduled_rounds_xn!(5, 1, 2, 3, 0);
        scheduled_rounds_xn!(6, 2, 3, 0, 1);
        scheduled_rounds_xn!(7, 3, 0, 1, 2);
        scheduled_rounds_xn!(8, 0, 1, 2, 3);
        scheduled_rounds_xn!(9, 1, 2, 3, 0);
        scheduled_rounds_xn!(10, 2, 3, 0, 1);
        scheduled_rounds_xn!(11, 3, 0, 1, 2);
        scheduled_rounds_xn!(12, 0, 1, 2, 3);
        scheduled_rounds_xn!(13, 1, 2, 3, 0);
        scheduled_rounds_xn!(14, 2, 3, 0, 1);
        scheduled_rounds_xn!(15, 3, 0, 1, 2);

        for s in 0..N {
            store_state(
                &mut states[s],
                [
                    _mm_add_epi32(abef[s], abef_saved[s]),
                    _mm_add_epi32(cdgh[s], cdgh_saved[s]),
                ],
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Backend;
    use proptest::prelude::*;

    const SHA256_IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// The padded blocks of a message shorter than 2^61 bytes.
    fn padded(message: &[u8]) -> Vec<[u8; 64]> {
        let mut bytes = message.to_vec();
        bytes.push(0x80);
        while bytes.len() % 64 != 56 {
            bytes.push(0);
        }
        bytes.extend_from_slice(&(message.len() as u64 * 8).to_be_bytes());
        bytes
            .chunks_exact(64)
            .map(|c| c.try_into().unwrap())
            .collect()
    }

    fn digest_hex(state: &[u32; 8]) -> String {
        state.iter().map(|w| format!("{w:08x}")).collect()
    }

    /// [`compress_x2`] or [`compress_x2_portable`].
    type CompressX2 = fn(&mut [u32; 8], &[u8; 64], &mut [u32; 8], &[u8; 64]);

    /// Hashes `a` and `b` (same block count) in lockstep through `compress`.
    fn hash_x2(compress: CompressX2, a: &[u8], b: &[u8]) -> (String, String) {
        let (a_blocks, b_blocks) = (padded(a), padded(b));
        assert_eq!(a_blocks.len(), b_blocks.len());
        let (mut sa, mut sb) = (SHA256_IV, SHA256_IV);
        for (ab, bb) in a_blocks.iter().zip(&b_blocks) {
            compress(&mut sa, ab, &mut sb, bb);
        }
        (digest_hex(&sa), digest_hex(&sb))
    }

    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const TWO_BLOCK_MSG: &[u8] = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    const TWO_BLOCK: &str = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";

    #[test]
    fn fips180_vectors_on_both_streams() {
        for compress in [compress_x2 as CompressX2, compress_x2_portable] {
            assert_eq!(
                hash_x2(compress, b"abc", b"abc"),
                (ABC.to_string(), ABC.to_string())
            );
            // Different messages with the same block count: each stream keeps its own.
            let (empty, abc) = hash_x2(compress, b"", b"abc");
            assert_eq!(
                empty,
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            );
            assert_eq!(abc, ABC);
            assert_eq!(
                hash_x2(compress, TWO_BLOCK_MSG, TWO_BLOCK_MSG),
                (TWO_BLOCK.to_string(), TWO_BLOCK.to_string())
            );
        }
    }

    /// splitmix64: deterministic test data without a dependency.
    struct TestRng(u64);

    impl TestRng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn state(&mut self) -> [u32; 8] {
            core::array::from_fn(|_| self.next_u64() as u32)
        }

        fn block(&mut self) -> [u8; 64] {
            let mut block = [0u8; 64];
            for chunk in block.chunks_exact_mut(8) {
                chunk.copy_from_slice(&self.next_u64().to_le_bytes());
            }
            block
        }
    }

    fn compress_one(state: &[u32; 8], block: &[u8; 64]) -> [u32; 8] {
        let mut s = *state;
        compress256(&mut s, std::slice::from_ref(block));
        s
    }

    #[test]
    fn random_inputs_match_sha2_on_both_streams() {
        let mut rng = TestRng(0x5eed);
        for _ in 0..2_000 {
            let (a_state, a_block, b_state, b_block) =
                (rng.state(), rng.block(), rng.state(), rng.block());
            let (mut a, mut b) = (a_state, b_state);
            compress_x2(&mut a, &a_block, &mut b, &b_block);
            assert_eq!(a, compress_one(&a_state, &a_block));
            assert_eq!(b, compress_one(&b_state, &b_block));
        }
    }

    #[test]
    fn equal_inputs_give_equal_outputs() {
        let mut rng = TestRng(7);
        for _ in 0..200 {
            let (state, block) = (rng.state(), rng.block());
            let (mut a, mut b) = (state, state);
            compress_x2(&mut a, &block, &mut b, &block);
            let want = compress_one(&state, &block);
            assert_eq!(a, want);
            assert_eq!(b, want);
        }
    }

    #[test]
    fn chained_blocks_match_sha2() {
        // Long chains catch a state layout error that a single step could hide.
        let mut rng = TestRng(99);
        let (mut a, mut b) = (SHA256_IV, rng.state());
        let (mut a_want, mut b_want) = (a, b);
        for _ in 0..100 {
            let (a_block, b_block) = (rng.block(), rng.block());
            compress_x2(&mut a, &a_block, &mut b, &b_block);
            a_want = compress_one(&a_want, &a_block);
            b_want = compress_one(&b_want, &b_block);
        }
        assert_eq!((a, b), (a_want, b_want));
    }

    /// The SHA-NI path where the CPU has it (else prints why it is skipped), and the path
    /// `REBINDGW_AES_BACKEND=portable` forces, which must not be SHA-NI.
    fn backends_to_test() -> Vec<Backend> {
        let mut v = vec![Backend::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            assert!(
                !uses_sha_ni(Backend::Portable),
                "portable must switch SHA-NI off"
            );
            assert!(!uses_sha_ni(crate::crypto::process_backend_from_value(
                Some("portable")
            )));
            if uses_sha_ni(Backend::AesNi) {
                v.push(Backend::AesNi);
            } else {
                eprintln!(
                    "skipped: compress_x2's SHA-NI path (this CPU lacks sha, ssse3 or sse4.1)"
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        eprintln!("skipped: compress_x2's SHA-NI path (not x86_64)");
        v
    }

    proptest! {
        /// Each path of `compress_x2_with`, on random states and blocks, equals two calls of
        /// `sha2`'s own compression function.
        #[test]
        fn compress_x2_matches_sha2(
            a_state in any::<[u32; 8]>(),
            b_state in any::<[u32; 8]>(),
            a_block in proptest::array::uniform32(any::<[u8; 2]>()),
            b_block in proptest::array::uniform32(any::<[u8; 2]>()),
        ) {
            let a_block: [u8; 64] = a_block.concat().try_into().unwrap();
            let b_block: [u8; 64] = b_block.concat().try_into().unwrap();
            for backend in backends_to_test() {
                let (mut a, mut b) = (a_state, b_state);
                compress_x2_with(backend, &mut a, &a_block, &mut b, &b_block);
                prop_assert_eq!(a, compress_one(&a_state, &a_block), "{}", backend);
                prop_assert_eq!(b, compress_one(&b_state, &b_block), "{}", backend);
            }
        }

        /// `compress_xn_with` for 4 and 8 streams, each path, against `sha2`'s compression.
        #[test]
        fn compress_xn_matches_sha2(
            states in proptest::array::uniform8(any::<[u32; 8]>()),
            seed in any::<u64>(),
        ) {
            let mut rng = TestRng(seed);
            let blocks: [[u8; 64]; 8] = core::array::from_fn(|_| rng.block());
            for backend in backends_to_test() {
                let mut four: [[u32; 8]; 4] = core::array::from_fn(|i| states[i]);
                compress_xn_with(backend, &mut four, core::array::from_fn(|i| &blocks[i]));
                let mut eight = states;
                compress_xn_with(backend, &mut eight, core::array::from_fn(|i| &blocks[i]));
                for i in 0..8 {
                    let want = compress_one(&states[i], &blocks[i]);
                    prop_assert_eq!(eight[i], want, "{} x8 stream {}", backend, i);
                    if i < 4 {
                        prop_assert_eq!(four[i], want, "{} x4 stream {}", backend, i);
                    }
                }
            }
        }

        /// `HmacSha256Midstate` (keyed and finished through `compress_x2`) against the `hmac`
        /// crate, for both streams of `mac_x2`.
        #[test]
        fn mac_x2_matches_hmac_crate(
            key_a in proptest::collection::vec(any::<u8>(), 0..=64),
            key_b in proptest::collection::vec(any::<u8>(), 0..=64),
            a in proptest::collection::vec(any::<u8>(), 0..300),
            b in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            use crate::crypto::HmacSha256Midstate;
            use hmac::{Hmac, KeyInit, Mac};
            let reference = |key: &[u8], msg: &[u8]| {
                let mut m = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).unwrap();
                m.update(msg);
                m.finalize().into_bytes()
            };
            let (ka, kb) = (HmacSha256Midstate::new(&key_a), HmacSha256Midstate::new(&key_b));
            let [got_a, got_b] = HmacSha256Midstate::mac_x2((&ka, &[&a]), (&kb, &[&b]));
            prop_assert_eq!(&got_a[..], &reference(&key_a, &a)[..]);
            prop_assert_eq!(&got_b[..], &reference(&key_b, &b)[..]);
        }
    }
}
