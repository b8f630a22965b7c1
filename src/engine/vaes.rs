//! VAES backend: one slot per ymm register, both keys of the slot at once.
//!
//! A job is one slot of one packet. Its ciphertext block is broadcast into both 128-bit
//! lanes of a ymm register; lane 0 is decrypted with the round keys of `K[i][0]` and lane 1
//! with those of `K[i][1]`, so one `vaesdec` tests both candidates. 8 registers (16
//! blocks) are in flight: in phase 1 and phase 2 the same slot of 8 packets
//! ([`decrypt8_shared`], one round-key load per round), for leftover packets 8 slots of one
//! packet (`decrypt8!` in the parent module).
//!
//! Phase 1 judges slot 0 with scalar code: the 8 decrypted registers are stored to a
//! [`Spill`] and compared with integer loads, which keeps the vector pipes free for
//! `vaesdec`; and it is software-pipelined (group g is judged after group g+1's
//! decryption is issued), so the judging overlaps the AES latency chain. Phase 2 judges in
//! vector registers ([`judge8`]): per packet-slot the scalar way costs more instructions
//! than it saves there (measured).
//!
//! Every function here needs `vaes`, `avx2` and `aes`; the backend is only constructed
//! after runtime detection ([`super::Backend::is_supported`]).
#![allow(unsafe_code)]

use core::arch::x86_64::*;

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::aesni;
use super::{
    CHUNK, EMPTY_OUTPUT, Kernel, MAX_SLOTS, Slot0, TrialInput, TrialOutput, first_block,
    index_from_bits, t_le,
};

/// Lane-paired decryption round keys of one slot: round r = `dk(K0)[r] || dk(K1)[r]`
/// (lane 0 first). 32-aligned so `vaesdec` takes them straight from memory.
#[derive(Zeroize)]
#[repr(C, align(32))]
struct PairKeys([[u8; 32]; 11]);

impl PairKeys {
    /// Round key pair `r` (< 11).
    #[inline(always)]
    fn get(&self, r: usize) -> __m256i {
        let k: &[u8; 32] = &self.0[r];
        // SAFETY: `k` is valid for a 32-byte read, and 32-aligned: `PairKeys` is
        // `align(32)` and each element is 32 bytes long. The CPU has AVX: `PairKeys`
        // exist only after VAES/AVX2 detection (see `Keys::new`).
        unsafe { _mm256_load_si256(k.as_ptr().cast()) }
    }
}

/// Expanded keys of an epoch: `pk[i]` for slot i. Zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(super) struct Keys {
    pk: Vec<PairKeys>,
}

impl Keys {
    /// Expands every key. Must only be called when the CPU has VAES, AVX2 and AES-NI.
    pub(super) fn new(keys: &[[[u8; 16]; 2]]) -> Keys {
        let mut pk = Vec::with_capacity(keys.len());
        for [k0, k1] in keys {
            // SAFETY: `Keys` is only built by `TrialKeys::new` after it checked
            // `Backend::Vaes.is_supported()`, which includes `aes`.
            let (mut d0, mut d1) = unsafe { (aesni::expand_dec(k0), aesni::expand_dec(k1)) };
            let mut p = PairKeys([[0; 32]; 11]);
            for r in 0..11 {
                p.0[r][..16].copy_from_slice(&d0.0[r]);
                p.0[r][16..].copy_from_slice(&d1.0[r]);
            }
            pk.push(p);
            d0.zeroize();
            d1.zeroize();
        }
        Keys { pk }
    }

    pub(super) fn decrypt_raw(&self, slot: usize, blocks: &mut [[u8; 16]]) {
        // SAFETY: these keys exist, so VAES, AVX2 and AES-NI were detected (see `Keys::new`).
        unsafe { decrypt_raw(self, slot, blocks) }
    }
}

impl Kernel for Keys {
    fn filter(&self, inputs: &[TrialInput<'_>], alive: &mut [u8], slot0: &mut Slot0) -> usize {
        // SAFETY: these keys exist, so VAES, AVX2 and AES-NI were detected (see `Keys::new`).
        unsafe { filter(self, inputs, alive, slot0) }
    }

    fn verify(
        &self,
        inputs: &[TrialInput<'_>],
        alive: &[u8],
        slot0: &Slot0,
        out: &mut [Option<TrialOutput>],
    ) {
        // SAFETY: these keys exist, so VAES, AVX2 and AES-NI were detected (see `Keys::new`).
        unsafe { verify(self, inputs, alive, slot0, out) }
    }
}

/// Loads a 16-byte block into both lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn broadcast(b: &[u8; 16]) -> __m256i {
    // SAFETY: `b` is valid for a 16-byte read; `loadu` has no alignment requirement.
    _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(b.as_ptr().cast()) })
}

/// One round of [`decrypt8_shared`]'s template: load round key `$r`, apply `$op` to all 8.
macro_rules! shared_round {
    ($op:literal, $r:literal) => {
        concat!(
            "vmovdqa {t}, ymmword ptr [{k} + 32*",
            $r,
            "]\n",
            $op,
            " {x0}, {x0}, {t}\n",
            $op,
            " {x1}, {x1}, {t}\n",
            $op,
            " {x2}, {x2}, {t}\n",
            $op,
            " {x3}, {x3}, {t}\n",
            $op,
            " {x4}, {x4}, {t}\n",
            $op,
            " {x5}, {x5}, {t}\n",
            $op,
            " {x6}, {x6}, {t}\n",
            $op,
            " {x7}, {x7}, {t}\n",
        )
    };
}

/// Decrypts 8 registers in flight, all under the same lane-paired round keys.
///
/// Inline assembly pins the round-by-round order: with the intrinsics, LLVM hoists the
/// shared round keys into registers and then, short of registers, reorders the rounds
/// into nearly serial chains, which costs ~10% here. Each round key is loaded once.
#[inline]
#[target_feature(enable = "vaes,avx2,aes")]
fn decrypt8_shared(k: &PairKeys, x: [__m256i; 8]) -> [__m256i; 8] {
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
    // SAFETY: the template reads 11 32-byte round keys at `k + 32*r` for r < 11, which
    // is exactly `*k` (a valid, 32-aligned `PairKeys`, so `vmovdqa` is fine); it writes
    // only the declared registers, touches neither memory nor the stack nor the flags,
    // and needs VAES/AVX, which this function's target features guarantee.
    unsafe {
        core::arch::asm!(
            shared_round!("vpxor", 0),
            shared_round!("vaesdec", 1),
            shared_round!("vaesdec", 2),
            shared_round!("vaesdec", 3),
            shared_round!("vaesdec", 4),
            shared_round!("vaesdec", 5),
            shared_round!("vaesdec", 6),
            shared_round!("vaesdec", 7),
            shared_round!("vaesdec", 8),
            shared_round!("vaesdec", 9),
            shared_round!("vaesdeclast", 10),
            k = in(reg) k.0.as_ptr(),
            t = out(ymm_reg) _,
            x0 = inout(ymm_reg) x0,
            x1 = inout(ymm_reg) x1,
            x2 = inout(ymm_reg) x2,
            x3 = inout(ymm_reg) x3,
            x4 = inout(ymm_reg) x4,
            x5 = inout(ymm_reg) x5,
            x6 = inout(ymm_reg) x6,
            x7 = inout(ymm_reg) x7,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    [x0, x1, x2, x3, x4, x5, x6, x7]
}

/// Decrypted candidates of 8 registers in memory, for scalar judging: qwords 0, 1 = lane
/// 0 (`K0`) bytes 0..8, 8..16; qwords 2, 3 = lane 1 (`K1`).
///
/// Scalar loads and compares run on the integer pipes, beside the `vaesdec` stream;
/// judging in vector registers needs shuffles and compares that compete with it.
#[repr(C, align(32))]
struct Spill([[u64; 4]; 8]);

impl Spill {
    fn new() -> Spill {
        Spill([[0; 4]; 8])
    }

    /// Stores the 8 registers, register j in `self.0[j]`.
    #[inline]
    #[target_feature(enable = "avx")]
    fn store(&mut self, x: &[__m256i; 8]) {
        // An `asm!` store: with a plain store LLVM would see the reads below through
        // the memory and turn them back into vector extracts.
        // SAFETY: writes 8 x 32 bytes at `self.0`, which is exactly `*self` (32-aligned:
        // `Spill` is `align(32)`), through an exclusive borrow; no stack, no flags; AVX is
        // enabled.
        unsafe {
            core::arch::asm!(
                "vmovdqa ymmword ptr [{p}], {x0}",
                "vmovdqa ymmword ptr [{p} + 32], {x1}",
                "vmovdqa ymmword ptr [{p} + 64], {x2}",
                "vmovdqa ymmword ptr [{p} + 96], {x3}",
                "vmovdqa ymmword ptr [{p} + 128], {x4}",
                "vmovdqa ymmword ptr [{p} + 160], {x5}",
                "vmovdqa ymmword ptr [{p} + 192], {x6}",
                "vmovdqa ymmword ptr [{p} + 224], {x7}",
                p = in(reg) self.0.as_mut_ptr(),
                x0 = in(ymm_reg) x[0],
                x1 = in(ymm_reg) x[1],
                x2 = in(ymm_reg) x[2],
                x3 = in(ymm_reg) x[3],
                x4 = in(ymm_reg) x[4],
                x5 = in(ymm_reg) x[5],
                x6 = in(ymm_reg) x[6],
                x7 = in(ymm_reg) x[7],
                options(nostack, preserves_flags),
            );
        }
    }

    /// Register j's candidates against `want` ([`t_le`]): (good under `K0`, good under `K1`, the
    /// nonce of the `K1` candidate if that one is good, else of the `K0` one).
    #[inline(always)]
    fn judge(&self, j: usize, want: u64) -> (bool, bool, [u8; 8]) {
        let c = &self.0[j % 8];
        let (g0, g1) = (c[1] == want, c[3] == want);
        (g0, g1, c[2 * usize::from(g1)].to_le_bytes())
    }
}

/// One group of phase 1: up to 8 packets (by index in the chunk) and their `u64(t)`.
#[derive(Clone, Copy)]
struct Group {
    ps: [u8; 8],
    n: usize,
    t: [u64; 8],
}

/// Phase 1: slot 0 of 8 packets at a time (all under the slot-0 key pair).
///
/// Software-pipelined: group g is judged (scalar, from its [`Spill`]) after group g+1's
/// decryption is issued, so the judging overlaps the `vaesdec` latency chain instead of
/// waiting behind it.
#[target_feature(enable = "vaes,avx2,aes")]
fn filter(keys: &Keys, inputs: &[TrialInput<'_>], alive: &mut [u8], slot0: &mut Slot0) -> usize {
    let total = alive.len().min(CHUNK);
    // `alive` is compacted in place while it is read: read from a copy.
    let mut ids = [0u8; CHUNK];
    for (d, a) in ids.iter_mut().zip(alive.iter()) {
        *d = *a;
    }
    let mut kept = 0;
    let mut spills = [Spill::new(), Spill::new()];
    let mut pending: Option<Group> = None;
    let mut g = 0;
    let mut turn = 0;
    while g < total || pending.is_some() {
        let mut next = None;
        if g < total {
            let n = (total - g).min(8);
            let mut ps = [0u8; 8];
            if let Some(src) = ids[g..].first_chunk::<8>() {
                ps = *src;
            }
            // Pad a short group with its first packet; the padding is not judged.
            let pad = ps[0];
            for q in &mut ps[n..] {
                *q = pad;
            }
            let mut first = [&[0u8; 16]; 8];
            let mut t = [0u64; 8];
            for j in 0..8 {
                let input = &inputs[usize::from(ps[j])];
                first[j] = first_block(input);
                t[j] = t_le(input.t);
            }
            let x = decrypt8_shared(
                &keys.pk[0],
                [
                    broadcast(first[0]),
                    broadcast(first[1]),
                    broadcast(first[2]),
                    broadcast(first[3]),
                    broadcast(first[4]),
                    broadcast(first[5]),
                    broadcast(first[6]),
                    broadcast(first[7]),
                ],
            );
            spills[turn].store(&x);
            next = Some(Group { ps, n, t });
            g += n;
        }
        if let Some(grp) = pending {
            let spill = &spills[turn ^ 1];
            for j in 0..grp.n.min(8) {
                let (g0, g1, nonce) = spill.judge(j, grp.t[j]);
                slot0.set(grp.ps[j], g1, nonce);
                alive[kept] = grp.ps[j];
                kept += usize::from(g0 != g1);
            }
        }
        pending = next;
        turn ^= 1;
    }
    kept
}

/// Judges 8 decrypted registers (candidates), register j against `t[j]` (u64(t) in
/// qwords 1 and 3).
///
/// Returns the good flags, bit j of the first = register j good under `K0`, of the second
/// = good under `K1`; and the nonces of registers 2i, 2i+1 in `pairs[i]` (low,
/// high qword): the first 8 bytes of the good lane (the OR of both lanes' when both are
/// good, zero when none is, which only happens in packets that are rejected).
#[inline]
#[target_feature(enable = "avx2")]
fn judge8(x: &[__m256i; 8], t: &[__m256i; 8]) -> (u32, u32, [__m128i; 4]) {
    // Qword 1 of each compare = lane 0 (`K0`) bytes 8..16 == u64(t); qword 3 = lane 1.
    let c = [
        _mm256_cmpeq_epi64(x[0], t[0]),
        _mm256_cmpeq_epi64(x[1], t[1]),
        _mm256_cmpeq_epi64(x[2], t[2]),
        _mm256_cmpeq_epi64(x[3], t[3]),
        _mm256_cmpeq_epi64(x[4], t[4]),
        _mm256_cmpeq_epi64(x[5], t[5]),
        _mm256_cmpeq_epi64(x[6], t[6]),
        _mm256_cmpeq_epi64(x[7], t[7]),
    ];
    // Per 128-bit lane, slots 2i and 2i+1: good flags (`g`) and nonces (`n`);
    // lane 0 = `K0`, lane 1 = `K1`.
    let g = [
        _mm256_unpackhi_epi64(c[0], c[1]),
        _mm256_unpackhi_epi64(c[2], c[3]),
        _mm256_unpackhi_epi64(c[4], c[5]),
        _mm256_unpackhi_epi64(c[6], c[7]),
    ];
    let n = [
        _mm256_unpacklo_epi64(x[0], x[1]),
        _mm256_unpacklo_epi64(x[2], x[3]),
        _mm256_unpacklo_epi64(x[4], x[5]),
        _mm256_unpacklo_epi64(x[6], x[7]),
    ];
    let mut pairs = [_mm_setzero_si128(); 4];
    for i in 0..4 {
        let v = _mm256_and_si256(n[i], g[i]);
        pairs[i] = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    }
    // One `movmskpd` per pair (no shuffles, which would compete with `vaesdec`): bits 0, 1
    // = registers 2i, 2i+1 good under `K0`; bits 2, 3 = under `K1`.
    let (mut good0, mut good1) = (0u32, 0u32);
    for (i, gi) in g.iter().enumerate() {
        let m = _mm256_movemask_pd(_mm256_castsi256_pd(*gi)) as u32;
        good0 |= (m & 3) << (2 * i);
        good1 |= ((m >> 2) & 3) << (2 * i);
    }
    (good0, good1, pairs)
}

/// Phase 2: groups of 8 packets slot by slot ([`verify8`]), the rest packet by packet.
#[target_feature(enable = "vaes,avx2,aes")]
fn verify(
    keys: &Keys,
    inputs: &[TrialInput<'_>],
    alive: &[u8],
    slot0: &Slot0,
    out: &mut [Option<TrialOutput>],
) {
    let (groups, rest) = alive.as_chunks::<8>();
    for ps in groups {
        verify8(keys, inputs, ps, slot0, out);
    }
    verify_each(keys, inputs, rest, out);
}

/// Phase 2 for 8 packets, slot by slot: register j holds slot s of packet `ps[j]`, so
/// all 8 share the slot's round keys and one key load feeds 8 `vaesdec` (per-packet
/// order would need a key load per `vaesdec`, which saturates the load ports).
#[target_feature(enable = "vaes,avx2,aes")]
fn verify8(
    keys: &Keys,
    inputs: &[TrialInput<'_>],
    ps: &[u8; 8],
    slot0: &Slot0,
    out: &mut [Option<TrialOutput>],
) {
    let slots = keys.pk.len();
    let mut blocks: [&[[u8; 16]]; 8] = [&[]; 8];
    let mut t = [_mm256_setzero_si256(); 8];
    for j in 0..8 {
        let input = inputs[usize::from(ps[j])];
        blocks[j] = input.slots.as_chunks::<16>().0;
        t[j] = _mm256_set1_epi64x(t_le(input.t) as i64);
    }
    let idx = ps.map(usize::from);
    let opts = match out.get_disjoint_mut(idx) {
        Ok(opts) if blocks.iter().all(|b| b.len() == slots) => opts,
        // The caller checked lengths and passes distinct packets; stay panic-free anyway.
        _ => return verify_each(keys, inputs, ps, out),
    };
    // Spelled out rather than `opts.map(..)`: the closure is not inlined into this
    // `target_feature` function, and the out-of-line calls cost ~2% of phase 2.
    let [o0, o1, o2, o3, o4, o5, o6, o7] = opts;
    let mut res = [
        o0.insert(EMPTY_OUTPUT),
        o1.insert(EMPTY_OUTPUT),
        o2.insert(EMPTY_OUTPUT),
        o3.insert(EMPTY_OUTPUT),
        o4.insert(EMPTY_OUTPUT),
        o5.insert(EMPTY_OUTPUT),
        o6.insert(EMPTY_OUTPUT),
        o7.insert(EMPTY_OUTPUT),
    ];
    // `hist[s]` bit j: slot s of packet j is good under `K1`.
    let mut hist = [0u8; MAX_SLOTS];
    // Slot 0 passed phase 1 (exactly one good candidate).
    for (j, r) in res.iter_mut().enumerate() {
        let (b, nonce) = slot0.get(ps[j]);
        hist[0] |= u8::from(b) << j;
        r.nonces[0] = nonce;
    }
    // Bit j set: some slot of packet j had zero or two good candidates.
    let mut bad = 0u32;
    for s in 1..slots {
        let x = decrypt8_shared(
            &keys.pk[s],
            [
                broadcast(&blocks[0][s]),
                broadcast(&blocks[1][s]),
                broadcast(&blocks[2][s]),
                broadcast(&blocks[3][s]),
                broadcast(&blocks[4][s]),
                broadcast(&blocks[5][s]),
                broadcast(&blocks[6][s]),
                broadcast(&blocks[7][s]),
            ],
        );
        let (good0, good1, pairs) = judge8(&x, &t);
        //= PROTOCOL.md §6 check 4
        //# Exactly one candidate per slot must be good.
        bad |= !(good0 ^ good1) & 0xff;
        hist[s] = good1 as u8;
        for (r, pair) in res.as_chunks_mut::<2>().0.iter_mut().zip(&pairs) {
            let [lo, hi] = r;
            // SAFETY: `lo.nonces[s]` and `hi.nonces[s]` (`[u8; 8]`) are valid for 8-byte
            // writes; these stores have no alignment requirement.
            unsafe {
                _mm_storel_epi64(lo.nonces[s].as_mut_ptr().cast(), *pair);
                _mm_storeh_pd(hi.nonces[s].as_mut_ptr().cast(), _mm_castsi128_pd(*pair));
            }
        }
    }
    let bits = transpose8(&hist);
    for (r, b) in res.iter_mut().zip(bits) {
        r.index = index_from_bits(b, slots);
    }
    for (j, &p) in ps.iter().enumerate() {
        if (bad >> j) & 1 != 0 {
            out[usize::from(p)] = None;
        }
    }
}

/// Transposes a 32x8 bit matrix: result j bit s = `hist[s]` bit j.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8(hist: &[u8; MAX_SLOTS]) -> [u32; 8] {
    // SAFETY: `hist` is valid for a 32-byte read; `loadu` has no alignment requirement.
    let v = unsafe { _mm256_loadu_si256(hist.as_ptr().cast()) };
    // Shifting 16-bit lanes left by 7-j moves bit j of every byte to its bit 7 (bits do
    // not cross into bit 7 of the next byte for shifts < 8), which `movemask` collects.
    [
        _mm256_movemask_epi8(_mm256_slli_epi16::<7>(v)) as u32,
        _mm256_movemask_epi8(_mm256_slli_epi16::<6>(v)) as u32,
        _mm256_movemask_epi8(_mm256_slli_epi16::<5>(v)) as u32,
        _mm256_movemask_epi8(_mm256_slli_epi16::<4>(v)) as u32,
        _mm256_movemask_epi8(_mm256_slli_epi16::<3>(v)) as u32,
        _mm256_movemask_epi8(_mm256_slli_epi16::<2>(v)) as u32,
        _mm256_movemask_epi8(_mm256_slli_epi16::<1>(v)) as u32,
        _mm256_movemask_epi8(v) as u32,
    ]
}

/// Phase 2 packet by packet (fewer than 8 left): 8 slots (8 registers) at a time.
#[target_feature(enable = "vaes,avx2,aes")]
fn verify_each(
    keys: &Keys,
    inputs: &[TrialInput<'_>],
    alive: &[u8],
    out: &mut [Option<TrialOutput>],
) {
    let slots = keys.pk.len();
    for &p in alive {
        let p = usize::from(p);
        let input = inputs[p];
        let blocks = input.slots.as_chunks::<16>().0;
        if blocks.len() != slots {
            out[p] = None;
            continue;
        }
        let t = _mm256_set1_epi64x(t_le(input.t) as i64);
        let res = out[p].insert(EMPTY_OUTPUT);
        let mut ok = true;
        let mut bits = 0u32;
        let mut s0 = 0;
        while s0 < slots {
            let n = (slots - s0).min(8);
            let x = match (
                blocks[s0..].first_chunk::<8>(),
                keys.pk[s0..].first_chunk::<8>(),
            ) {
                (Some(b), Some(k)) => decrypt8!(
                    k,
                    [
                        broadcast(&b[0]),
                        broadcast(&b[1]),
                        broadcast(&b[2]),
                        broadcast(&b[3]),
                        broadcast(&b[4]),
                        broadcast(&b[5]),
                        broadcast(&b[6]),
                        broadcast(&b[7]),
                    ],
                    _mm256_xor_si256,
                    _mm256_aesdec_epi128,
                    _mm256_aesdeclast_epi128
                ),
                _ => {
                    // A short last group: pad with its last slot, masked off below.
                    let mut k = [&keys.pk[s0]; 8];
                    let mut b = [&blocks[s0]; 8];
                    for j in 0..8 {
                        k[j] = &keys.pk[s0 + j.min(n - 1)];
                        b[j] = &blocks[s0 + j.min(n - 1)];
                    }
                    decrypt8!(
                        &k,
                        [
                            broadcast(b[0]),
                            broadcast(b[1]),
                            broadcast(b[2]),
                            broadcast(b[3]),
                            broadcast(b[4]),
                            broadcast(b[5]),
                            broadcast(b[6]),
                            broadcast(b[7]),
                        ],
                        _mm256_xor_si256,
                        _mm256_aesdec_epi128,
                        _mm256_aesdeclast_epi128
                    )
                }
            };
            let (good0, good1, pairs) = judge8(&x, &[t; 8]);
            //= PROTOCOL.md §6 check 4
            //# Exactly one candidate per slot must be good.
            let want = (1u32 << n) - 1;
            ok &= ((good0 ^ good1) & want) == want;
            bits |= (good1 & want) << s0;
            match res.nonces[s0..].first_chunk_mut::<8>() {
                Some(dst) if n == 8 => {
                    for (d, pair) in dst.as_chunks_mut::<2>().0.iter_mut().zip(&pairs) {
                        // SAFETY: `d` (`[[u8; 8]; 2]`) is valid for a 16-byte write;
                        // `storeu` has no alignment requirement.
                        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), *pair) };
                    }
                }
                _ => {
                    let mut tmp = [[0u8; 8]; 8];
                    for (d, pair) in tmp.as_chunks_mut::<2>().0.iter_mut().zip(&pairs) {
                        // SAFETY: `d` (`[[u8; 8]; 2]`) is valid for a 16-byte write;
                        // `storeu` has no alignment requirement.
                        unsafe { _mm_storeu_si128(d.as_mut_ptr().cast(), *pair) };
                    }
                    for (d, n) in res.nonces[s0..].iter_mut().zip(&tmp[..n]) {
                        *d = *n;
                    }
                }
            }
            s0 += 8;
        }
        if ok {
            res.index = index_from_bits(bits, slots);
        } else {
            out[p] = None;
        }
    }
}

/// Raw decryption: `blocks[..h]` under `K[slot][0]`, `blocks[h..]` under `K[slot][1]`
/// (h = len/2); block j and block h+j share a register. 8 registers in flight.
#[target_feature(enable = "vaes,avx2,aes")]
fn decrypt_raw(keys: &Keys, slot: usize, blocks: &mut [[u8; 16]]) {
    let h = blocks.len() / 2;
    let (lo, hi) = blocks.split_at_mut(h);
    let pk = &keys.pk[slot];
    let (lo8, lo_tail) = lo.as_chunks_mut::<8>();
    let (hi8, hi_rest) = hi[..h].as_chunks_mut::<8>();
    for (a, b) in lo8.iter_mut().zip(hi8.iter_mut()) {
        let mut x = [_mm256_setzero_si256(); 8];
        for j in 0..8 {
            x[j] = load2(&a[j], &b[j]);
        }
        let x = decrypt8_shared(pk, x);
        for j in 0..8 {
            (a[j], b[j]) = store2(x[j]);
        }
    }
    for (a, b) in lo_tail.iter_mut().zip(hi_rest.iter_mut()) {
        let x = [load2(a, b); 8];
        let x = decrypt8_shared(pk, x);
        (*a, *b) = store2(x[0]);
    }
    if blocks.len() % 2 == 1 {
        // The odd last block belongs to the `K[slot][1]` half: decrypt it in lane 1.
        let last = blocks.len() - 1;
        let x = [broadcast(&blocks[last]); 8];
        let x = decrypt8_shared(pk, x);
        blocks[last] = store2(x[0]).1;
    }
}

/// Loads `lo` into lane 0 and `hi` into lane 1.
#[inline]
#[target_feature(enable = "avx2")]
fn load2(lo: &[u8; 16], hi: &[u8; 16]) -> __m256i {
    // SAFETY: both are valid for 16-byte reads; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu2_m128i(hi.as_ptr().cast(), lo.as_ptr().cast()) }
}

/// Splits a register into its two lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn store2(x: __m256i) -> ([u8; 16], [u8; 16]) {
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    // SAFETY: both are valid for 16-byte writes; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu2_m128i(hi.as_mut_ptr().cast(), lo.as_mut_ptr().cast(), x) };
    (lo, hi)
}
