//! Portable backend: the `aes` crate, batched per key across the chunk.
//!
//! For each slot, the chunk's blocks of that slot are gathered and decrypted with one
//! `decrypt_blocks` call per key, so the crate's own parallel path is used.
#![forbid(unsafe_code)]

use aes::Aes128Dec;
use aes::cipher::{Array, BlockCipherDecrypt, KeyInit};

use super::{CHUNK, Kernel, Slot0, TrialInput, TrialOutput};

type Block = Array<u8, aes::cipher::consts::U16>;

/// Expanded keys; `Aes128Dec` zeroizes itself on drop (the `aes/zeroize` feature is on).
pub(super) struct Keys {
    dec: Vec<[Aes128Dec; 2]>,
}

impl Keys {
    pub(super) fn new(keys: &[[[u8; 16]; 2]]) -> Keys {
        let dec = keys
            .iter()
            .map(|[k0, k1]| {
                [
                    Aes128Dec::new(&Array::from(*k0)),
                    Aes128Dec::new(&Array::from(*k1)),
                ]
            })
            .collect();
        Keys { dec }
    }

    pub(super) fn decrypt_raw(&self, slot: usize, blocks: &mut [[u8; 16]]) {
        let (lo, hi) = blocks.split_at_mut(blocks.len() / 2);
        let [k0, k1] = &self.dec[slot];
        k0.decrypt_blocks(Array::cast_slice_from_core_mut(lo));
        k1.decrypt_blocks(Array::cast_slice_from_core_mut(hi));
    }
}

/// Good bits (bit 0: `K0` candidate, bit 1: `K1`) and the nonce of the good candidate
/// (of the `K0` one if neither is good).
#[inline(always)]
fn judge(t: u64, cand0: &Block, cand1: &Block) -> (u32, [u8; 8]) {
    let t = t.to_be_bytes();
    let g0 = u32::from(cand0[8..] == t);
    let g1 = u32::from(cand1[8..] == t);
    let src = if g1 != 0 { cand1 } else { cand0 };
    let mut nonce = [0; 8];
    nonce.copy_from_slice(&src[..8]);
    (g0 | (g1 << 1), nonce)
}

impl Keys {
    /// Decrypts slot `s` of every packet in `alive` under both keys: `b0[k]`, `b1[k]`.
    fn decrypt_slot(
        &self,
        inputs: &[TrialInput<'_>],
        alive: &[u8],
        s: usize,
        b0: &mut [Block; CHUNK],
        b1: &mut [Block; CHUNK],
    ) {
        let n = alive.len();
        for (b, &p) in b0.iter_mut().zip(alive) {
            let slot = inputs[usize::from(p)].slots.as_chunks::<16>().0.get(s);
            *b = Block::from(*slot.unwrap_or(&[0; 16]));
        }
        b1[..n].copy_from_slice(&b0[..n]);
        let [k0, k1] = &self.dec[s];
        k0.decrypt_blocks(&mut b0[..n]);
        k1.decrypt_blocks(&mut b1[..n]);
    }
}

impl Kernel for Keys {
    fn filter(&self, inputs: &[TrialInput<'_>], alive: &mut [u8], slot0: &mut Slot0) -> usize {
        let mut b0 = [Block::default(); CHUNK];
        let mut b1 = [Block::default(); CHUNK];
        self.decrypt_slot(inputs, alive, 0, &mut b0, &mut b1);
        let mut kept = 0;
        for k in 0..alive.len() {
            let p = alive[k];
            let (good, nonce) = judge(inputs[usize::from(p)].t, &b0[k], &b1[k]);
            slot0.set(p, good == 2, nonce);
            alive[kept] = p;
            kept += usize::from(good == 1 || good == 2);
        }
        kept
    }

    fn verify(
        &self,
        inputs: &[TrialInput<'_>],
        alive: &[u8],
        slot0: &Slot0,
        out: &mut [Option<TrialOutput>],
    ) {
        let slots = self.dec.len();
        let mut b0 = [Block::default(); CHUNK];
        let mut b1 = [Block::default(); CHUNK];
        // `good[k][b]` bit s: slot s of packet `alive[k]` is good under `K[s][b]`.
        let mut good = [[0u32; 2]; CHUNK];
        for (g, &p) in good.iter_mut().zip(alive) {
            // Slot 0 passed phase 1: exactly one candidate is good.
            let (b, nonce) = slot0.get(p);
            *g = [u32::from(!b), u32::from(b)];
            let mut o = super::EMPTY_OUTPUT;
            o.nonces[0] = nonce;
            out[usize::from(p)] = Some(o);
        }
        for s in 1..slots {
            self.decrypt_slot(inputs, alive, s, &mut b0, &mut b1);
            for (k, &p) in alive.iter().enumerate() {
                let p = usize::from(p);
                let (g, nonce) = judge(inputs[p].t, &b0[k], &b1[k]);
                good[k][0] |= (g & 1) << s;
                good[k][1] |= (g >> 1) << s;
                if let Some(o) = &mut out[p] {
                    o.nonces[s] = nonce;
                }
            }
        }
        let full = u32::MAX >> (32 - slots);
        for (&[g0, g1], &p) in good.iter().zip(alive) {
            let o = &mut out[usize::from(p)];
            //= PROTOCOL.md §6 check 4
            //# Exactly one candidate per slot must be good.
            if (g0 ^ g1) == full && (g0 & g1) == 0 {
                if let Some(o) = o {
                    o.index = super::index_from_bits(g1, slots);
                }
            } else {
                *o = None;
            }
        }
    }
}
