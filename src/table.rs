//! Lock-free-read fast-path tables: source tuple → connection ([`TupleTable`]) and
//! `conn_id` → client tuple ([`ConnTable`]).
//!
//! # Shape
//!
//! Every table is split into two handles over one shared bucket array:
//!
//! * a **writer** ([`TupleWriter`], [`ConnWriter`]): created by `new`, not `Clone`, mutates
//!   through `&mut self`. Holding it inside the registry mutex gives the "one writer at a
//!   time" rule from the type system instead of from a comment;
//! * any number of **readers** ([`TupleTable`], [`ConnTable`]), obtained with
//!   `writer.reader()`: `Clone + Send + Sync` (an `Arc` inside), read-only. `get` takes no lock,
//!   performs no allocation and no syscall in the normal case.
//!
//! # Layout
//!
//! Fixed capacity, chosen at construction: `⌈5/3 × max_entries⌉` buckets, so the load factor
//! never exceeds 0.6 and every probe sequence ends at an empty bucket. A multiply-shift maps
//! hashes onto the (not power-of-two) bucket count. Inserting a new key when `max_entries` are
//! present returns [`TableFull`] instead of degrading. Open addressing with linear probing and
//! backward-shift deletion (no tombstones, so probe lengths do not grow with churn). Each bucket
//! is an array of `AtomicU64`; an all-zero bucket is empty, and one designated word (the "tag")
//! is non-zero in every occupied bucket.
//!
//! | table         | bucket words                                                         | bytes |
//! |---------------|----------------------------------------------------------------------|-------|
//! | `TupleTable`  | addr16 hi, addr16 lo, port‖family‖occupied (key) · conn_id, index‖host‖owner‖epoch (value) | 40 |
//! | `ConnTable`   | conn_id (key) · addr16 hi, addr16 lo, port‖family‖no-tuple‖owner‖occupied, index‖epoch‖host (value) | 40 |
//!
//! Memory per entry at full load = bucket bytes × capacity / max_entries ≈ 40 × 5/3 = **67 B**
//! per table. At 65,536 entries: 109,227 buckets, 4.2 MiB per table.
//!
//! Keys are attacker-chosen (source tuples; `conn_id`s echoed by hosts), so the bucket index is
//! SipHash-1-3 of the key words under a 128-bit key drawn from `getrandom` per table.
//!
//! # Consistency: one global seqlock
//!
//! A single `AtomicU64` sequence number (on its own cache line) guards the whole array.
//!
//! * Writer: `seq.store(s + 1, Relaxed)` (odd); `fence(Release)`; bucket stores `Relaxed`;
//!   `seq.store(s + 2, Release)` (even). Everything that is not a store to shared words (hashing
//!   the new key, finding its slot, the full check) happens before the odd store, so a write
//!   section is a handful of stores (an update or insert) or a short backward-shift walk (a
//!   remove; it rehashes the entries of the one cluster it walks).
//! * Reader: `s1 = seq.load(Acquire)`; if odd, back off and retry; probe with `Relaxed` loads;
//!   `fence(Acquire)`; `s2 = seq.load(Relaxed)`; accept the result only if `s1 == s2`.
//!
//! Why a validated read is a consistent snapshot (the `loom` tests at the end of this file check
//! it on small models; see there for the command): suppose a
//! reader's `Relaxed` load returned a value stored by a write section W. W's stores follow
//! W's `fence(Release)`, which follows W's odd store; the reader's `fence(Acquire)` follows the
//! load, so the two fences synchronise and the reader's later load of `seq` sees W's odd store
//! or something newer, i.e. `s2 ≠ s1` unless `s1` was already W's odd value — which the reader
//! rejects up front. Conversely, if `s1` is the even value published by W's final `Release`
//! store, the `Acquire` load of `s1` makes every store of W (and earlier sections) visible, so
//! no load can return an older value. Hence `s1 == s2` (even) implies every word read belongs
//! to the state between two write sections. Because every shared cell is an atomic, an
//! unvalidated (torn) read is merely discarded: it can't be UB, and the probe is bounded by the
//! capacity, so it can't loop forever or index out of range either. Decoding runs only on
//! validated words and is total anyway.
//!
//! Progress: the writer never waits for readers. A reader retries while a write section is in
//! progress (spinning, then yielding after [`SPINS_BEFORE_YIELD`] failed attempts, which only
//! matters if the writer was descheduled mid-section), so readers are obstruction-free with
//! respect to each other and wait only for short write sections. Writes are rare
//! (register/rebind/close), so retries are rare; the global counter means any write makes every
//! overlapping read retry once, which is cheap at that rate and is what makes backward-shift
//! (moving entries between buckets) safe to read without per-bucket versions.
//!
//! A rebind is two operations (insert the new tuple, then remove the old one): do them in that
//! order so a reader never finds neither.
//!
//! Alternatives considered: per-bucket seqlocks (a reader could miss an entry that a
//! backward shift moves past it); RCU/epoch copy-on-write of the whole table (an allocation and
//! a copy of megabytes per registration); `ArcSwap` of per-entry boxes (pointer chasing and
//! refcount traffic on every lookup). The global seqlock over flat atomics is the simplest safe
//! design with one cache-missing bucket load per lookup.
#![forbid(unsafe_code)]

use std::hash::Hasher as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use sync::{Arc, AtomicU64, AtomicUsize, Ordering, fence};

use crossbeam::utils::CachePadded;
use siphasher::sip::SipHasher13;

/// The shared-memory primitives of the seqlock: std's, or loom's in the model-checking tests
/// (`--cfg loom`, see the `loom` test module at the end of this file), so that loom sees every
/// atomic access, fence and spin of the real code.
mod sync {
    #[cfg(all(loom, test))]
    pub(super) use ::loom::{
        hint::spin_loop,
        sync::Arc,
        sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence},
        thread::yield_now,
    };
    #[cfg(not(all(loom, test)))]
    pub(super) use std::{
        hint::spin_loop,
        sync::Arc,
        sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence},
        thread::yield_now,
    };
}

/// Failed read attempts (odd or changed sequence number) before a reader starts calling
/// `thread::yield_now` between attempts instead of only spinning.
pub const SPINS_BEFORE_YIELD: u32 = 64;

/// Inserting a new key into a table that already holds `max_entries` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("table full: it already holds its maximum of {max_entries} entries")]
pub struct TableFull {
    pub max_entries: usize,
}

// ---------------------------------------------------------------------------------------------
// Generic core: `KW` leading key words, `W` words per bucket, `TAG` the word that is non-zero
// iff the bucket is occupied.
// ---------------------------------------------------------------------------------------------

/// Buckets for `max_entries`: a load factor of at most 0.6, and always one empty bucket.
fn capacity_for(max_entries: usize) -> usize {
    max_entries
        .checked_mul(5)
        .map(|n| n.div_ceil(3))
        .expect("table max_entries too large")
        .max(max_entries + 1)
        .max(2)
}

struct Raw<const KW: usize, const W: usize, const TAG: usize> {
    seq: CachePadded<AtomicU64>,
    buckets: Box<[[AtomicU64; W]]>,
    cap: usize,
    max_entries: usize,
    len: AtomicUsize,
    sip_k0: u64,
    sip_k1: u64,
    #[cfg(test)]
    hash_override: Option<fn(&[u64]) -> u64>,
}

impl<const KW: usize, const W: usize, const TAG: usize> Raw<KW, W, TAG> {
    const CHECK: () = assert!(KW >= 1 && KW <= W && TAG < W);

    fn new(max_entries: usize) -> Self {
        let mut k = [0u8; 16];
        getrandom::fill(&mut k).expect("getrandom failed while keying the table hash");
        let k0 = u64::from_le_bytes(k[..8].try_into().expect("8 bytes"));
        let k1 = u64::from_le_bytes(k[8..].try_into().expect("8 bytes"));
        Self::with_keys(max_entries, k0, k1)
    }

    fn with_keys(max_entries: usize, sip_k0: u64, sip_k1: u64) -> Self {
        let () = Self::CHECK;
        let capacity = capacity_for(max_entries);
        let buckets = (0..capacity)
            .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
            .collect();
        Raw {
            seq: CachePadded::new(AtomicU64::new(0)),
            buckets,
            cap: capacity,
            max_entries,
            len: AtomicUsize::new(0),
            sip_k0,
            sip_k1,
            #[cfg(test)]
            hash_override: None,
        }
    }

    #[inline]
    fn hash(&self, key: &[u64; KW]) -> u64 {
        #[cfg(test)]
        if let Some(f) = self.hash_override {
            return f(key);
        }
        let mut h = SipHasher13::new_with_keys(self.sip_k0, self.sip_k1);
        for &w in key {
            h.write_u64(w);
        }
        h.finish()
    }

    #[inline]
    fn home(&self, key: &[u64; KW]) -> usize {
        // Lemire's multiply-shift maps the hash onto [0, cap) without a power-of-two size.
        ((u128::from(self.hash(key)) * self.cap as u128) >> 64) as usize
    }

    #[inline]
    fn key_of(bucket: &[AtomicU64; W]) -> [u64; KW] {
        std::array::from_fn(|j| bucket[j].load(Ordering::Relaxed))
    }

    #[inline]
    fn image_of(bucket: &[AtomicU64; W]) -> [u64; W] {
        std::array::from_fn(|j| bucket[j].load(Ordering::Relaxed))
    }

    /// One unvalidated probe. Bounded by the capacity, so a torn view can't make it spin.
    #[inline]
    fn probe(&self, key: &[u64; KW], home: usize) -> Option<[u64; W]> {
        let mut i = home;
        for _ in 0..self.cap {
            let b = &self.buckets[i];
            if b[TAG].load(Ordering::Relaxed) == 0 {
                return None;
            }
            if key
                .iter()
                .zip(b.iter())
                .all(|(k, w)| w.load(Ordering::Relaxed) == *k)
            {
                return Some(Self::image_of(b));
            }
            i = self.next(i);
        }
        None
    }

    /// Seqlock-validated lookup; returns the whole bucket image.
    #[inline]
    fn get(&self, key: &[u64; KW]) -> Option<[u64; W]> {
        let home = self.home(key);
        let mut failures = 0u32;
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 0 {
                let found = self.probe(key, home);
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == s1 {
                    return found;
                }
            }
            failures = failures.saturating_add(1);
            if failures < SPINS_BEFORE_YIELD {
                sync::spin_loop();
            } else {
                sync::yield_now();
            }
        }
    }

    /// Writer-side lookup (no validation needed: only the writer stores). Returns the index
    /// of the key's bucket, or `Err(index of the empty bucket that ends its probe sequence)`.
    fn find(&self, key: &[u64; KW]) -> Result<usize, usize> {
        let mut i = self.home(key);
        loop {
            let b = &self.buckets[i];
            if b[TAG].load(Ordering::Relaxed) == 0 {
                return Err(i);
            }
            if Self::key_of(b) == *key {
                return Ok(i);
            }
            // Terminates: `cap > max_entries` keeps at least one bucket empty.
            i = self.next(i);
        }
    }

    #[inline]
    fn begin_write(&self) -> u64 {
        let s = self.seq.load(Ordering::Relaxed);
        debug_assert!(s & 1 == 0, "table write section entered twice");
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        s
    }

    #[inline]
    fn end_write(&self, s: u64) {
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    fn store(bucket: &[AtomicU64; W], image: &[u64; W]) {
        for (cell, &w) in bucket.iter().zip(image) {
            cell.store(w, Ordering::Relaxed);
        }
    }

    /// Writer only (caller holds `&mut` of the unique writer handle).
    fn insert(&self, image: [u64; W]) -> Result<Option<[u64; W]>, TableFull> {
        debug_assert!(image[TAG] != 0, "encoded bucket lacks its occupied tag");
        let key: [u64; KW] = std::array::from_fn(|j| image[j]);
        match self.find(&key) {
            Ok(i) => {
                let b = &self.buckets[i];
                let old = Self::image_of(b);
                if old != image {
                    let s = self.begin_write();
                    for j in KW..W {
                        b[j].store(image[j], Ordering::Relaxed);
                    }
                    self.end_write(s);
                }
                Ok(Some(old))
            }
            Err(i) => {
                let len = self.len.load(Ordering::Relaxed);
                if len >= self.max_entries {
                    return Err(TableFull {
                        max_entries: self.max_entries,
                    });
                }
                let s = self.begin_write();
                Self::store(&self.buckets[i], &image);
                self.end_write(s);
                self.len.store(len + 1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Writer only. Backward-shift deletion: walk the cluster after the hole and pull back
    /// every entry whose home is not cyclically inside `(hole, j]`.
    fn remove(&self, key: &[u64; KW]) -> Option<[u64; W]> {
        let i = self.find(key).ok()?;
        let old = Self::image_of(&self.buckets[i]);
        let s = self.begin_write();
        let mut hole = i;
        let mut j = self.next(i);
        loop {
            let b = &self.buckets[j];
            if b[TAG].load(Ordering::Relaxed) == 0 {
                break;
            }
            let home = self.home(&Self::key_of(b));
            // Entry at j may move to `hole` iff it is at least as far from home as the hole is
            // from j, i.e. the hole lies on its probe path.
            if self.dist(home, j) >= self.dist(hole, j) {
                Self::store(&self.buckets[hole], &Self::image_of(b));
                hole = j;
            }
            j = self.next(j);
        }
        Self::store(&self.buckets[hole], &[0; W]);
        self.end_write(s);
        self.len
            .store(self.len.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
        Some(old)
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn capacity(&self) -> usize {
        self.cap
    }

    /// The bucket after `i`, wrapping.
    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.cap { 0 } else { i + 1 }
    }

    /// Cyclic distance from `from` forward to `to`.
    #[inline]
    fn dist(&self, from: usize, to: usize) -> usize {
        if to >= from {
            to - from
        } else {
            to + self.cap - from
        }
    }

    fn memory_bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<[AtomicU64; W]>()
    }

    /// Test helper: every occupied bucket is reachable from its home without crossing an
    /// empty bucket, keys are unique, and `len` matches.
    #[cfg(all(test, not(loom)))]
    fn check_invariants(&self) {
        let mut count = 0;
        let mut seen = std::collections::HashSet::new();
        for (i, b) in self.buckets.iter().enumerate() {
            let img = Self::image_of(b);
            if img[TAG] == 0 {
                assert_eq!(img, [0; W], "empty bucket {i} not all-zero");
                continue;
            }
            count += 1;
            let key = Self::key_of(b);
            assert!(seen.insert(key), "duplicate key at {i}");
            let mut k = self.home(&key);
            while k != i {
                assert_ne!(
                    self.buckets[k][TAG].load(Ordering::Relaxed),
                    0,
                    "gap before {i}"
                );
                k = self.next(k);
            }
        }
        assert_eq!(count, self.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Address packing shared by both tables.
// ---------------------------------------------------------------------------------------------

const OCCUPIED: u64 = 1 << 63;
const FAMILY_V6: u64 = 1 << 16;

/// `(addr16 hi, addr16 lo, port | family)`; IPv4 is packed as `::ffff:a.b.c.d` with family 0,
/// so `1.2.3.4:p` and `[::ffff:1.2.3.4]:p` are different keys. Flow info and scope id are
/// ignored.
#[inline]
fn pack_addr(addr: &SocketAddr) -> (u64, u64, u64) {
    let (bits, family) = match addr {
        SocketAddr::V4(a) => (a.ip().to_ipv6_mapped().to_bits(), 0),
        SocketAddr::V6(a) => (a.ip().to_bits(), FAMILY_V6),
    };
    (
        (bits >> 64) as u64,
        bits as u64,
        u64::from(addr.port()) | family,
    )
}

#[inline]
fn unpack_addr(hi: u64, lo: u64, port_family: u64) -> SocketAddr {
    let port = port_family as u16;
    if port_family & FAMILY_V6 != 0 {
        let ip = Ipv6Addr::from_bits((u128::from(hi) << 64) | u128::from(lo));
        SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
    } else {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from_bits(lo as u32), port))
    }
}

// ---------------------------------------------------------------------------------------------
// TupleTable: SocketAddr -> ConnRef
// ---------------------------------------------------------------------------------------------

/// What a worker needs to route a datagram from a known client tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub conn_id: u64,
    pub index: u32,
    pub host: u16,
    pub owner: u8,
    pub epoch_byte: u8,
}

type TupleRaw = Raw<3, 5, 2>;

#[inline]
fn tuple_key(addr: &SocketAddr) -> [u64; 3] {
    let (hi, lo, pf) = pack_addr(addr);
    [hi, lo, pf | OCCUPIED]
}

#[inline]
fn tuple_image(addr: &SocketAddr, v: &ConnRef) -> [u64; 5] {
    let [a, b, c] = tuple_key(addr);
    let packed = u64::from(v.index)
        | u64::from(v.host) << 32
        | u64::from(v.owner) << 48
        | u64::from(v.epoch_byte) << 56;
    [a, b, c, v.conn_id, packed]
}

#[inline]
fn tuple_value(img: &[u64; 5]) -> ConnRef {
    ConnRef {
        conn_id: img[3],
        index: img[4] as u32,
        host: (img[4] >> 32) as u16,
        owner: (img[4] >> 48) as u8,
        epoch_byte: (img[4] >> 56) as u8,
    }
}

/// Read handle of the source-tuple table. `Clone + Send + Sync`; `get` is lock-free for
/// readers and never allocates. See the module docs.
#[derive(Clone)]
pub struct TupleTable {
    raw: Arc<TupleRaw>,
}

/// The unique write handle of a [`TupleTable`]; not `Clone`, mutation takes `&mut self`.
/// Reads go through the table it derefs to.
pub struct TupleWriter {
    table: TupleTable,
}

impl std::ops::Deref for TupleWriter {
    type Target = TupleTable;
    fn deref(&self) -> &TupleTable {
        &self.table
    }
}

impl TupleTable {
    /// The connection registered for datagrams from `addr`, if any.
    #[inline]
    pub fn get(&self, addr: &SocketAddr) -> Option<ConnRef> {
        self.raw.get(&tuple_key(addr)).map(|img| tuple_value(&img))
    }
    /// Entries present (may be momentarily stale for readers).
    pub fn len(&self) -> usize {
        self.raw.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of buckets (⌈5/3 × `max_entries`⌉, at least `max_entries + 1`).
    pub fn capacity(&self) -> usize {
        self.raw.capacity()
    }
    pub fn max_entries(&self) -> usize {
        self.raw.max_entries
    }
    /// Bytes of bucket storage (40 × capacity).
    pub fn memory_bytes(&self) -> usize {
        self.raw.memory_bytes()
    }
}

impl TupleWriter {
    /// An empty table for up to `max_entries` tuples, with a fresh random SipHash key.
    ///
    /// # Panics
    /// If `5/3 × max_entries` overflows `usize`, or `getrandom` fails.
    pub fn new(max_entries: usize) -> Self {
        TupleWriter {
            table: TupleTable {
                raw: Arc::new(TupleRaw::new(max_entries)),
            },
        }
    }
    /// A read handle sharing this table.
    pub fn reader(&self) -> TupleTable {
        self.table.clone()
    }
    /// Inserts or replaces; returns the previous value. A new key beyond `max_entries` fails.
    pub fn insert(
        &mut self,
        addr: SocketAddr,
        value: ConnRef,
    ) -> Result<Option<ConnRef>, TableFull> {
        Ok(self
            .raw
            .insert(tuple_image(&addr, &value))?
            .map(|img| tuple_value(&img)))
    }
    /// Removes `addr`; returns its value.
    pub fn remove(&mut self, addr: &SocketAddr) -> Option<ConnRef> {
        self.raw
            .remove(&tuple_key(addr))
            .map(|img| tuple_value(&img))
    }
}

// ---------------------------------------------------------------------------------------------
// ConnTable: conn_id -> (SocketAddr, owner)
// ---------------------------------------------------------------------------------------------

/// Where a host reply for a connection goes, and where the connection sits in the registry:
/// the client's current tuple (none after a NAT handed it to another connection), the worker
/// that owns the connection, its epoch byte and index, and the host it belongs to (only
/// that host may send it DATA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRoute {
    pub tuple: Option<SocketAddr>,
    pub owner: u8,
    pub index: u32,
    pub epoch_byte: u8,
    pub host: u16,
}

/// Key word 0 = conn_id (every u64 is valid), so the occupied tag lives in value word 3.
type ConnRaw = Raw<1, 5, 3>;

/// Set in value word 3 when the connection has no tuple.
const NO_TUPLE: u64 = 1 << 17;

#[inline]
fn conn_image(conn_id: u64, v: &ConnRoute) -> [u64; 5] {
    let (hi, lo, pf) = match &v.tuple {
        Some(t) => pack_addr(t),
        None => (0, 0, NO_TUPLE),
    };
    [
        conn_id,
        hi,
        lo,
        pf | u64::from(v.owner) << 24 | OCCUPIED,
        u64::from(v.index) | u64::from(v.epoch_byte) << 32 | u64::from(v.host) << 40,
    ]
}

#[inline]
fn conn_value(img: &[u64; 5]) -> ConnRoute {
    ConnRoute {
        tuple: (img[3] & NO_TUPLE == 0).then(|| unpack_addr(img[1], img[2], img[3])),
        owner: (img[3] >> 24) as u8,
        index: img[4] as u32,
        epoch_byte: (img[4] >> 32) as u8,
        host: (img[4] >> 40) as u16,
    }
}

/// Read handle of the `conn_id` table. `Clone + Send + Sync`; `get` is lock-free for readers
/// and never allocates.
#[derive(Clone)]
pub struct ConnTable {
    raw: Arc<ConnRaw>,
}

/// The unique write handle of a [`ConnTable`]; not `Clone`, mutation takes `&mut self`.
/// Reads go through the table it derefs to.
pub struct ConnWriter {
    table: ConnTable,
}

impl std::ops::Deref for ConnWriter {
    type Target = ConnTable;
    fn deref(&self) -> &ConnTable {
        &self.table
    }
}

impl ConnTable {
    #[inline]
    pub fn get(&self, conn_id: u64) -> Option<ConnRoute> {
        self.raw.get(&[conn_id]).map(|img| conn_value(&img))
    }
    pub fn len(&self) -> usize {
        self.raw.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn capacity(&self) -> usize {
        self.raw.capacity()
    }
    pub fn max_entries(&self) -> usize {
        self.raw.max_entries
    }
    /// Bytes of bucket storage (40 × capacity).
    pub fn memory_bytes(&self) -> usize {
        self.raw.memory_bytes()
    }
}

impl ConnWriter {
    /// An empty table for up to `max_entries` connections, with a fresh random SipHash key.
    ///
    /// # Panics
    /// If `5/3 × max_entries` overflows `usize`, or `getrandom` fails.
    pub fn new(max_entries: usize) -> Self {
        ConnWriter {
            table: ConnTable {
                raw: Arc::new(ConnRaw::new(max_entries)),
            },
        }
    }
    pub fn reader(&self) -> ConnTable {
        self.table.clone()
    }
    pub fn insert(
        &mut self,
        conn_id: u64,
        value: ConnRoute,
    ) -> Result<Option<ConnRoute>, TableFull> {
        Ok(self
            .raw
            .insert(conn_image(conn_id, &value))?
            .map(|img| conn_value(&img)))
    }
    pub fn remove(&mut self, conn_id: u64) -> Option<ConnRoute> {
        self.raw.remove(&[conn_id]).map(|img| conn_value(&img))
    }
}

macro_rules! impl_debug {
    ($($t:ty),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    .field("len", &self.len())
                    .field("max_entries", &self.max_entries())
                    .field("capacity", &self.capacity())
                    .finish_non_exhaustive()
            }
        }
    )*};
}
impl_debug!(TupleTable, TupleWriter, ConnTable, ConnWriter);

#[cfg(all(test, not(loom)))]
impl TupleWriter {
    fn with_hash(max_entries: usize, f: fn(&[u64]) -> u64) -> Self {
        let mut raw = TupleRaw::with_keys(max_entries, 1, 2);
        raw.hash_override = Some(f);
        TupleWriter {
            table: TupleTable { raw: Arc::new(raw) },
        }
    }
}

#[cfg(test)]
impl ConnWriter {
    fn with_hash(max_entries: usize, f: fn(&[u64]) -> u64) -> Self {
        let mut raw = ConnRaw::with_keys(max_entries, 1, 2);
        raw.hash_override = Some(f);
        ConnWriter {
            table: ConnTable { raw: Arc::new(raw) },
        }
    }
}

// The std-thread tests below would use loom's atomics outside a loom model under `--cfg loom`.
#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((a, port))
    }
    fn v6(a: [u16; 8], port: u16) -> SocketAddr {
        SocketAddr::from((Ipv6Addr::from(a), port))
    }
    fn cref(n: u64) -> ConnRef {
        ConnRef {
            conn_id: n,
            index: n as u32 ^ 0xdead_beef,
            host: n as u16,
            owner: (n >> 3) as u8,
            epoch_byte: (n >> 11) as u8,
        }
    }
    /// All keys collide on a handful of home buckets near the end of the array (so chains wrap).
    fn degenerate(words: &[u64]) -> u64 {
        let x = words
            .iter()
            .fold(0u64, |a, w| a ^ w ^ (w >> 17) ^ (w >> 40));
        (x % 3).wrapping_sub(2)
    }
    fn constant(_: &[u64]) -> u64 {
        7
    }

    #[test]
    fn sizes() {
        let w = TupleWriter::new(65_536);
        assert_eq!(w.capacity(), 109_227);
        assert_eq!(w.memory_bytes(), 109_227 * 40);
        assert_eq!(w.memory_bytes() / w.max_entries(), 66);
        let c = ConnWriter::new(65_536);
        assert_eq!(c.capacity(), 109_227);
        assert_eq!(c.memory_bytes(), 109_227 * 40);
        assert_eq!(TupleWriter::new(0).capacity(), 2);
        assert_eq!(TupleWriter::new(1).capacity(), 2);
        assert_eq!(TupleWriter::new(3).capacity(), 5);
    }

    #[test]
    fn debug_shows_occupancy() {
        let w = ConnWriter::new(4);
        assert_eq!(
            format!("{:?}", w.reader()),
            "ConnTable { len: 0, max_entries: 4, capacity: 7, .. }"
        );
    }

    #[test]
    fn handles_are_send_sync() {
        fn ss<T: Send + Sync + Clone>() {}
        fn s<T: Send>() {}
        ss::<TupleTable>();
        ss::<ConnTable>();
        s::<TupleWriter>();
        s::<ConnWriter>();
    }

    #[test]
    fn tuple_insert_get_overwrite_remove() {
        let mut w = TupleWriter::new(16);
        let r = w.reader();
        let a = v4([192, 0, 2, 1], 4433);
        assert_eq!(r.get(&a), None);
        assert_eq!(w.insert(a, cref(1)), Ok(None));
        assert_eq!(r.get(&a), Some(cref(1)));
        assert_eq!(w.insert(a, cref(2)), Ok(Some(cref(1))));
        assert_eq!(r.get(&a), Some(cref(2)));
        assert_eq!(r.len(), 1);
        assert_eq!(w.remove(&a), Some(cref(2)));
        assert_eq!(w.remove(&a), None);
        assert_eq!(r.get(&a), None);
        assert!(r.is_empty());
        w.raw.check_invariants();
    }

    #[test]
    fn tuple_families_ports_addresses_are_distinct() {
        let mut w = TupleWriter::new(16);
        let keys = [
            v4([1, 2, 3, 4], 1000),
            v4([1, 2, 3, 4], 1001),
            v4([1, 2, 3, 5], 1000),
            v4([0, 0, 0, 0], 0),
            v6([0, 0, 0, 0, 0, 0xffff, 0x0102, 0x0304], 1000), // ::ffff:1.2.3.4
            v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 1000),
            v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2], 1000),
            v6([0, 0, 0, 0, 0, 0, 0, 0], 0),
        ];
        for (n, k) in keys.iter().enumerate() {
            assert_eq!(w.insert(*k, cref(n as u64)), Ok(None), "{k}");
        }
        for (n, k) in keys.iter().enumerate() {
            assert_eq!(w.get(k), Some(cref(n as u64)), "{k}");
        }
        // Flow info and scope id are not part of the key.
        let scoped = SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]),
            1000,
            77,
            3,
        ));
        assert_eq!(w.get(&scoped), Some(cref(5)));
        w.raw.check_invariants();
    }

    #[test]
    fn conn_insert_get_overwrite_remove() {
        let mut w = ConnWriter::new(4);
        let r = w.reader();
        let a = ConnRoute {
            tuple: Some(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 9], 65535)),
            owner: 255,
            index: u32::MAX,
            epoch_byte: 255,
            host: u16::MAX,
        };
        let b = ConnRoute {
            tuple: None,
            owner: 0,
            index: 0,
            epoch_byte: 0,
            host: 0,
        };
        for id in [0, u64::MAX, 1 << 63] {
            assert_eq!(r.get(id), None);
            assert_eq!(w.insert(id, a), Ok(None));
            assert_eq!(r.get(id), Some(a));
        }
        assert_eq!(w.insert(0, b), Ok(Some(a)));
        assert_eq!(r.get(0), Some(b));
        assert_eq!(r.get(1), None);
        assert_eq!(w.remove(u64::MAX), Some(a));
        assert_eq!(r.get(u64::MAX), None);
        assert_eq!(r.len(), 2);
        w.raw.check_invariants();
    }

    #[test]
    fn full_table_errors_but_overwrite_and_reuse_work() {
        let mut w = TupleWriter::new(3);
        for p in 0..3 {
            assert_eq!(w.insert(v4([10, 0, 0, 1], p), cref(p.into())), Ok(None));
        }
        let err = w.insert(v4([10, 0, 0, 1], 3), cref(3)).unwrap_err();
        assert_eq!(err, TableFull { max_entries: 3 });
        assert_eq!(
            err.to_string(),
            "table full: it already holds its maximum of 3 entries"
        );
        assert_eq!(w.len(), 3);
        assert_eq!(w.insert(v4([10, 0, 0, 1], 2), cref(9)), Ok(Some(cref(2))));
        assert!(w.remove(&v4([10, 0, 0, 1], 0)).is_some());
        assert_eq!(w.insert(v4([10, 0, 0, 1], 3), cref(3)), Ok(None));

        let mut c = ConnWriter::new(1);
        let route = ConnRoute {
            tuple: Some(v4([1, 1, 1, 1], 1)),
            owner: 1,
            index: 1,
            epoch_byte: 1,
            host: 1,
        };
        assert_eq!(c.insert(5, route), Ok(None));
        assert_eq!(c.insert(6, route), Err(TableFull { max_entries: 1 }));
        w.raw.check_invariants();
        c.raw.check_invariants();
    }

    /// Every key hashes to the same home bucket: one long chain. Remove from the front, the
    /// middle and the end, and check every survivor is still found.
    #[test]
    fn backward_shift_single_chain() {
        let mut w = TupleWriter::with_hash(8, constant);
        let keys: Vec<SocketAddr> = (0..8).map(|p| v4([10, 0, 0, 1], p)).collect();
        for (n, k) in keys.iter().enumerate() {
            w.insert(*k, cref(n as u64)).unwrap();
        }
        w.raw.check_invariants();
        let mut live: Vec<usize> = (0..8).collect();
        for victim in [0usize, 4, 7, 1, 5, 2, 6, 3] {
            assert_eq!(w.remove(&keys[victim]), Some(cref(victim as u64)));
            live.retain(|&n| n != victim);
            w.raw.check_invariants();
            for &n in &live {
                assert_eq!(w.get(&keys[n]), Some(cref(n as u64)));
            }
            assert_eq!(w.get(&keys[victim]), None);
        }
        assert!(w.is_empty());
    }

    /// Interleaved chains with different homes that wrap around the end of the array: an entry
    /// must only move back when the hole is on its probe path.
    #[test]
    fn backward_shift_interleaved_wrapping_chains() {
        fn h(words: &[u64]) -> u64 {
            // conn_id 0..: home = capacity-2 + (id % 3), capacity = 16.
            14 + words[0] % 3
        }
        let mut w = ConnWriter::with_hash(8, h);
        let route = |id: u64| ConnRoute {
            tuple: Some(v4([10, 0, 0, id as u8], id as u16)),
            index: id as u32,
            epoch_byte: (id >> 8) as u8,
            owner: id as u8,
            host: id as u16,
        };
        for id in 0..8 {
            w.insert(id, route(id)).unwrap();
        }
        w.raw.check_invariants();
        for victim in [2u64, 0, 7, 3, 1, 6, 4, 5] {
            assert_eq!(w.remove(victim), Some(route(victim)));
            w.raw.check_invariants();
            for id in 0..8 {
                let removed = [2u64, 0, 7, 3, 1, 6, 4, 5]
                    .iter()
                    .take_while(|&&v| v != victim)
                    .any(|&v| v == id)
                    || id == victim;
                assert_eq!(w.get(id), (!removed).then(|| route(id)), "id {id}");
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8, u64),
        Remove(u8),
        Get(u8),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0u8..24, any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
                (0u8..24).prop_map(Op::Remove),
                (0u8..24).prop_map(Op::Get),
            ],
            0..200,
        )
    }

    /// 24 tuples: v4/v6, shared ports, shared addresses, the v4-mapped twin of a v4 address.
    fn tuple_of(k: u8) -> SocketAddr {
        let port = 5000 + u16::from(k % 3);
        match k % 4 {
            0 => v4([192, 0, 2, k / 4], port),
            1 => v6(
                [0, 0, 0, 0, 0, 0xffff, 0xc000, 0x0200 | u16::from(k / 4)],
                port,
            ),
            2 => v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, u16::from(k / 4)], port),
            _ => v4([198, 51, 100, k], 5000),
        }
    }

    fn route_of(v: u64) -> ConnRoute {
        let tuple = if v & 1 == 0 {
            v4((v as u32).to_be_bytes(), (v >> 32) as u16)
        } else {
            SocketAddr::from((
                Ipv6Addr::from(u128::from(v) * 0x9e37_79b9),
                (v >> 48) as u16,
            ))
        };
        ConnRoute {
            tuple: (v & 2 == 0).then_some(tuple),
            owner: (v >> 56) as u8,
            index: (v >> 8) as u32,
            epoch_byte: (v >> 40) as u8,
            host: (v >> 48) as u16,
        }
    }

    proptest! {
        #[test]
        fn tuple_matches_hashmap(ops in ops(), max in 1usize..20, degen in any::<bool>()) {
            let mut w = if degen {
                TupleWriter::with_hash(max, degenerate)
            } else {
                TupleWriter::new(max)
            };
            let r = w.reader();
            let mut model: HashMap<SocketAddr, ConnRef> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let key = tuple_of(k);
                        let expect = if model.contains_key(&key) || model.len() < max {
                            Ok(model.insert(key, cref(v)))
                        } else {
                            Err(TableFull { max_entries: max })
                        };
                        prop_assert_eq!(w.insert(key, cref(v)), expect);
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(w.remove(&tuple_of(k)), model.remove(&tuple_of(k)));
                    }
                    Op::Get(k) => {
                        prop_assert_eq!(r.get(&tuple_of(k)), model.get(&tuple_of(k)).copied());
                    }
                }
                prop_assert_eq!(r.len(), model.len());
            }
            w.raw.check_invariants();
            for k in 0..24 {
                prop_assert_eq!(r.get(&tuple_of(k)), model.get(&tuple_of(k)).copied());
            }
        }

        #[test]
        fn conn_matches_hashmap(ops in ops(), max in 1usize..20, degen in any::<bool>()) {
            let mut w = if degen {
                ConnWriter::with_hash(max, degenerate)
            } else {
                ConnWriter::new(max)
            };
            let r = w.reader();
            // Spread ids over the u64 range, including 0 and u64::MAX.
            let id = |k: u8| match k {
                0 => 0,
                1 => u64::MAX,
                k => u64::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            };
            let mut model: HashMap<u64, ConnRoute> = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        let expect = if model.contains_key(&id(k)) || model.len() < max {
                            Ok(model.insert(id(k), route_of(v)))
                        } else {
                            Err(TableFull { max_entries: max })
                        };
                        prop_assert_eq!(w.insert(id(k), route_of(v)), expect);
                    }
                    Op::Remove(k) => prop_assert_eq!(w.remove(id(k)), model.remove(&id(k))),
                    Op::Get(k) => prop_assert_eq!(r.get(id(k)), model.get(&id(k)).copied()),
                }
                prop_assert_eq!(r.len(), model.len());
            }
            w.raw.check_invariants();
            for k in 0..24 {
                prop_assert_eq!(r.get(id(k)), model.get(&id(k)).copied());
            }
        }
    }

    // --- concurrent stress -------------------------------------------------------------------

    /// Key number → tuple (half v4, half v6).
    fn stress_tuple(n: u32) -> SocketAddr {
        if n & 1 == 0 {
            v4(
                [10, (n >> 16) as u8, (n >> 8) as u8, n as u8],
                7000 + (n % 7) as u16,
            )
        } else {
            v6([0xfd00, 0, 0, 0, 0, (n >> 16) as u16, n as u16, 1], 7000)
        }
    }
    /// Value for key `n` at generation `g`: conn_id carries the key, the other fields carry the
    /// generation and a check value, so a torn or misattributed read is detectable.
    fn stress_ref(n: u32, g: u32) -> ConnRef {
        let check = (u64::from(n) ^ u64::from(g)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ConnRef {
            conn_id: u64::from(n) << 32 | u64::from(!n),
            index: g,
            host: check as u16,
            owner: (check >> 16) as u8,
            epoch_byte: (check >> 24) as u8,
        }
    }
    fn stress_route(n: u32, g: u32) -> ConnRoute {
        let check = (u64::from(n) ^ u64::from(g)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        ConnRoute {
            tuple: Some(if g & 1 == 0 {
                v4(g.to_be_bytes(), check as u16)
            } else {
                v6(
                    [0xfd01, 0, 0, (g >> 16) as u16, g as u16, 0, 0, 0],
                    check as u16,
                )
            }),
            owner: (check >> 16) as u8,
            index: check as u32,
            epoch_byte: (check >> 40) as u8,
            host: (check >> 48) as u16,
        }
    }
    fn stress_conn_id(n: u32) -> u64 {
        u64::from(n).wrapping_mul(0xff51_afd7_ed55_8ccd)
    }
    fn route_generation(r: &ConnRoute) -> u32 {
        match r.tuple.expect("stress routes always have a tuple") {
            SocketAddr::V4(a) => a.ip().to_bits(),
            SocketAddr::V6(a) => {
                let s = a.ip().segments();
                u32::from(s[3]) << 16 | u32::from(s[4])
            }
        }
    }

    /// One writer churns both tables (inserts, moves to new values, removes; backward shifts
    /// move the stable entries around) while three readers hammer `get`. Stable keys must always
    /// be found with their exact value; churn keys may be absent but any value seen must be one
    /// the writer stored for that key.
    #[test]
    fn concurrent_stress() {
        run_stress(
            TupleWriter::new(512),
            ConnWriter::new(512),
            (200, 600),
            Duration::from_millis(700),
        );
    }

    /// The same with a degenerate hash: long wrapping clusters, so every remove shifts many
    /// entries.
    #[test]
    fn concurrent_stress_colliding() {
        run_stress(
            TupleWriter::with_hash(64, degenerate),
            ConnWriter::with_hash(64, degenerate),
            (24, 72),
            Duration::from_millis(400),
        );
    }

    /// `stable + churn / 2 < max_entries` keeps the table mostly below full.
    fn run_stress(
        mut tw: TupleWriter,
        mut cw: ConnWriter,
        (stable, churn): (u32, u32),
        dur: Duration,
    ) {
        for n in 0..stable {
            tw.insert(stress_tuple(n), stress_ref(n, 0)).unwrap();
            cw.insert(stress_conn_id(n), stress_route(n, 0)).unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        // Each reader's lookups so far: the writer goes on past `dur` until every reader has
        // made progress (a loaded machine may not schedule one within `dur`), up to a bound
        // that only a livelocked reader misses.
        let progress: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
        let readers: Vec<_> = (0..3u32)
            .map(|t| {
                let (tr, cr, stop) = (tw.reader(), cw.reader(), Arc::clone(&stop));
                let progress = Arc::clone(&progress);
                std::thread::spawn(move || {
                    let mut x = 0x1234_5678u32 ^ t;
                    let (mut lookups, mut churn_hits) = (0u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..16 {
                            x ^= x << 13;
                            x ^= x >> 17;
                            x ^= x << 5;
                            let n = x % (stable + churn);
                            let t = tr.get(&stress_tuple(n));
                            let c = cr.get(stress_conn_id(n));
                            if n < stable {
                                assert_eq!(t, Some(stress_ref(n, 0)), "stable tuple {n}");
                                assert_eq!(c, Some(stress_route(n, 0)), "stable conn {n}");
                            } else {
                                if let Some(v) = t {
                                    assert_eq!(v, stress_ref(n, v.index), "churn tuple {n}");
                                    churn_hits += 1;
                                }
                                if let Some(v) = c {
                                    let g = route_generation(&v);
                                    assert_eq!(v, stress_route(n, g), "churn conn {n}");
                                    churn_hits += 1;
                                }
                            }
                            lookups += 1;
                        }
                        progress[t as usize].store(lookups, Ordering::Relaxed);
                    }
                    (lookups, churn_hits)
                })
            })
            .collect();

        let start = Instant::now();
        let mut x = 0x9abc_def1u32;
        let mut gen_of = vec![None::<u32>; (stable + churn) as usize];
        let mut writes = 0u64;
        let starved = || progress.iter().any(|p| p.load(Ordering::Relaxed) <= 1_000);
        while start.elapsed() < dur || (starved() && start.elapsed() < Duration::from_secs(30)) {
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let n = stable + x % churn;
                let slot = &mut gen_of[n as usize];
                match *slot {
                    Some(g) if x & 0x300 == 0 => {
                        // Move to a new value.
                        let g2 = g + 1;
                        assert_eq!(
                            tw.insert(stress_tuple(n), stress_ref(n, g2)),
                            Ok(Some(stress_ref(n, g)))
                        );
                        assert_eq!(
                            cw.insert(stress_conn_id(n), stress_route(n, g2)),
                            Ok(Some(stress_route(n, g)))
                        );
                        *slot = Some(g2);
                    }
                    Some(g) => {
                        assert_eq!(tw.remove(&stress_tuple(n)), Some(stress_ref(n, g)));
                        assert_eq!(cw.remove(stress_conn_id(n)), Some(stress_route(n, g)));
                        *slot = None;
                    }
                    None => {
                        let g = x >> 12;
                        // Both tables hold the same keys, so they fill up together; a full
                        // table is an allowed outcome.
                        if tw.insert(stress_tuple(n), stress_ref(n, g)).is_ok() {
                            cw.insert(stress_conn_id(n), stress_route(n, g)).unwrap();
                            *slot = Some(g);
                        }
                    }
                }
                writes += 1;
            }
            // Writes are rare in production; leave readers a little room here too.
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for r in readers {
            let (lookups, _hits) = r.join().expect("reader panicked");
            assert!(lookups > 1_000, "reader starved: {lookups} lookups");
            total += lookups;
        }
        assert!(writes > 1_000, "writer made too little progress: {writes}");
        tw.raw.check_invariants();
        cw.raw.check_invariants();
        eprintln!("stress: {writes} writes, {total} lookups");
    }
}

/// Model checking of the seqlock with loom: every interleaving (up to a preemption bound) of
/// one writer and the readers, with every value a `Relaxed` load may return under the C++11
/// memory model, not just the ones a real CPU happens to produce.
///
/// Run with (the release profile only for speed; the model is small):
///
/// ```text
/// RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=... cargo test --release --lib table::loom
/// ```
///
/// Plain `cargo test` does not build these (nor needs the `loom` crate). Under `--cfg loom`
/// the `sync` module above hands the table loom's atomics, fence, `Arc` and spin hints.
#[cfg(all(test, loom))]
mod loom {
    use super::*;

    /// Every key has home bucket 0: one cluster, so a remove shifts the next entry back and a
    /// reader can race with an entry moving between buckets.
    fn same_home(_: &[u64]) -> u64 {
        0
    }

    /// A route whose every word depends on `(key, version)`, so a bucket image assembled from
    /// two different states (a torn read) decodes to a route that is not any legal one.
    fn route(key: u64, version: u32) -> ConnRoute {
        let v = u64::from(version);
        let bits = (u128::from(key) << 96) | (u128::from(v) << 64) | u128::from(key ^ (v << 8));
        ConnRoute {
            tuple: Some(SocketAddr::new(
                Ipv6Addr::from_bits(bits).into(),
                (key as u16) ^ (version as u16) << 8,
            )),
            owner: (key as u8) ^ (version as u8),
            index: (key as u32) << 8 | version,
            epoch_byte: version as u8,
        }
    }

    const A: u64 = 0xa;
    const B: u64 = 0xb;
    const C: u64 = 0xc;

    fn builder() -> ::loom::model::Builder {
        let mut b = ::loom::model::Builder::new();
        // Bounded so the run stays at seconds; loom's docs: most bugs need 2-3 preemptions.
        if b.preemption_bound.is_none() {
            b.preemption_bound = Some(3);
        }
        b
    }

    /// A remove that shifts another entry back, racing with a reader of both keys.
    ///
    /// Before: A at bucket 0, B at bucket 1 (both home 0). Writer: remove A (B moves to
    /// bucket 0, bucket 1 is cleared). Reader: B is present throughout, so `get(B)` must find
    /// it with its exact value; `get(A)` must be its value or nothing.
    #[test]
    fn remove_with_backward_shift() {
        builder().check(|| {
            let mut w = ConnWriter::with_hash(4, same_home);
            w.insert(A, route(A, 1)).unwrap();
            w.insert(B, route(B, 1)).unwrap();
            let r = w.reader();
            let writer = ::loom::thread::spawn(move || {
                assert_eq!(w.remove(A), Some(route(A, 1)));
                w
            });
            let reader = ::loom::thread::spawn(move || {
                assert_eq!(r.get(B), Some(route(B, 1)));
                let a = r.get(A);
                assert!(a.is_none() || a == Some(route(A, 1)), "A read as {a:?}");
            });
            reader.join().unwrap();
            let w = writer.join().unwrap();
            assert_eq!(w.get(A), None);
            assert_eq!(w.get(B), Some(route(B, 1)));
        });
    }

    /// An update in place and an insert of a new key into the same cluster, racing with a
    /// reader: B is always present with its old or new value (never a mix of the two), C is
    /// absent or complete.
    #[test]
    fn update_and_insert() {
        builder().check(|| {
            let mut w = ConnWriter::with_hash(4, same_home);
            w.insert(B, route(B, 1)).unwrap();
            let r = w.reader();
            let r_after = w.reader();
            let writer = ::loom::thread::spawn(move || {
                assert_eq!(w.insert(B, route(B, 2)), Ok(Some(route(B, 1))));
                assert_eq!(w.insert(C, route(C, 1)), Ok(None));
            });
            let reader = ::loom::thread::spawn(move || {
                let b = r.get(B);
                assert!(
                    b == Some(route(B, 1)) || b == Some(route(B, 2)),
                    "B read as {b:?}"
                );
                let c = r.get(C);
                assert!(c.is_none() || c == Some(route(C, 1)), "C read as {c:?}");
            });
            reader.join().unwrap();
            writer.join().unwrap();
            assert_eq!(r_after.get(B), Some(route(B, 2)));
            assert_eq!(r_after.get(C), Some(route(C, 1)));
        });
    }

    /// Two readers and a writer that removes and re-inserts: each reader sees A either
    /// absent or with one of its complete values, and B always.
    #[test]
    fn two_readers_remove_reinsert() {
        builder().check(|| {
            let mut w = ConnWriter::with_hash(4, same_home);
            w.insert(A, route(A, 1)).unwrap();
            w.insert(B, route(B, 1)).unwrap();
            let r2 = w.reader();
            let r = w.reader();
            let writer = ::loom::thread::spawn(move || {
                w.remove(A);
                w.insert(A, route(A, 2)).unwrap();
            });
            let reader = ::loom::thread::spawn(move || {
                let a = r2.get(A);
                assert!(
                    a.is_none() || a == Some(route(A, 1)) || a == Some(route(A, 2)),
                    "A read as {a:?}"
                );
            });
            assert_eq!(r.get(B), Some(route(B, 1)));
            writer.join().unwrap();
            reader.join().unwrap();
        });
    }
}
