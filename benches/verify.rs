//! Full REBIND verification per packet (PROTOCOL.md §6): cookie + trial + HKDF + GCM +
//! registry, batched as a gateway worker runs it, with baselines measured in the same run.
//!
//! Groups:
//! - `full_verify`: 64 valid REBINDs from 64 connections of a 65,536-connection registry,
//!   per backend; and the same pipeline with the `hkdf` crate's unkeyed HKDF as the KDF
//!   baseline (`kdf_baseline`).
//! - `full_verify/pipeline_kdf/{pairs,lanes16}`: the same pipeline on the best backend with
//!   the session keys two at a time on SHA-NI (`pairs`, the previous default) or sixteen at a
//!   time across AVX-512 lanes (`lanes16`, the default where the CPU has AVX-512), same run.
//! - `reject`: per-packet cost of refusing a flood at the pipeline level: garbage (random
//!   bytes of REBIND length and type), replays with an old `t` outside W (`stale`), and
//!   replays inside W with `t <= L` from the bound tuple (`replay_in_window`, fails check 7
//!   after the cookie and trial steps).
//!
//! Run: `cargo bench --bench verify`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hkdf::Hkdf;
use rebindgw::crypto::KdfPath;
use rebindgw::engine::{Backend, TrialKeys};
use rebindgw::keys::{EpochKeys, MasterSecret};
use rebindgw::rebind::{RebindCredentials, RebindSecret, build_rebind};
use rebindgw::registry::Registry;
use rebindgw::time::{TICKS_PER_SECOND, Ticks};
use rebindgw::verify::{EpochCrypto, ReadOnly, precheck, verify_batch, verify_batch_with};
use sha2::Sha256;

const S: usize = 16;
const BATCH: usize = 64;
const CONNECTIONS: u32 = 65_536;
const NOW: u64 = 639_028_224_000_000_000;
const WINDOW: u64 = 30 * TICKS_PER_SECOND;

struct World {
    keys: EpochKeys,
    registry: Registry,
    /// (source, datagram) of valid REBINDs, each from its own connection.
    valid: Vec<(SocketAddr, Vec<u8>)>,
    secrets: Vec<RebindSecret>,
}

fn world() -> World {
    let keys = EpochKeys::derive(&MasterSecret::from_bytes([7; 32]), 1, S).unwrap();
    let mut registry = Registry::new(S);
    let mut secrets = Vec::new();
    for c in 0..CONNECTIONS {
        let r = registry.register(u64::from(c) * 7 + 1, 0, None).unwrap();
        secrets.push(r.secret);
    }
    let valid = (0..BATCH as u32)
        .map(|j| {
            let index = j * 1021 % CONNECTIONS;
            let from = SocketAddr::from(([10, 1, (j >> 8) as u8, j as u8], 40_000));
            let t = Ticks(NOW - 1_000 + u64::from(j));
            let cookie = keys.cookie(&from, t);
            let issued = keys.client_keys(index);
            let creds = RebindCredentials {
                conn_id: u64::from(index) * 7 + 1,
                secret: &secrets[index as usize],
                slot_keys: &issued,
            };
            let nonces: Vec<[u8; 8]> = (0..S).map(|i| [(i as u8) ^ j as u8; 8]).collect();
            let (datagram, _) = build_rebind(&creds, keys.epoch_byte(), t, &cookie, &nonces);
            (from, datagram)
        })
        .collect();
    World {
        keys,
        registry,
        valid,
        secrets,
    }
}

/// The gateway's path (`verify::verify_batch`: precheck → one trial batch → KDFs two at a
/// time → open), against the registry without committing. Returns the verified count.
fn pipeline(w: &World, crypto: &EpochCrypto, batch: &[(SocketAddr, Vec<u8>)]) -> usize {
    let packets: Vec<(&[u8], &SocketAddr)> = batch.iter().map(|(f, d)| (&d[..], f)).collect();
    let mut registry = ReadOnly(&w.registry);
    verify_batch(&packets, Ticks(NOW), WINDOW, S, &[crypto], &mut registry)
        .iter()
        .filter(|o| o.verified().is_some())
        .count()
}

/// [`pipeline`] with the KDF path given.
fn pipeline_kdf(
    w: &World,
    crypto: &EpochCrypto,
    batch: &[(SocketAddr, Vec<u8>)],
    kdf: KdfPath,
) -> usize {
    let packets: Vec<(&[u8], &SocketAddr)> = batch.iter().map(|(f, d)| (&d[..], f)).collect();
    let mut registry = ReadOnly(&w.registry);
    verify_batch_with(
        &packets,
        Ticks(NOW),
        WINDOW,
        S,
        &[crypto],
        &mut registry,
        kdf,
    )
    .iter()
    .filter(|o| o.verified().is_some())
    .count()
}

/// The epoch's keys and engine keys for `backend`.
fn epoch_crypto(backend: Backend) -> EpochCrypto {
    let keys = EpochKeys::derive(&MasterSecret::from_bytes([7; 32]), 1, S).unwrap();
    let trial = TrialKeys::new(backend, keys.slot_key_pairs()).unwrap();
    EpochCrypto::new(keys, trial)
}

fn full_verify(c: &mut Criterion) {
    let w = world();
    let mut g = c.benchmark_group("full_verify");
    g.throughput(Throughput::Elements(BATCH as u64));
    for backend in Backend::all_supported() {
        let trial = epoch_crypto(backend);
        assert_eq!(
            pipeline(&w, &trial, &w.valid),
            BATCH,
            "every REBIND verifies"
        );
        g.bench_function(BenchmarkId::new("pipeline", backend.name()), |b| {
            b.iter(|| black_box(pipeline(&w, &trial, black_box(&w.valid))))
        });
    }
    // The KDF paths on the best backend, old (`pairs`, SHA-NI two at a time) against new
    // (`lanes16`, AVX-512 sixteen at a time), same run.
    let best = epoch_crypto(Backend::best());
    for kdf in [KdfPath::Pairs, KdfPath::Lanes16] {
        assert_eq!(pipeline_kdf(&w, &best, &w.valid, kdf), BATCH);
        g.bench_function(BenchmarkId::new("pipeline_kdf", kdf.name()), |b| {
            b.iter(|| black_box(pipeline_kdf(&w, &best, black_box(&w.valid), kdf)))
        });
    }
    // Baseline for the KDF share: the session key with the hkdf crate, keyed from R each time.
    let nonces: Vec<[u8; 8]> = (0..S).map(|i| [i as u8; 8]).collect();
    let ikm: Vec<u8> = nonces.concat();
    g.bench_function("kdf_baseline/hkdf_crate", |b| {
        b.iter(|| {
            for j in 0..BATCH {
                let hk = Hkdf::<Sha256>::new(Some(&w.secrets[j].0), black_box(&ikm));
                let mut k = [0u8; 16];
                hk.expand_multi_info(&[b"rebind", &NOW.to_be_bytes()], &mut k)
                    .unwrap();
                black_box(k);
            }
        })
    });
    let kdf = rebindgw::rebind::RebindKdf::new(&w.secrets[0]);
    g.bench_function("kdf_baseline/midstate", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(kdf.session_key(black_box(&nonces), Ticks(NOW)));
            }
        })
    });
    g.finish();
}

fn rejects(c: &mut Criterion) {
    let mut w = world();
    let trial = epoch_crypto(Backend::best());

    // Garbage: random bytes of the right length and type.
    let mut x = 0x1234_5678_9abc_def0u64;
    let garbage: Vec<(SocketAddr, Vec<u8>)> = (0..BATCH)
        .map(|j| {
            let mut d: Vec<u8> = (0..w.valid[0].1.len())
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            d[0] = b'R';
            (w.valid[j].0, d)
        })
        .collect();
    // Stale: valid packets whose t is older than W at this `now`.
    let stale_now = Ticks(NOW + 2 * WINDOW);
    // In-window replays: the registry already holds L = t for these connections, bound to
    // another tuple.
    let replay = w.valid.clone();
    for (j, (_, d)) in replay.iter().enumerate() {
        let index = j as u32 * 1021 % CONNECTIONS;
        let t = Ticks(u64::from_be_bytes(d[2..10].try_into().unwrap()));
        w.registry
            .commit_rebind(index, t, SocketAddr::from(([192, 0, 2, 1], 1)));
    }
    assert_eq!(pipeline(&w, &trial, &replay), 0);
    assert_eq!(pipeline(&w, &trial, &garbage), 0);

    let mut g = c.benchmark_group("reject");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("garbage", |b| {
        b.iter(|| black_box(pipeline(&w, &trial, black_box(&garbage))))
    });
    g.bench_function("stale", |b| {
        let keys = [&w.keys];
        b.iter(|| {
            replay
                .iter()
                .filter(|(from, d)| precheck(d, from, stale_now, WINDOW, S, &keys).is_ok())
                .count()
        })
    });
    g.bench_function("replay_in_window", |b| {
        b.iter(|| black_box(pipeline(&w, &trial, black_box(&replay))))
    });
    g.finish();
}

fn configure() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
}

criterion_group! {
    name = benches;
    config = configure();
    targets = full_verify, rejects
}
criterion_main!(benches);
