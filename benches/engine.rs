//! Trial-decryption engine benchmarks (PROTOCOL.md §6 check 4).
//!
//! Groups: `aes_raw` (ns/block per backend), `trial_step` (per REBIND, S=16, batch 1/8/64),
//! `naive_baseline` (one `aes` crate call per slot and key, one packet at a time, in the
//! same run), `garbage_reject` (random bytes, batch 64).
//! Run: `cargo bench --bench engine` (filter with the usual criterion arguments).
//!
//! Note: where the CPU has AVX-512 (this machine: Zen 4), the `aes` crate picks its
//! VAES-512 backend, which re-broadcasts the round keys on every call: one
//! `decrypt_block` costs ~40 ns, so `naive_baseline` is much slower than its bulk
//! `aes_raw/aes_crate` rate suggests.

use std::hint::black_box;
use std::time::Duration;

use aes::Aes128;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rebindgw::engine::{Backend, MAX_SLOTS, TrialInput, TrialKeys, TrialOutput};

const S: usize = 16;
const T: u64 = 639_028_224_000_000_000;

/// Small deterministic generator (splitmix64), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        for c in b.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes()[..c.len()]);
        }
        b
    }
}

fn keys(rng: &mut Rng) -> Vec<[[u8; 16]; 2]> {
    (0..S).map(|_| [rng.bytes(), rng.bytes()]).collect()
}

/// Slots of a valid REBIND for a random index, t = T + j (so each packet has its own t).
fn valid_packets(keys: &[[[u8; 16]; 2]], rng: &mut Rng, n: usize) -> Vec<(Vec<u8>, u64)> {
    let enc: Vec<[Aes128; 2]> = keys
        .iter()
        .map(|[a, b]| [Aes128::new(&Array::from(*a)), Aes128::new(&Array::from(*b))])
        .collect();
    (0..n)
        .map(|j| {
            let t = T + j as u64;
            let index = rng.next() as u32 & ((1 << S) - 1);
            let mut slots = Vec::with_capacity(16 * S);
            for (i, pair) in enc.iter().enumerate() {
                let b = (index >> (S - 1 - i)) & 1;
                let mut pt = [0u8; 16];
                pt[..8].copy_from_slice(&rng.bytes::<8>());
                pt[8..].copy_from_slice(&t.to_be_bytes());
                let mut blk = Array::from(pt);
                pair[b as usize].encrypt_block(&mut blk);
                slots.extend_from_slice(&blk);
            }
            (slots, t)
        })
        .collect()
}

fn inputs(packets: &[(Vec<u8>, u64)]) -> Vec<TrialInput<'_>> {
    packets
        .iter()
        .map(|(slots, t)| TrialInput { slots, t: *t })
        .collect()
}

fn configure(c: &mut Criterion) -> Criterion {
    std::mem::take(c)
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

fn bench_aes_raw(c: &mut Criterion, keys: &[[[u8; 16]; 2]]) {
    const BLOCKS: usize = 1024;
    let mut g = c.benchmark_group("aes_raw");
    g.throughput(Throughput::Elements(BLOCKS as u64));
    for backend in Backend::all_supported() {
        let tk = TrialKeys::new(backend, keys).unwrap();
        let mut blocks = vec![[0x5au8; 16]; BLOCKS];
        g.bench_function(backend.name(), |b| {
            b.iter(|| tk.bench_decrypt_blocks(0, black_box(&mut blocks)))
        });
    }
    // The `aes` crate alone, one key over the whole buffer (its own parallel path).
    let dec = aes::Aes128Dec::new(&Array::from(keys[0][0]));
    let mut blocks = vec![Array::from([0x5au8; 16]); BLOCKS];
    g.bench_function("aes_crate", |b| {
        b.iter(|| dec.decrypt_blocks(black_box(&mut blocks)))
    });
    g.finish();
}

fn bench_trial_step(c: &mut Criterion, keys: &[[[u8; 16]; 2]], rng: &mut Rng) {
    let mut g = c.benchmark_group("trial_step");
    let packets = valid_packets(keys, rng, 64);
    let all = inputs(&packets);
    for backend in Backend::all_supported() {
        let tk = TrialKeys::new(backend, keys).unwrap();
        for batch in [1usize, 8, 64] {
            let input = &all[..batch];
            let mut out: Vec<Option<TrialOutput>> = vec![None; batch];
            tk.trial_batch(input, &mut out);
            assert!(
                out.iter().all(Option::is_some),
                "{backend} rejected a valid REBIND"
            );
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(BenchmarkId::new(backend.name(), batch), &batch, |b, _| {
                b.iter(|| tk.trial_batch(black_box(input), &mut out))
            });
        }
    }
    g.finish();
}

/// One `decrypt_block` call per slot and key, one packet at a time.
fn naive_trial(dec: &[[aes::Aes128Dec; 2]], input: TrialInput<'_>) -> Option<TrialOutput> {
    let s = dec.len();
    if input.slots.len() != 16 * s {
        return None;
    }
    let mut out = TrialOutput {
        index: 0,
        nonces: [[0; 8]; MAX_SLOTS],
    };
    let tb = input.t.to_be_bytes();
    for (i, (pair, ct)) in dec.iter().zip(input.slots.chunks_exact(16)).enumerate() {
        let mut good = None;
        for (b, k) in pair.iter().enumerate() {
            let mut blk = Array::from(<[u8; 16]>::try_from(ct).unwrap());
            k.decrypt_block(&mut blk);
            if blk[8..] == tb {
                if good.is_some() {
                    return None;
                }
                good = Some((b, blk));
            }
        }
        let (b, blk) = good?;
        out.index |= (b as u32) << (s - 1 - i);
        out.nonces[i].copy_from_slice(&blk[..8]);
    }
    Some(out)
}

fn bench_naive(c: &mut Criterion, keys: &[[[u8; 16]; 2]], rng: &mut Rng) {
    let dec: Vec<[aes::Aes128Dec; 2]> = keys
        .iter()
        .map(|[a, b]| {
            [
                aes::Aes128Dec::new(&Array::from(*a)),
                aes::Aes128Dec::new(&Array::from(*b)),
            ]
        })
        .collect();
    let packets = valid_packets(keys, rng, 64);
    let all = inputs(&packets);
    let tk = TrialKeys::new(Backend::Portable, keys).unwrap();
    for &i in &all {
        assert_eq!(naive_trial(&dec, i), tk.trial_one(i));
    }
    let mut g = c.benchmark_group("naive_baseline");
    g.throughput(Throughput::Elements(all.len() as u64));
    g.bench_function("aes_crate_per_block/64", |b| {
        b.iter(|| {
            for &i in black_box(&all[..]) {
                black_box(naive_trial(&dec, i));
            }
        })
    });
    g.finish();
}

fn bench_garbage(c: &mut Criterion, keys: &[[[u8; 16]; 2]], rng: &mut Rng) {
    const BATCH: usize = 64;
    let packets: Vec<(Vec<u8>, u64)> = (0..BATCH)
        .map(|_| {
            let slots: Vec<u8> = (0..S).flat_map(|_| rng.bytes::<16>()).collect();
            (slots, rng.next())
        })
        .collect();
    let all = inputs(&packets);
    let mut g = c.benchmark_group("garbage_reject");
    g.throughput(Throughput::Elements(BATCH as u64));
    for backend in Backend::all_supported() {
        let tk = TrialKeys::new(backend, keys).unwrap();
        let mut out = vec![None; BATCH];
        tk.trial_batch(&all, &mut out);
        assert!(out.iter().all(Option::is_none));
        g.bench_with_input(BenchmarkId::new(backend.name(), BATCH), &BATCH, |b, _| {
            b.iter(|| tk.trial_batch(black_box(&all), &mut out))
        });
    }
    g.finish();
}

fn engine(c: &mut Criterion) {
    let mut c = configure(c);
    let mut rng = Rng(0x5eed);
    let keys = keys(&mut rng);
    eprintln!(
        "backends: {:?} (best {})",
        Backend::all_supported(),
        Backend::best()
    );
    for b in [Backend::AesNi, Backend::Vaes] {
        if !b.is_supported() {
            eprintln!(
                "skipped: backend {b} (this CPU lacks {})",
                b.missing_features().join(", ")
            );
        }
    }
    bench_aes_raw(&mut c, &keys);
    bench_trial_step(&mut c, &keys, &mut rng);
    bench_naive(&mut c, &keys, &mut rng);
    bench_garbage(&mut c, &keys, &mut rng);
}

criterion_group!(benches, engine);
criterion_main!(benches);
