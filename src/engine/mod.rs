//! Batched trial decryption of REBIND slots (PROTOCOL.md §6, check 4).
//!
//! The gateway holds, for one key epoch, S pairs of AES-128 keys `K[i][0]`, `K[i][1]`.
//! A REBIND carries S ciphertext blocks `slot_i = AES(K[i][b_i], n_i || u64(t))`.
//! [`TrialKeys::trial_batch`] decrypts every slot under both keys, checks that exactly one
//! candidate per slot ends in `u64(t)`, and returns the index `x` and the nonces.
//!
//! Three backends compute the same function, one file each (the RustCrypto `aes` layout):
//! - [`Backend::Portable`]: the `aes` crate, batched per key across the batch;
//! - [`Backend::AesNi`]: hand-written AES-NI, 8 blocks (4 slots x 2 keys) in flight;
//! - [`Backend::Vaes`]: hand-written VAES-256, one slot per ymm register with the two lanes
//!   holding the round keys of `K[i][0]` and `K[i][1]`, 8 registers in flight.
//!
//! The CPU is probed once; the backend is chosen when the keys are expanded
//! ([`TrialKeys::new`]) and the batch loop dispatches on it once per batch.
//!
//! Batches are processed in two phases per chunk of 64 packets: slot 0 of every
//! packet first (phase 1), then the remaining slots of the packets that survived slot 0
//! (phase 2). Garbage almost never survives slot 0 (2^-63 per packet), so it costs two
//! block decryptions. The SIMD backends run phase 2 on groups of packets slot by slot, so
//! one load of a slot's round keys serves the whole group; leftover packets (and single
//! packets) are run slot group by slot group instead.
//!
//! The CPU probe and the backend choice ([`Backend`], [`process_backend`],
//! `REBINDGW_AES_BACKEND`) live in [`crate::crypto::cpu`], shared with the other SIMD code
//! of the verify path (in [`crate::crypto`]), and are re-exported here.
//!
//! `unsafe` is confined to `aesni.rs` and `vaes.rs` (intrinsics, unaligned loads and stores,
//! and `asm!` blocks that pin the round order).

// `forbid` would also bind the SIMD child modules, which need `allow(unsafe_code)`;
// `deny` keeps this file free of unsafe code while letting them opt in.
#![deny(unsafe_code)]

use std::fmt;

/// Applies `$op` with round key `$r` to each of 8 registers, `$x[j]` with `$k[j]`.
#[cfg(target_arch = "x86_64")]
macro_rules! round8 {
    ($op:ident, $x:ident, $k:ident, $r:expr) => {
        [
            $op($x[0], $k[0].get($r)),
            $op($x[1], $k[1].get($r)),
            $op($x[2], $k[2].get($r)),
            $op($x[3], $k[3].get($r)),
            $op($x[4], $k[4].get($r)),
            $op($x[5], $k[5].get($r)),
            $op($x[6], $k[6].get($r)),
            $op($x[7], $k[7].get($r)),
        ]
    };
}

/// Decrypts 8 registers in flight, `$x[j]` under `$k[j]`, as a value, with the backend's
/// xor, round and last-round instructions (AES-NI xmm or VAES ymm).
///
/// A macro rather than a function so that it is always inlined into its
/// `#[target_feature]` caller (`#[inline(always)]` is not allowed there) and the blocks
/// never leave the registers. Rounds are unrolled by hand.
#[cfg(target_arch = "x86_64")]
macro_rules! decrypt8 {
    ($k:expr, $x:expr, $xor:ident, $dec:ident, $last:ident) => {{
        let k = $k;
        let x = $x;
        let x = round8!($xor, x, k, 0);
        let x = round8!($dec, x, k, 1);
        let x = round8!($dec, x, k, 2);
        let x = round8!($dec, x, k, 3);
        let x = round8!($dec, x, k, 4);
        let x = round8!($dec, x, k, 5);
        let x = round8!($dec, x, k, 6);
        let x = round8!($dec, x, k, 7);
        let x = round8!($dec, x, k, 8);
        let x = round8!($dec, x, k, 9);
        round8!($last, x, k, 10)
    }};
}

#[cfg(target_arch = "x86_64")]
mod aesni;
mod portable;
#[cfg(target_arch = "x86_64")]
mod vaes;

pub use crate::crypto::cpu::{
    BACKEND_ENV, Backend, EngineError, backend_from_env, backend_from_value, process_backend,
    process_backend_from_value,
};

/// Largest supported number of slots per key set (PROTOCOL.md §2: `S` in 1..=32).
pub const MAX_SLOTS: usize = 32;

/// Packets per internal chunk; bounds the stack scratch space of one batch step.
const CHUNK: usize = 64;

/// One candidate: its S ciphertext slots (S*16 bytes, slot 0 first) and the packet's t.
#[derive(Clone, Copy, Debug)]
pub struct TrialInput<'a> {
    /// `slot_0 || ... || slot_{S-1}` (bytes 26.. of the REBIND head).
    pub slots: &'a [u8],
    /// The packet's `t` (ticks).
    pub t: u64,
}

/// Result of a successful trial: index x and nonce n_i of every slot (only first S meaningful).
///
/// Nonces of slots `S..MAX_SLOTS` are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrialOutput {
    /// `x = sum(b_i << (S-1-i))`.
    pub index: u32,
    /// `n_i`, the first 8 bytes of slot i's good plaintext.
    pub nonces: [[u8; 8]; MAX_SLOTS],
}

/// Round keys of one backend.
enum Inner {
    Portable(portable::Keys),
    #[cfg(target_arch = "x86_64")]
    AesNi(Box<aesni::Keys>),
    #[cfg(target_arch = "x86_64")]
    Vaes(Box<vaes::Keys>),
}

/// Decryption keys of one epoch, pre-expanded for one backend (done once per epoch).
///
/// Round keys are zeroized on drop.
pub struct TrialKeys {
    backend: Backend,
    slots: usize,
    inner: Inner,
}

impl fmt::Debug for TrialKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrialKeys")
            .field("backend", &self.backend)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl TrialKeys {
    /// Expands `keys[i] = [K[i][0], K[i][1]]` (raw AES-128 keys) for `backend`.
    ///
    /// Errors if `backend` is not supported by this CPU.
    ///
    /// # Panics
    /// If `keys.len()` is not in `1..=MAX_SLOTS`: S is a validated gateway setting, so
    /// another length is a programmer error.
    pub fn new(backend: Backend, keys: &[[[u8; 16]; 2]]) -> Result<TrialKeys, EngineError> {
        assert!(
            (1..=MAX_SLOTS).contains(&keys.len()),
            "TrialKeys::new: {} slots, expected 1..={MAX_SLOTS}",
            keys.len()
        );
        if !backend.is_supported() {
            return Err(backend.unsupported_error());
        }
        let inner = match backend {
            Backend::Portable => Inner::Portable(portable::Keys::new(keys)),
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi => Inner::AesNi(Box::new(aesni::Keys::new(keys))),
            #[cfg(target_arch = "x86_64")]
            Backend::Vaes => Inner::Vaes(Box::new(vaes::Keys::new(keys))),
            #[cfg(not(target_arch = "x86_64"))]
            _ => return Err(backend.unsupported_error()),
        };
        Ok(TrialKeys {
            backend,
            slots: keys.len(),
            inner,
        })
    }

    /// S, the number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The backend the keys were expanded for.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Trial-decrypts a batch (PROTOCOL.md §6, check 4).
    ///
    /// `out[j]` receives the result for `batch[j]`: `None` when the trial fails (some slot
    /// has zero or two good candidates) or when `batch[j].slots.len() != 16 * self.slots()`.
    /// `out.len()` must equal `batch.len()`; if it does not, only the common prefix is
    /// processed and any extra `out` entries are set to `None`. Never panics.
    pub fn trial_batch(&self, batch: &[TrialInput<'_>], out: &mut [Option<TrialOutput>]) {
        let n = batch.len().min(out.len());
        let (out, rest) = out.split_at_mut(n);
        rest.fill(None);
        let batch = &batch[..n];
        match &self.inner {
            Inner::Portable(k) => drive(k, self.slots, batch, out),
            #[cfg(target_arch = "x86_64")]
            Inner::AesNi(k) => drive(&**k, self.slots, batch, out),
            #[cfg(target_arch = "x86_64")]
            Inner::Vaes(k) => drive(&**k, self.slots, batch, out),
        }
    }

    /// Trial-decrypts one packet (see [`TrialKeys::trial_batch`]).
    pub fn trial_one(&self, input: TrialInput<'_>) -> Option<TrialOutput> {
        let mut out = [None];
        self.trial_batch(std::slice::from_ref(&input), &mut out);
        out[0]
    }

    /// Benchmark support: raw AES-128 decryption, no trial logic.
    ///
    /// Decrypts `blocks[..len/2]` under `K[slot][0]` and `blocks[len/2..]` under
    /// `K[slot][1]`, in place. Does nothing if `slot >= self.slots()`.
    #[doc(hidden)]
    pub fn bench_decrypt_blocks(&self, slot: usize, blocks: &mut [[u8; 16]]) {
        if slot >= self.slots {
            return;
        }
        match &self.inner {
            Inner::Portable(k) => k.decrypt_raw(slot, blocks),
            #[cfg(target_arch = "x86_64")]
            Inner::AesNi(k) => k.decrypt_raw(slot, blocks),
            #[cfg(target_arch = "x86_64")]
            Inner::Vaes(k) => k.decrypt_raw(slot, blocks),
        }
    }
}

/// A backend's kernels. Both are called once per chunk, so the per-packet loops run
/// inside the backend's `#[target_feature]` functions.
trait Kernel {
    /// Phase 1. Decrypts slot 0 of every packet in `alive` (indices into `inputs`, whose
    /// lengths were checked) under both keys, and keeps, compacted in place and in order,
    /// only the packets with exactly one good candidate. Returns how many were kept, and
    /// records their slot 0 in `slot0` (which the kernel's `verify` may use or redo).
    fn filter(&self, inputs: &[TrialInput<'_>], alive: &mut [u8], slot0: &mut Slot0) -> usize;

    /// Phase 2. The full trial of every packet p in `alive`: sets `out[p]`.
    fn verify(
        &self,
        inputs: &[TrialInput<'_>],
        alive: &[u8],
        slot0: &Slot0,
        out: &mut [Option<TrialOutput>],
    );
}

/// Slot 0 of the packets that passed phase 1, by index in the chunk.
struct Slot0 {
    /// Bit p: slot 0 of packet p is good under `K[0][1]` (else under `K[0][0]`).
    b: u64,
    /// Nonce of slot 0 of packet p.
    nonce: [[u8; 8]; CHUNK],
}

impl Slot0 {
    /// Records slot 0 of packet `p` (used for kept packets only).
    #[inline(always)]
    fn set(&mut self, p: u8, b: bool, nonce: [u8; 8]) {
        let p = usize::from(p) % CHUNK;
        self.b = (self.b & !(1 << p)) | (u64::from(b) << p);
        self.nonce[p] = nonce;
    }

    /// Slot 0 of packet `p`: (b, nonce).
    #[inline(always)]
    fn get(&self, p: u8) -> (bool, [u8; 8]) {
        let p = usize::from(p) % CHUNK;
        ((self.b >> p) & 1 != 0, self.nonce[p])
    }
}

/// The batch loop, compiled once per backend.
fn drive<K: Kernel>(
    kernel: &K,
    slots: usize,
    batch: &[TrialInput<'_>],
    out: &mut [Option<TrialOutput>],
) {
    let want_len = 16 * slots;
    for (inputs, out) in batch.chunks(CHUNK).zip(out.chunks_mut(CHUNK)) {
        let mut alive = [0u8; CHUNK];
        let mut n = 0;
        for (p, (input, o)) in inputs.iter().zip(out.iter_mut()).enumerate() {
            *o = None;
            if let Some(a) = alive.get_mut(n) {
                *a = p as u8;
            }
            n += usize::from(input.slots.len() == want_len);
        }
        let alive = &mut alive[..n.min(CHUNK)];
        // Phase 1: slot 0 of every packet; garbage almost always stops here.
        let mut slot0 = Slot0 {
            b: 0,
            nonce: [[0; 8]; CHUNK],
        };
        let kept = kernel.filter(inputs, alive, &mut slot0);
        // Phase 2: every slot of the survivors.
        kernel.verify(inputs, &alive[..kept.min(alive.len())], &slot0, out);
    }
}

/// A fresh output for [`Kernel::verify`] to fill in.
const EMPTY_OUTPUT: TrialOutput = TrialOutput {
    index: 0,
    nonces: [[0; 8]; MAX_SLOTS],
};

/// `x = sum(b_i << (S-1-i))` from `bits`, which holds `b_i` at bit i (PROTOCOL.md §3:
/// slot 0 carries the most significant bit).
#[inline(always)]
fn index_from_bits(bits: u32, slots: usize) -> u32 {
    bits.reverse_bits() >> (32 - slots)
}

/// The packet's `u64(t)` as plaintext bytes 8..16 read as a little-endian `u64`.
#[inline(always)]
fn t_le(t: u64) -> u64 {
    u64::from_le_bytes(t.to_be_bytes())
}

/// Slot 0 of a checked packet (a zero block if the length check was somehow skipped).
#[inline(always)]
fn first_block<'a>(input: &TrialInput<'a>) -> &'a [u8; 16] {
    input.slots.first_chunk::<16>().unwrap_or(&[0; 16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::cpu::{ALL_BACKENDS, fast_paths_allowed};
    use aes::Aes128;
    use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
    use proptest::prelude::*;

    /// Backends to test; prints a skip message for the ones this CPU lacks.
    fn backends() -> Vec<Backend> {
        for b in ALL_BACKENDS {
            if !b.is_supported() {
                eprintln!(
                    "skipped: backend {b} (this CPU lacks {})",
                    b.missing_features().join(", ")
                );
            }
        }
        Backend::all_supported()
    }

    fn encrypt(key: &[u8; 16], block: [u8; 16]) -> [u8; 16] {
        let mut b = Array::from(block);
        Aes128::new(&Array::from(*key)).encrypt_block(&mut b);
        b.0
    }

    fn decrypt(key: &[u8; 16], block: [u8; 16]) -> [u8; 16] {
        let mut b = Array::from(block);
        Aes128::new(&Array::from(*key)).decrypt_block(&mut b);
        b.0
    }

    /// The scalar reference: PROTOCOL.md §6 check 4, one block at a time.
    fn reference(keys: &[[[u8; 16]; 2]], input: TrialInput<'_>) -> Option<TrialOutput> {
        let s = keys.len();
        if input.slots.len() != 16 * s {
            return None;
        }
        let mut out = TrialOutput {
            index: 0,
            nonces: [[0; 8]; MAX_SLOTS],
        };
        for (i, pair) in keys.iter().enumerate() {
            let ct: [u8; 16] = input.slots[16 * i..16 * i + 16].try_into().unwrap();
            let cands = pair.map(|k| decrypt(&k, ct));
            let good: Vec<usize> = (0..2)
                .filter(|&b| cands[b][8..] == input.t.to_be_bytes())
                .collect();
            let [b] = good[..] else { return None };
            out.index |= (b as u32) << (s - 1 - i);
            out.nonces[i].copy_from_slice(&cands[b][..8]);
        }
        Some(out)
    }

    /// Builds the slots of a valid REBIND for `index`.
    fn make_slots(keys: &[[[u8; 16]; 2]], index: u32, t: u64, nonces: &[[u8; 8]]) -> Vec<u8> {
        let s = keys.len();
        let mut v = Vec::with_capacity(16 * s);
        for (i, pair) in keys.iter().enumerate() {
            let b = ((index >> (s - 1 - i)) & 1) as usize;
            let mut pt = [0u8; 16];
            pt[..8].copy_from_slice(&nonces[i]);
            pt[8..].copy_from_slice(&t.to_be_bytes());
            v.extend_from_slice(&encrypt(&pair[b], pt));
        }
        v
    }

    fn hex16(s: &str) -> [u8; 16] {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    #[test]
    fn known_answer_vectors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/v1.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let ks = &v["key_schedule"];
        let keys: Vec<[[u8; 16]; 2]> = ks["slot_keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| [hex16(p[0].as_str().unwrap()), hex16(p[1].as_str().unwrap())])
            .collect();
        assert_eq!(keys.len() as u64, ks["slots"].as_u64().unwrap());
        let mut checked = 0;
        for backend in backends() {
            let tk = TrialKeys::new(backend, &keys).unwrap();
            for r in v["rebind"].as_array().unwrap() {
                if r["master"] != ks["master"]
                    || r["epoch"] != ks["epoch"]
                    || r["slots"] != ks["slots"]
                {
                    continue;
                }
                let pkt = hex::decode(r["rebind"].as_str().unwrap()).unwrap();
                let t = u64::from_be_bytes(pkt[2..10].try_into().unwrap());
                assert_eq!(t, r["t"].as_u64().unwrap());
                let s = keys.len();
                let input = TrialInput {
                    slots: &pkt[26..26 + 16 * s],
                    t,
                };
                let got = tk.trial_one(input).expect("vector must pass the trial");
                assert_eq!(
                    u64::from(got.index),
                    r["index"].as_u64().unwrap(),
                    "{backend}"
                );
                for (i, n) in r["nonces"].as_array().unwrap().iter().enumerate() {
                    assert_eq!(
                        hex::encode(got.nonces[i]),
                        n.as_str().unwrap(),
                        "{backend} slot {i}"
                    );
                }
                assert!(got.nonces[s..].iter().all(|n| *n == [0; 8]));
                assert_eq!(Some(got), reference(&keys, input));
                // One wrong t, one flipped bit: rejected.
                assert_eq!(tk.trial_one(TrialInput { t: t + 1, ..input }), None);
                let mut bad = input.slots.to_vec();
                bad[16 * (s - 1) + 3] ^= 0x10;
                assert_eq!(tk.trial_one(TrialInput { slots: &bad, t }), None);
                checked += 1;
            }
        }
        assert!(
            checked >= 2 * backends().len(),
            "only {checked} vectors checked"
        );
    }

    /// Full batches: the 8-packet (VAES) and 4-packet (AES-NI) groups, the per-packet
    /// remainder, several chunks, and rejects inside a group.
    #[test]
    fn large_valid_batches() {
        for s in [1usize, 5, 8, 16, 32] {
            let keys: Vec<[[u8; 16]; 2]> = (0..s)
                .map(|i| [[i as u8 ^ 0x11; 16], [i as u8 ^ 0x22; 16]])
                .collect();
            let packets: Vec<(Vec<u8>, u64)> = (0..150u32)
                .map(|j| {
                    let t = 1_000 + u64::from(j % 7);
                    let nonces: Vec<[u8; 8]> = (0..s)
                        .map(|i| [j as u8, i as u8, 1, 2, 3, 4, 5, 6])
                        .collect();
                    let mut v = make_slots(&keys, j.wrapping_mul(2_654_435_761), t, &nonces);
                    if j % 13 == 5 {
                        let last = v.len() - 1;
                        v[last] ^= 1;
                    }
                    (v, t)
                })
                .collect();
            let batch: Vec<TrialInput<'_>> = packets
                .iter()
                .map(|(v, t)| TrialInput { slots: v, t: *t })
                .collect();
            let want: Vec<_> = batch.iter().map(|&i| reference(&keys, i)).collect();
            assert!(want.iter().filter(|w| w.is_some()).count() > 130);
            for backend in backends() {
                let tk = TrialKeys::new(backend, &keys).unwrap();
                let mut out = vec![None; batch.len()];
                tk.trial_batch(&batch, &mut out);
                assert_eq!(out, want, "{backend} S={s}");
            }
        }
    }

    #[test]
    fn two_good_candidates_reject() {
        let mut keys = vec![[[1u8; 16], [2u8; 16]]; 4];
        keys[2] = [[9u8; 16], [9u8; 16]];
        let nonces = [[7u8; 8]; 4];
        let slots = make_slots(&keys, 0b0101, 42, &nonces);
        let input = TrialInput {
            slots: &slots,
            t: 42,
        };
        assert_eq!(reference(&keys, input), None);
        for backend in backends() {
            let tk = TrialKeys::new(backend, &keys).unwrap();
            assert_eq!(tk.trial_one(input), None, "{backend}");
        }
    }

    #[test]
    fn edge_slot_counts_and_indices() {
        for s in [1usize, 2, 7, 8, 9, 16, 31, 32] {
            let keys: Vec<[[u8; 16]; 2]> = (0..s)
                .map(|i| [[i as u8; 16], [(i as u8) ^ 0x80; 16]])
                .collect();
            let max = if s == 32 { u32::MAX } else { (1u32 << s) - 1 };
            let nonces: Vec<[u8; 8]> = (0..s).map(|i| [i as u8 + 1; 8]).collect();
            for index in [0, 1, max, max >> 1, 0x5555_5555 & max] {
                let slots = make_slots(&keys, index, u64::MAX - 3, &nonces);
                let input = TrialInput {
                    slots: &slots,
                    t: u64::MAX - 3,
                };
                let want = reference(&keys, input).unwrap();
                assert_eq!(want.index, index);
                for backend in backends() {
                    let tk = TrialKeys::new(backend, &keys).unwrap();
                    assert_eq!(tk.slots(), s);
                    assert_eq!(tk.backend(), backend);
                    assert_eq!(tk.trial_one(input), Some(want), "{backend} S={s}");
                }
            }
        }
    }

    #[test]
    fn mismatched_out_len_does_not_panic() {
        let keys = vec![[[3u8; 16], [4u8; 16]]; 2];
        let slots = make_slots(&keys, 2, 5, &[[0; 8]; 2]);
        let batch = [TrialInput {
            slots: &slots,
            t: 5,
        }; 3];
        for backend in backends() {
            let tk = TrialKeys::new(backend, &keys).unwrap();
            let mut out = [Some(TrialOutput {
                index: 9,
                nonces: [[1; 8]; MAX_SLOTS],
            }); 5];
            tk.trial_batch(&batch, &mut out);
            assert!(out[..3].iter().all(|o| o.is_some_and(|o| o.index == 2)));
            assert_eq!(out[3..], [None, None]);
            let mut short = [None; 1];
            tk.trial_batch(&batch, &mut short);
            assert_eq!(short[0].map(|o| o.index), Some(2));
            tk.trial_batch(&[], &mut []);
        }
    }

    #[test]
    #[should_panic(expected = "expected 1..=32")]
    fn zero_slots_panics() {
        let _ = TrialKeys::new(Backend::Portable, &[]);
    }

    #[test]
    #[should_panic(expected = "expected 1..=32")]
    fn too_many_slots_panics() {
        let _ = TrialKeys::new(Backend::Portable, &[[[0; 16]; 2]; 33]);
    }

    #[test]
    fn raw_decrypt_matches_aes_crate() {
        let keys: Vec<[[u8; 16]; 2]> = (0..3u8).map(|i| [[i; 16], [i + 100; 16]]).collect();
        for backend in backends() {
            let tk = TrialKeys::new(backend, &keys).unwrap();
            for len in [0usize, 1, 2, 3, 7, 15, 16, 17, 31, 33, 64, 100] {
                let orig: Vec<[u8; 16]> = (0..len).map(|j| [j as u8 ^ 0x3c; 16]).collect();
                let mut blocks = orig.clone();
                tk.bench_decrypt_blocks(1, &mut blocks);
                for (j, (got, ct)) in blocks.iter().zip(&orig).enumerate() {
                    let key = &keys[1][usize::from(j >= len / 2)];
                    assert_eq!(*got, decrypt(key, *ct), "{backend} len {len} block {j}");
                }
            }
        }
    }

    #[test]
    fn backend_names_and_parsing() {
        for b in ALL_BACKENDS {
            assert_eq!(b.name().parse::<Backend>().unwrap(), b);
            assert_eq!(b.to_string(), b.name());
        }
        let err = "AESNI".parse::<Backend>().unwrap_err().to_string();
        assert!(
            err.contains("\"AESNI\"") && err.contains("portable") && err.contains("vaes"),
            "{err}"
        );
        assert!(Backend::best().is_supported());
        assert!(Backend::all_supported().contains(&Backend::Portable));
        assert!(Backend::all_supported().contains(&Backend::best()));
        assert!(Backend::Portable.missing_features().is_empty());
    }

    #[test]
    fn backend_from_value_parsing() {
        assert_eq!(backend_from_value(None).unwrap(), Backend::best());
        assert_eq!(backend_from_value(Some("")).unwrap(), Backend::best());
        assert_eq!(
            backend_from_value(Some("portable")).unwrap(),
            Backend::Portable
        );
        for b in ALL_BACKENDS {
            match backend_from_value(Some(b.name())) {
                Ok(got) => assert!(got == b && b.is_supported()),
                Err(e) => {
                    assert!(!b.is_supported());
                    let msg = e.to_string();
                    assert!(msg.contains(BACKEND_ENV) && msg.contains(b.name()), "{msg}");
                    assert!(msg.contains("lacks"), "{msg}");
                }
            }
        }
        let msg = backend_from_value(Some("fast")).unwrap_err().to_string();
        assert!(
            msg.contains(BACKEND_ENV) && msg.contains("\"fast\""),
            "{msg}"
        );
        assert!(
            msg.contains("portable") && msg.contains("aesni") && msg.contains("vaes"),
            "{msg}"
        );
        // The error message for an unsupported backend names what the CPU lacks.
        let e = EngineError::Env {
            var: BACKEND_ENV,
            value: "vaes".into(),
            reason: Box::new(EngineError::Unsupported {
                backend: Backend::Vaes,
                missing: "vaes, avx2".into(),
            }),
        };
        assert_eq!(
            e.to_string(),
            "REBINDGW_AES_BACKEND=\"vaes\": AES backend vaes is not supported: this CPU lacks vaes, avx2"
        );
    }

    #[test]
    fn process_backend_value_falls_back_to_portable() {
        assert_eq!(process_backend_from_value(None), Backend::best());
        assert_eq!(process_backend_from_value(Some("")), Backend::best());
        assert_eq!(
            process_backend_from_value(Some("portable")),
            Backend::Portable
        );
        assert_eq!(process_backend_from_value(Some("fast")), Backend::Portable);
        for b in ALL_BACKENDS {
            let want = if b.is_supported() {
                b
            } else {
                Backend::Portable
            };
            assert_eq!(process_backend_from_value(Some(b.name())), want);
        }
        assert!(!fast_paths_allowed(Backend::Portable));
        assert!(fast_paths_allowed(Backend::AesNi) && fast_paths_allowed(Backend::Vaes));
    }

    /// How one batch entry is built.
    #[derive(Clone, Debug)]
    enum Kind {
        Valid,
        Garbage,
        BitFlip {
            slot: usize,
            bit: u8,
        },
        WrongT(u64),
        WrongLen(usize),
        /// Valid but with slot `slot` taken from another valid packet with another t.
        MixedT {
            slot: usize,
        },
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            4 => Just(Kind::Valid),
            2 => Just(Kind::Garbage),
            2 => (0usize..32, 0u8..128).prop_map(|(slot, bit)| Kind::BitFlip { slot, bit }),
            1 => (1u64..4).prop_map(Kind::WrongT),
            1 => (0usize..40).prop_map(Kind::WrongLen),
            1 => (0usize..32).prop_map(|slot| Kind::MixedT { slot }),
        ]
    }

    fn entry(
        keys: &[[[u8; 16]; 2]],
        kind: &Kind,
        index: u32,
        t: u64,
        bytes: &[u8; 512],
    ) -> (Vec<u8>, u64) {
        let s = keys.len();
        let index = index & (u32::MAX >> (32 - s));
        let nonces: Vec<[u8; 8]> = bytes
            .chunks(8)
            .take(s)
            .map(|c| c.try_into().unwrap())
            .collect();
        let valid = make_slots(keys, index, t, &nonces);
        match *kind {
            Kind::Valid => (valid, t),
            Kind::Garbage => (bytes[..16 * s].to_vec(), t),
            Kind::BitFlip { slot, bit } => {
                let mut v = valid;
                let byte = 16 * (slot % s) + usize::from(bit / 8);
                v[byte] ^= 1 << (bit % 8);
                (v, t)
            }
            Kind::WrongT(d) => (valid, t.wrapping_add(d)),
            Kind::WrongLen(len) => {
                let len = if len == 16 * s { len + 1 } else { len };
                let mut v = valid;
                v.resize(len, 0xa5);
                (v, t)
            }
            Kind::MixedT { slot } => {
                let other = make_slots(keys, index, t ^ 1, &nonces);
                let mut v = valid;
                let i = slot % s;
                v[16 * i..16 * i + 16].copy_from_slice(&other[16 * i..16 * i + 16]);
                (v, t)
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// Every backend agrees with the scalar reference, entry by entry.
        #[test]
        fn backends_match_reference(
            raw_keys in proptest::collection::vec(any::<[[u8; 16]; 2]>(), 1..=32),
            dup_slot in proptest::option::weighted(0.1, 0usize..32),
            entries in proptest::collection::vec(
                (kind(), any::<u32>(), any::<u64>(), proptest::array::uniform32(any::<[u8; 16]>())),
                0..=70,
            ),
        ) {
            let mut keys = raw_keys;
            if let Some(d) = dup_slot {
                let d = d % keys.len();
                keys[d][1] = keys[d][0];
            }
            let built: Vec<(Vec<u8>, u64)> = entries
                .iter()
                .map(|(k, index, t, b)| {
                    let mut bytes = [0u8; 512];
                    for (dst, src) in bytes.chunks_mut(16).zip(b) {
                        dst.copy_from_slice(src);
                    }
                    entry(&keys, k, *index, *t, &bytes)
                })
                .collect();
            let batch: Vec<TrialInput<'_>> = built
                .iter()
                .map(|(slots, t)| TrialInput { slots, t: *t })
                .collect();
            let want: Vec<Option<TrialOutput>> =
                batch.iter().map(|&i| reference(&keys, i)).collect();
            for (e, w) in entries.iter().zip(&want) {
                if matches!(e.0, Kind::Valid) && dup_slot.is_none() {
                    prop_assert!(w.is_some());
                }
            }
            for backend in backends() {
                let tk = TrialKeys::new(backend, &keys).unwrap();
                let mut out = vec![Some(TrialOutput { index: 7, nonces: [[7; 8]; MAX_SLOTS] }); batch.len()];
                tk.trial_batch(&batch, &mut out);
                prop_assert_eq!(&out, &want, "backend {}", backend);
                if let Some(&first) = batch.first() {
                    prop_assert_eq!(tk.trial_one(first), want[0]);
                }
            }
        }
    }
}
