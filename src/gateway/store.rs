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
/// Named u64 settings: "epoch", "reserved_ticks", "slots", "grace_until" (ticks; absent or 0:
/// no previous epoch is kept), "rotated_at" (ticks; when the current epoch started).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Records `--set-aside-corrupt` moved out of `connections`, as they were stored.
const QUARANTINE: TableDefinition<(u32, u32), &[u8]> = TableDefinition::new("quarantine");
/// The registry file's name in the state directory.
pub const REGISTRY_FILE: &str = "registry.redb";

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
        /// The connection removed (cluster mode removes only if the index still holds it).
        conn_id: u64,
    },
    /// No gateway time at or below `ticks` was issued before this is committed.
    Reserve {
        ticks: Ticks,
    },
    SetEpoch {
        epoch: u32,
    },
    /// A rotation, as one op so it lands in one transaction: `epoch` becomes the current
    /// epoch, the previous one is accepted until `grace_until`, every record of `drop`
    /// (the epoch the rotation stops accepting, if any) is removed, and `register` (every
    /// live connection, registered anew in `epoch` for key delivery) is added.
    Rotate {
        epoch: u32,
        /// When the rotation happened (the schedule counts from it).
        at: Ticks,
        grace_until: Ticks,
        drop: Option<u32>,
        register: Vec<StoredConn>,
    },
    /// The grace period of `epoch` (the previous one) is over: its records go.
    EndGrace {
        epoch: u32,
    },
    /// The first start of a gateway that never rotated: the schedule counts from `at`.
    ScheduleFrom {
        at: Ticks,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The source names the file and the cause.
    #[error("registry store")]
    Open {
        path: PathBuf,
        source: crate::secrets::SecretFileError,
    },
    #[error("cannot open the registry store {path}")]
    Db {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    /// The file cannot be read as a registry at all.
    #[error(
        "the registry store {path} is damaged ({detail}); restore it from a backup, or start \
         with `--set-aside-corrupt` to move it aside and start with an empty registry"
    )]
    Damaged { path: PathBuf, detail: String },
    /// Some records cannot be restored.
    #[error(
        "the registry store {path} holds {count} damaged connection record(s), the first \
         ({epoch}, {index}): {problem}; start with `--set-aside-corrupt` to move them into its \
         `quarantine` table and start with the good ones"
    )]
    BadRecords {
        path: PathBuf,
        count: usize,
        epoch: u32,
        index: u32,
        problem: String,
    },
    #[error(
        "the registry store {path} was made with S = {stored}, but `slots` is {configured}; \
         use that S or a new state directory"
    )]
    SlotsChanged {
        path: PathBuf,
        stored: u64,
        configured: usize,
    },
    #[error("cannot move the damaged registry store {path} aside to {to}")]
    MoveAside {
        path: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error("registry store: {0}")]
    Write(String),
    #[error("registry store record ({epoch}, {index}) is corrupt: {problem}")]
    Corrupt {
        epoch: u32,
        index: u32,
        problem: &'static str,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Write(e.to_string())
}

/// Sorts a redb error met while opening or reading: damage to the file, or another failure
/// (I/O, locking) that moving the file aside would not cure.
fn classify(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    let damaged = match &e {
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. } => true,
        redb::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        ),
        _ => false,
    };
    if damaged {
        StoreError::Damaged {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    } else {
        StoreError::Db {
            path: path.to_path_buf(),
            source: Box::new(e),
        }
    }
}

/// Runs `f`, which reads the file through redb, turning a panic into [`StoreError::Damaged`]:
/// redb 2 asserts on some damaged files (a truncated one, for example) instead of returning
/// an error.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the storage library gave up reading it".into());
        Err(StoreError::Damaged {
            path: path.to_path_buf(),
            detail,
        })
    })
}

/// What a restart finds.
#[derive(Debug, Default)]
pub struct Loaded {
    pub epoch: Option<u32>,
    pub slots: Option<u64>,
    pub reserved: Ticks,
    /// Until when the previous epoch is accepted (zero: no previous epoch).
    pub grace_until: Ticks,
    /// When the current epoch started (zero: unknown, never rotated).
    pub rotated_at: Ticks,
    pub conns: Vec<StoredConn>,
    /// Damaged records moved into the `quarantine` table by this load.
    pub set_aside: usize,
    /// Where an unreadable registry file was moved (the registry then starts empty).
    pub moved_aside: Option<PathBuf>,
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
    let corrupt = |problem| StoreError::Corrupt {
        epoch,
        index,
        problem,
    };
    let (Some(conn_id), Some(secret), Some(last), Some(host), Some(&flag)) = (
        b.get(0..8),
        b.get(8..40),
        b.get(40..48),
        b.get(48..50),
        b.get(50),
    ) else {
        return Err(corrupt("shorter than the 51 bytes of a record"));
    };
    let tuple = match flag {
        0 if b.len() == 51 => None,
        0 => return Err(corrupt("bytes after a record without a tuple")),
        1 => {
            let (t, n) = parse_tuple(&b[51..]).map_err(|_| corrupt("the tuple is malformed"))?;
            if 51 + n != b.len() {
                return Err(corrupt("bytes after the tuple"));
            }
            Some(t)
        }
        _ => return Err(corrupt("the tuple flag is neither 0 nor 1")),
    };
    let mut r = [0u8; 32];
    r.copy_from_slice(secret);
    let mut c = [0u8; 8];
    c.copy_from_slice(conn_id);
    let mut l = [0u8; 8];
    l.copy_from_slice(last);
    Ok(StoredConn {
        epoch,
        index,
        conn_id: u64::from_be_bytes(c),
        secret: RebindSecret(r),
        last_rebind: Ticks(u64::from_be_bytes(l)),
        host: u16::from_be_bytes([host[0], host[1]]),
        tuple,
    })
}

/// Why a decoded record cannot be restored, if it cannot: its index must lie in 2^S and its
/// epoch be the current one or the one before (kept during a rotation's grace).
fn check_record(c: &StoredConn, slots: usize, epoch: u32) -> Option<String> {
    if slots < 64 && u64::from(c.index) >= 1u64 << slots {
        return Some(format!(
            "index {} is outside the index space 2^{slots}",
            c.index
        ));
    }
    if c.epoch != epoch && c.epoch != epoch.wrapping_sub(1) {
        return Some(format!(
            "epoch {} is neither the stored epoch {epoch} nor the one before it",
            c.epoch
        ));
    }
    None
}

impl Store {
    /// Opens or creates `DIR/registry.redb`. The file is created 0600 whatever the umask, is
    /// opened without following a symbolic link, must belong to this process's user, and is
    /// narrowed to 0600 (with a warning) if group or others could read it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(REGISTRY_FILE);
        let (file, widened) =
            crate::secrets::open_private_rw(&path).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        if let Some(mode) = widened {
            tracing::warn!(
                file = %path.display(),
                mode = format_args!("{mode:o}"),
                "the registry file (it holds every connection's secret R) was readable \
                 beyond its owner; narrowed it to 0600"
            );
        }
        guarded(&path, || {
            let db = Database::builder()
                // Small cache: the registry is read once at start-up and then only written.
                .set_cache_size(4 << 20)
                .create_file(file)
                .map_err(|e| classify(&path, e))?;
            let txn = db.begin_write().map_err(|e| classify(&path, e))?;
            txn.open_table(CONNS).map_err(|e| classify(&path, e))?;
            txn.open_table(META).map_err(|e| classify(&path, e))?;
            txn.commit().map_err(|e| classify(&path, e))?;
            Ok(Store {
                db,
                path: path.clone(),
            })
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Everything stored, for a gateway with S = `slots`. A record that cannot be restored
    /// (malformed, index outside 2^S, a foreign epoch) is an error, unless `set_aside`: then
    /// such records move into the `quarantine` table and the rest load.
    pub fn load(&self, slots: usize, set_aside: bool) -> Result<Loaded, StoreError> {
        let path = &self.path;
        let mut bad: Vec<(u32, u32, String)> = Vec::new();
        let mut loaded = guarded(path, || {
            let txn = self.db.begin_read().map_err(|e| classify(path, e))?;
            let meta = txn.open_table(META).map_err(|e| classify(path, e))?;
            let get = |k: &str| -> Result<Option<u64>, StoreError> {
                Ok(meta
                    .get(k)
                    .map_err(|e| classify(path, e))?
                    .map(|v| v.value()))
            };
            let epoch = match get("epoch")? {
                None => None,
                Some(e) => Some(u32::try_from(e).map_err(|_| StoreError::Damaged {
                    path: path.clone(),
                    detail: format!("the stored epoch {e} does not fit 32 bits"),
                })?),
            };
            let stored_slots = get("slots")?;
            if let Some(stored) = stored_slots
                && stored != slots as u64
            {
                return Err(StoreError::SlotsChanged {
                    path: path.clone(),
                    stored,
                    configured: slots,
                });
            }
            let mut loaded = Loaded {
                epoch,
                slots: stored_slots,
                reserved: Ticks(get("reserved_ticks")?.unwrap_or(0)),
                grace_until: Ticks(get("grace_until")?.unwrap_or(0)),
                rotated_at: Ticks(get("rotated_at")?.unwrap_or(0)),
                ..Loaded::default()
            };
            let current = epoch.unwrap_or(1);
            let mut ids = std::collections::HashSet::new();
            let conns = txn.open_table(CONNS).map_err(|e| classify(path, e))?;
            for row in conns.iter().map_err(|e| classify(path, e))? {
                let (k, v) = row.map_err(|e| classify(path, e))?;
                let (epoch, index) = k.value();
                let problem = match decode(epoch, index, v.value()) {
                    Err(StoreError::Corrupt { problem, .. }) => Some(problem.to_string()),
                    Err(e) => Some(e.to_string()),
                    Ok(c) => match check_record(&c, slots, current) {
                        Some(p) => Some(p),
                        // A rotation registers a connection in the new epoch too (key
                        // delivery): unique per epoch.
                        None if !ids.insert((c.epoch, c.conn_id)) => {
                            Some("its connection ID is another record's".to_string())
                        }
                        None => {
                            loaded.conns.push(c);
                            None
                        }
                    },
                };
                if let Some(p) = problem {
                    bad.push((epoch, index, p));
                }
            }
            Ok(loaded)
        })?;
        let Some((epoch, index, problem)) = bad.first().cloned() else {
            return Ok(loaded);
        };
        if !set_aside {
            return Err(StoreError::BadRecords {
                path: path.clone(),
                count: bad.len(),
                epoch,
                index,
                problem,
            });
        }
        guarded(path, || {
            let txn = self.db.begin_write().map_err(|e| classify(path, e))?;
            {
                let mut conns = txn.open_table(CONNS).map_err(|e| classify(path, e))?;
                let mut quarantine = txn.open_table(QUARANTINE).map_err(|e| classify(path, e))?;
                for (epoch, index, _) in &bad {
                    let raw = conns
                        .remove((*epoch, *index))
                        .map_err(|e| classify(path, e))?
                        .map(|v| Zeroizing::new(v.value().to_vec()));
                    if let Some(raw) = raw {
                        quarantine
                            .insert((*epoch, *index), &raw[..])
                            .map_err(|e| classify(path, e))?;
                    }
                }
            }
            txn.commit().map_err(|e| classify(path, e))
        })?;
        for (epoch, index, problem) in bad.iter().take(10) {
            tracing::warn!(epoch, index, problem = %problem, "damaged registry record set aside");
        }
        tracing::warn!(
            count = bad.len(),
            file = %path.display(),
            "set aside damaged registry records into the `quarantine` table; those connections \
             must handshake again"
        );
        loaded.set_aside = bad.len();
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
                    StoreOp::Remove { epoch, index, .. } => {
                        conns.remove((*epoch, *index)).map_err(db_err)?;
                    }
                    StoreOp::Reserve { ticks } => {
                        meta.insert("reserved_ticks", ticks.0).map_err(db_err)?;
                    }
                    StoreOp::SetEpoch { epoch } => {
                        meta.insert("epoch", u64::from(*epoch)).map_err(db_err)?;
                    }
                    StoreOp::Rotate {
                        epoch,
                        at,
                        grace_until,
                        drop,
                        register,
                    } => {
                        meta.insert("rotated_at", at.0).map_err(db_err)?;
                        if let Some(d) = drop {
                            remove_epoch(&mut conns, *d)?;
                        }
                        for c in register {
                            conns
                                .insert((c.epoch, c.index), &encode(c)[..])
                                .map_err(db_err)?;
                        }
                        meta.insert("epoch", u64::from(*epoch)).map_err(db_err)?;
                        meta.insert("grace_until", grace_until.0).map_err(db_err)?;
                    }
                    StoreOp::EndGrace { epoch } => {
                        remove_epoch(&mut conns, *epoch)?;
                        meta.insert("grace_until", 0).map_err(db_err)?;
                    }
                    StoreOp::ScheduleFrom { at } => {
                        meta.insert("rotated_at", at.0).map_err(db_err)?;
                    }
                }
            }
        }
        txn.commit().map_err(db_err)
    }
}

/// Removes every record of `epoch`.
fn remove_epoch(
    conns: &mut redb::Table<'_, (u32, u32), &[u8]>,
    epoch: u32,
) -> Result<(), StoreError> {
    let keys: Vec<(u32, u32)> = conns
        .range((epoch, 0)..=(epoch, u32::MAX))
        .map_err(db_err)?
        .map(|row| row.map(|(k, _)| k.value()))
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    for k in keys {
        conns.remove(k).map_err(db_err)?;
    }
    Ok(())
}

/// Opens and loads `DIR/registry.redb` (see [`Store::open`] and [`Store::load`]). With
/// `set_aside`, a file that cannot be read at all is renamed to
/// `registry.corrupt-<unix seconds>.redb` beside it and the gateway starts with an empty
/// registry.
pub fn open_and_load(
    dir: &Path,
    slots: usize,
    set_aside: bool,
) -> Result<(Store, Loaded), StoreError> {
    let attempt = || -> Result<(Store, Loaded), StoreError> {
        let store = Store::open(dir)?;
        let loaded = store.load(slots, set_aside)?;
        Ok((store, loaded))
    };
    match attempt() {
        Err(StoreError::Damaged { path, detail }) if set_aside => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let to = dir.join(format!("registry.corrupt-{secs}.redb"));
            std::fs::rename(&path, &to).map_err(|source| StoreError::MoveAside {
                path: path.clone(),
                to: to.clone(),
                source,
            })?;
            tracing::error!(
                file = %path.display(),
                moved_to = %to.display(),
                damage = %detail,
                "THE REGISTRY FILE IS UNREADABLE: moved it aside and STARTING WITH AN EMPTY \
                 REGISTRY; every client must handshake again"
            );
            let (store, mut loaded) = attempt()?;
            loaded.moved_aside = Some(to);
            Ok((store, loaded))
        }
        other => other,
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
                StoreOp::Remove {
                    epoch: 1,
                    index: 2,
                    conn_id: 0,
                },
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
        let l = s.load(12, false).unwrap();
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
        assert_eq!(s.load(12, false).unwrap().conns.len(), 500);
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

    /// A `connections` row as stored: (epoch, index) and the record's bytes.
    type RawRow = ((u32, u32), Vec<u8>);

    /// Opens DIR's registry and loads it for S = 12.
    fn open_load(dir: &Path, set_aside: bool) -> Result<Loaded, StoreError> {
        open_and_load(dir, 12, set_aside).map(|(_, l)| l)
    }

    fn write_raw(dir: &Path, epoch: u64, rows: &[RawRow]) {
        let db = Database::create(dir.join("registry.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert("epoch", epoch).unwrap();
            meta.insert("slots", 12).unwrap();
            let mut conns = txn.open_table(CONNS).unwrap();
            for (k, v) in rows {
                conns.insert(*k, &v[..]).unwrap();
            }
        }
        txn.commit().unwrap();
    }

    /// A good record, and one of each kind of damage a valid redb file can hold.
    fn good_and_bad() -> (Vec<RawRow>, usize) {
        let good = |i: u32| ((1, i), encode(&conn(i, Some("10.0.0.1:5"))).to_vec());
        let mut short = encode(&conn(2, None)).to_vec();
        short.truncate(30);
        let mut flag = encode(&conn(3, None)).to_vec();
        flag[50] = 9;
        let mut tuple = encode(&conn(4, Some("10.0.0.1:5"))).to_vec();
        tuple[51] = 0xee; // not an address family
        let mut trailing = encode(&conn(5, None)).to_vec();
        trailing.push(1);
        let rows = vec![
            good(0),
            good(1),
            ((1, 2), short),
            ((1, 3), flag),
            ((1, 4), tuple),
            ((1, 5), trailing),
            // Index 5000 is outside 2^12.
            ((1, 5000), encode(&conn(6, None)).to_vec()),
            // Epoch 7 is neither the stored epoch (1) nor the one before it.
            ((7, 8), encode(&conn(8, None)).to_vec()),
        ];
        (rows, 6)
    }

    #[test]
    fn store_open_errors_show_the_os_error_once() {
        let dir = tempdir();
        std::fs::create_dir(dir.join(REGISTRY_FILE)).unwrap();
        let shown = format!("{:#}", anyhow::Error::from(Store::open(&dir).unwrap_err()));
        assert_eq!(shown.matches("Is a directory").count(), 1, "{shown}");
        assert_eq!(shown.matches("registry.redb").count(), 1, "{shown}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn registry_file_is_created_0600_and_narrowed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempdir();
        let path = dir.join("registry.redb");
        drop(Store::open(&dir).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Store::open(&dir).unwrap());
        assert_eq!(mode(&path), 0o600);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn damaged_files_are_clear_errors_not_panics() {
        let dir = tempdir();
        {
            let s = Store::open(&dir).unwrap();
            let mut ops = vec![StoreOp::SetEpoch { epoch: 1 }];
            ops.extend((0..300).map(|i| StoreOp::Register(conn(i, Some("10.0.0.1:5")))));
            s.apply(&ops).unwrap();
        }
        let good = std::fs::read(dir.join("registry.redb")).unwrap();
        let mut variants: Vec<Vec<u8>> = (1..40)
            .map(|k| good[..good.len() * k / 40].to_vec())
            .collect();
        variants.push((0..5000u32).map(|i| (i * 7 % 251) as u8).collect());
        variants.push(vec![0xff; 4096]);
        let d2 = tempdir();
        for (n, v) in variants.iter().enumerate() {
            std::fs::write(d2.join("registry.redb"), v).unwrap();
            match open_load(&d2, false) {
                Ok(l) => panic!(
                    "variant {n} ({} bytes) loaded {} records",
                    v.len(),
                    l.conns.len()
                ),
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("damaged")
                            && e.contains("--set-aside-corrupt")
                            && e.contains("registry.redb"),
                        "variant {n}: {e}"
                    );
                }
            }
        }
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(&d2).ok();
    }

    #[test]
    fn malformed_records_are_clear_errors() {
        let (rows, _) = good_and_bad();
        for bad in &rows[2..] {
            let dir = tempdir();
            write_raw(&dir, 1, &[rows[0].clone(), bad.clone()]);
            let e = open_load(&dir, false).unwrap_err().to_string();
            let (epoch, index) = bad.0;
            assert!(
                e.contains(&format!("({epoch}, {index})"))
                    && e.contains("--set-aside-corrupt")
                    && e.contains("1 damaged"),
                "{e}"
            );
            std::fs::remove_dir_all(&dir).ok();
        }
    }

    #[test]
    fn set_aside_keeps_good_records_and_quarantines_bad_ones() {
        let dir = tempdir();
        let (rows, bad) = good_and_bad();
        write_raw(&dir, 1, &rows);
        let l = open_load(&dir, true).unwrap();
        assert_eq!(l.conns.len(), 2);
        assert_eq!(l.set_aside, bad);
        // They are gone from the connections, kept in `quarantine`, and a strict load is clean.
        let l = open_load(&dir, false).unwrap();
        assert_eq!(l.conns.len(), 2);
        use redb::ReadableTableMetadata;
        let db = Database::create(dir.join("registry.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(
            txn.open_table(QUARANTINE).unwrap().len().unwrap(),
            bad as u64
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn set_aside_moves_an_unreadable_file_and_starts_empty() {
        let dir = tempdir();
        let junk: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("registry.redb"), &junk).unwrap();
        let l = open_load(&dir, true).unwrap();
        assert!(l.conns.is_empty());
        let moved = l.moved_aside.expect("the damaged file moved aside");
        assert!(
            moved
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("registry.corrupt-"),
            "{moved:?}"
        );
        assert_eq!(std::fs::read(&moved).unwrap(), junk);
        open_load(&dir, false).unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A rotation is one op: the epoch, its grace deadline and the removal of the epoch it
    /// stops accepting land together, so a restart never finds records of a foreign epoch.
    #[test]
    fn rotations_drop_the_epoch_they_stop_accepting() {
        let dir = tempdir();
        let at = |epoch: u32, index: u32| StoredConn {
            epoch,
            conn_id: u64::from(epoch) << 32 | u64::from(index),
            ..conn(index, None)
        };
        {
            let s = Store::open(&dir).unwrap();
            s.apply(&[StoreOp::ScheduleFrom { at: Ticks(5) }]).unwrap();
            assert_eq!(s.load(12, false).unwrap().rotated_at, Ticks(5));
            s.apply(&[
                StoreOp::SetEpoch { epoch: 1 },
                StoreOp::Register(at(1, 0)),
                StoreOp::Register(at(1, 5)),
                StoreOp::Rotate {
                    epoch: 2,
                    at: Ticks(10),
                    grace_until: Ticks(1_000),
                    drop: None,
                    // The connection registered anew for key delivery lands with it.
                    register: vec![at(2, 3)],
                },
            ])
            .unwrap();
            let l = s.load(12, false).unwrap();
            assert_eq!((l.epoch, l.grace_until), (Some(2), Ticks(1_000)));
            assert_eq!(l.conns.len(), 3);
            s.apply(&[StoreOp::Rotate {
                epoch: 3,
                at: Ticks(20),
                grace_until: Ticks(2_000),
                drop: Some(1),
                register: Vec::new(),
            }])
            .unwrap();
        }
        let s = Store::open(&dir).unwrap();
        let l = s
            .load(12, false)
            .expect("no record of a foreign epoch is left");
        assert_eq!((l.epoch, l.grace_until), (Some(3), Ticks(2_000)));
        assert_eq!(l.rotated_at, Ticks(20));
        assert_eq!(l.conns, vec![at(2, 3)]);
        s.apply(&[StoreOp::EndGrace { epoch: 2 }]).unwrap();
        let l = s.load(12, false).unwrap();
        assert_eq!((l.epoch, l.grace_until), (Some(3), Ticks(0)));
        assert!(l.conns.is_empty());
        std::fs::remove_dir_all(&dir).ok();
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
