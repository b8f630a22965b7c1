//! The REBIND session-key KDF (PROTOCOL.md §6), S = 16, per key:
//! - `hkdf_crate`: the `hkdf` crate, keyed from scratch each call (the unkeyed baseline);
//! - `sha2_midstate_single`: HMAC midstates with every compression a `sha2` call, 8 in a row
//!   (the KDF before `compress_x2`, kept here as the reference; it skips the buffer wiping,
//!   so it runs a little faster than that code did);
//! - `session_key`: `RebindKdf::session_key` (Expand's ipad/opad pair as one `compress_x2`);
//! - `session_keys_x2`: `RebindKdf::session_keys_x2`, two keys per call (throughput is per
//!   key).
//!
//! Also one SHA-256 block: `sha2`'s `compress256` against `compress_x2` (2 blocks).
//!
//! Run: `cargo bench --bench kdf`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rebindgw::crypto;
use rebindgw::crypto::Backend;
use rebindgw::crypto::sha256::{compress_x2, compress_x2_portable, compress_xn};
use rebindgw::crypto::sha256_x16::{KdfLane, LANES, hkdf_keyed_x16, hkdf_keyed_x16_with};
use rebindgw::rebind::{RebindKdf, RebindSecret};
use rebindgw::time::Ticks;
use sha2::block_api::compress256;
use zeroize::Zeroizing;

const S: usize = 16;

const SHA256_IV: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// The pre-`compress_x2` HMAC midstate: one `sha2` compression per block.
struct Sha2Midstate {
    inner: [u32; 8],
    outer: [u32; 8],
}

impl Sha2Midstate {
    fn new(key: &[u8]) -> Self {
        let mut block = [0u8; 64];
        block[..key.len()].copy_from_slice(key);
        block.iter_mut().for_each(|b| *b ^= 0x36);
        let mut inner = SHA256_IV;
        compress256(&mut inner, std::slice::from_ref(&block));
        block.iter_mut().for_each(|b| *b ^= 0x36 ^ 0x5c);
        let mut outer = SHA256_IV;
        compress256(&mut outer, std::slice::from_ref(&block));
        Sha2Midstate { inner, outer }
    }

    fn mac(&self, message: &[u8]) -> [u8; 32] {
        let inner = sha256_from(self.inner, message);
        sha256_from(self.outer, &inner)
    }

    fn session_key(&self, nonces: &[[u8; 8]], t: Ticks) -> [u8; 16] {
        let prk = self.mac(nonces.as_flattened());
        let mut info = [0u8; 15];
        info[..6].copy_from_slice(b"rebind");
        info[6..14].copy_from_slice(&t.0.to_be_bytes());
        info[14] = 1;
        let t1 = Sha2Midstate::new(&prk).mac(&info);
        t1[..16].try_into().unwrap()
    }
}

/// SHA-256 of `message` continued after one block from `state`.
fn sha256_from(mut state: [u32; 8], message: &[u8]) -> [u8; 32] {
    let (blocks, rest) = message.as_chunks::<64>();
    compress256(&mut state, blocks);
    let mut buf = [0u8; 64];
    buf[..rest.len()].copy_from_slice(rest);
    buf[rest.len()] = 0x80;
    if rest.len() + 1 > 56 {
        compress256(&mut state, std::slice::from_ref(&buf));
        buf = [0; 64];
    }
    buf[56..].copy_from_slice(&((64 + message.len() as u64) * 8).to_be_bytes());
    compress256(&mut state, std::slice::from_ref(&buf));
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(state) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn kdf(c: &mut Criterion) {
    let secret = RebindSecret([0x42; 32]);
    let nonces: Vec<[u8; 8]> = (0..S).map(|i| [i as u8; 8]).collect();
    let other_nonces: Vec<[u8; 8]> = (0..S).map(|i| [!(i as u8); 8]).collect();
    let t = Ticks(639_028_224_000_000_000);
    let keyed = RebindKdf::new(&secret);
    let sha2_keyed = Sha2Midstate::new(&secret.0);
    assert_eq!(
        sha2_keyed.session_key(&nonces, t),
        *keyed.session_key(&nonces, t)
    );

    let mut g = c.benchmark_group("kdf");
    g.sample_size(50)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    g.bench_function("hkdf_crate", |b| {
        b.iter(|| {
            let mut k = [0u8; 16];
            crypto::hkdf(
                &secret.0,
                black_box(&nonces).as_flattened(),
                &[b"rebind", &black_box(t).0.to_be_bytes()],
                &mut k,
            );
            k
        })
    });
    g.bench_function("sha2_midstate_single", |b| {
        b.iter(|| sha2_keyed.session_key(black_box(&nonces), black_box(t)))
    });
    g.bench_function("session_key", |b| {
        b.iter(|| keyed.session_key(black_box(&nonces), black_box(t)))
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("session_keys_x2", |b| {
        b.iter(|| {
            RebindKdf::session_keys_x2(
                (&keyed, black_box(&nonces), black_box(t)),
                (&keyed, black_box(&other_nonces), black_box(t)),
            )
        })
    });
    // The 16-lane AVX-512 KDF (the crypto-level call `derive_keys` makes through
    // `RebindKdf::session_keys_x16`), 16 keys per call, and the same call forced portable.
    let midstate = crypto::HmacSha256Midstate::new(&secret.0);
    let mut info = [0u8; 14];
    info[..6].copy_from_slice(b"rebind");
    info[6..].copy_from_slice(&t.0.to_be_bytes());
    let lanes: Vec<KdfLane<'_>> = (0..LANES)
        .map(|l| KdfLane {
            extract: &midstate,
            ikm: if l % 2 == 0 {
                nonces.as_flattened()
            } else {
                other_nonces.as_flattened()
            },
            info: &info,
        })
        .collect();
    let mut out: Vec<Zeroizing<[u8; 16]>> = (0..LANES).map(|_| Zeroizing::new([0; 16])).collect();
    hkdf_keyed_x16(&lanes, &mut out);
    assert_eq!(*out[0], *keyed.session_key(&nonces, t));
    assert_eq!(*out[1], *keyed.session_key(&other_nonces, t));
    g.throughput(Throughput::Elements(LANES as u64));
    g.bench_function("session_keys_x16", |b| {
        b.iter(|| hkdf_keyed_x16(black_box(&lanes), &mut out))
    });
    g.bench_function("session_keys_x16_portable", |b| {
        b.iter(|| hkdf_keyed_x16_with(Backend::Portable, black_box(&lanes), &mut out))
    });
    g.finish();

    let mut g = c.benchmark_group("sha256_block");
    g.sample_size(50).measurement_time(Duration::from_secs(2));
    let (block_a, block_b) = ([1u8; 64], [2u8; 64]);
    g.throughput(Throughput::Elements(1));
    g.bench_function("sha2_compress256", |b| {
        let mut state = SHA256_IV;
        b.iter(|| compress256(&mut state, std::slice::from_ref(black_box(&block_a))))
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("compress_x2", |b| {
        let (mut a, mut bs) = (SHA256_IV, SHA256_IV);
        b.iter(|| compress_x2(&mut a, black_box(&block_a), &mut bs, black_box(&block_b)))
    });
    g.throughput(Throughput::Elements(4));
    g.bench_function("compress_x4", |b| {
        let mut states = [SHA256_IV; 4];
        b.iter(|| {
            compress_xn(
                &mut states,
                black_box([&block_a, &block_b, &block_a, &block_b]),
            )
        })
    });
    g.throughput(Throughput::Elements(8));
    g.bench_function("compress_x8", |b| {
        let mut states = [SHA256_IV; 8];
        let blocks = [
            &block_a, &block_b, &block_a, &block_b, &block_a, &block_b, &block_a, &block_b,
        ];
        b.iter(|| compress_xn(&mut states, black_box(blocks)))
    });
    g.throughput(Throughput::Elements(2));
    g.bench_function("compress_x2_portable", |b| {
        let (mut a, mut bs) = (SHA256_IV, SHA256_IV);
        b.iter(|| compress_x2_portable(&mut a, black_box(&block_a), &mut bs, black_box(&block_b)))
    });
    g.finish();
}

criterion_group!(benches, kdf);
criterion_main!(benches);
