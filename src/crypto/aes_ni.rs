//! The AES-128 key schedule with AES-NI, shared by [`super::block::FastAes128`],
//! [`super::gcm::SessionGcm`] and the trial engine's AES-NI and VAES backends. Every function
//! here needs the `aes` CPU feature (plus SSE2, baseline on x86_64).
#![allow(unsafe_code)]

use core::arch::x86_64::*;

/// Loads a 16-byte block.
#[inline(always)]
pub(crate) fn load(b: &[u8; 16]) -> __m128i {
    // SAFETY: `b` is valid for a 16-byte read; `loadu` has no alignment requirement.
    // SSE2 is baseline on x86_64.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// One step of the AES-128 key schedule (FIPS 197 §5.2), the `aes` crate's formulation.
#[inline]
#[target_feature(enable = "aes,sse2")]
fn expand_step<const RCON: i32>(prev: __m128i) -> __m128i {
    let mut t1 = prev;
    let t2 = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<RCON>(prev));
    let mut t3 = _mm_slli_si128::<4>(t1);
    t1 = _mm_xor_si128(t1, t3);
    t3 = _mm_slli_si128::<4>(t3);
    t1 = _mm_xor_si128(t1, t3);
    t3 = _mm_slli_si128::<4>(t3);
    t1 = _mm_xor_si128(t1, t3);
    _mm_xor_si128(t1, t2)
}

/// Encryption round keys of an AES-128 key.
#[target_feature(enable = "aes,sse2")]
pub(crate) fn expand_enc(key: &[u8; 16]) -> [__m128i; 11] {
    let mut ek = [_mm_setzero_si128(); 11];
    ek[0] = load(key);
    ek[1] = expand_step::<0x01>(ek[0]);
    ek[2] = expand_step::<0x02>(ek[1]);
    ek[3] = expand_step::<0x04>(ek[2]);
    ek[4] = expand_step::<0x08>(ek[3]);
    ek[5] = expand_step::<0x10>(ek[4]);
    ek[6] = expand_step::<0x20>(ek[5]);
    ek[7] = expand_step::<0x40>(ek[6]);
    ek[8] = expand_step::<0x80>(ek[7]);
    ek[9] = expand_step::<0x1b>(ek[8]);
    ek[10] = expand_step::<0x36>(ek[9]);
    ek
}
