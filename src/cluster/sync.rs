//! The gateway's link to the cluster registry (feature `cluster`): one thread with its own
//! async runtime that owns the etcd client, the [`Mirror`] and the gateway's lease. The
//! gateway's threads never wait on it: they [`ClusterHandle::submit`] requests (REGISTER,
//! accepted REBIND, close) and later take the [`Response`]s and the registry's [`Event`]s
//! with non-blocking receives.
//!
//! - Every request is an etcd transaction of its own, run concurrently with the others (one
//!   receive batch's REBINDs go out together), each bounded by the operation timeout.
//! - A REBIND commit is re-checked against the freshest copy (`t > L`, or the §6 duplicate)
//!   and written by compare-and-swap on the record's mod revision: of two gateways that accept
//!   REBINDs of one connection, one commit wins; the other gets [`Refusal::Conflict`].
//! - While etcd is unreachable or without quorum, requests are refused
//!   ([`Refusal::Unavailable`]), never accepted without a commit. The thread reconnects with
//!   backoff, reloads the whole registry (reporting what it missed) and watches again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::sync::mpsc as tmpsc;

use super::etcd::{
    Adopt, ClusterError, Committed, EpochRotated, EtcdRegistry, MAX_COMMITS_PER_TXN, Registered,
    Retire,
};
use super::mirror::{Applied, Change, Entry, Mirror};
use super::record::{ConnRecord, EpochRecord, GatewayId, RecordSeal};
use crate::keys::MasterSecret;
use crate::rebind::RebindSecret;
use crate::registry::HostId;
use crate::time::Ticks;

/// REBIND and REGISTER transactions of one gateway in flight at once.
const WRITE_TXNS_IN_FLIGHT: usize = 4;

/// How long a REBIND commit may keep trying: three operation timeouts (1 s by default), but
/// never past [`COMMIT_BUDGET_MAX`], well inside the core's 5 s wait for the answer.
const COMMIT_BUDGET_TIMEOUTS: u32 = 3;
const COMMIT_BUDGET_MAX: Duration = Duration::from_secs(4);

/// Where the cluster is and who this gateway is in it.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// etcd client URLs (`http://host:port`).
    pub endpoints: Vec<String>,
    /// The cluster's name: its keys live under `/rebindgw/<name>`.
    pub name: String,
    /// This gateway's id, unique in the cluster while its lease lives.
    pub gateway: GatewayId,
    /// The lease's TTL: the others see this gateway gone this long after it dies.
    pub lease_ttl: Duration,
    /// Bound on each etcd operation.
    pub timeout: Duration,
    /// The key epoch this gateway starts with if the cluster has none yet (the first
    /// gateway's); the cluster's stored epoch wins otherwise ([`ClusterHandle::epoch`]).
    pub epoch: u32,
}

impl ClusterSettings {
    pub fn prefix(&self) -> String {
        format!("/rebindgw/{}", self.name)
    }
}

/// A request to the registry. `ticket` comes back in its [`Response`].
#[derive(Debug)]
pub enum Request {
    /// A new connection: allocate an index of `epoch` below `capacity` and store it.
    Register {
        ticket: u64,
        epoch: u32,
        capacity: u32,
        conn_id: u64,
        secret: RebindSecret,
        host: HostId,
        tuple: Option<SocketAddr>,
        now: Ticks,
    },
    /// A REBIND of `(epoch, index)` at time `t` from `tuple` passed checks 1–6 here.
    Rebind {
        ticket: u64,
        epoch: u32,
        index: u32,
        t: Ticks,
        tuple: SocketAddr,
    },
    /// The connection closed; removed only if `(epoch, index)` still holds `conn_id`.
    Remove {
        ticket: u64,
        epoch: u32,
        index: u32,
        conn_id: u64,
    },
    /// A rotation of epoch `from` at `now_ms` (Unix ms) with a grace period of `grace_ms`:
    /// one transaction on the epoch record's mod revision. Refused during the previous
    /// rotation's grace period unless `force`. Answered on `answer`.
    Rotate {
        from: u32,
        force: bool,
        now_ms: u64,
        grace_ms: u64,
        answer: mpsc::Sender<RotateAnswer>,
    },
    /// The grace period of `epoch` is over (or a forced rotation dropped it): the records
    /// of `epoch` this gateway owns (and those of gateways no longer alive) are deleted.
    DropEpoch { epoch: u32 },
}

/// How a [`Request::Rotate`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotateAnswer {
    /// This gateway's transaction stored `record`: every gateway's watch switches to it.
    Rotated(EpochRecord),
    /// The epoch had moved on already (another gateway rotated first, or at the same time
    /// and won the transaction): `current` is the cluster's record.
    Lost(EpochRecord),
    /// The previous rotation's grace period still runs (`previous` is still accepted).
    InGrace { previous: u32, left_ms: u64 },
    /// etcd did not answer, or has no quorum: nothing changed.
    Unavailable(String),
}

impl Request {
    pub fn ticket(&self) -> u64 {
        match self {
            Request::Register { ticket, .. }
            | Request::Rebind { ticket, .. }
            | Request::Remove { ticket, .. } => *ticket,
            Request::Rotate { .. } | Request::DropEpoch { .. } => 0,
        }
    }

    /// Refuses the request at once (etcd unreachable): a rotation hears it on its own
    /// channel, the others get a response.
    fn refuse(self, responses: &mpsc::Sender<Response>, why: &str) {
        match self {
            Request::Rotate { answer, .. } => {
                let _ = answer.send(RotateAnswer::Unavailable(why.into()));
            }
            Request::DropEpoch { .. } => {}
            other => {
                let _ = responses.send(Response::Refused {
                    ticket: other.ticket(),
                    why: Refusal::Unavailable(why.into()),
                });
            }
        }
    }
}

/// Why a request did not commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another gateway changed the record first (it accepted a REBIND of the connection).
    Conflict,
    /// The freshest copy already has `L >= t` (and it is not the §6 duplicate).
    Stale,
    /// No such connection in the registry.
    Unknown,
    /// Every index of the epoch is taken.
    Full,
    /// etcd did not answer in time, or has no quorum.
    Unavailable(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    Registered {
        ticket: u64,
        index: u32,
        revision: i64,
    },
    /// The REBIND is committed: send REBIND_ACK and REBOUND.
    Rebound {
        ticket: u64,
        revision: i64,
        /// The tuple the connection had before.
        old: Option<SocketAddr>,
    },
    /// The same REBIND again from the same tuple (§6): answer again, change nothing.
    Duplicate {
        ticket: u64,
    },
    Removed {
        ticket: u64,
    },
    Refused {
        ticket: u64,
        why: Refusal,
    },
}

/// What changed in the registry by other gateways' hands (or while the link was down).
#[derive(Debug)]
pub enum Event {
    Changed {
        applied: Applied,
        /// The record now stored (`None` once removed), `R` still sealed: open it with the
        /// gateway's [`RecordSeal`].
        entry: Option<Entry>,
    },
    /// The cluster's epoch record changed (a rotation): every gateway switches to it.
    Epoch { record: EpochRecord },
    /// The link is up again after a reload; what was missed came as `Changed` before it.
    Up { records: usize },
    /// etcd became unreachable; requests are refused until `Up`.
    Down { error: String },
}

/// Counters of the link (exported by the gateway as metrics).
#[derive(Debug, Default)]
pub struct ClusterCounters {
    pub registered: AtomicU64,
    pub register_collisions: AtomicU64,
    pub rebinds_committed: AtomicU64,
    /// ... of which took the connection over from another gateway.
    pub rebinds_taken_over: AtomicU64,
    pub duplicates: AtomicU64,
    pub conflicts: AtomicU64,
    pub stale: AtomicU64,
    pub unavailable: AtomicU64,
    pub watch_events: AtomicU64,
    /// Broken watch streams resumed at once on another member (no reload, no pause).
    pub watch_resumes: AtomicU64,
    pub reloads: AtomicU64,
    pub malformed_records: AtomicU64,
    /// Range reads of the registry (the start's load and each reload after the watch
    /// broke): nothing on the packet path reads etcd, so forwarding never moves this.
    pub range_reads: AtomicU64,
    /// Removals committed.
    pub removed: AtomicU64,
    /// etcd transactions that carried REBIND commits (one carries up to
    /// [`MAX_COMMITS_PER_TXN`]).
    pub commit_batches: AtomicU64,
    /// REBIND commit transactions tried again after a failure or timeout.
    pub commit_retries: AtomicU64,
}

/// A clonable way to queue requests (one per worker); never blocks.
#[derive(Clone)]
pub struct Submitter(tmpsc::UnboundedSender<Request>);

impl Submitter {
    pub fn submit(&self, request: Request) {
        // The link's thread only ends on shutdown; a request sent after it is dropped.
        let _ = self.0.send(request);
    }
}

/// The gateway's side of the link.
pub struct ClusterHandle {
    requests: tmpsc::UnboundedSender<Request>,
    pub responses: mpsc::Receiver<Response>,
    pub events: mpsc::Receiver<Event>,
    pub counters: Arc<ClusterCounters>,
    pub seal: Arc<RecordSeal>,
    /// The cluster's key epoch, agreed at start (`epoch_record.current`).
    pub epoch: u32,
    /// The cluster's epoch record at start (a gateway started during a grace period
    /// accepts the previous epoch too).
    pub epoch_record: EpochRecord,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    wake: Arc<tokio::sync::Notify>,
}

/// State shared by the link's tasks (short critical sections, never held across an await).
struct Shared {
    mirror: Mirror,
    /// Indices being registered by this gateway's in-flight transactions.
    allocating: HashSet<(u32, u32)>,
    /// Where the next index search starts: after the last index this gateway took, so a
    /// search does not walk over every index taken before (a 65,536-client connect storm
    /// was quadratic).
    cursor: Option<u32>,
    up: bool,
    /// The epoch record as last read or watched, and its mod revision.
    epoch: (EpochRecord, i64),
}

/// A REGISTER's fields (`Request::Register`).
struct RegisterRequest {
    ticket: u64,
    epoch: u32,
    capacity: u32,
    conn_id: u64,
    secret: RebindSecret,
    host: HostId,
    tuple: Option<SocketAddr>,
    now: Ticks,
}

/// A REBIND commit ready to go: what it compares against and what it writes.
struct PreparedRebind {
    ticket: u64,
    epoch: u32,
    index: u32,
    expected: i64,
    record: ConnRecord,
    old: Option<SocketAddr>,
    taken_over: bool,
}

struct Link {
    registry: EtcdRegistry,
    shared: Arc<Mutex<Shared>>,
    seal: Arc<RecordSeal>,
    me: GatewayId,
    timeout: Duration,
    counters: Arc<ClusterCounters>,
    responses: mpsc::Sender<Response>,
}

impl ClusterHandle {
    /// Connects, claims the gateway id, loads the registry and starts the link's thread.
    /// Fails (naming the step) if etcd cannot be reached within the timeout or the id is held
    /// by a live gateway. The loaded records come first on `events`.
    pub fn start(
        settings: ClusterSettings,
        master: &MasterSecret,
    ) -> Result<ClusterHandle, StartError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StartError::Runtime)?;
        let prefix = settings.prefix();
        let seal = Arc::new(RecordSeal::new(master, &prefix));
        let (ev_tx, ev_rx) = mpsc::channel();
        let (resp_tx, resp_rx) = mpsc::channel();
        let (req_tx, req_rx) = tmpsc::unbounded_channel();
        let counters = Arc::new(ClusterCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(tokio::sync::Notify::new());

        let (registry, lease, shared, epoch) = runtime.block_on(async {
            let connect = EtcdRegistry::connect(
                &settings.endpoints,
                &prefix,
                settings.gateway,
                settings.timeout,
            );
            let mut registry = tokio::time::timeout(settings.timeout, connect)
                .await
                .map_err(|_| StartError::Timeout("connecting to etcd"))??;
            let lease =
                tokio::time::timeout(settings.timeout, registry.announce(settings.lease_ttl))
                    .await
                    .map_err(|_| StartError::Timeout("claiming the gateway id"))??
                    .ok_or(StartError::IdInUse(settings.gateway))?;
            tokio::time::timeout(settings.timeout, registry.agree_epoch(settings.epoch))
                .await
                .map_err(|_| StartError::Timeout("agreeing on the key epoch"))??;
            let mut mirror = Mirror::new(&prefix, settings.gateway);
            counters.range_reads.fetch_add(1, Ordering::Relaxed);
            let (changes, revision) = registry.read_all(settings.timeout).await?;
            for a in mirror.reload(changes, revision) {
                send_change(&ev_tx, &mirror, a, &counters);
            }
            // Read after the registry: a rotation after the read comes through the watch
            // too (and is told once: by its mod revision).
            let epoch = tokio::time::timeout(settings.timeout, registry.read_epoch())
                .await
                .map_err(|_| StartError::Timeout("reading the epoch record"))??;
            let _ = ev_tx.send(Event::Up {
                records: mirror.len(),
            });
            let shared = Arc::new(Mutex::new(Shared {
                mirror,
                allocating: HashSet::new(),
                cursor: None,
                up: true,
                epoch,
            }));
            Ok::<_, StartError>((registry, lease, shared, epoch))
        })?;

        let link = Link {
            registry,
            shared,
            seal: seal.clone(),
            me: settings.gateway,
            timeout: settings.timeout,
            counters: counters.clone(),
            responses: resp_tx,
        };
        let thread_stop = stop.clone();
        let thread_wake = wake.clone();
        let thread = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || {
                runtime.block_on(run(
                    link,
                    req_rx,
                    ev_tx,
                    lease,
                    settings,
                    thread_stop,
                    thread_wake,
                ))
            })
            .map_err(StartError::Thread)?;
        Ok(ClusterHandle {
            requests: req_tx,
            responses: resp_rx,
            events: ev_rx,
            counters,
            seal,
            epoch: epoch.0.current,
            epoch_record: epoch.0,
            stop,
            thread: Some(thread),
            wake,
        })
    }

    /// Queues a request; never blocks.
    pub fn submit(&self, request: Request) {
        // The thread only ends on shutdown; a request sent after it is dropped.
        let _ = self.requests.send(request);
    }

    /// A handle for another thread to submit with.
    pub fn submitter(&self) -> Submitter {
        Submitter(self.requests.clone())
    }

    /// Ends the lease (the others see this gateway leave at once) and joins the thread.
    pub fn shutdown(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cluster: starting the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cluster: starting its thread: {0}")]
    Thread(std::io::Error),
    #[error("cluster: {0} timed out (are the etcd endpoints right and is there a quorum?)")]
    Timeout(&'static str),
    #[error("cluster: gateway id {0} is held by a live gateway (each gateway needs its own id)")]
    IdInUse(GatewayId),
    #[error("cluster: {0}")]
    Etcd(#[from] ClusterError),
}

fn send_change(ev: &mpsc::Sender<Event>, mirror: &Mirror, a: Applied, c: &ClusterCounters) {
    let entry = match &a {
        Applied::Added { epoch, index } | Applied::Updated { epoch, index, .. } => {
            mirror.get(*epoch, *index).cloned()
        }
        Applied::Removed { .. } => None,
        Applied::Malformed(_) => {
            c.malformed_records.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Applied::Stale | Applied::Foreign => return,
    };
    let _ = ev.send(Event::Changed { applied: a, entry });
}

async fn run(
    link: Link,
    mut requests: tmpsc::UnboundedReceiver<Request>,
    events: mpsc::Sender<Event>,
    mut lease: i64,
    settings: ClusterSettings,
    stop: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
) {
    let link = Arc::new(link);
    let mut registry = link.registry.clone();
    let mut keepalive = tokio::time::interval(settings.lease_ttl / 3);
    let mut backoff = Duration::from_millis(100);
    let writes = Arc::new(tokio::sync::Semaphore::new(WRITE_TXNS_IN_FLIGHT));
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    'outer: while !stop.load(Ordering::SeqCst) {
        // (Re)open the watch from the mirror's revision.
        let after = link.shared.lock().unwrap().mirror.revision();
        let watch = tokio::time::timeout(settings.timeout, registry.watch(after)).await;
        let (mut _watcher, mut stream) = match watch {
            Ok(Ok(w)) => w,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "watch: timed out".into(),
                };
                link_down(&link, &events, why);
                let back = reconnect(
                    &link,
                    &mut registry,
                    &mut requests,
                    &events,
                    &mut backoff,
                    &stop,
                );
                if !back.await {
                    break;
                }
                continue;
            }
        };
        loop {
            tokio::select! {
                _ = wake.notified() => {
                    if stop.load(Ordering::SeqCst) {
                        break 'outer;
                    }
                }
                // Write transactions in flight are bounded: what queues meanwhile goes out
                // in fuller batches (group commit) instead of as many small transactions
                // competing for etcd's raft log.
                permit = writes.clone().acquire_owned(), if held.is_none() => {
                    held = permit.ok();
                }
                req = requests.recv(), if held.is_some() => {
                    let permit = held.take();
                    let Some(req) = req else { break 'outer };
                    // What queued up meanwhile goes with it: REBINDs in one transaction.
                    let mut rebinds = Vec::new();
                    let mut registers = Vec::new();
                    let mut next = Some(req);
                    while let Some(req) = next.take() {
                        match req {
                            Request::Rebind { ticket, epoch, index, t, tuple } => {
                                rebinds.push((ticket, epoch, index, t, tuple));
                            }
                            Request::Register { ticket, epoch, capacity, conn_id, secret, host, tuple, now } => {
                                registers.push(RegisterRequest { ticket, epoch, capacity, conn_id, secret, host, tuple, now });
                            }
                            Request::Remove { ticket, epoch, index, conn_id } => {
                                let link = link.clone();
                                tokio::spawn(async move {
                                    let answer = link.remove(ticket, epoch, index, conn_id).await;
                                    link.answer(answer);
                                });
                            }
                            Request::Rotate { from, force, now_ms, grace_ms, answer } => {
                                let link = link.clone();
                                tokio::spawn(async move {
                                    let a = link.rotate(from, force, now_ms, grace_ms).await;
                                    let _ = answer.send(a);
                                });
                            }
                            Request::DropEpoch { epoch } => {
                                tokio::spawn(link.clone().drop_epoch(epoch));
                            }
                        }
                        if rebinds.len() < MAX_COMMITS_PER_TXN && registers.len() < MAX_COMMITS_PER_TXN {
                            next = requests.try_recv().ok();
                        }
                    }
                    if !rebinds.is_empty() || !registers.is_empty() {
                        let link = link.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            tokio::join!(
                                async {
                                    if !rebinds.is_empty() {
                                        link.clone().rebind_batch(rebinds).await;
                                    }
                                },
                                async {
                                    if !registers.is_empty() {
                                        link.clone().register_batch(registers).await;
                                    }
                                }
                            );
                        });
                    }
                }
                msg = stream.message() => {
                    match msg {
                        Ok(Some(resp)) => {
                            let (changes, rev) = EtcdRegistry::changes(&resp);
                            let mut sh = link.shared.lock().unwrap();
                            for c in changes {
                                link.counters.watch_events.fetch_add(1, Ordering::Relaxed);
                                if let Some(c) = link.epoch_change(&mut sh, c, &events) {
                                    let a = sh.mirror.apply(c);
                                    send_change(&events, &sh.mirror, a, &link.counters);
                                }
                            }
                            sh.mirror.advance(rev);
                        }
                        Ok(None) | Err(_) => {
                            let why = match msg {
                                Err(e) => e.to_string(),
                                _ => "watch closed".into(),
                            };
                            // The stream's member may have died alone: resume on another
                            // from the copy's revision, with no pause for requests (their
                            // commits are compare-and-swaps in etcd, not on the copy).
                            let after = link.shared.lock().unwrap().mirror.revision();
                            let resumed = tokio::time::timeout(settings.timeout, registry.watch(after)).await;
                            if let Ok(Ok((w, s))) = resumed {
                                link.counters.watch_resumes.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(error = %why, revision = after, "cluster: the etcd watch broke; resumed");
                                (_watcher, stream) = (w, s);
                                continue;
                            }
                            link_down(&link, &events, why);
                            if !reconnect(&link, &mut registry, &mut requests, &events, &mut backoff, &stop).await {
                                break 'outer;
                            }
                            break;
                        }
                    }
                }
                _ = keepalive.tick() => {
                    let ka = tokio::time::timeout(settings.timeout, registry.keep_alive(lease)).await;
                    if !matches!(ka, Ok(Ok(()))) {
                        // The lease may have expired while etcd was away: claim the id anew.
                        if let Ok(Ok(Some(l))) = tokio::time::timeout(
                            settings.timeout,
                            registry.announce(settings.lease_ttl),
                        ).await {
                            lease = l;
                        }
                    }
                }
            }
        }
    }
    let _ = tokio::time::timeout(settings.timeout, registry.leave(lease)).await;
}

fn link_down(link: &Link, events: &mpsc::Sender<Event>, error: String) {
    let mut sh = link.shared.lock().unwrap();
    if sh.up {
        sh.up = false;
        let _ = events.send(Event::Down { error });
    }
}

/// Reloads the registry once etcd answers again (with backoff); false if asked to stop.
/// Meanwhile every request is refused at once: nothing is accepted without a commit.
async fn reconnect(
    link: &Link,
    registry: &mut EtcdRegistry,
    requests: &mut tmpsc::UnboundedReceiver<Request>,
    events: &mpsc::Sender<Event>,
    backoff: &mut Duration,
    stop: &AtomicBool,
) -> bool {
    let mut warn = crate::logging::LogEvery::new(Duration::from_secs(10));
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let pause = tokio::time::sleep(*backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut pause => break,
                req = requests.recv() => match req {
                    Some(req) => {
                        link.counters.unavailable.fetch_add(1, Ordering::Relaxed);
                        req.refuse(&link.responses, "etcd unreachable");
                    }
                    None => return false,
                },
            }
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(2));
        link.counters.range_reads.fetch_add(1, Ordering::Relaxed);
        let read = registry.read_all(link.timeout).await;
        let failure = read.as_ref().err().map(ToString::to_string);
        if let Some(error) = failure
            && let Some(held_back) = warn.check(std::time::Instant::now())
        {
            tracing::warn!(%error, held_back, "cluster: reloading the registry failed; retrying");
        }
        let epoch = match read {
            Ok(_) => tokio::time::timeout(link.timeout, registry.read_epoch())
                .await
                .ok()
                .and_then(Result::ok),
            _ => None,
        };
        if let (Ok((changes, revision)), Some((record, mod_revision))) = (read, epoch) {
            let mut sh = link.shared.lock().unwrap();
            // A rotation while the link was down: told before the records, so that the
            // gateway holds the new epoch when its records come.
            if mod_revision > sh.epoch.1 {
                sh.epoch = (record, mod_revision);
                let _ = events.send(Event::Epoch { record });
            }
            for a in sh.mirror.reload(changes, revision) {
                send_change(events, &sh.mirror, a, &link.counters);
            }
            sh.up = true;
            link.counters.reloads.fetch_add(1, Ordering::Relaxed);
            let _ = events.send(Event::Up {
                records: sh.mirror.len(),
            });
            *backoff = Duration::from_millis(100);
            return true;
        }
    }
}

impl Link {
    /// A change of the epoch record is taken here (and told as [`Event::Epoch`] if it is
    /// newer than the one known); any other change is handed back.
    fn epoch_change(
        &self,
        sh: &mut Shared,
        change: Change,
        events: &mpsc::Sender<Event>,
    ) -> Option<Change> {
        let key = self.registry.epoch_key();
        match change {
            Change::Put {
                key: k,
                value,
                mod_revision,
            } if k == key.as_bytes() => {
                match EpochRecord::decode(&value) {
                    Ok(record) if mod_revision > sh.epoch.1 => {
                        sh.epoch = (record, mod_revision);
                        let _ = events.send(Event::Epoch { record });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.counters
                            .malformed_records
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "cluster: the epoch record is malformed; ignored");
                    }
                }
                None
            }
            Change::Delete { key: k, .. } if k == key.as_bytes() => {
                tracing::warn!("cluster: the epoch record was deleted; the gateways keep theirs");
                None
            }
            other => Some(other),
        }
    }

    /// A rotation of `from`: one transaction on the epoch record's mod revision.
    async fn rotate(&self, from: u32, force: bool, now_ms: u64, grace_ms: u64) -> RotateAnswer {
        let (record, expected) = {
            let sh = self.shared.lock().unwrap();
            if !sh.up {
                return RotateAnswer::Unavailable("etcd unreachable".into());
            }
            sh.epoch
        };
        if record.current != from {
            return RotateAnswer::Lost(record);
        }
        if let Some(previous) = record.in_grace(now_ms)
            && !force
        {
            return RotateAnswer::InGrace {
                previous,
                left_ms: record.grace_until_ms.saturating_sub(now_ms),
            };
        }
        let next = record.next(now_ms, grace_ms);
        let mut registry = self.registry.clone();
        match tokio::time::timeout(self.timeout, registry.rotate_epoch(expected, &next)).await {
            Ok(Ok(EpochRotated::Won { .. })) => RotateAnswer::Rotated(next),
            Ok(Ok(EpochRotated::Lost { current, .. })) => RotateAnswer::Lost(current),
            Ok(Err(e)) => RotateAnswer::Unavailable(e.to_string()),
            Err(_) => RotateAnswer::Unavailable("etcd timed out".into()),
        }
    }

    /// Deletes the records of `epoch` (whose grace is over) this gateway owns, and those
    /// whose owner is no live gateway, each compared on its mod revision (a record changed
    /// meanwhile stays). A connection this gateway forwards by its old record moves its tuple
    /// and ownership onto its record in the next epoch in the same transaction, if that one
    /// was not rebound yet (the core moved it there at the end of grace: a restart then
    /// finds it bound).
    async fn drop_epoch(self: Arc<Self>, epoch: u32) {
        let mut registry = self.registry.clone();
        let live = match tokio::time::timeout(self.timeout, registry.gateways()).await {
            Ok(Ok(ids)) => ids,
            _ => vec![self.me],
        };
        let next = epoch.wrapping_add(1);
        let retire: Vec<Retire> = {
            let sh = self.shared.lock().unwrap();
            let successors: std::collections::HashMap<u64, (u32, &Entry)> = sh
                .mirror
                .iter()
                .filter(|((e, _), entry)| *e == next && entry.record.tuple.is_none())
                .map(|((_, i), entry)| (entry.record.conn_id, (i, entry)))
                .collect();
            sh.mirror
                .iter()
                .filter(|((e, _), entry)| {
                    *e == epoch
                        && (entry.record.owner == self.me || !live.contains(&entry.record.owner))
                })
                .map(|((e, i), entry)| Retire {
                    epoch: e,
                    index: i,
                    expected: entry.mod_revision,
                    adopt: entry
                        .record
                        .tuple
                        .filter(|_| entry.record.owner == self.me)
                        .and_then(|tuple| {
                            let (index, succ) = successors.get(&entry.record.conn_id)?;
                            let mut record = succ.record.clone();
                            record.owner = self.me;
                            record.tuple = Some(tuple);
                            Some(Adopt {
                                epoch: next,
                                index: *index,
                                expected: succ.mod_revision,
                                record,
                            })
                        }),
                })
                .collect()
        };
        if retire.is_empty() {
            return;
        }
        let adopted = retire.iter().filter(|r| r.adopt.is_some()).count();
        match tokio::time::timeout(
            self.timeout.saturating_mul(4),
            registry.retire_many(&retire),
        )
        .await
        {
            Ok(Ok(n)) => {
                self.counters.removed.fetch_add(n as u64, Ordering::Relaxed);
                tracing::info!(
                    epoch,
                    removed = n,
                    adopted,
                    "cluster: the previous epoch's records of this gateway are removed"
                );
            }
            Ok(Err(e)) => {
                tracing::warn!(epoch, error = %e, "cluster: removing the previous epoch's records failed")
            }
            Err(_) => {
                tracing::warn!(
                    epoch,
                    "cluster: removing the previous epoch's records timed out"
                )
            }
        }
    }

    /// Sends an answer to the gateway's workers (counting refusals for unavailability).
    fn answer(&self, response: Response) {
        if let Response::Refused {
            why: Refusal::Unavailable(_),
            ..
        } = &response
        {
            self.counters.unavailable.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.responses.send(response);
    }

    fn unavailable(ticket: u64, e: impl ToString) -> Response {
        Response::Refused {
            ticket,
            why: Refusal::Unavailable(e.to_string()),
        }
    }

    /// Where this gateway's index search starts in a space of `capacity`: gateway ids spread
    /// by bit reversal (1 at 1/2, 2 at 1/4, 3 at 3/4, 4 at 1/8, ...), so the gateways of a
    /// cluster search far apart and rarely race for an index.
    fn search_start(&self, capacity: u32) -> u32 {
        ((u64::from(u32::from(self.me).reverse_bits()) * u64::from(capacity.max(1))) >> 32) as u32
    }

    /// An index of `epoch` free in the mirror and not being allocated here, searched from
    /// `hint`; marked as being allocated.
    fn allocate(&self, epoch: u32, capacity: u32, hint: Option<u32>) -> Option<u32> {
        let mut sh = self.shared.lock().unwrap();
        let hint = hint
            .or(sh.cursor)
            .unwrap_or_else(|| self.search_start(capacity));
        let found = {
            let allocating = &sh.allocating;
            sh.mirror
                .free_index_except(epoch, capacity, hint, |x| allocating.contains(&(epoch, x)))
        }?;
        sh.allocating.insert((epoch, found));
        sh.cursor = Some(found.wrapping_add(1) % capacity.max(1));
        Some(found)
    }

    fn new_record(&self, epoch: u32, index: u32, r: &RegisterRequest) -> ConnRecord {
        ConnRecord {
            conn_id: r.conn_id,
            secret: self.seal.seal(epoch, index, r.conn_id, &r.secret),
            last_rebind: r.now,
            host: r.host,
            owner: self.me,
            tuple: r.tuple,
        }
    }

    /// A created record: into the mirror, and the answer.
    fn registered(
        &self,
        ticket: u64,
        epoch: u32,
        index: u32,
        record: ConnRecord,
        revision: i64,
    ) -> Response {
        self.shared.lock().unwrap().mirror.record_own(
            epoch,
            index,
            Entry {
                record,
                mod_revision: revision,
            },
        );
        self.counters.registered.fetch_add(1, Ordering::Relaxed);
        Response::Registered {
            ticket,
            index,
            revision,
        }
    }

    async fn register(&self, r: RegisterRequest, mut hint: Option<u32>) -> Response {
        let ticket = r.ticket;
        for _ in 0..16 {
            let Some(index) = self.allocate(r.epoch, r.capacity, hint) else {
                return Response::Refused {
                    ticket,
                    why: Refusal::Full,
                };
            };
            let record = self.new_record(r.epoch, index, &r);
            let mut registry = self.registry.clone();
            let result =
                tokio::time::timeout(self.timeout, registry.register(r.epoch, index, &record))
                    .await;
            // In the mirror before it is no longer being allocated: else another search
            // could pick it in between (and collide with ourselves).
            let release = || {
                self.shared
                    .lock()
                    .unwrap()
                    .allocating
                    .remove(&(r.epoch, index));
            };
            match result {
                Ok(Ok(Registered::Done { revision })) => {
                    let answer = self.registered(ticket, r.epoch, index, record, revision);
                    release();
                    return answer;
                }
                Ok(Ok(Registered::Taken)) => {
                    release();
                    self.counters
                        .register_collisions
                        .fetch_add(1, Ordering::Relaxed);
                    hint = Some(index.wrapping_add(1));
                }
                Ok(Err(e)) => {
                    release();
                    return Self::unavailable(ticket, e);
                }
                Err(_) => {
                    release();
                    return Self::unavailable(ticket, "etcd timed out");
                }
            }
        }
        Self::unavailable(ticket, "16 index collisions in a row")
    }

    /// REGISTERs that queued up together: an index each, created in one etcd transaction (a
    /// create-if-absent compare each, like [`Link::rebind_batch`]). One whose index another
    /// gateway took first searches again alone.
    async fn register_batch(self: Arc<Self>, requests: Vec<RegisterRequest>) {
        let mut prepared = Vec::with_capacity(requests.len());
        for r in requests {
            match self.allocate(r.epoch, r.capacity, None) {
                Some(index) => {
                    let record = self.new_record(r.epoch, index, &r);
                    prepared.push((r, index, record));
                }
                None => self.answer(Response::Refused {
                    ticket: r.ticket,
                    why: Refusal::Full,
                }),
            }
        }
        if prepared.is_empty() {
            return;
        }
        let creates: Vec<(u32, u32, &ConnRecord)> = prepared
            .iter()
            .map(|(r, index, record)| (r.epoch, *index, record))
            .collect();
        let mut registry = self.registry.clone();
        let result = tokio::time::timeout(self.timeout, registry.register_many(&creates)).await;
        drop(creates);
        // Created records go into the mirror before their indices stop being allocated (else
        // another search could pick one in between).
        let release = |prepared: &[(RegisterRequest, u32, ConnRecord)]| {
            let mut sh = self.shared.lock().unwrap();
            for (r, index, _) in prepared {
                sh.allocating.remove(&(r.epoch, *index));
            }
        };
        let answers = match result {
            Ok(Ok(answers)) => answers,
            Ok(Err(e)) => {
                release(&prepared);
                let why = e.to_string();
                for (r, _, _) in prepared {
                    self.answer(Self::unavailable(r.ticket, &why));
                }
                return;
            }
            Err(_) => {
                release(&prepared);
                for (r, _, _) in prepared {
                    self.answer(Self::unavailable(r.ticket, "etcd timed out"));
                }
                return;
            }
        };
        let mut retries = Vec::new();
        let mut created = Vec::new();
        for ((r, index, record), a) in prepared.iter().zip(&answers) {
            if let Registered::Done { revision } = a {
                created.push(self.registered(r.ticket, r.epoch, *index, record.clone(), *revision));
            }
        }
        release(&prepared);
        for answer in created {
            self.answer(answer);
        }
        for ((r, index, _), a) in prepared.into_iter().zip(answers) {
            if matches!(a, Registered::Taken) {
                retries.push((r, index));
            }
        }
        for (r, index) in retries {
            self.counters
                .register_collisions
                .fetch_add(1, Ordering::Relaxed);
            let link = self.clone();
            tokio::spawn(async move {
                let answer = link.register(r, Some(index.wrapping_add(1))).await;
                link.answer(answer);
            });
        }
    }

    /// Reads what a REBIND commit compares against; a duplicate, stale or unknown REBIND is
    /// answered at once.
    fn prepare_rebind(
        &self,
        ticket: u64,
        epoch: u32,
        index: u32,
        t: Ticks,
        tuple: SocketAddr,
    ) -> Result<PreparedRebind, Response> {
        let sh = self.shared.lock().unwrap();
        let Some(entry) = sh.mirror.get(epoch, index) else {
            return Err(Response::Refused {
                ticket,
                why: Refusal::Unknown,
            });
        };
        let cur = &entry.record;
        if t == cur.last_rebind && cur.tuple == Some(tuple) {
            self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            return Err(Response::Duplicate { ticket });
        }
        if t <= cur.last_rebind {
            self.counters.stale.fetch_add(1, Ordering::Relaxed);
            return Err(Response::Refused {
                ticket,
                why: Refusal::Stale,
            });
        }
        let mut next = cur.clone();
        next.last_rebind = t;
        next.tuple = Some(tuple);
        next.owner = self.me;
        Ok(PreparedRebind {
            ticket,
            epoch,
            index,
            expected: entry.mod_revision,
            record: next,
            old: cur.tuple,
            taken_over: cur.owner != self.me,
        })
    }

    /// The answer to a prepared REBIND, from etcd's.
    fn finish_rebind(
        &self,
        p: PreparedRebind,
        result: Result<Result<Committed, ClusterError>, tokio::time::error::Elapsed>,
    ) -> Response {
        let ticket = p.ticket;
        match result {
            Ok(Ok(Committed::Done { revision })) => {
                self.shared.lock().unwrap().mirror.record_own(
                    p.epoch,
                    p.index,
                    Entry {
                        record: p.record,
                        mod_revision: revision,
                    },
                );
                self.counters
                    .rebinds_committed
                    .fetch_add(1, Ordering::Relaxed);
                if p.taken_over {
                    self.counters
                        .rebinds_taken_over
                        .fetch_add(1, Ordering::Relaxed);
                }
                Response::Rebound {
                    ticket,
                    revision,
                    old: p.old,
                }
            }
            Ok(Ok(Committed::Conflict { .. })) => {
                self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
                Response::Refused {
                    ticket,
                    why: Refusal::Conflict,
                }
            }
            Ok(Err(e)) => Self::unavailable(ticket, e),
            Err(_) => Self::unavailable(ticket, "etcd timed out"),
        }
    }

    async fn rebind(
        &self,
        ticket: u64,
        epoch: u32,
        index: u32,
        t: Ticks,
        tuple: SocketAddr,
    ) -> Response {
        let p = match self.prepare_rebind(ticket, epoch, index, t, tuple) {
            Ok(p) => p,
            Err(answer) => return answer,
        };
        let mut registry = self.registry.clone();
        let result = tokio::time::timeout(
            self.timeout,
            registry.commit(p.epoch, p.index, p.expected, &p.record),
        )
        .await;
        self.finish_rebind(p, result)
    }

    /// REBINDs that queued up together, committed in one etcd transaction (each with its own
    /// compare): under a storm, one raft entry and one fsync carry up to
    /// [`MAX_COMMITS_PER_TXN`] of them. A second REBIND of a connection already in the batch
    /// goes alone.
    async fn rebind_batch(self: Arc<Self>, requests: Vec<(u64, u32, u32, Ticks, SocketAddr)>) {
        // A failed or timed-out transaction is tried again (prepared afresh from the copy)
        // until the budget is spent: an etcd leader election (a member died) stalls writes
        // for about a second, and the client is better served by a late ACK than by a
        // refusal it can only answer with retransmits.
        let started = tokio::time::Instant::now();
        let budget = (self.timeout * COMMIT_BUDGET_TIMEOUTS).min(COMMIT_BUDGET_MAX);
        let mut pause = Duration::from_millis(100);
        let mut keys = HashSet::with_capacity(requests.len());
        let mut pending = Vec::with_capacity(requests.len());
        for (ticket, epoch, index, t, tuple) in requests {
            if keys.insert((epoch, index)) {
                pending.push((ticket, epoch, index, t, tuple));
            } else {
                let link = self.clone();
                tokio::spawn(async move {
                    let answer = link.rebind(ticket, epoch, index, t, tuple).await;
                    link.answer(answer);
                });
            }
        }
        loop {
            let mut prepared = Vec::with_capacity(pending.len());
            for &(ticket, epoch, index, t, tuple) in &pending {
                match self.prepare_rebind(ticket, epoch, index, t, tuple) {
                    Ok(p) => prepared.push(((ticket, epoch, index, t, tuple), p)),
                    Err(answer) => self.answer(answer),
                }
            }
            if prepared.is_empty() {
                return;
            }
            self.counters.commit_batches.fetch_add(1, Ordering::Relaxed);
            let commits: Vec<(u32, u32, i64, &ConnRecord)> = prepared
                .iter()
                .map(|(_, p)| (p.epoch, p.index, p.expected, &p.record))
                .collect();
            let mut registry = self.registry.clone();
            let left = budget.saturating_sub(started.elapsed());
            let result =
                tokio::time::timeout(self.timeout.min(left), registry.commit_many(&commits)).await;
            drop(commits);
            let why = match result {
                Ok(Ok(answers)) => {
                    for ((_, p), a) in prepared.into_iter().zip(answers) {
                        let answer = self.finish_rebind(p, Ok(Ok(a)));
                        self.answer(answer);
                    }
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "etcd timed out".to_owned(),
            };
            if started.elapsed() + pause < budget {
                self.counters.commit_retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(400));
                pending = prepared.into_iter().map(|(req, _)| req).collect();
                continue;
            }
            for (_, p) in prepared {
                self.answer(Self::unavailable(p.ticket, &why));
            }
            return;
        }
    }

    async fn remove(&self, ticket: u64, epoch: u32, index: u32, conn_id: u64) -> Response {
        let Some(expected) = self
            .shared
            .lock()
            .unwrap()
            .mirror
            .get(epoch, index)
            .filter(|e| e.record.conn_id == conn_id)
            .map(|e| e.mod_revision)
        else {
            return Response::Refused {
                ticket,
                why: Refusal::Unknown,
            };
        };
        let mut registry = self.registry.clone();
        match tokio::time::timeout(self.timeout, registry.remove(epoch, index, expected)).await {
            Ok(Ok(true)) => {
                self.shared.lock().unwrap().mirror.forget(epoch, index);
                self.counters.removed.fetch_add(1, Ordering::Relaxed);
                Response::Removed { ticket }
            }
            Ok(Ok(false)) => Response::Refused {
                ticket,
                why: Refusal::Conflict,
            },
            Ok(Err(e)) => Self::unavailable(ticket, e),
            Err(_) => Self::unavailable(ticket, "etcd timed out"),
        }
    }
}
