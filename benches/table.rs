//! Fast-path table lookups at 65,536 entries, beside `std::collections::HashMap` with its default
//! SipHash-1-3 and no lock as the baseline. Keys are visited in a shuffled order so each lookup
//! touches a different bucket (as with real traffic), not one cached line.
use std::collections::HashMap;
use std::hint::black_box;
use std::net::{Ipv6Addr, SocketAddr};

use criterion::{Criterion, criterion_group, criterion_main};
use rebindgw::table::{ConnRef, ConnRoute, ConnWriter, TupleWriter};

const N: usize = 65_536;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn tuples(seed: u64, n: usize) -> Vec<SocketAddr> {
    let mut x = seed;
    (0..n)
        .map(|i| {
            let r = xorshift(&mut x);
            if i % 2 == 0 {
                SocketAddr::from(((r as u32).to_be_bytes(), (r >> 32) as u16))
            } else {
                SocketAddr::from((
                    Ipv6Addr::from(u128::from(r) << 64 | u128::from(r.rotate_left(17))),
                    (r >> 48) as u16,
                ))
            }
        })
        .collect()
}

fn conn_ref(i: usize) -> ConnRef {
    ConnRef {
        conn_id: i as u64,
        index: i as u32,
        host: 1,
        owner: 2,
        epoch_byte: 3,
    }
}

fn bench_tuple(c: &mut Criterion) {
    let keys = tuples(0x1234_5678_9abc_def1, N);
    let misses = tuples(0x0fed_cba9_8765_4321, N);
    let mut w = TupleWriter::new(N);
    let mut map = HashMap::with_capacity(N);
    for (i, k) in keys.iter().enumerate() {
        w.insert(*k, conn_ref(i)).unwrap();
        map.insert(*k, conn_ref(i));
    }
    let r = w.reader();
    let mut g = c.benchmark_group("tuple_65536");
    for (name, set) in [("hit", &keys), ("miss", &misses)] {
        let mut i = 0usize;
        g.bench_function(format!("TupleTable::get/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) & (N - 1);
                black_box(r.get(black_box(&set[i])))
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("HashMap::get/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) & (N - 1);
                black_box(map.get(black_box(&set[i])).copied())
            })
        });
    }
    g.finish();
}

fn bench_conn(c: &mut Criterion) {
    let mut x = 0x5555_aaaa_1234_4321u64;
    let ids: Vec<u64> = (0..N).map(|_| xorshift(&mut x)).collect();
    let miss_ids: Vec<u64> = (0..N).map(|_| xorshift(&mut x)).collect();
    let addrs = tuples(7, N);
    let mut w = ConnWriter::new(N);
    let mut map = HashMap::with_capacity(N);
    for (id, a) in ids.iter().zip(&addrs) {
        let v = ConnRoute {
            tuple: Some(*a),
            owner: 1,
            index: *id as u32,
            epoch_byte: 1,
            host: 0,
        };
        w.insert(*id, v).unwrap();
        map.insert(*id, v);
    }
    let r = w.reader();
    let mut g = c.benchmark_group("conn_65536");
    for (name, set) in [("hit", &ids), ("miss", &miss_ids)] {
        let mut i = 0usize;
        g.bench_function(format!("ConnTable::get/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) & (N - 1);
                black_box(r.get(black_box(set[i])))
            })
        });
        let mut i = 0usize;
        g.bench_function(format!("HashMap::get/{name}"), |b| {
            b.iter(|| {
                i = (i + 1) & (N - 1);
                black_box(map.get(black_box(&set[i])).copied())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_tuple, bench_conn);
criterion_main!(benches);
