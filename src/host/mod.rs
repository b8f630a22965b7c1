//! The reference echo host: PROTOCOL.md §7 (handshake, DATA echo) spoken over the host link
//! of [`crate::hostlink`].
//!
//! - [`HostCore`] is the sans-IO state machine: no sockets, no clock. It takes `now` and the
//!   source address of each host-link datagram (a gateway worker's socket) and writes its
//!   answer into a caller buffer. The DATA echo path does not allocate.
//! - [`run_host`] / [`spawn_host`] drive it on one thread and one UDP socket, with the
//!   project's batched `recvmmsg`/`sendmmsg` ([`crate::io::BatchSocket`]).
//!   The enrolled-clients file is reloaded on SIGHUP and when its mtime, size or inode
//!   changes (checked at most once per second by default).
//!
//! Handshake (§7), as the host sees it:
//!
//! ```text
//! gateway --TO_HOST_HANDSHAKE(tuple, HANDSHAKE)--> host     client_id known? AEAD? ticks ±10 min?
//!                                                           nonce unseen? -> random conn_id
//! gateway <--REGISTER(request, now, conn_id, tuple)-- host  resent every 500 ms, 5 sends at most
//! gateway --REGISTERED(request, conn_id, e, S, x, R, keys)--> host
//! gateway <--TO_CLIENT_REPLY(tuple, HANDSHAKE_REPLY)-- host with fresh kd_c2s, kd_s2c
//! ```
//!
//! Choices where PROTOCOL.md is silent:
//! - A client nonce is remembered until `max(now, client ticks) + 10 min`, the last moment a
//!   copy of that handshake could pass the ticks check; 10 minutes after first sight would let a
//!   handshake from a client whose clock runs ahead be replayed. Nonces are recorded only after
//!   the AEAD verifies, so forged handshakes cannot burn a client's nonce. The cache has a hard
//!   cap; when full, new handshakes are refused rather than old nonces evicted.
//! - A retransmitted HANDSHAKE (same nonce) gets the kept HANDSHAKE_REPLY again for 30 s, but
//!   only for the same client tuple (a copy replayed from another tuple could aim the larger
//!   reply at a victim); while REGISTER is outstanding it is ignored.
//! - Echo DATA goes to the gateway address that last forwarded DATA for the connection (after
//!   the AEAD and replay checks) or that sent REBOUND for it.
//! - A client uses one connection: the first DATA on one closes the client's other
//!   connections (earlier handshake attempts), a client holds at most
//!   [`MAX_UNPROVEN_PER_CLIENT`] at once, and connections idle for `idle_timeout` are closed.
#![forbid(unsafe_code)]

pub mod clients;
mod sansio;
#[cfg(test)]
mod tests;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::host::clients::ClientsFile;
use crate::hostlink::LinkKey;
use crate::io::BatchSocket;
use crate::io::batch::{SLOT_LEN, TxQueue, Via};
use crate::time::Ticks;

pub use self::sansio::{
    GatewayNet, HostConfig, HostCore, HostCounters, HostEvent, HostSendError, MAX_DATAGRAM,
    MAX_SEND_PAYLOAD, MAX_UNPROVEN_PER_CLIENT, Outgoing, SEND_QUEUE_LIMIT, Transmit,
};

/// How the host driver runs.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// Host-link address the gateway sends to (port 0 picks one; see [`HostHandle::local_addr`]).
    pub listen: SocketAddr,
    /// The enrolled-clients file (see [`crate::host::clients`]).
    pub clients: PathBuf,
    /// This host's link key, shared with the gateway.
    pub link_key: LinkKey,
    pub config: HostConfig,
    /// SO_RCVBUF and SO_SNDBUF request (the kernel caps it at `rmem_max`/`wmem_max`).
    pub socket_buffer: usize,
    /// Datagrams per `recvmmsg`/`sendmmsg`.
    pub batch: usize,
    /// How often the clients file's mtime is checked.
    pub reload_check: Duration,
    /// Reload the clients file on SIGHUP (installs a process-wide flag handler while running).
    pub reload_on_sighup: bool,
}

impl HostOptions {
    pub fn new(listen: SocketAddr, clients: PathBuf, link_key: LinkKey) -> Self {
        HostOptions {
            listen,
            clients,
            link_key,
            config: HostConfig::default(),
            socket_buffer: 4 << 20,
            batch: 32,
            reload_check: Duration::from_secs(1),
            reload_on_sighup: true,
        }
    }
}

/// The driver's view: core counters plus I/O and reload counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostStats {
    #[serde(flatten)]
    pub counters: HostCounters,
    pub connections: usize,
    pub pending: usize,
    pub clients: usize,
    pub reloads: u64,
    pub reload_errors: u64,
    pub send_errors: u64,
    pub recv_errors: u64,
    pub recv_truncated: u64,
}

/// A host running on its own thread.
#[derive(Debug)]
pub struct HostHandle {
    local_addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    live: Arc<Mutex<HostStats>>,
    thread: JoinHandle<anyhow::Result<HostStats>>,
}

impl HostHandle {
    /// The bound host-link address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The flag that stops the host when set.
    pub fn shutdown_flag(&self) -> Arc<AtomicBool> {
        self.shutdown.clone()
    }

    /// A snapshot of the stats, refreshed every ~50 ms by the host thread.
    pub fn stats(&self) -> HostStats {
        self.live.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stops the host and returns its final stats.
    pub fn stop(self) -> anyhow::Result<HostStats> {
        self.shutdown.store(true, Ordering::Relaxed);
        self.join()
    }

    /// Waits for the host to stop (after the shutdown flag is set).
    pub fn join(self) -> anyhow::Result<HostStats> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("host thread panicked"))?
    }
}

/// Runs the host on the calling thread until `shutdown` is set.
pub fn run_host(opts: HostOptions, shutdown: Arc<AtomicBool>) -> anyhow::Result<HostStats> {
    let server = Server::bind(&opts)?;
    server.run(&opts, &shutdown, None)
}

/// Binds the socket and loads the clients file on the calling thread (so errors surface
/// here), then runs the host on a new thread.
pub fn spawn_host(opts: HostOptions) -> anyhow::Result<HostHandle> {
    let server = Server::bind(&opts)?;
    let local_addr = server.sock.local_addr()?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let live = Arc::new(Mutex::new(HostStats::default()));
    let thread = {
        let (shutdown, live) = (shutdown.clone(), live.clone());
        std::thread::Builder::new()
            .name("mesh-host".into())
            .spawn(move || server.run(&opts, &shutdown, Some(&live)))?
    };
    Ok(HostHandle {
        local_addr,
        shutdown,
        live,
        thread,
    })
}

/// What identifies a version of the clients file.
type FileId = Option<(SystemTime, u64, u64)>;

fn file_id(path: &Path) -> FileId {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Sends what is queued; the socket counts what it could not send.
fn flush(sock: &mut BatchSocket, tx: &mut TxQueue) {
    if !tx.is_empty() {
        let _ = sock.send_batch(tx.iter().map(|(m, b)| (m.to, b)));
        tx.clear();
    }
}

struct Server {
    sock: UdpSocket,
    core: HostCore,
    file: FileId,
}

impl Server {
    fn bind(opts: &HostOptions) -> anyhow::Result<Server> {
        let file = file_id(&opts.clients);
        let clients = ClientsFile::load(&opts.clients)?;
        let sock = Socket::new(
            Domain::for_address(opts.listen),
            Type::DGRAM,
            Some(Protocol::UDP),
        )
        .context("creating the host-link socket")?;
        // Best effort: the kernel caps these at rmem_max / wmem_max.
        let _ = sock.set_recv_buffer_size(opts.socket_buffer);
        let _ = sock.set_send_buffer_size(opts.socket_buffer);
        sock.bind(&opts.listen.into())
            .with_context(|| format!("binding the host-link socket to {}", opts.listen))?;
        let sock: UdpSocket = sock.into();
        tracing::info!(
            listen = %sock.local_addr()?,
            clients = clients.len(),
            file = %opts.clients.display(),
            "host listening"
        );
        let mut core = HostCore::with_config(&opts.link_key, clients, opts.config.clone());
        core.set_start(Ticks::wall_clock());
        Ok(Server { sock, core, file })
    }

    fn run(
        mut self,
        opts: &HostOptions,
        shutdown: &AtomicBool,
        live: Option<&Mutex<HostStats>>,
    ) -> anyhow::Result<HostStats> {
        let sighup = Arc::new(AtomicBool::new(false));
        let sig_id = if opts.reload_on_sighup {
            Some(
                signal_hook::flag::register(signal_hook::consts::SIGHUP, sighup.clone())
                    .context("installing the SIGHUP handler")?,
            )
        } else {
            None
        };
        let batch = opts.batch.clamp(1, 1024);
        // A host-link datagram is a client datagram plus a 20-byte header: at most SLOT_LEN.
        let mut sock = BatchSocket::with_capacity(self.sock.try_clone()?, batch, SLOT_LEN)?;
        // One answer per received datagram, plus room for timer output.
        let mut tx = TxQueue::new(2 * batch);
        let mut stats = HostStats::default();
        let tick = duration(Duration::from_millis(50));
        let reload_every = duration(opts.reload_check);
        let mut next_tick = Ticks(0);
        let mut next_reload = Ticks::wall_clock().saturating_add(opts.reload_check);

        while !shutdown.load(Ordering::Relaxed) {
            let now = Ticks::wall_clock();
            let core = &mut self.core;
            let received = sock.recv_batch(Some(Duration::from_millis(50)), |from, d| {
                core.handle(now, from, d);
                // Output left when the queue is full waits in the core for the next drain.
                while !tx.is_full()
                    && tx.push_from(Via::Host, |slot| {
                        core.poll_transmit(now, slot).map(|o| (o.to, o.len))
                    })
                {}
            });
            if received.is_err() {
                // E.g. ECONNREFUSED reported for an earlier send: nothing to receive.
                stats.recv_errors += 1;
            }
            if now.0 >= next_tick.0 {
                next_tick = Ticks(now.0.saturating_add(tick));
                self.core.handle_timeout(now);
                let hup = sighup.swap(false, Ordering::Relaxed);
                if hup || now.0 >= next_reload.0 {
                    next_reload = Ticks(now.0.saturating_add(reload_every));
                    self.maybe_reload(&opts.clients, hup, &mut stats);
                }
                stats.send_errors = sock.dropped();
                stats.recv_truncated = sock.truncated();
                if let Some(live) = live
                    && let Ok(mut l) = live.lock()
                {
                    *l = self.snapshot(&stats);
                }
            }
            // Timer output, and any left over when the queue filled during the batch.
            loop {
                if tx.is_full() {
                    flush(&mut sock, &mut tx);
                }
                let core = &mut self.core;
                if !tx.push_from(Via::Host, |slot| {
                    core.poll_transmit(now, slot).map(|o| (o.to, o.len))
                }) {
                    break;
                }
            }
            flush(&mut sock, &mut tx);
        }
        stats.send_errors = sock.dropped();
        stats.recv_truncated = sock.truncated();
        if let Some(id) = sig_id {
            signal_hook::low_level::unregister(id);
        }
        let stats = self.snapshot(&stats);
        if let Some(live) = live
            && let Ok(mut l) = live.lock()
        {
            *l = stats.clone();
        }
        tracing::info!(
            connections = stats.connections,
            handshakes = stats.counters.handshakes_ok,
            registrations = stats.counters.registrations,
            echoes = stats.counters.echoes,
            send_errors = stats.send_errors,
            "host stopped"
        );
        Ok(stats)
    }

    fn maybe_reload(&mut self, path: &Path, forced: bool, stats: &mut HostStats) {
        let id = file_id(path);
        if !forced && id == self.file {
            return;
        }
        self.file = id;
        match ClientsFile::load(path) {
            Ok(f) => {
                stats.reloads += 1;
                tracing::info!(clients = f.len(), file = %path.display(), "clients file reloaded");
                self.core.replace_clients(f);
            }
            Err(e) => {
                stats.reload_errors += 1;
                tracing::warn!(error = %e, "clients file reload failed; keeping the previous list");
            }
        }
    }

    fn snapshot(&self, stats: &HostStats) -> HostStats {
        HostStats {
            counters: self.core.counters().clone(),
            connections: self.core.connections(),
            pending: self.core.pending(),
            clients: self.core.clients().len(),
            ..stats.clone()
        }
    }
}

fn duration(d: Duration) -> u64 {
    crate::time::duration_ticks(d)
}
