//! Multi-buffer SHA-256 over the 16 32-bit lanes of AVX-512 registers, for the per-REBIND
//! session-key KDF of a whole batch: [`hkdf_keyed_x16`] derives up to 16 keys
//! `Expand(Extract(R, ikm), info, 16)` at once, one lane per key, every SHA-256 compression
//! of the 16 KDFs one pass over `zmm` registers (word `j` of every lane in register `j`).
//!
//! Why: on this CPU SHA-NI is throughput-bound (one compression ≈ 31 ns whether 1, 2, 4 or 8
//! streams are interleaved: `cargo bench --bench kdf -- sha256_block`), so the paired
//! [`super::sha256::compress_x2`] cannot go faster; 16 lanes of plain SIMD rounds can.
//!
//! The lanes' messages must have equal lengths (they do in a REBIND batch: one S per
//! registry). Unused lanes of a partial batch repeat lane 0 and are thrown away.
//! Without AVX-512 (f, bw), or under `REBINDGW_AES_BACKEND=portable`, [`hkdf_keyed_x16_with`]
//! runs the portable per-key code ([`super::HmacSha256Midstate`] over `sha2`).
#![allow(unsafe_code)]

use zeroize::Zeroizing;

use super::{Backend, HmacSha256Midstate, Wiped};

/// Lanes per pass.
pub const LANES: usize = 16;

/// The longest `ikm` (and `info`) a lane may have: the gateway's S ≤ 32 nonces of 8 bytes.
pub const MAX_IKM: usize = 256;
/// The longest `info` (`info || 0x01` must fit one block with its padding).
pub const MAX_INFO: usize = 54;

/// One key of [`hkdf_keyed_x16`]: `Expand(Extract(salt, ikm), info, 16)` where `extract` is
/// HMAC keyed with the salt.
#[derive(Clone, Copy)]
pub struct KdfLane<'a> {
    pub extract: &'a HmacSha256Midstate,
    pub ikm: &'a [u8],
    pub info: &'a [u8],
}

/// Whether the AVX-512 path runs under `backend` on this CPU.
pub fn available(backend: Backend) -> bool {
    cfg!(target_arch = "x86_64")
        && super::fast_paths_allowed(backend)
        && super::cpu_features().avx512
}

/// [`hkdf_keyed_x16_with`] under the process backend ([`super::process_backend`]).
pub fn hkdf_keyed_x16(lanes: &[KdfLane<'_>], out: &mut [Zeroizing<[u8; 16]>]) {
    hkdf_keyed_x16_with(super::process_backend(), lanes, out);
}

/// `out[i] = Expand(Extract(lanes[i]), lanes[i].info, 16)` for up to [`LANES`] lanes of
/// equal `ikm` and `info` lengths (`ikm` ≤ [`MAX_IKM`], `info` ≤ [`MAX_INFO`] bytes): AVX-512
/// when [`available`], else one lane after the other on the portable code.
///
/// Panics if the lengths differ, exceed the limits, or `out` is not as long as `lanes`.
pub fn hkdf_keyed_x16_with(
    backend: Backend,
    lanes: &[KdfLane<'_>],
    out: &mut [Zeroizing<[u8; 16]>],
) {
    assert!(lanes.len() <= LANES && out.len() == lanes.len());
    let Some(first) = lanes.first() else { return };
    assert!(first.ikm.len() <= MAX_IKM && first.info.len() <= MAX_INFO);
    assert!(
        lanes
            .iter()
            .all(|l| l.ikm.len() == first.ikm.len() && l.info.len() == first.info.len()),
        "every lane's ikm and info have the same length"
    );
    #[cfg(target_arch = "x86_64")]
    if available(backend) {
        // SAFETY: `available` checked that the CPU has avx512f and avx512bw, the features
        // `avx512::hkdf_x16` is compiled with; the lengths were checked above.
        unsafe { avx512::hkdf_x16(lanes, out) };
        return;
    }
    let _ = backend;
    hkdf_portable(lanes, out);
}

/// One key at a time on [`HmacSha256Midstate`] (the fallback, and a reference for tests).
#[doc(hidden)]
pub fn hkdf_portable(lanes: &[KdfLane<'_>], out: &mut [Zeroizing<[u8; 16]>]) {
    for (lane, k) in lanes.iter().zip(out) {
        let prk = lane.extract.mac(&[lane.ikm]);
        let t1 = HmacSha256Midstate::new(&prk[..]).mac(&[lane.info, &[1]]);
        k.copy_from_slice(&t1[..16]);
    }
}

/// Block `index` of the SHA-256 padding of `msg` hashed after `done` bytes (a multiple of
/// 64): message bytes, `0x80`, zeros, the 64-bit bit length.
fn padded_block(msg: &[u8], done: u64, index: usize, out: &mut [u8; 64]) {
    let start = 64 * index;
    if let Some(whole) = msg.get(start..start + 64) {
        // A block of message bytes only: one fixed-size copy.
        out.copy_from_slice(whole);
        return;
    }
    out.fill(0);
    if start < msg.len() {
        let n = (msg.len() - start).min(64);
        out[..n].copy_from_slice(&msg[start..start + n]);
    }
    if (start..start + 64).contains(&msg.len()) {
        out[msg.len() - start] = 0x80;
    }
    if padded_len(msg.len()) == start + 64 {
        out[56..].copy_from_slice(&((done + msg.len() as u64) * 8).to_be_bytes());
    }
}

/// Bytes of `msg` once padded (a multiple of 64).
fn padded_len(len: usize) -> usize {
    (len + 9).div_ceil(64) * 64
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::*;

    use zeroize::Zeroizing;

    use super::{KdfLane, LANES, MAX_IKM, Wiped, padded_block, padded_len};

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

    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    /// Word `j` of the 16 lanes' states, `j = 0..8` (a..h).
    type State = [__m512i; 8];
    /// Word `j` of the 16 lanes' message blocks.
    type Words = [__m512i; 16];

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn splat(x: u32) -> __m512i {
        _mm512_set1_epi32(x as i32)
    }

    /// One SHA-256 round on 16 lanes, `wk` = `W[t] + K[t]`; the caller rotates the names.
    macro_rules! round_wk {
        ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident,
         $wk:expr) => {{
            let s1 = _mm512_ternarylogic_epi32(
                _mm512_ror_epi32($e, 6),
                _mm512_ror_epi32($e, 11),
                _mm512_ror_epi32($e, 25),
                0x96,
            );
            // Ch(e, f, g) = e ? f : g.
            let ch = _mm512_ternarylogic_epi32($e, $f, $g, 0xCA);
            let t1 = _mm512_add_epi32(_mm512_add_epi32($h, s1), _mm512_add_epi32(ch, $wk));
            let s0 = _mm512_ternarylogic_epi32(
                _mm512_ror_epi32($a, 2),
                _mm512_ror_epi32($a, 13),
                _mm512_ror_epi32($a, 22),
                0x96,
            );
            // Maj(a, b, c).
            let maj = _mm512_ternarylogic_epi32($a, $b, $c, 0xE8);
            $d = _mm512_add_epi32($d, t1);
            $h = _mm512_add_epi32(t1, _mm512_add_epi32(s0, maj));
        }};
    }

    /// `state += compress(state, block)` for 16 lanes that all hash the same block, given as
    /// its scalar schedule with the round constants added (`wk[t] = W[t] + K[t]`): no
    /// message schedule in the vectors. Used for a block of padding only, which depends on
    /// the message length alone.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn compress_same_block(state: &mut State, wk: &[u32; 64]) {
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
        for t in (0..64).step_by(8) {
            round_wk!(a, b, c, d, e, f, g, h, splat(wk[t]));
            round_wk!(h, a, b, c, d, e, f, g, splat(wk[t + 1]));
            round_wk!(g, h, a, b, c, d, e, f, splat(wk[t + 2]));
            round_wk!(f, g, h, a, b, c, d, e, splat(wk[t + 3]));
            round_wk!(e, f, g, h, a, b, c, d, splat(wk[t + 4]));
            round_wk!(d, e, f, g, h, a, b, c, splat(wk[t + 5]));
            round_wk!(c, d, e, f, g, h, a, b, splat(wk[t + 6]));
            round_wk!(b, c, d, e, f, g, h, a, splat(wk[t + 7]));
        }
        let new = [a, b, c, d, e, f, g, h];
        for (s, n) in state.iter_mut().zip(new) {
            *s = _mm512_add_epi32(*s, n);
        }
    }

    /// The schedule of one block with the round constants added: `W[t] + K[t]`, `t < 64`.
    fn schedule_wk(block: &[u8; 64]) -> [u32; 64] {
        let mut w = [0u32; 64];
        for (wt, chunk) in w.iter_mut().zip(block.chunks_exact(4)) {
            *wt = u32::from_be_bytes(chunk.try_into().expect("4 bytes"));
        }
        for t in 16..64 {
            let s0 = w[t - 15].rotate_right(7) ^ w[t - 15].rotate_right(18) ^ (w[t - 15] >> 3);
            let s1 = w[t - 2].rotate_right(17) ^ w[t - 2].rotate_right(19) ^ (w[t - 2] >> 10);
            w[t] = w[t - 16]
                .wrapping_add(s0)
                .wrapping_add(w[t - 7])
                .wrapping_add(s1);
        }
        for (wt, k) in w.iter_mut().zip(K) {
            *wt = wt.wrapping_add(k);
        }
        w
    }

    /// `state += compress(state, w)` for the 16 lanes. `w` is consumed (it holds the message
    /// schedule afterwards).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn compress(state: &mut State, w: &mut Words) {
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
        // One round on the named registers; the caller rotates the names.
        macro_rules! round {
            ($a:ident, $b:ident, $c:ident, $d:ident, $e:ident, $f:ident, $g:ident, $h:ident,
             $k:expr, $j:literal, $sched:expr) => {{
                if $sched {
                    // w[j] += σ0(w[j+1]) + w[j+9] + σ1(w[j+14]) (indices mod 16).
                    let w1 = w[($j + 1) % 16];
                    let w14 = w[($j + 14) % 16];
                    let s0 = _mm512_ternarylogic_epi32(
                        _mm512_ror_epi32(w1, 7),
                        _mm512_ror_epi32(w1, 18),
                        _mm512_srli_epi32(w1, 3),
                        0x96,
                    );
                    let s1 = _mm512_ternarylogic_epi32(
                        _mm512_ror_epi32(w14, 17),
                        _mm512_ror_epi32(w14, 19),
                        _mm512_srli_epi32(w14, 10),
                        0x96,
                    );
                    w[$j] = _mm512_add_epi32(
                        _mm512_add_epi32(w[$j], s0),
                        _mm512_add_epi32(w[($j + 9) % 16], s1),
                    );
                }
                round_wk!(
                    $a,
                    $b,
                    $c,
                    $d,
                    $e,
                    $f,
                    $g,
                    $h,
                    _mm512_add_epi32(w[$j], splat($k))
                );
            }};
        }
        // 16 rounds; after 8 the names are back in place.
        macro_rules! sixteen {
            ($base:expr, $sched:expr) => {{
                round!(a, b, c, d, e, f, g, h, K[$base], 0, $sched);
                round!(h, a, b, c, d, e, f, g, K[$base + 1], 1, $sched);
                round!(g, h, a, b, c, d, e, f, K[$base + 2], 2, $sched);
                round!(f, g, h, a, b, c, d, e, K[$base + 3], 3, $sched);
                round!(e, f, g, h, a, b, c, d, K[$base + 4], 4, $sched);
                round!(d, e, f, g, h, a, b, c, K[$base + 5], 5, $sched);
                round!(c, d, e, f, g, h, a, b, K[$base + 6], 6, $sched);
                round!(b, c, d, e, f, g, h, a, K[$base + 7], 7, $sched);
                round!(a, b, c, d, e, f, g, h, K[$base + 8], 8, $sched);
                round!(h, a, b, c, d, e, f, g, K[$base + 9], 9, $sched);
                round!(g, h, a, b, c, d, e, f, K[$base + 10], 10, $sched);
                round!(f, g, h, a, b, c, d, e, K[$base + 11], 11, $sched);
                round!(e, f, g, h, a, b, c, d, K[$base + 12], 12, $sched);
                round!(d, e, f, g, h, a, b, c, K[$base + 13], 13, $sched);
                round!(c, d, e, f, g, h, a, b, K[$base + 14], 14, $sched);
                round!(b, c, d, e, f, g, h, a, K[$base + 15], 15, $sched);
            }};
        }
        sixteen!(0, false);
        sixteen!(16, true);
        sixteen!(32, true);
        sixteen!(48, true);
        let new = [a, b, c, d, e, f, g, h];
        for (s, n) in state.iter_mut().zip(new) {
            *s = _mm512_add_epi32(*s, n);
        }
    }

    /// The message words of one block per lane, `blocks[lane]` (64 bytes each, in memory one
    /// after the other), big-endian, transposed: word `j` of every lane in `w[j]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn load_blocks(blocks: &[[u8; 64]; LANES]) -> Words {
        let lane_offsets = _mm512_set_epi32(
            15 * 64,
            14 * 64,
            13 * 64,
            12 * 64,
            11 * 64,
            10 * 64,
            9 * 64,
            8 * 64,
            7 * 64,
            6 * 64,
            5 * 64,
            4 * 64,
            3 * 64,
            2 * 64,
            64,
            0,
        );
        let byte_swap =
            _mm512_broadcast_i32x4(_mm_set_epi64x(0x0C0D_0E0F_0809_0A0B, 0x0405_0607_0001_0203));
        let base: *const u8 = blocks.as_ptr().cast();
        core::array::from_fn(|j| {
            // SAFETY: lane `l` reads the 4 bytes at `64 * l + 4 * j` with `l < 16`, `j < 16`:
            // inside the 1,024 bytes of `blocks`.
            let words =
                unsafe { _mm512_i32gather_epi32::<1>(lane_offsets, base.add(4 * j).cast()) };
            _mm512_shuffle_epi8(words, byte_swap)
        })
    }

    /// The 8 state words of 16 midstates, transposed.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn load_states(states: &[[u32; 8]; LANES]) -> State {
        let lane_offsets = _mm512_set_epi32(
            15 * 8,
            14 * 8,
            13 * 8,
            12 * 8,
            11 * 8,
            10 * 8,
            9 * 8,
            8 * 8,
            7 * 8,
            6 * 8,
            5 * 8,
            4 * 8,
            3 * 8,
            2 * 8,
            8,
            0,
        );
        let base: *const i32 = states.as_ptr().cast();
        core::array::from_fn(|j| {
            // SAFETY: lane `l` reads the word at `8 * l + j` (scale 4) with `l < 16`,
            // `j < 8`: inside the 128 words of `states`.
            unsafe { _mm512_i32gather_epi32::<4>(lane_offsets, base.add(j)) }
        })
    }

    /// An HMAC outer block (or any 32-byte message after one block): `digest` then the
    /// padding of a 96-byte message.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn digest_block(digest: &State) -> Words {
        let mut w = [_mm512_setzero_si512(); 16];
        w[..8].copy_from_slice(digest);
        w[8] = splat(0x8000_0000);
        w[15] = splat(96 * 8);
        w
    }

    /// HMAC keying with a 32-byte key in every lane (`key` transposed): the ipad and opad
    /// midstates.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn hmac_key32(key: &State) -> (State, State) {
        let pad = |x: u32| {
            let mut w = [splat(x); 16];
            for (wj, kj) in w.iter_mut().zip(key) {
                *wj = _mm512_xor_si512(*kj, splat(x));
            }
            w
        };
        let (mut ipad, mut opad) = (pad(0x3636_3636), pad(0x5c5c_5c5c));
        let (mut inner, mut outer) = (IV.map(|x| splat(x)), IV.map(|x| splat(x)));
        compress(&mut inner, &mut ipad);
        compress(&mut outer, &mut opad);
        (inner, outer)
    }

    /// Plain SHA-256 of 16 messages of equal length, one per lane (tests: the NIST vectors
    /// on the lane code alone).
    #[cfg(test)]
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn sha256_x16(msgs: &[&[u8]; LANES]) -> [[u8; 32]; LANES] {
        let mut state = IV.map(|x| splat(x));
        let mut blocks = [[0u8; 64]; LANES];
        for b in 0..padded_len(msgs[0].len()) / 64 {
            for (block, msg) in blocks.iter_mut().zip(msgs) {
                padded_block(msg, 0, b, block);
            }
            compress(&mut state, &mut load_blocks(&blocks));
        }
        let mut words = [[0u32; LANES]; 8];
        for (out, word) in words.iter_mut().zip(state) {
            // SAFETY: `out` is 64 writable bytes; unaligned store.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), word) };
        }
        core::array::from_fn(|l| {
            let mut digest = [0u8; 32];
            for (j, chunk) in digest.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&words[j][l].to_be_bytes());
            }
            digest
        })
    }

    /// See [`super::hkdf_keyed_x16_with`], which checked the lengths.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) fn hkdf_x16(lanes: &[KdfLane<'_>], out: &mut [Zeroizing<[u8; 16]>]) {
        let lane = |l: usize| lanes.get(l).unwrap_or(&lanes[0]);
        let (mut inner_mid, mut outer_mid) = ([[0u32; 8]; LANES], [[0u32; 8]; LANES]);
        for l in 0..LANES {
            (inner_mid[l], outer_mid[l]) = (lane(l).extract.inner, lane(l).extract.outer);
        }
        let mut state = load_states(&inner_mid);
        let outer = load_states(&outer_mid);
        inner_mid.as_flattened_mut().fill(0);
        outer_mid.as_flattened_mut().fill(0);
        core::hint::black_box((&mut inner_mid, &mut outer_mid));

        // Extract: HMAC(salt, ikm), the inner hash continued after the ipad block.
        let ikm_len = lanes[0].ikm.len();
        debug_assert!(ikm_len <= MAX_IKM);
        let mut buf = Wiped::<{ 64 * LANES }>::zeroed();
        let blocks: &mut [[u8; 64]; LANES] =
            buf.as_chunks_mut::<64>().0.try_into().expect("16 blocks");
        for b in 0..padded_len(ikm_len) / 64 {
            if 64 * b >= ikm_len {
                // Padding only: the same block in every lane (equal lengths). Public data.
                let mut pad = [0u8; 64];
                padded_block(lanes[0].ikm, 64, b, &mut pad);
                compress_same_block(&mut state, &schedule_wk(&pad));
                continue;
            }
            for (l, block) in blocks.iter_mut().enumerate() {
                padded_block(lane(l).ikm, 64, b, block);
            }
            let mut w = load_blocks(blocks);
            compress(&mut state, &mut w);
        }
        let mut prk = outer;
        compress(&mut prk, &mut digest_block(&state));

        // Expand, L = 16: T(1) = HMAC(prk, info || 0x01), one block after the ipad block.
        let (mut inner, mut t1) = hmac_key32(&prk);
        for (l, block) in blocks.iter_mut().enumerate() {
            let info = lane(l).info;
            let mut msg = [0u8; super::MAX_INFO + 1];
            msg[..info.len()].copy_from_slice(info);
            msg[info.len()] = 1;
            padded_block(&msg[..=info.len()], 64, 0, block);
        }
        compress(&mut inner, &mut load_blocks(blocks));
        compress(&mut t1, &mut digest_block(&inner));

        // k = the first 16 bytes of T(1), lane by lane.
        let mut words = Wiped::<{ 4 * 64 }>::zeroed();
        for (j, word) in t1[..4].iter().enumerate() {
            // SAFETY: `words` has 256 bytes: word `j` of the 16 lanes goes to bytes
            // `64 * j .. 64 * j + 64`, `j < 4`, with an unaligned store.
            unsafe { _mm512_storeu_si512(words.as_mut_ptr().add(64 * j).cast(), *word) };
        }
        for (l, k) in out.iter_mut().enumerate() {
            for j in 0..4 {
                let at = 64 * j + 4 * l;
                let word = u32::from_ne_bytes(words[at..at + 4].try_into().expect("4 bytes"));
                k[4 * j..4 * j + 4].copy_from_slice(&word.to_be_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// The AVX-512 path where the CPU has it (else says why it is skipped), and the path
    /// `REBINDGW_AES_BACKEND=portable` forces, which must not be AVX-512.
    fn backends_to_test() -> Vec<Backend> {
        assert!(
            !available(Backend::Portable),
            "portable must switch AVX-512 off"
        );
        assert!(!available(super::super::process_backend_from_value(Some(
            "portable"
        ))));
        let mut v = vec![Backend::Portable];
        if available(Backend::best()) {
            v.push(Backend::best());
        } else {
            eprintln!("skipped: the 16-lane AVX-512 KDF (this CPU lacks avx512f or avx512bw)");
        }
        v
    }

    /// The `hkdf` crate: first 16 bytes of `Expand(Extract(salt, ikm), info, 16)`.
    fn reference(salt: &[u8], ikm: &[u8], info: &[u8]) -> [u8; 16] {
        let mut k = [0u8; 16];
        hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm)
            .expand(info, &mut k)
            .unwrap();
        k
    }

    fn run(
        backend: Backend,
        salts: &[Vec<u8>],
        ikms: &[Vec<u8>],
        infos: &[Vec<u8>],
    ) -> Vec<[u8; 16]> {
        let keyed: Vec<HmacSha256Midstate> =
            salts.iter().map(|s| HmacSha256Midstate::new(s)).collect();
        let lanes: Vec<KdfLane<'_>> = (0..salts.len())
            .map(|l| KdfLane {
                extract: &keyed[l],
                ikm: &ikms[l],
                info: &infos[l],
            })
            .collect();
        let mut out: Vec<Zeroizing<[u8; 16]>> =
            (0..lanes.len()).map(|_| Zeroizing::new([0; 16])).collect();
        hkdf_keyed_x16_with(backend, &lanes, &mut out);
        out.iter().map(|k| **k).collect()
    }

    /// RFC 5869 A.1 and A.3 (the first 16 bytes of OKM), in every lane at once and alone.
    #[test]
    fn rfc5869_vectors() {
        let h = |s: &str| hex::decode(s).unwrap();
        let cases = [
            (
                h("000102030405060708090a0b0c"),
                vec![0x0b; 22],
                h("f0f1f2f3f4f5f6f7f8f9"),
                "3cb25f25faacd57a90434f64d0362f2a",
            ),
            (
                vec![],
                vec![0x0b; 22],
                vec![],
                "8da4e775a563c18f715f802a063c5a31",
            ),
        ];
        for backend in backends_to_test() {
            for (salt, ikm, info, okm) in &cases {
                for n in [1, 5, 16] {
                    let got = run(
                        backend,
                        &vec![salt.clone(); n],
                        &vec![ikm.clone(); n],
                        &vec![info.clone(); n],
                    );
                    for k in got {
                        assert_eq!(hex::encode(k), *okm, "{backend}, {n} lanes");
                    }
                }
            }
        }
    }

    /// FIPS 180-2 / NIST CAVP SHA-256 vectors ("abc", "", the 448-bit two-block message) in
    /// all 16 lanes, and 16 different messages of one length against `sha2`.
    #[test]
    fn nist_vectors_on_every_lane() {
        use sha2::Digest;
        if !available(Backend::best()) {
            eprintln!("skipped: the 16-lane AVX-512 SHA-256 (this CPU lacks avx512f or avx512bw)");
            return;
        }
        let cases: [(&[u8], &str); 3] = [
            (
                b"abc",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
            (
                b"",
                "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            ),
        ];
        for (msg, want) in cases {
            // SAFETY: `available` checked avx512f and avx512bw.
            let got = unsafe { avx512::sha256_x16(&[msg; LANES]) };
            for (l, d) in got.iter().enumerate() {
                assert_eq!(hex::encode(d), want, "lane {l}");
            }
        }
        let msgs: Vec<Vec<u8>> = (0..LANES).map(|l| vec![l as u8 * 17; 130]).collect();
        let refs: [&[u8]; LANES] = core::array::from_fn(|l| &msgs[l][..]);
        // SAFETY: as above.
        let got = unsafe { avx512::sha256_x16(&refs) };
        for l in 0..LANES {
            assert_eq!(got[l][..], sha2::Sha256::digest(&msgs[l])[..], "lane {l}");
        }
    }

    #[test]
    fn padding_boundaries_every_lane_its_own() {
        // ikm lengths around the 55/56/64-byte edges of the block after the ipad block.
        for len in [
            0usize, 1, 54, 55, 56, 57, 63, 64, 65, 119, 120, 128, 183, 184, 256,
        ] {
            for backend in backends_to_test() {
                let salts: Vec<Vec<u8>> = (0..16).map(|l| vec![l as u8; 32]).collect();
                let ikms: Vec<Vec<u8>> = (0..16)
                    .map(|l| (0..len).map(|i| (i * 7 + l) as u8).collect())
                    .collect();
                let infos: Vec<Vec<u8>> = (0..16).map(|l| vec![l as u8 ^ 0x55; 14]).collect();
                let got = run(backend, &salts, &ikms, &infos);
                for l in 0..16 {
                    assert_eq!(
                        got[l],
                        reference(&salts[l], &ikms[l], &infos[l]),
                        "{backend}, len {len}, lane {l}"
                    );
                }
            }
        }
    }

    #[test]
    fn padded_block_matches_sha2_padding() {
        use sha2::Digest;
        use sha2::block_api::compress256;
        for len in [0usize, 1, 55, 56, 57, 63, 64, 65, 119, 120, 200] {
            let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut state = [
                0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
                0x5be0cd19,
            ];
            let mut block = [0u8; 64];
            for b in 0..padded_len(len) / 64 {
                padded_block(&msg, 0, b, &mut block);
                compress256(&mut state, std::slice::from_ref(&block));
            }
            let got: Vec<u8> = state.iter().flat_map(|w| w.to_be_bytes()).collect();
            assert_eq!(got[..], sha2::Sha256::digest(&msg)[..], "len {len}");
        }
    }

    #[test]
    #[should_panic(expected = "same length")]
    fn unequal_lengths_are_refused() {
        run(
            Backend::best(),
            &[vec![1; 32], vec![2; 32]],
            &[vec![0; 16], vec![0; 17]],
            &[vec![], vec![]],
        );
    }

    proptest! {
        /// Every path against the `hkdf` crate, for 1..=16 lanes of random salts, ikm and info
        /// (equal lengths across lanes, as the gateway's batches have).
        #[test]
        fn matches_hkdf_crate(
            lanes in 1usize..=LANES,
            ikm_len in 0usize..=MAX_IKM,
            info_len in 0usize..=MAX_INFO,
            salts in vec(vec(any::<u8>(), 0..=64), LANES),
            bytes in vec(any::<u8>(), LANES * (MAX_IKM + MAX_INFO)),
        ) {
            let salts = &salts[..lanes];
            let chunk = |l: usize, at: usize, n: usize| {
                let start = l * (MAX_IKM + MAX_INFO) + at;
                bytes[start..start + n].to_vec()
            };
            let ikms: Vec<Vec<u8>> = (0..lanes).map(|l| chunk(l, 0, ikm_len)).collect();
            let infos: Vec<Vec<u8>> = (0..lanes).map(|l| chunk(l, MAX_IKM, info_len)).collect();
            for backend in backends_to_test() {
                let got = run(backend, salts, &ikms, &infos);
                for l in 0..lanes {
                    prop_assert_eq!(
                        got[l],
                        reference(&salts[l], &ikms[l], &infos[l]),
                        "{} lane {}", backend, l
                    );
                }
            }
        }
    }
}
