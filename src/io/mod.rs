//! Per-worker UDP I/O loops. Three backends behind one [`Handler`] interface:
//!
//! - [`IoBackend::Uring`]: one io_uring per worker, a multishot `RecvMsgMulti` per socket over
//!   a provided buffer ring, `SendMsg` per outgoing datagram (`uring.rs`).
//! - [`IoBackend::Mmsg`]: `poll(2)` + `recvmmsg(2)`/`sendmmsg(2)` (`mmsg.rs`).
//! - [`IoBackend::Xdp`]: an XDP program steers the client ports to one AF_XDP socket per
//!   worker and queue, beside the worker's kernel sockets (`xdp/`, docs/xdp.md).
//!
//! The loop is thin: reap a batch → [`Handler::handle_batch`] → send what it queued in the
//! [`TxQueue`]. No allocation, logging or locking per packet. Unsafe code lives only in the two
//! backend files, `xdp/sys.rs` and `ids.rs` (one `geteuid` call), each opting in with
//! `#![allow(unsafe_code)]`; this file is unsafe-free
//! (`deny`, not `forbid`: a `forbid` here would make the backends' `allow` an error, E0453).
#![deny(unsafe_code)]

pub mod batch;
pub mod ids;
mod mmsg;
pub mod poll;
mod uring;
pub mod xdp;

pub use mmsg::BatchSocket;

use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use batch::{TxQueue, Via};

/// Which I/O loop a worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    Uring,
    Mmsg,
    /// AF_XDP (`xdp/`): needs [`xdp::Xdp::setup`] and [`xdp::run_loop_xdp`]; falls back to
    /// `Uring` (then `Mmsg`) when it cannot be set up.
    Xdp,
}

impl IoBackend {
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Mmsg => "mmsg",
            IoBackend::Xdp => "xdp",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for IoBackend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uring" | "io_uring" | "io-uring" => Ok(IoBackend::Uring),
            "mmsg" => Ok(IoBackend::Mmsg),
            "xdp" | "af_xdp" | "af-xdp" => Ok(IoBackend::Xdp),
            other => Err(format!(
                "unknown I/O backend {other:?} (expected \"uring\", \"mmsg\" or \"xdp\")"
            )),
        }
    }
}

/// The sockets one worker serves. `clients[i]` is [`Via::Client`]`(i as u8)` (at most 255).
pub struct WorkerSockets {
    pub clients: Vec<UdpSocket>,
    pub host: UdpSocket,
}

impl WorkerSockets {
    /// Sockets in loop order: the clients, then the host.
    fn count(&self) -> usize {
        self.clients.len() + 1
    }

    fn get(&self, s: usize) -> &UdpSocket {
        self.clients.get(s).unwrap_or(&self.host)
    }

    fn via(&self, s: usize) -> Via {
        if s < self.clients.len() {
            Via::Client(s as u8)
        } else {
            Via::Host
        }
    }

    fn index(&self, via: Via) -> Option<usize> {
        match via {
            Via::Client(i) if usize::from(i) < self.clients.len() => Some(usize::from(i)),
            Via::Client(_) => None,
            Via::Host => Some(self.clients.len()),
        }
    }

    /// Per socket in loop order: is it an IPv6 socket?
    fn families(&self) -> io::Result<Vec<bool>> {
        (0..self.count())
            .map(|s| Ok(self.get(s).local_addr()?.is_ipv6()))
            .collect()
    }

    fn check(&self) -> io::Result<()> {
        if self.clients.len() > usize::from(u8::MAX) + 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "more than 256 client sockets",
            ));
        }
        for s in 0..self.count() {
            self.get(s).set_nonblocking(true)?;
        }
        Ok(())
    }
}

pub use batch::Rx;

/// What a worker loop drives. Both backends call it identically.
pub trait Handler {
    /// A batch of received datagrams (at most `batch`, across all of the worker's sockets),
    /// never empty. Push replies into `tx`; the loop sends them after this returns (and after
    /// `tick`, when one is due). `rx` borrows the loop's receive buffers: copy what you keep.
    fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue);
    /// Called at least every `tick` (also when idle) for timers and housekeeping.
    fn tick(&mut self, tx: &mut TxQueue);
    /// `n` queued datagrams could not be sent (socket full after a short wait, refused by the
    /// kernel, or a `Via` the worker doesn't have). Called at most once per batch.
    fn on_send_errors(&mut self, _n: u64) {}
    /// `n` received datagrams were longer than `buffer_len` and were dropped.
    fn on_truncated(&mut self, _n: u64) {}
    /// The loop's counters so far; called once per loop iteration, after its sends, so a
    /// handler can publish them (e.g. copy the errors into its metrics) while the loop runs.
    fn on_io_stats(&mut self, _stats: &IoStats) {}
}

/// Loop sizing.
#[derive(Clone, Debug)]
pub struct LoopOptions {
    /// Most datagrams per `handle_batch` call (mmsg: at most 1024).
    pub batch: usize,
    /// Longest wait between `tick` calls; also bounds how late a shutdown is noticed.
    pub tick: Duration,
    /// Slots in the worker's `TxQueue`.
    pub tx_capacity: usize,
    /// Largest datagram received; longer ones are dropped and counted as truncated.
    pub buffer_len: usize,
    /// io_uring: buffers in the provided buffer ring (rounded up to a power of two, at least
    /// `batch`, at most 32768).
    pub ring_buffers: usize,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions {
            batch: 64,
            tick: Duration::from_millis(10),
            tx_capacity: 256,
            buffer_len: 2048,
            ring_buffers: 1024,
        }
    }
}

impl LoopOptions {
    fn check(&self) -> io::Result<()> {
        let bad = |what: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("LoopOptions: {what}"),
            ))
        };
        if self.batch == 0 {
            return bad("batch must be at least 1");
        }
        if self.tick.is_zero() {
            return bad("tick must be positive");
        }
        if self.tx_capacity == 0 {
            return bad("tx_capacity must be at least 1");
        }
        if self.buffer_len == 0 || self.buffer_len > 65_536 {
            return bad("buffer_len must be in 1..=65536");
        }
        if self.ring_buffers.max(self.batch) > 32_768 {
            return bad("ring_buffers (and batch) must be at most 32768");
        }
        Ok(())
    }
}

/// Counters of one loop run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Datagrams handed to the handler.
    pub received: u64,
    /// Datagrams the kernel accepted for sending.
    pub sent: u64,
    /// Queued datagrams not sent (see [`Handler::on_send_errors`]).
    pub send_errors: u64,
    /// `send_errors` by reason.
    pub send_error_reasons: SendErrors,
    /// Received datagrams dropped for exceeding `buffer_len`.
    pub truncated: u64,
    /// Received datagrams dropped for another reason (unparseable sender, recv error).
    pub rx_errors: u64,
    /// io_uring: times the provided buffer ring ran dry (`ENOBUFS`; the kernel queues or drops).
    pub no_buffers: u64,
    /// `handle_batch` calls.
    pub batches: u64,
    /// AF_XDP: frames taken from the XSK's RX ring (`received` counts the datagrams of them
    /// that reached the handler; malformed ones count as `rx_errors`).
    pub xdp_received: u64,
    /// AF_XDP: datagrams sent as frames on the XSK (included in `sent`).
    pub xdp_sent: u64,
    /// AF_XDP: client datagrams sent through the kernel socket instead (no neighbour entry
    /// yet, too long for the MTU, or no free frame; included in `sent`).
    pub xdp_kernel_sent: u64,
    /// Batch sizes: 1, 2–3, 4–7, 8–15, 16–31, 32–63, 64–127, 128+.
    pub batch_sizes: [u64; 8],
}

/// Why queued datagrams were not sent; the fields add up to [`IoStats::send_errors`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendErrors {
    /// The datagram named a `Via` the worker has no socket for.
    pub no_socket: u64,
    /// The socket stayed full (`EAGAIN`/`ENOBUFS`) past the loop's short wait, or the send
    /// was cancelled for taking too long.
    pub socket_full: u64,
    /// The kernel refused the datagram (bad address, `EMSGSIZE`, an ICMP error, ...).
    pub refused: u64,
}

impl SendErrors {
    fn merge(&mut self, o: &SendErrors) {
        self.no_socket += o.no_socket;
        self.socket_full += o.socket_full;
        self.refused += o.refused;
    }
}

impl IoStats {
    fn record_batch(&mut self, n: usize) {
        self.received += n as u64;
        self.batches += 1;
        let bucket = (usize::BITS - 1 - n.max(1).leading_zeros()).min(7) as usize;
        self.batch_sizes[bucket] += 1;
    }

    /// Adds another run's counters (e.g. to total the workers).
    pub fn merge(&mut self, o: &IoStats) {
        self.received += o.received;
        self.sent += o.sent;
        self.send_errors += o.send_errors;
        self.send_error_reasons.merge(&o.send_error_reasons);
        self.truncated += o.truncated;
        self.rx_errors += o.rx_errors;
        self.no_buffers += o.no_buffers;
        self.batches += o.batches;
        self.xdp_received += o.xdp_received;
        self.xdp_sent += o.xdp_sent;
        self.xdp_kernel_sent += o.xdp_kernel_sent;
        for (a, b) in self.batch_sizes.iter_mut().zip(o.batch_sizes) {
            *a += b;
        }
    }

    /// Mean datagrams per batch.
    pub fn mean_batch(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.received as f64 / self.batches as f64
        }
    }
}

/// Tick deadline bookkeeping shared by both loops.
struct Ticker {
    every: Duration,
    next: Instant,
}

impl Ticker {
    fn new(every: Duration) -> Self {
        Ticker {
            every,
            next: Instant::now() + every,
        }
    }

    /// How long the loop may wait before the next tick is due.
    fn remaining(&self, now: Instant) -> Duration {
        self.next.saturating_duration_since(now)
    }

    /// True (and the next tick scheduled) when a tick is due.
    fn due(&mut self, now: Instant) -> bool {
        if now >= self.next {
            self.next = now + self.every;
            true
        } else {
            false
        }
    }
}

/// Empties `v` and gives its allocation back with a new lifetime, so the loops keep one `Rx`
/// vector for their whole run (in-place `collect` reuses the buffer: same layout).
fn recycle<'b>(mut v: Vec<Rx<'_>>) -> Vec<Rx<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| -> Rx<'b> { unreachable!() })
        .collect()
}

/// Runs until `shutdown` is set (checked at least every tick), then finishes the in-flight
/// batch and returns. Call on the worker's own thread (the io_uring is single-issuer).
pub fn run_loop(
    backend: IoBackend,
    sockets: &WorkerSockets,
    handler: &mut impl Handler,
    shutdown: &AtomicBool,
    opts: &LoopOptions,
) -> io::Result<IoStats> {
    opts.check()?;
    sockets.check()?;
    match backend {
        IoBackend::Uring => uring::run(sockets, handler, shutdown, opts),
        IoBackend::Mmsg => mmsg::run(sockets, handler, shutdown, opts),
        IoBackend::Xdp => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the xdp backend runs through xdp::Xdp::setup and xdp::run_loop_xdp, not run_loop",
        )),
    }
}

/// Probes io_uring end to end: a ring with the loop's setup flags, a provided buffer ring, a
/// multishot `RecvMsgMulti` receiving one datagram on loopback and a `SendMsg` answering it.
/// `Err(reason)` if any of that is unusable.
pub fn probe_uring() -> Result<(), String> {
    struct Probe<'a> {
        stop: &'a AtomicBool,
        deadline: Instant,
        answered: bool,
    }
    impl Handler for Probe<'_> {
        fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
            for r in rx.iter().filter(|r| r.data == b"probe") {
                tx.push_bytes(r.via, r.from, b"pong");
                self.answered = true;
                self.stop.store(true, Ordering::Relaxed);
            }
        }
        fn tick(&mut self, _tx: &mut TxQueue) {
            if Instant::now() > self.deadline {
                self.stop.store(true, Ordering::Relaxed);
            }
        }
    }

    let err = |what: &str, e: io::Error| format!("{what}: {e}");
    let host = UdpSocket::bind("127.0.0.1:0").map_err(|e| err("bind", e))?;
    let peer = UdpSocket::bind("127.0.0.1:0").map_err(|e| err("bind", e))?;
    peer.send_to(
        b"probe",
        host.local_addr().map_err(|e| err("local_addr", e))?,
    )
    .map_err(|e| err("send", e))?;
    let sockets = WorkerSockets {
        clients: Vec::new(),
        host,
    };
    let stop = AtomicBool::new(false);
    let mut h = Probe {
        stop: &stop,
        deadline: Instant::now() + Duration::from_secs(1),
        answered: false,
    };
    let opts = LoopOptions {
        batch: 4,
        tick: Duration::from_millis(10),
        tx_capacity: 4,
        buffer_len: 64,
        ring_buffers: 8,
    };
    let stats = run_loop(IoBackend::Uring, &sockets, &mut h, &stop, &opts)
        .map_err(|e| err("io_uring loop", e))?;
    if !h.answered {
        return Err("multishot recvmsg delivered nothing within 1 s".into());
    }
    if stats.sent != 1 {
        return Err("SendMsg failed".into());
    }
    peer.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| err("set_read_timeout", e))?;
    let mut buf = [0u8; 16];
    match peer.recv_from(&mut buf) {
        Ok((4, _)) if &buf[..4] == b"pong" => Ok(()),
        Ok(_) => Err("SendMsg delivered a wrong datagram".into()),
        Err(e) => Err(err("reply not received", e)),
    }
}

/// `Uring` if requested and [`probe_uring`] succeeds (probed once per process), else `Mmsg`,
/// logging why once.
pub fn select_backend(requested: IoBackend) -> IoBackend {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    if requested == IoBackend::Mmsg {
        return IoBackend::Mmsg;
    }
    let mut first = false;
    let probe = PROBE.get_or_init(|| {
        first = true;
        probe_uring()
    });
    match probe {
        Ok(()) => IoBackend::Uring,
        Err(reason) => {
            if first {
                tracing::warn!(%reason, "io_uring unusable, falling back to recvmmsg/sendmmsg");
            }
            IoBackend::Mmsg
        }
    }
}

/// [`select_backend`] with AF_XDP: for `Xdp`, sets it up for the resolved `listen` addresses
/// and `workers` workers; if that fails, logs why once and falls back to io_uring (then mmsg),
/// as `select_backend` does. Run each worker with [`run_worker`] and its
/// [`xdp::Xdp::take_worker`].
pub fn select_backend_xdp(
    requested: IoBackend,
    cfg: &xdp::XdpConfig,
    listen: &[SocketAddr],
    workers: usize,
) -> (IoBackend, Option<xdp::Xdp>) {
    if requested != IoBackend::Xdp {
        return (select_backend(requested), None);
    }
    match xdp::Xdp::setup(cfg, listen, workers) {
        Ok(x) => {
            tracing::info!(setup = x.summary(), "I/O backend: AF_XDP");
            (IoBackend::Xdp, Some(x))
        }
        Err(reason) => {
            let fallback = select_backend(IoBackend::Uring);
            tracing::warn!(%reason, %fallback, "AF_XDP unusable, falling back");
            (fallback, None)
        }
    }
}

/// Runs one worker: on its AF_XDP socket if it has one, else on `backend` (for `Xdp` without
/// a socket, i.e. more workers than the interface has queues: io_uring, else mmsg).
pub fn run_worker(
    backend: IoBackend,
    xdp: Option<xdp::XdpWorker>,
    sockets: &WorkerSockets,
    handler: &mut impl Handler,
    shutdown: &AtomicBool,
    opts: &LoopOptions,
) -> io::Result<IoStats> {
    match (xdp, backend) {
        (Some(w), _) => xdp::run_loop_xdp(w, sockets, handler, shutdown, opts),
        (None, IoBackend::Xdp) => run_loop(
            select_backend(IoBackend::Uring),
            sockets,
            handler,
            shutdown,
            opts,
        ),
        (None, b) => run_loop(b, sockets, handler, shutdown, opts),
    }
}

/// Binds a nonblocking UDP socket, with `SO_REUSEPORT` if asked (per-worker client sockets),
/// `IPV6_V6ONLY` for IPv6 addresses, and send/receive buffers of `buf_bytes` (forced past
/// `rmem_max`/`wmem_max` with `SO_*BUFFORCE` when privileged, else as large as allowed).
/// `buf_bytes == 0` keeps the system defaults.
pub fn bind_udp(addr: SocketAddr, reuseport: bool, buf_bytes: usize) -> io::Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if reuseport {
        sock.set_reuse_port(true)?;
    }
    if buf_bytes > 0 {
        let fd = sock.as_raw_fd();
        let n = i32::try_from(buf_bytes).unwrap_or(i32::MAX);
        if mmsg::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, n).is_err() {
            sock.set_recv_buffer_size(buf_bytes)?;
        }
        if mmsg::set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, n).is_err() {
            sock.set_send_buffer_size(buf_bytes)?;
        }
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    /// `recv_from` that retries when a signal interrupts it (some kernels deliver io_uring
    /// task-work notifications to other threads of the test process).
    fn recv_retrying(
        sock: &std::net::UdpSocket,
        buf: &mut [u8],
    ) -> std::io::Result<(usize, std::net::SocketAddr)> {
        loop {
            match sock.recv_from(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    use super::*;
    use std::net::IpAddr;
    use std::sync::Arc;
    use std::thread;

    #[test]
    fn backend_parse_and_name() {
        assert_eq!("uring".parse::<IoBackend>(), Ok(IoBackend::Uring));
        assert_eq!("io_uring".parse::<IoBackend>(), Ok(IoBackend::Uring));
        assert_eq!("MMSG".parse::<IoBackend>(), Ok(IoBackend::Mmsg));
        assert!("epoll".parse::<IoBackend>().is_err());
        for b in [IoBackend::Uring, IoBackend::Mmsg] {
            assert_eq!(b.name().parse::<IoBackend>(), Ok(b));
            assert_eq!(b.to_string(), b.name());
        }
        assert_eq!(select_backend(IoBackend::Mmsg), IoBackend::Mmsg);
    }

    #[test]
    fn recycle_keeps_the_allocation() {
        let data = [1u8, 2, 3];
        let mut v: Vec<Rx<'_>> = Vec::with_capacity(64);
        v.push(Rx {
            via: Via::Host,
            from: "127.0.0.1:1".parse().unwrap(),
            data: &data,
        });
        let (ptr, cap) = (v.as_ptr() as usize, v.capacity());
        let w: Vec<Rx<'static>> = recycle(v);
        assert!(w.is_empty());
        assert_eq!((w.as_ptr() as usize, w.capacity()), (ptr, cap));
    }

    #[test]
    fn batch_size_buckets() {
        let mut s = IoStats::default();
        for n in [1, 2, 3, 4, 63, 64, 127, 128, 1000] {
            s.record_batch(n);
        }
        assert_eq!(s.batch_sizes, [1, 2, 1, 0, 0, 1, 2, 2]);
        assert_eq!(s.batches, 9);
    }

    #[test]
    fn options_are_checked() {
        assert!(LoopOptions::default().check().is_ok());
        let bad = LoopOptions {
            batch: 0,
            ..LoopOptions::default()
        };
        assert!(bad.check().is_err());
    }

    // ---- loop tests on loopback -------------------------------------------------------------

    fn uring_available() -> bool {
        match probe_uring() {
            Ok(()) => true,
            Err(reason) => {
                println!("skipped: io_uring unavailable: {reason}");
                false
            }
        }
    }

    /// Echoes each datagram to its sender through the socket it came in on, and forwards a
    /// copy through the host socket to `host_peer`.
    #[derive(Default)]
    struct Echo {
        host_peer: Option<SocketAddr>,
        ticks: u64,
        send_errors: u64,
        truncated: u64,
    }

    impl Handler for Echo {
        fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
            assert!(!rx.is_empty());
            for r in rx {
                tx.push_bytes(r.via, r.from, r.data);
                if let Some(h) = self.host_peer {
                    tx.push_bytes(Via::Host, h, r.data);
                }
            }
        }
        fn tick(&mut self, _tx: &mut TxQueue) {
            self.ticks += 1;
        }
        fn on_send_errors(&mut self, n: u64) {
            self.send_errors += n;
        }
        fn on_truncated(&mut self, n: u64) {
            self.truncated += n;
        }
    }

    struct Server {
        clients: Vec<SocketAddr>,
        host: SocketAddr,
        stop: Arc<AtomicBool>,
        join: thread::JoinHandle<(io::Result<IoStats>, Echo)>,
    }

    impl Server {
        fn start(
            backend: IoBackend,
            ip: IpAddr,
            nclients: usize,
            host_peer: Option<SocketAddr>,
            opts: LoopOptions,
        ) -> Server {
            let clients: Vec<UdpSocket> = (0..nclients)
                .map(|_| bind_udp(SocketAddr::new(ip, 0), true, 4 << 20).unwrap())
                .collect();
            let host = bind_udp(SocketAddr::new(ip, 0), false, 4 << 20).unwrap();
            let addrs = clients.iter().map(|s| s.local_addr().unwrap()).collect();
            let host_addr = host.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let join = thread::spawn(move || {
                let sockets = WorkerSockets { clients, host };
                let mut h = Echo {
                    host_peer,
                    ..Echo::default()
                };
                let r = run_loop(backend, &sockets, &mut h, &stop2, &opts);
                (r, h)
            });
            Server {
                clients: addrs,
                host: host_addr,
                stop,
                join,
            }
        }

        fn stop(self) -> (IoStats, Echo) {
            self.stop.store(true, Ordering::Relaxed);
            let (r, h) = self.join.join().unwrap();
            (r.unwrap(), h)
        }
    }

    const SIZES: [usize; 7] = [8, 13, 64, 300, 1200, 1472, 2048];

    fn payload(i: usize, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&(i as u32).to_le_bytes());
        out.extend((4..SIZES[i % SIZES.len()]).map(|j| (i * 31 + j) as u8));
    }

    fn check_payload(data: &[u8]) -> usize {
        let i = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        let mut want = Vec::new();
        payload(i, &mut want);
        assert_eq!(data, &want[..], "datagram {i} corrupted");
        i
    }

    /// Sends `count` datagrams round-robin to the server's client sockets with at most
    /// `window` unanswered, and checks every echo: intact, once, from the right socket.
    fn drive_echo(server: &Server, ip: IpAddr, count: usize, window: usize) {
        let sock = bind_udp(SocketAddr::new(ip, 0), false, 8 << 20).unwrap();
        let mut bs = BatchSocket::new(sock).unwrap();
        let mut bufs: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        let mut seen = vec![false; count];
        let (mut next, mut done) = (0, 0);
        while done < count {
            let k = (window - (next - done)).min(count - next);
            if k > 0 {
                bufs.resize_with(k, || (server.host, Vec::new()));
                for (j, (to, p)) in bufs.iter_mut().enumerate() {
                    *to = server.clients[(next + j) % server.clients.len()];
                    payload(next + j, p);
                }
                assert_eq!(
                    bs.send_batch(bufs.iter().map(|(a, p)| (*a, &p[..])))
                        .unwrap(),
                    k
                );
                next += k;
            }
            let n = bs
                .recv_batch(Some(Duration::from_secs(2)), |from, data| {
                    let i = check_payload(data);
                    assert_eq!(
                        from,
                        server.clients[i % server.clients.len()],
                        "datagram {i} echoed via the wrong socket"
                    );
                    assert!(!seen[i], "datagram {i} echoed twice");
                    seen[i] = true;
                })
                .unwrap();
            assert!(n > 0, "echo timed out after {done}/{count}");
            done += n;
        }
        assert_eq!(bs.dropped(), 0);
    }

    /// Collects the host copies in a thread: returns how many arrived intact from `host`.
    fn host_sink(
        ip: IpAddr,
        count: usize,
    ) -> (SocketAddr, thread::JoinHandle<(usize, Option<SocketAddr>)>) {
        let sock = bind_udp(SocketAddr::new(ip, 0), false, 8 << 20).unwrap();
        let addr = sock.local_addr().unwrap();
        let join = thread::spawn(move || {
            let mut bs = BatchSocket::new(sock).unwrap();
            let (mut n, mut from_addr) = (0, None);
            while n < count {
                let got = bs
                    .recv_batch(Some(Duration::from_secs(3)), |from, data| {
                        check_payload(data);
                        assert!(from_addr.is_none_or(|a| a == from));
                        from_addr = Some(from);
                    })
                    .unwrap();
                if got == 0 {
                    break;
                }
                n += got;
            }
            (n, from_addr)
        });
        (addr, join)
    }

    fn echo_test(backend: IoBackend, ip: IpAddr, count: usize) {
        let (sink, sink_join) = host_sink(ip, count);
        let server = Server::start(backend, ip, 2, Some(sink), LoopOptions::default());
        drive_echo(&server, ip, count, 32);
        let (copies, copies_from) = sink_join.join().unwrap();
        let host = server.host;
        let (stats, h) = server.stop();
        assert_eq!(copies, count, "host copies");
        assert_eq!(
            copies_from,
            Some(host),
            "host copies must come from the host socket"
        );
        assert_eq!(stats.received, count as u64);
        assert_eq!(stats.sent, 2 * count as u64);
        assert_eq!(
            (stats.send_errors, h.send_errors, stats.truncated),
            (0, 0, 0)
        );
        assert_eq!(stats.batch_sizes.iter().sum::<u64>(), stats.batches);
        assert!(stats.batches >= 1 && stats.batches <= stats.received);
    }

    const V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);

    #[test]
    fn mmsg_echo_v4() {
        echo_test(IoBackend::Mmsg, V4, 10_000);
    }

    #[test]
    fn uring_echo_v4() {
        if uring_available() {
            echo_test(IoBackend::Uring, V4, 10_000);
        }
    }

    #[test]
    fn mmsg_echo_v6() {
        echo_test(IoBackend::Mmsg, V6, 2_000);
    }

    #[test]
    fn uring_echo_v6() {
        if uring_available() {
            echo_test(IoBackend::Uring, V6, 2_000);
        }
    }

    fn truncation_test(backend: IoBackend) {
        let opts = LoopOptions {
            buffer_len: 512,
            ..LoopOptions::default()
        };
        let server = Server::start(backend, V4, 1, None, opts);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = server.clients[0];
        for len in [513, 512, 10, 4000] {
            sock.send_to(&vec![len as u8; len], to).unwrap();
        }
        let mut buf = [0u8; 4096];
        for want in [512, 10] {
            let (n, from) = recv_retrying(&sock, &mut buf).unwrap();
            assert_eq!((n, from), (want, to));
            assert!(buf[..n].iter().all(|&b| b == want as u8));
        }
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        assert!(
            recv_retrying(&sock, &mut buf).is_err(),
            "an oversized datagram was delivered"
        );
        let (stats, h) = server.stop();
        assert_eq!((stats.truncated, h.truncated, stats.received), (2, 2, 2));
    }

    #[test]
    fn mmsg_truncation() {
        truncation_test(IoBackend::Mmsg);
    }

    #[test]
    fn uring_truncation() {
        if uring_available() {
            truncation_test(IoBackend::Uring);
        }
    }

    /// Idle: tick keeps coming; shutdown is noticed within about two ticks.
    fn idle_tick_shutdown_test(backend: IoBackend) {
        let tick = Duration::from_millis(10);
        let opts = LoopOptions {
            tick,
            ..LoopOptions::default()
        };
        let server = Server::start(backend, V4, 1, None, opts);
        thread::sleep(Duration::from_millis(120));
        let t = Instant::now();
        let (stats, h) = server.stop();
        let took = t.elapsed();
        assert!(
            took <= 2 * tick + Duration::from_millis(15),
            "shutdown took {took:?}"
        );
        // 12 ticks are due; a loaded 2-core CI machine can starve a few.
        assert!(h.ticks >= 3, "only {} ticks in 120 ms", h.ticks);
        assert_eq!(stats.received, 0);
    }

    #[test]
    fn mmsg_idle_tick_and_shutdown() {
        idle_tick_shutdown_test(IoBackend::Mmsg);
    }

    #[test]
    fn uring_idle_tick_and_shutdown() {
        if uring_available() {
            idle_tick_shutdown_test(IoBackend::Uring);
        }
    }

    #[test]
    fn send_to_missing_via_is_an_error() {
        struct Bad;
        impl Handler for Bad {
            fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
                for r in rx {
                    tx.push_bytes(Via::Client(9), r.from, r.data);
                    tx.push_bytes(r.via, r.from, r.data);
                    // An IPv6 destination on an IPv4 socket: the kernel refuses it.
                    tx.push_bytes(r.via, "[2001:db8::1]:9".parse().unwrap(), r.data);
                }
            }
            fn tick(&mut self, _tx: &mut TxQueue) {}
        }
        let mut backends = vec![IoBackend::Mmsg];
        if uring_available() {
            backends.push(IoBackend::Uring);
        }
        for backend in backends {
            let host = bind_udp("127.0.0.1:0".parse().unwrap(), false, 0).unwrap();
            let to = host.local_addr().unwrap();
            let sockets = WorkerSockets {
                clients: Vec::new(),
                host,
            };
            let stop = Arc::new(AtomicBool::new(false));
            let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let stop2 = stop.clone();
            let t = thread::spawn(move || {
                run_loop(backend, &sockets, &mut Bad, &stop2, &LoopOptions::default())
            });
            peer.send_to(b"x", to).unwrap();
            let mut buf = [0u8; 8];
            assert_eq!(recv_retrying(&peer, &mut buf).unwrap(), (1, to));
            stop.store(true, Ordering::Relaxed);
            let stats = t.join().unwrap().unwrap();
            assert_eq!((stats.sent, stats.send_errors), (1, 2), "{backend}");
            assert_eq!(
                stats.send_error_reasons,
                SendErrors {
                    no_socket: 1,
                    refused: 1,
                    ..SendErrors::default()
                },
                "{backend}"
            );
        }
    }

    #[test]
    fn batch_socket_roundtrip() {
        let a = BatchSocket::new(bind_udp("127.0.0.1:0".parse().unwrap(), false, 1 << 20).unwrap());
        let mut a = a.unwrap();
        let mut b = BatchSocket::with_capacity(
            bind_udp("127.0.0.1:0".parse().unwrap(), false, 1 << 20).unwrap(),
            16,
            1500,
        )
        .unwrap();
        let b_addr = b.socket().local_addr().unwrap();
        let a_addr = a.socket().local_addr().unwrap();
        let msgs: Vec<Vec<u8>> = (0..200).map(|i| vec![i as u8; 1 + i * 7]).collect();
        assert_eq!(
            a.send_batch(msgs.iter().map(|m| (b_addr, &m[..]))).unwrap(),
            200
        );
        let mut got = Vec::new();
        while got.len() < 200 {
            let n = b
                .recv_batch(Some(Duration::from_secs(1)), |from, data| {
                    assert_eq!(from, a_addr);
                    got.push(data.to_vec());
                })
                .unwrap();
            assert!(n > 0 && n <= 16);
        }
        assert_eq!(got, msgs);
        // Nothing left: a zero timeout returns at once, a short one after waiting.
        assert_eq!(b.recv_batch(Some(Duration::ZERO), |_, _| ()).unwrap(), 0);
        let t = Instant::now();
        assert_eq!(
            b.recv_batch(Some(Duration::from_millis(20)), |_, _| ())
                .unwrap(),
            0
        );
        assert!(t.elapsed() >= Duration::from_millis(19));
        // Longer than the buffer: counted, not delivered.
        a.send_batch([(b_addr, &[7u8; 1501][..]), (b_addr, &[8u8; 3][..])])
            .unwrap();
        let mut n = 0;
        while n == 0 {
            n = b
                .recv_batch(Some(Duration::from_secs(1)), |_, d| {
                    assert_eq!(d, &[8u8; 3])
                })
                .unwrap();
        }
        assert_eq!(b.truncated(), 1);
    }

    /// CPU time (user + system) of the calling thread, at clock-tick (10 ms) resolution.
    fn thread_cpu() -> Duration {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: u64 = fields
            .get(11..13)
            .map_or(0, |f| f.iter().map(|x| x.parse::<u64>().unwrap_or(0)).sum());
        Duration::from_millis(ticks * 10)
    }

    /// One worker echo loop per backend, driven by a `sendmmsg` client with a window.
    /// `cargo test --release --lib io::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn throughput_echo() {
        let secs = 2.0;
        let mut backends = vec![IoBackend::Mmsg];
        if uring_available() {
            backends.push(IoBackend::Uring);
        }
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        for round in 0..3 {
            for &backend in &backends {
                let (server_core, client_core) = (cores.first().copied(), cores.get(1).copied());
                let server = {
                    let clients =
                        vec![bind_udp("127.0.0.1:0".parse().unwrap(), true, 4 << 20).unwrap()];
                    let host = bind_udp("127.0.0.1:0".parse().unwrap(), false, 4 << 20).unwrap();
                    let addrs = vec![clients[0].local_addr().unwrap()];
                    let host_addr = host.local_addr().unwrap();
                    let stop = Arc::new(AtomicBool::new(false));
                    let stop2 = stop.clone();
                    let join = thread::spawn(move || {
                        if let Some(c) = server_core {
                            core_affinity::set_for_current(c);
                        }
                        let sockets = WorkerSockets { clients, host };
                        let mut h = Echo::default();
                        let cpu0 = thread_cpu();
                        let r =
                            run_loop(backend, &sockets, &mut h, &stop2, &LoopOptions::default());
                        h.ticks = (thread_cpu() - cpu0).as_millis() as u64; // server CPU ms
                        (r, h)
                    });
                    Server {
                        clients: addrs,
                        host: host_addr,
                        stop,
                        join,
                    }
                };
                let to = server.clients[0];
                let drive = thread::spawn(move || {
                    if let Some(c) = client_core {
                        core_affinity::set_for_current(c);
                    }
                    let sock = bind_udp("127.0.0.1:0".parse().unwrap(), false, 8 << 20).unwrap();
                    let mut bs = BatchSocket::new(sock).unwrap();
                    let msg = [0x5au8; 64];
                    let window = 256u64;
                    let (mut sent, mut got, mut stalls) = (0u64, 0u64, 0u64);
                    let start = Instant::now();
                    while start.elapsed().as_secs_f64() < secs {
                        let k = (window - sent.saturating_sub(got).min(window)).min(64) as usize;
                        if k > 0 {
                            sent += bs
                                .send_batch(std::iter::repeat_n((to, &msg[..]), k))
                                .unwrap() as u64;
                        }
                        let n = bs
                            .recv_batch(Some(Duration::from_millis(5)), |_, _| ())
                            .unwrap() as u64;
                        got += n;
                        if n == 0 && k == 0 {
                            stalls += 1;
                            sent = got; // lost: reopen the window
                        }
                    }
                    (got as f64 / start.elapsed().as_secs_f64(), stalls)
                });
                let (pps, stalls) = drive.join().unwrap();
                let (stats, h) = server.stop();
                let cpu = h.ticks as f64 / 1e3;
                println!(
                    "round {round} {backend:>5}: {:6.1} kpps echoed; server {:4.2} CPU-s = {:6.1} kpps per core (rx {}, tx {}, send errors {}, mean batch {:.1}, window stalls {stalls})",
                    pps / 1e3,
                    cpu,
                    stats.received as f64 / cpu / 1e3,
                    stats.received,
                    stats.sent,
                    stats.send_errors,
                    stats.mean_batch()
                );
            }
        }
    }
}
