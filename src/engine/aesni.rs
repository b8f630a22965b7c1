//! AES-NI backend: hand-written AES-128 decryption, 8 blocks in flight.
//!
//! Each slot is decrypted under both of its keys (2 blocks); 4 slots are interleaved, so 8
//! independent `aesdec` chains hide the instruction latency. Phase 2 takes 4 packets at a
//! time, slot by slot ([`decrypt4x2`]: each round key is loaded once for 4 blocks), and
//! leftover packets 4 slots at a time.
//! Every function here needs the `aes` CPU feature (plus SSE2, baseline on x86_64); the
//! backend is only constructed after runtime detection ([`super::Backend::is_supported`]).
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::aes_ni::{expand_enc, load};

use super::{
    EMPTY_OUTPUT, Kernel, Slot0, TrialInput, TrialOutput, first_block, index_from_bits, t_le,
};

/// The 11 decryption round keys of one AES-128 key (equivalent inverse cipher order:
/// `dk[0]` is applied first). 16-aligned so that SSE `aesdec` can take them from memory.
#[derive(Zeroize)]
#[repr(C, align(16))]
pub(super) struct RoundKeys(pub(super) [[u8; 16]; 11]);

impl RoundKeys {
    /// Round key `r` (< 11).
    #[inline(always)]
    fn get(&self, r: usize) -> __m128i {
        let k: &[u8; 16] = &self.0[r];
        // SAFETY: `k` is valid for a 16-byte read, and 16-aligned: `RoundKeys` is
        // `align(16)` and each element is 16 bytes long. SSE2 is baseline on x86_64.
        unsafe { _mm_load_si128(k.as_ptr().cast()) }
    }
}

/// Expanded keys of an epoch: `dk[i][b]` for `K[i][b]`. Zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(super) struct Keys {
    dk: Vec<[RoundKeys; 2]>,
}

impl Keys {
    /// Expands every key. Must only be called when the CPU has AES-NI.
    pub(super) fn new(keys: &[[[u8; 16]; 2]]) -> Keys {
        let dk = keys
            .iter()
            .map(|[k0, k1]| {
                // SAFETY: `Keys` is only built by `TrialKeys::new` after it checked
                // `Backend::AesNi.is_supported()` (or `Vaes`, which implies `aes`).
                unsafe { [expand_dec(k0), expand_dec(k1)] }
            })
            .collect();
        Keys { dk }
    }

    pub(super) fn decrypt_raw(&self, slot: usize, blocks: &mut [[u8; 16]]) {
        let (lo, hi) = blocks.split_at_mut(blocks.len() / 2);
        let [k0, k1] = &self.dk[slot];
        // SAFETY: these keys exist, so AES-NI was detected (see `Keys::new`).
        unsafe {
            decrypt_blocks(k0, lo);
            decrypt_blocks(k1, hi);
        }
    }
}

impl Kernel for Keys {
    fn filter(&self, inputs: &[TrialInput<'_>], alive: &mut [u8], _: &mut Slot0) -> usize {
        // SAFETY: these keys exist, so AES-NI was detected (see `Keys::new`).
        unsafe { filter(self, inputs, alive) }
    }

    /// Redoes slot 0: groups of 4 slots cost the same with or without it for S = 16.
    fn verify(
        &self,
        inputs: &[TrialInput<'_>],
        alive: &[u8],
        _: &Slot0,
        out: &mut [Option<TrialOutput>],
    ) {
        // SAFETY: these keys exist, so AES-NI was detected (see `Keys::new`).
        unsafe { verify(self, inputs, alive, out) }
    }
}

/// Stores a 16-byte block.
#[inline(always)]
fn store(v: __m128i) -> [u8; 16] {
    let mut b = [0u8; 16];
    // SAFETY: `b` is valid for a 16-byte write; `storeu` has no alignment requirement.
    unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) };
    b
}

/// Decryption round keys (equivalent inverse cipher, FIPS 197 §5.3.5) of an AES-128 key.
#[target_feature(enable = "aes,sse2")]
pub(super) fn expand_dec(key: &[u8; 16]) -> RoundKeys {
    let mut ek = expand_enc(key);
    let mut dk = RoundKeys([[0; 16]; 11]);
    dk.0[0] = store(ek[10]);
    for r in 1..10 {
        dk.0[r] = store(_mm_aesimc_si128(ek[10 - r]));
    }
    dk.0[10] = store(ek[0]);
    // Best effort: clear the stack copy of the encryption schedule.
    for k in ek.iter_mut() {
        *k = _mm_setzero_si128();
    }
    core::hint::black_box(&mut ek);
    dk
}

/// Decrypts one block.
#[inline]
#[target_feature(enable = "aes,sse2")]
fn decrypt1(k: &RoundKeys, b: __m128i) -> __m128i {
    let mut x = _mm_xor_si128(b, k.get(0));
    x = _mm_aesdec_si128(x, k.get(1));
    x = _mm_aesdec_si128(x, k.get(2));
    x = _mm_aesdec_si128(x, k.get(3));
    x = _mm_aesdec_si128(x, k.get(4));
    x = _mm_aesdec_si128(x, k.get(5));
    x = _mm_aesdec_si128(x, k.get(6));
    x = _mm_aesdec_si128(x, k.get(7));
    x = _mm_aesdec_si128(x, k.get(8));
    x = _mm_aesdec_si128(x, k.get(9));
    _mm_aesdeclast_si128(x, k.get(10))
}

/// Raw decryption of `blocks` under one key, 8 at a time.
#[target_feature(enable = "aes,sse2")]
fn decrypt_blocks(k: &RoundKeys, blocks: &mut [[u8; 16]]) {
    let (chunks, tail) = blocks.as_chunks_mut::<8>();
    for c in chunks {
        let mut x = [_mm_setzero_si128(); 8];
        for j in 0..8 {
            x[j] = load(&c[j]);
        }
        let x = decrypt4x2(k, k, x);
        for j in 0..8 {
            c[j] = store(x[j]);
        }
    }
    for b in tail {
        *b = store(decrypt1(k, load(b)));
    }
}

/// `(good0, good1)` of two candidates of one slot: bytes 8..16 equal u64(t).
#[inline]
#[target_feature(enable = "sse2")]
fn good2(x0: __m128i, x1: __m128i, t: __m128i) -> (bool, bool) {
    let m0 = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(x0, t)));
    let m1 = _mm_movemask_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(x1, t)));
    (m0 & 0b1100 == 0b1100, m1 & 0b1100 == 0b1100)
}

/// Phase 1: slot 0 of 4 packets at a time, each under both keys (8 blocks).
#[target_feature(enable = "aes,sse2")]
fn filter(keys: &Keys, inputs: &[TrialInput<'_>], alive: &mut [u8]) -> usize {
    let [k0, k1] = &keys.dk[0];
    let total = alive.len();
    let mut kept = 0;
    let mut i = 0;
    while i < total {
        let n = (total - i).min(4);
        // Pad a short group with its last packet; the padding is not read back.
        let mut ps = [0u8; 4];
        for (j, q) in ps.iter_mut().enumerate() {
            *q = alive[i + j.min(n - 1)];
        }
        let mut inp = [inputs[usize::from(ps[0])]; 4];
        let mut b = [_mm_setzero_si128(); 4];
        for j in 0..4 {
            inp[j] = inputs[usize::from(ps[j])];
            b[j] = load(first_block(&inp[j]));
        }
        let x = decrypt4x2(k0, k1, [b[0], b[0], b[1], b[1], b[2], b[2], b[3], b[3]]);
        for j in 0..n {
            let t = _mm_set1_epi64x(t_le(inp[j].t) as i64);
            let (g0, g1) = good2(x[2 * j], x[2 * j + 1], t);
            alive[kept] = ps[j];
            kept += usize::from(g0 != g1);
        }
        i += n;
    }
    kept
}

/// One round of [`decrypt4x2`]'s template: load round key `$r` of both keys, apply `$op`.
macro_rules! pair_round {
    ($op:literal, $r:literal) => {
        concat!(
            "movdqa {t0}, xmmword ptr [{k0} + 16*",
            $r,
            "]\n",
            "movdqa {t1}, xmmword ptr [{k1} + 16*",
            $r,
            "]\n",
            $op,
            " {x0}, {t0}\n",
            $op,
            " {x1}, {t1}\n",
            $op,
            " {x2}, {t0}\n",
            $op,
            " {x3}, {t1}\n",
            $op,
            " {x4}, {t0}\n",
            $op,
            " {x5}, {t1}\n",
            $op,
            " {x6}, {t0}\n",
            $op,
            " {x7}, {t1}\n",
        )
    };
}

/// Decrypts 8 blocks in flight: even ones under `k0`, odd ones under `k1`.
///
/// Inline assembly pins the round-by-round order and loads each round key once (with
/// the intrinsics LLVM hoists the 22 shared round keys and, short of registers,
/// serializes the chains).
#[inline]
#[target_feature(enable = "aes,sse2")]
fn decrypt4x2(k0: &RoundKeys, k1: &RoundKeys, x: [__m128i; 8]) -> [__m128i; 8] {
    let [
        mut x0,
        mut x1,
        mut x2,
        mut x3,
        mut x4,
        mut x5,
        mut x6,
        mut x7,
    ] = x;
    // SAFETY: the template reads 11 16-byte round keys at `k0 + 16*r` and `k1 + 16*r`
    // for r < 11, which is exactly `*k0` and `*k1` (valid, 16-aligned `RoundKeys`, so
    // `movdqa` is fine); it writes only the declared registers, touches neither memory
    // nor the stack nor the flags, and needs AES-NI/SSE2, which this function's target
    // features guarantee.
    unsafe {
        core::arch::asm!(
            pair_round!("pxor", 0),
            pair_round!("aesdec", 1),
            pair_round!("aesdec", 2),
            pair_round!("aesdec", 3),
            pair_round!("aesdec", 4),
            pair_round!("aesdec", 5),
            pair_round!("aesdec", 6),
            pair_round!("aesdec", 7),
            pair_round!("aesdec", 8),
            pair_round!("aesdec", 9),
            pair_round!("aesdeclast", 10),
            k0 = in(reg) k0.0.as_ptr(),
            k1 = in(reg) k1.0.as_ptr(),
            t0 = out(xmm_reg) _,
            t1 = out(xmm_reg) _,
            x0 = inout(xmm_reg) x0,
            x1 = inout(xmm_reg) x1,
            x2 = inout(xmm_reg) x2,
            x3 = inout(xmm_reg) x3,
            x4 = inout(xmm_reg) x4,
            x5 = inout(xmm_reg) x5,
            x6 = inout(xmm_reg) x6,
            x7 = inout(xmm_reg) x7,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    [x0, x1, x2, x3, x4, x5, x6, x7]
}

/// Phase 2: groups of 4 packets slot by slot ([`verify4`]), the rest packet by packet.
#[target_feature(enable = "aes,sse2")]
fn verify(keys: &Keys, inputs: &[TrialInput<'_>], alive: &[u8], out: &mut [Option<TrialOutput>]) {
    let (groups, rest) = alive.as_chunks::<4>();
    for ps in groups {
        verify4(keys, inputs, ps, out);
    }
    verify_each(keys, inputs, rest, out);
}

/// Phase 2 for 4 packets, slot by slot: blocks 2j and 2j+1 hold slot s of packet `ps[j]`
/// under `K[s][0]` and `K[s][1]`, so each round key is loaded once for 4 blocks.
#[target_feature(enable = "aes,sse2")]
fn verify4(keys: &Keys, inputs: &[TrialInput<'_>], ps: &[u8; 4], out: &mut [Option<TrialOutput>]) {
    let slots = keys.dk.len();
    let mut blocks: [&[[u8; 16]]; 4] = [&[]; 4];
    let mut t = [_mm_setzero_si128(); 4];
    for j in 0..4 {
        let input = inputs[usize::from(ps[j])];
        blocks[j] = input.slots.as_chunks::<16>().0;
        t[j] = _mm_set1_epi64x(t_le(input.t) as i64);
    }
    let opts = match out.get_disjoint_mut(ps.map(usize::from)) {
        Ok(opts) if blocks.iter().all(|b| b.len() == slots) => opts,
        // The caller checked lengths and passes distinct packets; stay panic-free anyway.
        _ => return verify_each(keys, inputs, ps, out),
    };
    let mut res = opts.map(|o| o.insert(EMPTY_OUTPUT));
    let mut ok = [true; 4];
    let mut bits = [0u32; 4];
    for (s, [k0, k1]) in keys.dk.iter().enumerate() {
        let b = [
            load(&blocks[0][s]),
            load(&blocks[1][s]),
            load(&blocks[2][s]),
            load(&blocks[3][s]),
        ];
        let x = decrypt4x2(k0, k1, [b[0], b[0], b[1], b[1], b[2], b[2], b[3], b[3]]);
        for j in 0..4 {
            let (g0, g1) = good2(x[2 * j], x[2 * j + 1], t[j]);
            //= PROTOCOL.md §6 check 4
            //# Exactly one candidate per slot must be good.
            ok[j] &= g0 != g1;
            bits[j] |= u32::from(g1) << s;
            let (n0, n1) = (_mm_cvtsi128_si64(x[2 * j]), _mm_cvtsi128_si64(x[2 * j + 1]));
            res[j].nonces[s] = (if g1 { n1 } else { n0 }).to_le_bytes();
        }
    }
    for (r, b) in res.iter_mut().zip(bits) {
        r.index = index_from_bits(b, slots);
    }
    for (&p, ok) in ps.iter().zip(ok) {
        if !ok {
            out[usize::from(p)] = None;
        }
    }
}

/// Phase 2 packet by packet (fewer than 4 left): 4 slots (8 blocks) at a time.
#[target_feature(enable = "aes,sse2")]
fn verify_each(
    keys: &Keys,
    inputs: &[TrialInput<'_>],
    alive: &[u8],
    out: &mut [Option<TrialOutput>],
) {
    let slots = keys.dk.len();
    for &p in alive {
        let p = usize::from(p);
        let input = inputs[p];
        let blocks = input.slots.as_chunks::<16>().0;
        if blocks.len() != slots {
            out[p] = None;
            continue;
        }
        let t = _mm_set1_epi64x(t_le(input.t) as i64);
        let res = out[p].insert(EMPTY_OUTPUT);
        let mut ok = true;
        let mut bits = 0u32;
        let mut s0 = 0;
        while s0 < slots {
            let n = (slots - s0).min(4);
            // A short last group is padded with its last slot, and not read back.
            let mut k = [&keys.dk[s0][0]; 8];
            let mut b = [_mm_setzero_si128(); 8];
            for j in 0..4 {
                let i = s0 + j.min(n - 1);
                k[2 * j] = &keys.dk[i][0];
                k[2 * j + 1] = &keys.dk[i][1];
                b[2 * j] = load(&blocks[i]);
                b[2 * j + 1] = b[2 * j];
            }
            let x = decrypt8!(&k, b, _mm_xor_si128, _mm_aesdec_si128, _mm_aesdeclast_si128);
            for j in 0..n {
                let (g0, g1) = good2(x[2 * j], x[2 * j + 1], t);
                //= PROTOCOL.md §6 check 4
                //# Exactly one candidate per slot must be good.
                ok &= g0 != g1;
                bits |= u32::from(g1) << (s0 + j);
                let (n0, n1) = (_mm_cvtsi128_si64(x[2 * j]), _mm_cvtsi128_si64(x[2 * j + 1]));
                let nonce = if g1 { n1 } else { n0 };
                res.nonces[s0 + j] = nonce.to_le_bytes();
            }
            s0 += 4;
        }
        if ok {
            res.index = index_from_bits(bits, slots);
        } else {
            out[p] = None;
        }
    }
}
