//! The cluster's registry in etcd v3 (feature `cluster`): range read and watch into a
//! [`Mirror`], race-free index allocation and compare-and-swap REBIND commits, and the
//! gateway's lease. Async (the etcd client is tonic); the gateway runs it on a thread of its
//! own, so the packet path never waits on it.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions, WatchResponse, Watcher,
};

pub use etcd_client::WatchStream;

use super::mirror::{Change, Entry, Mirror};
use super::record::{ConnRecord, EpochRecord, GatewayId, conn_key, conn_prefix, epoch_key};

/// HTTP/2 keep-alive pings on the etcd connection: above etcd's default minimum of 5 s.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Records per page of a registry read (about 150 bytes each: far below the 4 MiB limit).
pub const RANGE_PAGE: i64 = 4096;

/// Most REBIND commits in one etcd transaction (etcd's default `--max-txn-ops` is 128).
pub const MAX_COMMITS_PER_TXN: usize = 64;

/// An etcd failure, with what the gateway was doing.
#[derive(Debug, thiserror::Error)]
#[error("etcd: {what}: {source}")]
pub struct ClusterError {
    what: &'static str,
    #[source]
    source: etcd_client::Error,
}

fn ctx(what: &'static str) -> impl FnOnce(etcd_client::Error) -> ClusterError {
    move |source| ClusterError { what, source }
}

/// How a REGISTER's index allocation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// The record was created at `revision`: the index is this connection's.
    Done { revision: i64 },
    /// Another gateway created a record at that index first: pick another.
    Taken,
}

/// How a REBIND commit ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Written at `revision`: send REBIND_ACK and REBOUND.
    Done { revision: i64 },
    /// The record changed since the mirror read it (another gateway accepted a REBIND of the
    /// connection, or it was removed): `current` is what etcd holds now. Send nothing.
    Conflict { current: Option<Entry> },
}

/// A record of an epoch whose grace is over, to delete if unchanged since `expected`.
#[derive(Clone, Debug)]
pub struct Retire {
    pub epoch: u32,
    pub index: u32,
    pub expected: i64,
    /// The connection's record in the next epoch, rewritten in the same transaction.
    pub adopt: Option<Adopt>,
}

/// The next epoch's record of a retired connection that this gateway forwards: its tuple
/// and owner move there (the store's side of the core's migration at the end of grace).
#[derive(Clone, Debug)]
pub struct Adopt {
    pub epoch: u32,
    pub index: u32,
    pub expected: i64,
    pub record: ConnRecord,
}

/// How a rotation's transaction ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpochRotated {
    /// The new record is stored at `revision`: every gateway's watch switches to it.
    Won { revision: i64 },
    /// The record changed since it was read (another gateway rotated first): `current` is
    /// what etcd holds now.
    Lost {
        current: EpochRecord,
        mod_revision: i64,
    },
}

#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
    me: GatewayId,
}

impl EtcdRegistry {
    /// Connects to the cluster's etcd endpoints (`http://host:port`, several for failover).
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        me: GatewayId,
        timeout: Duration,
    ) -> Result<EtcdRegistry, ClusterError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            // etcd answers pings more often than every 5 s (its default
            // --grpc-keepalive-min-time) with GOAWAY, which broke the watch every 15 s.
            .with_keep_alive(KEEP_ALIVE_INTERVAL, timeout.max(Duration::from_secs(2)));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(ctx("connecting"))?;
        Ok(EtcdRegistry {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            me,
        })
    }

    pub fn gateway(&self) -> GatewayId {
        self.me
    }

    /// Every connection record, as changes, and the revision of the read. Read in pages of
    /// [`RANGE_PAGE`] records at one revision (a consistent snapshot): one response holding a
    /// 65,536-connection registry is larger than the client's 4 MiB message limit.
    ///
    /// Each page's request has `page_timeout` of its own: a whole registry (two epochs of
    /// 65,536 records during a rotation's grace is 32 pages) takes longer than one request
    /// may, and a bound on the whole read would keep a large registry from ever loading.
    pub async fn read_all(
        &mut self,
        page_timeout: Duration,
    ) -> Result<(Vec<Change>, i64), ClusterError> {
        let prefix = conn_prefix(&self.prefix).into_bytes();
        // The first key after every key that starts with the prefix ('/' is not 0xff).
        let mut end = prefix.clone();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let mut from = prefix;
        let mut revision = 0;
        let mut changes = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(RANGE_PAGE);
            if revision != 0 {
                options = options.with_revision(revision);
            }
            let mut resp =
                tokio::time::timeout(page_timeout, self.client.get(from.clone(), Some(options)))
                    .await
                    .map_err(|_| ClusterError {
                        what: "reading the registry",
                        source: etcd_client::Error::IoError(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("a page took over {} ms", page_timeout.as_millis()),
                        )),
                    })?
                    .map_err(ctx("reading the registry"))?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last() else { break };
            // The next page starts just after this page's last key.
            from = last.key().to_vec();
            from.push(0);
            changes.extend(kvs.into_iter().map(|kv| {
                let mod_revision = kv.mod_revision();
                let (key, value) = kv.into_key_value();
                Change::Put {
                    key,
                    value,
                    mod_revision,
                }
            }));
            if !more {
                break;
            }
        }
        Ok((changes, revision))
    }

    /// Reads every connection record into `mirror` (at start).
    pub async fn load(
        &mut self,
        mirror: &mut Mirror,
        page_timeout: Duration,
    ) -> Result<(), ClusterError> {
        let (changes, revision) = self.read_all(page_timeout).await?;
        for c in changes {
            mirror.apply(c);
        }
        mirror.advance(revision);
        Ok(())
    }

    /// Watches every connection record and the epoch record (one range: `<prefix>/conn/`
    /// sorts before `<prefix>/epoch`, and nothing else lies between) from the revision after
    /// `after` (a mirror's [`Mirror::revision`]).
    pub async fn watch(&mut self, after: i64) -> Result<(Watcher, WatchStream), ClusterError> {
        let mut end = epoch_key(&self.prefix).into_bytes();
        end.push(0);
        self.client
            .watch(
                conn_prefix(&self.prefix),
                Some(
                    WatchOptions::new()
                        .with_range(end)
                        .with_start_revision(after + 1),
                ),
            )
            .await
            .map_err(ctx("watching the registry"))
    }

    /// The key of the epoch record.
    pub fn epoch_key(&self) -> String {
        epoch_key(&self.prefix)
    }

    /// The changes of one watch response, in order, and its header revision.
    pub fn changes(resp: &WatchResponse) -> (Vec<Change>, i64) {
        let changes = resp
            .events()
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                Some(match ev.event_type() {
                    etcd_client::EventType::Put => Change::Put {
                        key: kv.key().to_vec(),
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                    etcd_client::EventType::Delete => Change::Delete {
                        key: kv.key().to_vec(),
                        mod_revision: kv.mod_revision(),
                    },
                })
            })
            .collect();
        (changes, resp.header().map_or(0, |h| h.revision()))
    }

    /// Creates the record of a new connection at `(epoch, index)` if no gateway has: one
    /// transaction comparing the key's create revision with 0 (absent).
    pub async fn register(
        &mut self,
        epoch: u32,
        index: u32,
        record: &ConnRecord,
    ) -> Result<Registered, ClusterError> {
        let key = conn_key(&self.prefix, epoch, index);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, record.encode(), None)]);
        let resp = self
            .client
            .txn(txn)
            .await
            .map_err(ctx("registering a connection"))?;
        Ok(if resp.succeeded() {
            Registered::Done {
                revision: resp.header().map_or(0, |h| h.revision()),
            }
        } else {
            Registered::Taken
        })
    }

    /// Puts `value` at `key` if the key's mod revision is still `expected` (0: absent), in one
    /// transaction: `Ok(revision)` of the write, or `Err` with what the key holds now (its
    /// value and mod revision; `None` if absent).
    async fn put_if_unchanged(
        &mut self,
        key: String,
        expected: i64,
        value: Vec<u8>,
        what: &'static str,
    ) -> Result<Result<i64, Option<(Vec<u8>, i64)>>, ClusterError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.client.txn(txn).await.map_err(ctx(what))?;
        if resp.succeeded() {
            return Ok(Ok(resp.header().map_or(0, |h| h.revision())));
        }
        Ok(Err(resp.op_responses().into_iter().find_map(
            |op| match op {
                TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
                _ => None,
            },
        )))
    }

    /// Writes `record` (new `L`, tuple, owner) at `(epoch, index)` only if the stored record
    /// is still the one read at `expected` (its mod revision): the REBIND's one
    /// compare-and-swap. On conflict, returns what etcd holds now.
    pub async fn commit(
        &mut self,
        epoch: u32,
        index: u32,
        expected: i64,
        record: &ConnRecord,
    ) -> Result<Committed, ClusterError> {
        let key = conn_key(&self.prefix, epoch, index);
        let current = match self
            .put_if_unchanged(key, expected, record.encode(), "committing a rebind")
            .await?
        {
            Ok(revision) => return Ok(Committed::Done { revision }),
            Err(now) => now.and_then(|(value, mod_revision)| {
                Some(Entry {
                    record: ConnRecord::decode(&value).ok()?,
                    mod_revision,
                })
            }),
        };
        Ok(Committed::Conflict { current })
    }

    /// Several [`EtcdRegistry::register`]s in one etcd transaction (a nested create-if-absent
    /// each; indices distinct, at most [`MAX_COMMITS_PER_TXN`]). Answers in order.
    pub async fn register_many(
        &mut self,
        creates: &[(u32, u32, &ConnRecord)],
    ) -> Result<Vec<Registered>, ClusterError> {
        let ops: Vec<TxnOp> = creates
            .iter()
            .map(|&(epoch, index, record)| {
                let key = conn_key(&self.prefix, epoch, index);
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key, record.encode(), None)]),
                )
            })
            .collect();
        let resp = self
            .client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(ctx("registering connections"))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut answers: Vec<Registered> = resp
            .op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Txn(t) if t.succeeded() => Registered::Done { revision },
                _ => Registered::Taken,
            })
            .collect();
        answers.resize(creates.len(), Registered::Taken);
        Ok(answers)
    }

    /// Several [`EtcdRegistry::commit`]s in one etcd transaction (one raft entry, one fsync):
    /// each is a nested transaction with its own compare, so one conflict does not fail the
    /// others. Keys must be distinct (etcd refuses a transaction that writes a key twice) and
    /// at most [`MAX_COMMITS_PER_TXN`]. The answers are in the order of `commits`.
    pub async fn commit_many(
        &mut self,
        commits: &[(u32, u32, i64, &ConnRecord)],
    ) -> Result<Vec<Committed>, ClusterError> {
        let ops: Vec<TxnOp> = commits
            .iter()
            .map(|&(epoch, index, expected, record)| {
                let key = conn_key(&self.prefix, epoch, index);
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            expected,
                        )])
                        .and_then([TxnOp::put(key.clone(), record.encode(), None)])
                        .or_else([TxnOp::get(key, None)]),
                )
            })
            .collect();
        let resp = self
            .client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(ctx("committing rebinds"))?;
        // Every write of a transaction has the transaction's revision.
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut answers: Vec<Committed> = resp
            .op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Txn(t) if t.succeeded() => Committed::Done { revision },
                TxnOpResponse::Txn(t) => Committed::Conflict {
                    current: t.op_responses().into_iter().find_map(|op| match op {
                        TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| {
                            Some(Entry {
                                record: ConnRecord::decode(kv.value()).ok()?,
                                mod_revision: kv.mod_revision(),
                            })
                        }),
                        _ => None,
                    }),
                },
                _ => Committed::Conflict { current: None },
            })
            .collect();
        // A short answer would be an etcd bug; what it left out is not committed for us.
        answers.resize(commits.len(), Committed::Conflict { current: None });
        Ok(answers)
    }

    /// Deletes the record at `(epoch, index)` if it is still the one read at `expected`.
    pub async fn remove(
        &mut self,
        epoch: u32,
        index: u32,
        expected: i64,
    ) -> Result<bool, ClusterError> {
        let key = conn_key(&self.prefix, epoch, index);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::delete(key, None)]);
        let resp = self
            .client
            .txn(txn)
            .await
            .map_err(ctx("removing a connection"))?;
        Ok(resp.succeeded())
    }

    /// The cluster's epoch record and its mod revision: `proposed` (an epoch that never
    /// rotated) if none is stored yet (the first gateway's), else the stored one. One
    /// transaction, so two first gateways agree.
    pub async fn agree_epoch(&mut self, proposed: u32) -> Result<(EpochRecord, i64), ClusterError> {
        let key = epoch_key(&self.prefix);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                EpochRecord::first(proposed).encode(),
                None,
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .client
            .txn(txn)
            .await
            .map_err(ctx("agreeing on the key epoch"))?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            return Ok((EpochRecord::first(proposed), revision));
        }
        let stored = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g
                .kvs()
                .first()
                .map(|kv| EpochRecord::decode(kv.value()).map(|r| (r, kv.mod_revision()))),
            _ => None,
        });
        self.epoch_or_refuse(stored, "agreeing on the key epoch")
    }

    fn epoch_or_refuse(
        &self,
        stored: Option<Result<(EpochRecord, i64), super::record::EpochRecordError>>,
        what: &'static str,
    ) -> Result<(EpochRecord, i64), ClusterError> {
        // A value no gateway wrote: refuse rather than guess.
        match stored {
            Some(Ok(r)) => Ok(r),
            Some(Err(e)) => Err(ClusterError {
                what,
                source: etcd_client::Error::InvalidArgs(format!(
                    "{}/epoch holds no epoch record: {e}",
                    self.prefix
                )),
            }),
            None => Err(ClusterError {
                what,
                source: etcd_client::Error::InvalidArgs(format!(
                    "{}/epoch is missing",
                    self.prefix
                )),
            }),
        }
    }

    /// The stored epoch record and its mod revision.
    pub async fn read_epoch(&mut self) -> Result<(EpochRecord, i64), ClusterError> {
        let resp = self
            .client
            .get(epoch_key(&self.prefix), None)
            .await
            .map_err(ctx("reading the epoch record"))?;
        let stored = resp
            .kvs()
            .first()
            .map(|kv| EpochRecord::decode(kv.value()).map(|r| (r, kv.mod_revision())));
        self.epoch_or_refuse(stored, "reading the epoch record")
    }

    /// A rotation: writes `next` only if the epoch record is still the one read at
    /// `expected` (its mod revision). Of two rotations of one epoch, exactly one wins; the
    /// loser gets the winner's record back.
    pub async fn rotate_epoch(
        &mut self,
        expected: i64,
        next: &EpochRecord,
    ) -> Result<EpochRotated, ClusterError> {
        let key = epoch_key(&self.prefix);
        let stored = match self
            .put_if_unchanged(key, expected, next.encode(), "rotating the key epoch")
            .await?
        {
            Ok(revision) => return Ok(EpochRotated::Won { revision }),
            Err(now) => now.map(|(value, mod_revision)| {
                EpochRecord::decode(&value).map(|r| (r, mod_revision))
            }),
        };
        let (current, mod_revision) = self.epoch_or_refuse(stored, "rotating the key epoch")?;
        Ok(EpochRotated::Lost {
            current,
            mod_revision,
        })
    }

    /// Deletes the records of an epoch whose grace is over, each only if its mod revision is
    /// still the one read, in transactions of up to 32 (a nested transaction each, so one
    /// that changed meanwhile stays alone). One that [`Retire::adopt`]s moves its tuple and
    /// owner onto the connection's record in the next epoch in the same nested transaction
    /// (compared on that record's mod revision too). Returns how many went.
    pub async fn retire_many(&mut self, retire: &[Retire]) -> Result<usize, ClusterError> {
        let mut removed = 0;
        for chunk in retire.chunks(MAX_COMMITS_PER_TXN / 2) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|r| {
                    let key = conn_key(&self.prefix, r.epoch, r.index);
                    let mut when = vec![Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        r.expected,
                    )];
                    let mut then = vec![TxnOp::delete(key, None)];
                    if let Some(a) = &r.adopt {
                        let next = conn_key(&self.prefix, a.epoch, a.index);
                        when.push(Compare::mod_revision(
                            next.clone(),
                            CompareOp::Equal,
                            a.expected,
                        ));
                        then.push(TxnOp::put(next, a.record.encode(), None));
                    }
                    TxnOp::txn(Txn::new().when(when).and_then(then))
                })
                .collect();
            let resp = self
                .client
                .txn(Txn::new().and_then(ops))
                .await
                .map_err(ctx("removing an epoch's records"))?;
            removed += resp
                .op_responses()
                .into_iter()
                .filter(|op| matches!(op, TxnOpResponse::Txn(t) if t.succeeded()))
                .count();
        }
        Ok(removed)
    }

    /// Announces this gateway under `<prefix>/gateways/<id>` with a lease of `ttl`: while the
    /// caller keeps the lease alive ([`EtcdRegistry::keep_alive`]) the others see it; when
    /// this gateway dies the key expires with the lease. Fails if another live gateway holds
    /// the id. Returns the lease id.
    pub async fn announce(&mut self, ttl: Duration) -> Result<Option<i64>, ClusterError> {
        let lease = self
            .client
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(ctx("granting the gateway's lease"))?
            .id();
        let key = format!("{}/gateways/{}", self.prefix, self.me);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                format!("gateway {}", self.me),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = self
            .client
            .txn(txn)
            .await
            .map_err(ctx("announcing the gateway"))?;
        if resp.succeeded() {
            Ok(Some(lease))
        } else {
            self.client
                .lease_revoke(lease)
                .await
                .map_err(ctx("revoking an unused lease"))?;
            Ok(None)
        }
    }

    /// Renews `lease` once (call at a third of its TTL).
    pub async fn keep_alive(&mut self, lease: i64) -> Result<(), ClusterError> {
        let (mut keeper, mut stream) = self
            .client
            .lease_keep_alive(lease)
            .await
            .map_err(ctx("keeping the gateway's lease"))?;
        keeper
            .keep_alive()
            .await
            .map_err(ctx("keeping the gateway's lease"))?;
        stream
            .message()
            .await
            .map_err(ctx("keeping the gateway's lease"))?;
        Ok(())
    }

    /// Ends this gateway's lease (a clean shutdown: the others see it leave at once).
    pub async fn leave(&mut self, lease: i64) -> Result<(), ClusterError> {
        self.client
            .lease_revoke(lease)
            .await
            .map_err(ctx("revoking the gateway's lease"))?;
        Ok(())
    }

    /// The ids of the gateways whose lease is alive.
    pub async fn gateways(&mut self) -> Result<Vec<GatewayId>, ClusterError> {
        let prefix = format!("{}/gateways/", self.prefix);
        let resp = self
            .client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(ctx("listing gateways"))?;
        let mut ids: Vec<GatewayId> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                std::str::from_utf8(kv.key().strip_prefix(prefix.as_bytes())?)
                    .ok()?
                    .parse()
                    .ok()
            })
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }
}
