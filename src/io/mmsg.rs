//! The portable backend: `poll(2)` + `recvmmsg(2)`/`sendmmsg(2)`, the [`BatchSocket`] helper,
//! sockaddr conversion and the socket options `bind_udp` needs.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Handler, IoStats, LoopOptions, Rx, Ticker, WorkerSockets, recycle};
use crate::io::batch::TxQueue;
use crate::wire::canonical;

/// `sizeof(struct sockaddr_storage)`.
const SS_LEN: libc::socklen_t = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
/// The kernel's limit on `vlen` for `sendmmsg`/`recvmmsg` (`UIO_MAXIOV`).
pub(crate) const MAX_VLEN: usize = 1024;
/// How long the loop waits for `POLLOUT` after `EAGAIN` before dropping the rest of a send batch.
pub(crate) const LOOP_SEND_WAIT: Duration = Duration::from_millis(1);
/// The same for [`BatchSocket::send_batch`], which prefers waiting over dropping.
const BATCH_SEND_WAIT: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// sockaddr conversion

/// Writes `addr` into `out` as the sockaddr a socket of the given family expects, and returns
/// its length. An IPv4 address sent from an IPv6 socket becomes IPv4-mapped (`::ffff:a.b.c.d`).
pub(crate) fn write_sockaddr(
    addr: SocketAddr,
    v6_socket: bool,
    out: &mut libc::sockaddr_storage,
) -> libc::socklen_t {
    let addr = match (addr, v6_socket) {
        (SocketAddr::V4(a), true) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        (a, _) => a,
    };
    let out: *mut libc::sockaddr_storage = out;
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: `out` comes from a `&mut sockaddr_storage`, which is larger than and at
            // least as aligned as `sockaddr_in` (that is its purpose).
            unsafe { out.cast::<libc::sockaddr_in>().write(sin) };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for `sockaddr_in6`.
            unsafe { out.cast::<libc::sockaddr_in6>().write(sin6) };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Reads a sockaddr that the kernel wrote into `ss` (`len` bytes of it). Not canonicalised.
pub(crate) fn read_sockaddr(
    ss: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    let len = len as usize;
    let p: *const libc::sockaddr_storage = ss;
    match i32::from(ss.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a `sockaddr_in`; the storage is large
            // and aligned enough for it, and `sockaddr_in` has no padding bytes.
            let sin = unsafe { &*p.cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for `sockaddr_in6` (28 bytes, no padding).
            let sin6 = unsafe { &*p.cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Parses a sockaddr from raw bytes (the name field io_uring's multishot recvmsg writes).
pub(crate) fn sockaddr_from_bytes(b: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes(b.get(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = b.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 => {
            let flow = u32::from_be_bytes(b.get(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let scope = u32::from_ne_bytes(b.get(24..28)?.try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// small syscall wrappers

/// Sets an `int` socket option.
pub(crate) fn set_int_opt(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live `c_int` and its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            ptr::from_ref(&value).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn timeout_ms(timeout: Option<Duration>) -> i32 {
    match timeout {
        None => -1,
        // Round up so a short remaining wait does not become a busy poll.
        Some(d) => d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32,
    }
}

/// `poll(2)`; `EINTR` counts as "nothing ready".
pub(crate) fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfds.
    let r = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout_ms(timeout),
        )
    };
    if r >= 0 {
        return Ok(r as usize);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINTR) {
        Ok(0)
    } else {
        Err(e)
    }
}

fn poll_one(fd: RawFd, events: i16, timeout: Option<Duration>) -> io::Result<bool> {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    Ok(poll_fds(&mut p, timeout)? > 0)
}

fn zeroed_mmsghdr() -> libc::mmsghdr {
    // SAFETY: `mmsghdr` is plain data (integers and raw pointers); all-zero is a valid value.
    unsafe { mem::zeroed() }
}

fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: `sockaddr_storage` is plain data; all-zero is a valid (AF_UNSPEC) value.
    unsafe { mem::zeroed() }
}

fn empty_iovec() -> libc::iovec {
    libc::iovec {
        iov_base: ptr::null_mut(),
        iov_len: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// receive side

/// Receive slots for `recvmmsg`: `cap` payload buffers of `buffer_len` bytes with their names.
pub(crate) struct RecvBufs {
    data: Box<[u8]>,
    buffer_len: usize,
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    hdrs: Box<[libc::mmsghdr]>,
}

// SAFETY: the raw pointers inside `iovs`/`hdrs` only ever point into this value's own heap
// allocations (and are rewritten before every use), so moving it to another thread is fine.
unsafe impl Send for RecvBufs {}

impl RecvBufs {
    pub(crate) fn new(cap: usize, buffer_len: usize) -> Self {
        let cap = cap.clamp(1, MAX_VLEN);
        RecvBufs {
            data: vec![0u8; cap * buffer_len].into_boxed_slice(),
            buffer_len,
            iovs: vec![empty_iovec(); cap].into_boxed_slice(),
            names: vec![zeroed_storage(); cap].into_boxed_slice(),
            hdrs: vec![zeroed_mmsghdr(); cap].into_boxed_slice(),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Receives up to `max` datagrams without blocking into slots `start..start + max`.
    /// Returns how many arrived (0 when none were waiting).
    pub(crate) fn recv(&mut self, fd: RawFd, start: usize, max: usize) -> io::Result<usize> {
        let end = start.saturating_add(max).min(self.capacity());
        if start >= end {
            return Ok(0);
        }
        // Derive every pointer the kernel gets from one fresh borrow per array, right now.
        let data = self.data.as_mut_ptr();
        let iovs = self.iovs.as_mut_ptr();
        let names = self.names.as_mut_ptr();
        let hdrs = self.hdrs.as_mut_ptr();
        for i in start..end {
            // SAFETY: `i < capacity`, so every offset stays inside its array (`data` holds
            // `capacity * buffer_len` bytes); the writes go through raw pointers derived above.
            unsafe {
                iovs.add(i).write(libc::iovec {
                    iov_base: data.add(i * self.buffer_len).cast(),
                    iov_len: self.buffer_len,
                });
                let h = &mut (*hdrs.add(i)).msg_hdr;
                h.msg_name = names.add(i).cast();
                h.msg_namelen = SS_LEN;
                h.msg_iov = iovs.add(i);
                h.msg_iovlen = 1;
                h.msg_control = ptr::null_mut();
                h.msg_controllen = 0;
                h.msg_flags = 0;
                (*hdrs.add(i)).msg_len = 0;
            }
        }
        loop {
            // SAFETY: slots `start..end` hold valid msghdrs whose name and iovec pointers point
            // into live buffers of the stated sizes, exclusively borrowed for this call.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.add(start),
                    (end - start) as u32,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Nothing waiting, or a stale ICMP error on the socket: not fatal.
                Some(
                    libc::EAGAIN | libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH,
                ) => {
                    return Ok(0);
                }
                _ => return Err(e),
            }
        }
    }

    /// Slot `i` after a `recv` that filled it: sender, payload, and whether it was truncated.
    pub(crate) fn get(&self, i: usize) -> (Option<SocketAddr>, &[u8], bool) {
        let h = &self.hdrs[i];
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let len = (h.msg_len as usize).min(self.buffer_len);
        let from = read_sockaddr(&self.names[i], h.msg_hdr.msg_namelen);
        let off = i * self.buffer_len;
        (from, &self.data[off..off + len], truncated)
    }
}

// ---------------------------------------------------------------------------------------------
// send side

/// Send slots for `sendmmsg`; payloads stay in the caller's memory.
pub(crate) struct SendBufs {
    iovs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    hdrs: Box<[libc::mmsghdr]>,
}

// SAFETY: between calls the raw pointers inside are dead values that are rewritten before use;
// nothing is shared with other threads.
unsafe impl Send for SendBufs {}

/// Outcome of [`SendBufs::send_all`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SendCount {
    pub sent: u64,
    pub dropped: u64,
    /// Of `dropped`, those the kernel refused (the rest found the socket full).
    pub refused: u64,
}

impl SendBufs {
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.clamp(1, MAX_VLEN);
        SendBufs {
            iovs: vec![empty_iovec(); cap].into_boxed_slice(),
            names: vec![zeroed_storage(); cap].into_boxed_slice(),
            hdrs: vec![zeroed_mmsghdr(); cap].into_boxed_slice(),
        }
    }

    /// Sends every message on `fd`, in chunks of the capacity. `EAGAIN` waits up to `wait` for
    /// `POLLOUT`, then drops the rest of the chunk; a message the kernel refuses is dropped.
    pub(crate) fn send_all<'a>(
        &mut self,
        fd: RawFd,
        v6_socket: bool,
        msgs: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
        wait: Duration,
    ) -> SendCount {
        let cap = self.hdrs.len();
        let mut count = SendCount::default();
        let mut msgs = msgs.into_iter().peekable();
        while msgs.peek().is_some() {
            let iovs = self.iovs.as_mut_ptr();
            let names = self.names.as_mut_ptr();
            let hdrs = self.hdrs.as_mut_ptr();
            let mut n = 0;
            for (to, data) in msgs.by_ref().take(cap) {
                // SAFETY: `n < cap`, so all three slots exist; the pointers written into the
                // header point at slot `n` of the arrays and at `data`, which outlives this call.
                unsafe {
                    let namelen = write_sockaddr(to, v6_socket, &mut *names.add(n));
                    iovs.add(n).write(libc::iovec {
                        iov_base: data.as_ptr().cast_mut().cast(),
                        iov_len: data.len(),
                    });
                    let h = &mut (*hdrs.add(n)).msg_hdr;
                    h.msg_name = names.add(n).cast();
                    h.msg_namelen = namelen;
                    h.msg_iov = iovs.add(n);
                    h.msg_iovlen = 1;
                    h.msg_control = ptr::null_mut();
                    h.msg_controllen = 0;
                    h.msg_flags = 0;
                }
                n += 1;
            }
            // SAFETY: the first `n` headers were filled just above and their pointers are live.
            let c = unsafe { flush(fd, hdrs, n, wait) };
            count.sent += c.sent;
            count.dropped += c.dropped;
            count.refused += c.refused;
        }
        count
    }
}

/// `sendmmsg` over `hdrs[..n]`, handling partial sends, `EINTR`, `EAGAIN` and refused messages.
///
/// # Safety
/// `hdrs` must point to `n` initialised `mmsghdr`s whose name, iovec and payload pointers are
/// valid for reads for the duration of the call.
unsafe fn flush(fd: RawFd, hdrs: *mut libc::mmsghdr, n: usize, wait: Duration) -> SendCount {
    let mut count = SendCount::default();
    let mut off = 0;
    let mut waited = false;
    while off < n {
        // SAFETY: `off < n`, and the caller guarantees `hdrs[..n]` are valid.
        let r = unsafe { libc::sendmmsg(fd, hdrs.add(off), (n - off) as u32, libc::MSG_DONTWAIT) };
        if r > 0 {
            off += r as usize;
            count.sent += r as u64;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN | libc::ENOBUFS) => {
                // Wait once per chunk for room; if the socket stays full, drop what is left.
                if waited || !poll_one(fd, libc::POLLOUT, Some(wait)).unwrap_or(false) {
                    count.dropped += (n - off) as u64;
                    return count;
                }
                waited = true;
            }
            // The first message was refused (bad address, EMSGSIZE, ICMP error, ...): skip it.
            _ => {
                off += 1;
                count.dropped += 1;
                count.refused += 1;
            }
        }
    }
    count
}

// ---------------------------------------------------------------------------------------------
// BatchSocket

/// A small synchronous batch API over one UDP socket (`recvmmsg`/`sendmmsg`), for the host,
/// tests and the load generator. Allocates its slots once.
pub struct BatchSocket {
    sock: UdpSocket,
    v6: bool,
    rx: RecvBufs,
    tx: SendBufs,
    dropped: u64,
    truncated: u64,
}

impl BatchSocket {
    /// Default batch of 64 datagrams of up to 2048 bytes.
    pub fn new(sock: UdpSocket) -> io::Result<Self> {
        Self::with_capacity(sock, 64, 2048)
    }

    /// `batch` slots per call (at most 1024); received datagrams longer than `buffer_len`
    /// are dropped and counted as truncated. Sets the socket nonblocking.
    pub fn with_capacity(sock: UdpSocket, batch: usize, buffer_len: usize) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let v6 = sock.local_addr()?.is_ipv6();
        Ok(BatchSocket {
            sock,
            v6,
            rx: RecvBufs::new(batch, buffer_len.max(1)),
            tx: SendBufs::new(batch),
            dropped: 0,
            truncated: 0,
        })
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    pub fn into_inner(self) -> UdpSocket {
        self.sock
    }

    /// Datagrams `send_batch` could not send (socket full after a short wait, or refused).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Received datagrams dropped for being longer than the buffer.
    pub fn truncated(&self) -> u64 {
        self.truncated
    }

    /// Receives one batch: waits up to `timeout` (`None`: forever, `Some(ZERO)`: not at all)
    /// for the first datagram, then takes whatever is queued up to the batch size. Calls `f`
    /// with each sender (canonical) and payload; returns how many were delivered.
    pub fn recv_batch(
        &mut self,
        timeout: Option<Duration>,
        mut f: impl FnMut(SocketAddr, &[u8]),
    ) -> io::Result<usize> {
        let fd = self.sock.as_raw_fd();
        let cap = self.rx.capacity();
        let mut n = self.rx.recv(fd, 0, cap)?;
        if n == 0 && timeout != Some(Duration::ZERO) {
            let deadline = timeout.map(|t| Instant::now() + t);
            while n == 0 {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    break;
                }
                if poll_one(fd, libc::POLLIN, left)? {
                    n = self.rx.recv(fd, 0, cap)?;
                }
            }
        }
        let mut delivered = 0;
        for i in 0..n {
            let (from, data, truncated) = self.rx.get(i);
            if truncated {
                self.truncated += 1;
            } else if let Some(from) = from {
                f(canonical(from), data);
                delivered += 1;
            }
        }
        Ok(delivered)
    }

    /// Sends every message (`sendmmsg`, chunks of the batch size). When the socket is full it
    /// waits briefly for room, then drops and counts. Returns how many were sent.
    pub fn send_batch<'a>(
        &mut self,
        msgs: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
    ) -> io::Result<usize> {
        let c = self
            .tx
            .send_all(self.sock.as_raw_fd(), self.v6, msgs, BATCH_SEND_WAIT);
        self.dropped += c.dropped;
        Ok(c.sent as usize)
    }
}

// ---------------------------------------------------------------------------------------------
// the loop

/// The `poll` + `recvmmsg`/`sendmmsg` worker loop. See [`super::run_loop`].
pub(crate) fn run(
    sockets: &WorkerSockets,
    handler: &mut impl Handler,
    shutdown: &AtomicBool,
    opts: &LoopOptions,
) -> io::Result<IoStats> {
    let nsock = sockets.count();
    let fds: Vec<RawFd> = (0..nsock).map(|s| sockets.get(s).as_raw_fd()).collect();
    let v6 = sockets.families()?;
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let batch = opts.batch.clamp(1, MAX_VLEN);
    let mut readable = vec![false; nsock];
    let mut ranges: Vec<(usize, usize, usize)> = Vec::with_capacity(nsock);
    let mut rxb = RecvBufs::new(batch, opts.buffer_len);
    let mut txb = SendBufs::new(opts.tx_capacity);
    let mut tx = TxQueue::new(opts.tx_capacity);
    let mut rx_store: Vec<Rx<'static>> = Vec::with_capacity(batch);
    let mut stats = IoStats::default();
    let mut ticker = Ticker::new(opts.tick);
    let mut first = 0;
    let mut assume_ready = false;

    while !shutdown.load(Ordering::Relaxed) {
        // 1. Wait for input, at most until the next tick. After a full batch, skip the poll:
        //    more is probably queued, and recvmmsg(MSG_DONTWAIT) tells us if not.
        if assume_ready {
            readable.fill(true);
        } else {
            poll_fds(&mut pfds, Some(ticker.remaining(Instant::now())))?;
            for (r, p) in readable.iter_mut().zip(&pfds) {
                *r = p.revents != 0;
            }
        }

        // 2. Gather up to `batch` datagrams, starting with a different socket each round.
        ranges.clear();
        let mut total = 0;
        for k in 0..nsock {
            let s = (first + k) % nsock;
            if readable[s] && total < batch {
                let n = rxb.recv(fds[s], total, batch - total)?;
                if n > 0 {
                    ranges.push((s, total, total + n));
                    total += n;
                }
            }
        }
        first = (first + 1) % nsock;
        assume_ready = total == batch;

        // 3. Hand them to the handler.
        let mut rx = recycle(mem::take(&mut rx_store));
        let mut truncated = 0;
        for &(s, a, b) in &ranges {
            let via = sockets.via(s);
            for i in a..b {
                match rxb.get(i) {
                    (_, _, true) => truncated += 1,
                    (Some(from), data, false) => rx.push(Rx {
                        via,
                        from: canonical(from),
                        data,
                    }),
                    (None, _, false) => stats.rx_errors += 1,
                }
            }
        }
        if truncated > 0 {
            stats.truncated += truncated;
            handler.on_truncated(truncated);
        }
        if !rx.is_empty() {
            handler.handle_batch(&rx, &mut tx);
            stats.record_batch(rx.len());
        }
        rx_store = recycle(rx);

        // 4. Timers.
        if ticker.due(Instant::now()) {
            handler.tick(&mut tx);
        }

        // 5. Send what the handler queued, grouped per socket.
        if !tx.is_empty() {
            let no_socket = tx
                .iter()
                .filter(|(m, _)| sockets.index(m.via).is_none())
                .count() as u64;
            let mut errors = no_socket;
            let r = &mut stats.send_error_reasons;
            r.no_socket += no_socket;
            for s in 0..nsock {
                let via = sockets.via(s);
                let msgs = tx
                    .iter()
                    .filter(|(m, _)| m.via == via)
                    .map(|(m, d)| (m.to, d));
                let c = txb.send_all(fds[s], v6[s], msgs, LOOP_SEND_WAIT);
                stats.sent += c.sent;
                errors += c.dropped;
                r.refused += c.refused;
                r.socket_full += c.dropped - c.refused;
            }
            if errors > 0 {
                stats.send_errors += errors;
                handler.on_send_errors(errors);
            }
            tx.clear();
        }
        handler.on_io_stats(&stats);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(addr: SocketAddr, v6_socket: bool) -> (SocketAddr, SocketAddr) {
        let mut ss = zeroed_storage();
        let len = write_sockaddr(addr, v6_socket, &mut ss);
        let a = read_sockaddr(&ss, len).unwrap();
        // SAFETY: (test) views the initialised prefix of the storage as bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(ptr::from_ref(&ss).cast::<u8>(), len as usize) };
        let b = sockaddr_from_bytes(bytes).unwrap();
        (a, b)
    }

    #[test]
    fn sockaddr_v4_roundtrip() {
        let a: SocketAddr = "192.0.2.7:4433".parse().unwrap();
        assert_eq!(roundtrip(a, false), (a, a));
    }

    #[test]
    fn sockaddr_v6_roundtrip() {
        let a = SocketAddr::V6(SocketAddrV6::new(
            "2001:db8::1".parse().unwrap(),
            65535,
            0x12345,
            7,
        ));
        assert_eq!(roundtrip(a, true), (a, a));
        let b: SocketAddr = "[::1]:1".parse().unwrap();
        assert_eq!(roundtrip(b, true), (b, b));
    }

    #[test]
    fn sockaddr_v4_on_v6_socket_is_mapped() {
        let a: SocketAddr = "198.51.100.9:53".parse().unwrap();
        let (x, y) = roundtrip(a, true);
        assert_eq!(x, y);
        assert_eq!(x, "[::ffff:198.51.100.9]:53".parse::<SocketAddr>().unwrap());
        assert_eq!(canonical(x), a);
    }

    #[test]
    fn sockaddr_rejects_short_or_unknown() {
        assert_eq!(sockaddr_from_bytes(&[]), None);
        assert_eq!(sockaddr_from_bytes(&[2, 0, 0, 1]), None);
        assert_eq!(sockaddr_from_bytes(&[0u8; 28]), None);
        assert_eq!(read_sockaddr(&zeroed_storage(), SS_LEN), None);
    }
}
