//! The crash-safe connection registry store: a `redb` database in the state directory.
//!
//! Every registered connection (`epoch`, `x`) → (`conn_id`, `R`, `L`, tuple, host) is kept,
//! with the current epoch and the tick reservation (see `docs/persistence.md`). Writes come
//! from the slow path through a channel to one writer thread that commits them in batches,
//! so nothing on the per-packet path waits for a disk.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, TableDefinition};
use zeroize::Zeroizing;

use crate::rebind::RebindSecret;
use crate::registry::HostId;
use crate::time::Ticks;
use crate::wire::{MAX_TUPLE_LEN, emit_tuple, parse_tuple};

/// (epoch, index) → record.
const CONNS: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("connections");
/// Named u64 settings: "epoch", "reserved_ticks", "slots".
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// A connection as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredConn {
    pub epoch: u32,
    pub index: u32,
    pub conn_id: u64,
    pub secret: RebindSecret,
    pub last_rebind: Ticks,
    pub tuple: Option<SocketAddr>,
    pub host: HostId,
}

/// One change to the store.
#[derive(Clone, Debug)]
pub enum StoreOp {
    /// A new connection.
    Register(StoredConn),
    /// An accepted rebind: `L` and the tuple change.
    Rebind {
        epoch: u32,
        index: u32,
        last_rebind: Ticks,
        tuple: SocketAddr,
    },
    /// The connection lost its tuple to another one.
    Unbind {
        epoch: u32,
        index: u32,
    },
    Remove {
        epoch: u32,
        index: u32,
    },
    /// No gateway time at or below `ticks` was issued before this is committed.
    Reserve {
        ticks: Ticks,
    },
    SetEpoch {
        epoch: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the registry store {path}: {source}")]
    Open {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    #[error("registry store: {0}")]
    Db(String),
    #[error("registry store record ({epoch}, {index}) is corrupt")]
    Corrupt { epoch: u32, index: u32 },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// What a restart finds.
#[derive(Debug, Default)]
pub struct Loaded {
    pub epoch: Option<u32>,
    pub slots: Option<u64>,
    pub reserved: Ticks,
    pub conns: Vec<StoredConn>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Record layout: u64 conn_id || R(32) || u64 L || u16 host || u8 has_tuple || Tuple?
fn encode(c: &StoredConn) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(Vec::with_capacity(8 + 32 + 8 + 2 + 1 + MAX_TUPLE_LEN));
    v.extend_from_slice(&c.conn_id.to_be_bytes());
    v.extend_from_slice(&c.secret.0);
    v.extend_from_slice(&c.last_rebind.0.to_be_bytes());
    v.extend_from_slice(&c.host.to_be_bytes());
    push_tuple(&mut v, c.tuple.as_ref());
    v
}

fn push_tuple(v: &mut Vec<u8>, tuple: Option<&SocketAddr>) {
    match tuple {
        Some(t) => {
            v.push(1);
            let mut b = [0u8; MAX_TUPLE_LEN];
            let n = emit_tuple(t, &mut b);
            v.extend_from_slice(&b[..n]);
        }
        None => v.push(0),
    }
}

fn decode(epoch: u32, index: u32, b: &[u8]) -> Result<StoredConn, StoreError> {
    let corrupt = || StoreError::Corrupt { epoch, index };
    if b.len() < 51 {
        return Err(corrupt());
    }
    let tuple = match b[50] {
        0 if b.len() == 51 => None,
        1 => {
            let (t, n) = parse_tuple(&b[51..]).map_err(|_| corrupt())?;
            if 51 + n != b.len() {
                return Err(corrupt());
            }
            Some(t)
        }
        _ => return Err(corrupt()),
    };
    Ok(StoredConn {
        epoch,
        index,
        conn_id: u64::from_be_bytes(b[0..8].try_into().map_err(|_| corrupt())?),
        secret: RebindSecret(b[8..40].try_into().map_err(|_| corrupt())?),
        last_rebind: Ticks(u64::from_be_bytes(
            b[40..48].try_into().map_err(|_| corrupt())?,
        )),
        host: u16::from_be_bytes([b[48], b[49]]),
        tuple,
    })
}

impl Store {
    /// Opens or creates `DIR/registry.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("registry.redb");
        let db = Database::builder()
            // Small cache: the registry is read once at start-up and then only written.
            .set_cache_size(4 << 20)
            .create(&path)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(CONNS).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Store { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything stored.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let get = |k: &str| -> Result<Option<u64>, StoreError> {
            Ok(meta.get(k).map_err(db_err)?.map(|v| v.value()))
        };
        let mut loaded = Loaded {
            epoch: get("epoch")?.map(|e| e as u32),
            slots: get("slots")?,
            reserved: Ticks(get("reserved_ticks")?.unwrap_or(0)),
            conns: Vec::new(),
        };
        let conns = txn.open_table(CONNS).map_err(db_err)?;
        for row in conns.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let (epoch, index) = k.value();
            loaded.conns.push(decode(epoch, index, v.value())?);
        }
        Ok(loaded)
    }

    /// Records S once; a later start with another S must not reuse the registry.
    pub fn set_slots(&self, slots: u64) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        txn.open_table(META)
            .map_err(db_err)?
            .insert("slots", slots)
            .map_err(db_err)?;
        txn.commit().map_err(db_err)
    }

    /// Applies `ops` in one durable transaction.
    pub fn apply(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db_err)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut conns = txn.open_table(CONNS).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            for op in ops {
                match op {
                    StoreOp::Register(c) => {
                        conns
                            .insert((c.epoch, c.index), &encode(c)[..])
                            .map_err(db_err)?;
                    }
                    StoreOp::Rebind {
                        epoch,
                        index,
                        last_rebind,
                        tuple,
                    } => {
                        let updated = match conns.get((*epoch, *index)).map_err(db_err)? {
                            Some(old) => {
                                let mut c = decode(*epoch, *index, old.value())?;
                                c.last_rebind = *last_rebind;
                                c.tuple = Some(*tuple);
                                Some(encode(&c))
                            }
                            // Closed meanwhile: nothing to update.
                            None => None,
                        };
                        if let Some(rec) = updated {
                            conns.insert((*epoch, *index), &rec[..]).map_err(db_err)?;
                        }
                    }
                    StoreOp::Unbind { epoch, index } => {
                        let updated = match conns.get((*epoch, *index)).map_err(db_err)? {
                            Some(old) => {
                                let mut c = decode(*epoch, *index, old.value())?;
                                c.tuple = None;
                                Some(encode(&c))
                            }
                            None => None,
                        };
                        if let Some(rec) = updated {
                            conns.insert((*epoch, *index), &rec[..]).map_err(db_err)?;
                        }
                    }
                    StoreOp::Remove { epoch, index } => {
                        conns.remove((*epoch, *index)).map_err(db_err)?;
                    }
                    StoreOp::Reserve { ticks } => {
                        meta.insert("reserved_ticks", ticks.0).map_err(db_err)?;
                    }
                    StoreOp::SetEpoch { epoch } => {
                        meta.insert("epoch", u64::from(*epoch)).map_err(db_err)?;
                    }
                }
            }
        }
        txn.commit().map_err(db_err)
    }
}

/// Commit statistics the writer thread publishes.
#[derive(Debug, Default, Clone)]
pub struct WriterStats {
    pub commits: u64,
    pub ops: u64,
    pub errors: u64,
}

/// Runs the writer: drains `rx` in batches (up to `max_batch` ops or `linger`), commits each
/// batch, reports every commit's latency through `on_commit`, and returns when every sender
/// is gone and the queue is flushed.
pub fn run_writer(
    store: &Store,
    rx: crossbeam::channel::Receiver<StoreOp>,
    max_batch: usize,
    linger: Duration,
    mut on_commit: impl FnMut(Duration, usize, Result<(), &StoreError>),
) -> WriterStats {
    let mut stats = WriterStats::default();
    let mut batch = Vec::with_capacity(max_batch);
    let mut warn = crate::logging::LogEvery::new(Duration::from_secs(10));
    while let Ok(first) = rx.recv() {
        batch.push(first);
        let deadline = Instant::now() + linger;
        while batch.len() < max_batch {
            match rx.recv_deadline(deadline) {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let start = Instant::now();
        let result = store.apply(&batch);
        on_commit(start.elapsed(), batch.len(), result.as_ref().map(|_| ()));
        match result {
            Ok(()) => {
                stats.commits += 1;
                stats.ops += batch.len() as u64;
            }
            Err(e) => {
                stats.errors += 1;
                if let Some(held_back) = warn.check(Instant::now()) {
                    tracing::error!(error = %e, ops = batch.len(), held_back, "registry store commit failed");
                }
            }
        }
        batch.clear();
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(index: u32, tuple: Option<&str>) -> StoredConn {
        StoredConn {
            epoch: 1,
            index,
            conn_id: 1000 + u64::from(index),
            secret: RebindSecret([index as u8; 32]),
            last_rebind: Ticks(0),
            tuple: tuple.map(|t| t.parse().unwrap()),
            host: 2,
        }
    }

    #[test]
    fn ops_survive_reopen() {
        let dir = tempdir();
        {
            let s = Store::open(&dir).unwrap();
            s.apply(&[
                StoreOp::SetEpoch { epoch: 1 },
                StoreOp::Register(conn(0, Some("10.0.0.1:5"))),
                StoreOp::Register(conn(1, None)),
                StoreOp::Register(conn(2, Some("[2001:db8::1]:9"))),
                StoreOp::Rebind {
                    epoch: 1,
                    index: 1,
                    last_rebind: Ticks(77),
                    tuple: "10.0.0.2:6".parse().unwrap(),
                },
                StoreOp::Unbind { epoch: 1, index: 0 },
                StoreOp::Remove { epoch: 1, index: 2 },
                StoreOp::Rebind {
                    epoch: 1,
                    index: 9,
                    last_rebind: Ticks(1),
                    tuple: "10.0.0.2:6".parse().unwrap(),
                },
                StoreOp::Reserve { ticks: Ticks(500) },
            ])
            .unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let l = s.load().unwrap();
        assert_eq!(l.epoch, Some(1));
        assert_eq!(l.reserved, Ticks(500));
        let mut want1 = conn(1, Some("10.0.0.2:6"));
        want1.last_rebind = Ticks(77);
        assert_eq!(l.conns, vec![conn(0, None), want1]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn writer_batches_and_flushes_on_close() {
        let dir = tempdir();
        let s = Store::open(&dir).unwrap();
        let (tx, rx) = crossbeam::channel::unbounded();
        for i in 0..500 {
            tx.send(StoreOp::Register(conn(i, Some("10.0.0.1:5"))))
                .unwrap();
        }
        drop(tx);
        let mut commits = 0;
        let stats = run_writer(&s, rx, 128, Duration::from_millis(5), |_, _, r| {
            assert!(r.is_ok());
            commits += 1;
        });
        assert_eq!(stats.ops, 500);
        assert!((4..=500).contains(&commits));
        assert_eq!(s.load().unwrap().conns.len(), 500);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn corrupt_records_are_errors() {
        assert!(decode(1, 1, &[0u8; 10]).is_err());
        let mut b = encode(&conn(1, None)).to_vec();
        b[50] = 7;
        assert!(decode(1, 1, &b).is_err());
        let mut b = encode(&conn(1, Some("10.0.0.1:5"))).to_vec();
        b.push(0);
        assert!(decode(1, 1, &b).is_err());
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "rebindgw-store-{}-{}",
            std::process::id(),
            crate::crypto::random_array::<8>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
