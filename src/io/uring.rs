//! The io_uring backend: one ring per worker (SINGLE_ISSUER + DEFER_TASKRUN, else
//! COOP_TASKRUN), a provided buffer ring, a multishot `RecvMsgMulti` per socket, and a `SendMsg`
//! per outgoing datagram.
//!
//! # Memory shared with the kernel
//!
//! Everything the kernel may read or write lives in [`Mem`], held in a `ManuallyDrop`:
//!
//! - **Receive buffers** (an `mmap`ed [`BufRing`]). A buffer belongs to the kernel while its id
//!   is in the ring (between head and the published tail) and to us from the CQE that names it
//!   until we push it back. Slices handed to the handler are created only for buffers we own,
//!   and borrow the `BufRing` immutably; pushing ids back needs `&mut BufRing`, so the borrow
//!   checker proves no `Rx` outlives its buffer's return to the kernel.
//! - **The recvmsg `msghdr`** (name/control lengths for the multishot receives): never changed
//!   after setup.
//! - **Send headers, iovecs, sockaddrs and the `TxQueue` payloads.** Written only while no send
//!   is in flight; the send phase reaps every send CQE (cancelling stragglers after
//!   [`SEND_TIMEOUT`]) before the queue is cleared or handed to the handler again.
//!
//! `Mem` is freed only after [`Uring::quiesce`] has seen the final CQE of every request that
//! could touch it and the buffer ring is unregistered; if that cannot be confirmed, it is
//! leaked rather than freed.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::mem::{self, ManuallyDrop};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::mmsg::{sockaddr_from_bytes, write_sockaddr};
use super::{Handler, IoStats, LoopOptions, Rx, Ticker, WorkerSockets, recycle};
use crate::io::batch::TxQueue;
use crate::wire::canonical;

/// user_data layout: a tag in the top 16 bits, an index (socket or tx slot) below.
const TAG_SHIFT: u32 = 48;
const TAG_RECV: u64 = 1 << TAG_SHIFT;
const TAG_SEND: u64 = 2 << TAG_SHIFT;
const TAG_CANCEL: u64 = 3 << TAG_SHIFT;
const INDEX_MASK: u64 = (1 << TAG_SHIFT) - 1;

/// Buffer group id of the provided buffer ring.
const BGID: u16 = 0;
/// `sizeof(struct io_uring_recvmsg_out)`: the header multishot recvmsg writes first.
const RECVMSG_OUT_LEN: usize = 16;
/// Name field reserved in each receive buffer (`sizeof(struct sockaddr_storage)`).
const NAME_LEN: usize = mem::size_of::<libc::sockaddr_storage>();
/// Sends not completed after this are cancelled (and counted as errors).
const SEND_TIMEOUT: Duration = Duration::from_millis(100);
/// How long teardown waits for the kernel to finish every request.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

/// `struct io_uring_buf`. Written field by field so the `resv` of entry 0 (the shared tail)
/// is only ever touched atomically.
#[repr(C)]
struct RingEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(mem::size_of::<RingEntry>() == mem::size_of::<types::BufRingEntry>());
const _: () = assert!(mem::size_of::<RingEntry>() == 16);

/// A provided buffer ring and its buffers in one anonymous mapping: the ring (page-aligned, as
/// the kernel requires) followed by `entries` buffers of `buf_size` bytes.
struct BufRing {
    base: NonNull<u8>,
    map_len: usize,
    entries: u16,
    mask: u16,
    buf_size: usize,
    data_off: usize,
    /// Our tail; published to the shared tail by `publish`.
    tail: u16,
}

impl BufRing {
    /// Maps the ring and fills it with every buffer (not yet published).
    fn new(entries: usize, buf_size: usize) -> io::Result<Self> {
        let entries = entries.next_power_of_two();
        if entries > 1 << 15 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring larger than 32768",
            ));
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let data_off = (entries * mem::size_of::<RingEntry>()).next_multiple_of(page);
        let map_len = data_off + entries * buf_size;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        let mut ring = BufRing {
            base,
            map_len,
            entries: entries as u16,
            mask: (entries - 1) as u16,
            buf_size,
            data_off,
            tail: 0,
        };
        for bid in 0..entries {
            ring.push(bid as u16);
        }
        Ok(ring)
    }

    fn ring_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.entries);
        self.base
            .as_ptr()
            .wrapping_add(self.data_off + usize::from(bid) * self.buf_size)
    }

    /// Appends buffer `bid` to the ring (visible to the kernel after `publish`).
    fn push(&mut self, bid: u16) {
        assert!(bid < self.entries, "buffer id out of range");
        let slot = usize::from(self.tail & self.mask);
        let addr = self.buf_ptr(bid) as u64;
        // SAFETY: `slot < entries`, so the entry lies inside our mapping. The kernel reads only
        // entries between its head and the published tail; this slot is at our unpublished tail
        // (the ring never holds more than `entries` ids), so nobody reads it concurrently. Only
        // addr/len/bid are written, never `resv`, which in entry 0 is the shared tail.
        unsafe {
            let e = self.base.as_ptr().cast::<RingEntry>().add(slot);
            ptr::addr_of_mut!((*e).addr).write(addr);
            ptr::addr_of_mut!((*e).len).write(self.buf_size as u32);
            ptr::addr_of_mut!((*e).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every pushed buffer available to the kernel.
    fn publish(&self) {
        // SAFETY: `base` is the page-aligned start of the live ring; the tail is the naturally
        // aligned u16 `resv` of entry 0, which the kernel and we access only atomically.
        let tail = unsafe {
            AtomicU16::from_ptr(types::BufRingEntry::tail(self.base.as_ptr().cast()).cast_mut())
        };
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid`.
    ///
    /// # Safety
    /// `bid` must be owned by user space: named by a CQE and not pushed back since. The
    /// returned slice borrows `self`, so it cannot outlive the next `push`.
    unsafe fn buf(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.entries, "buffer id out of range");
        // SAFETY: the buffer lies inside the mapping (`bid < entries`, `len` clamped to
        // `buf_size`) and, per the caller, the kernel does not write it while we hold it.
        unsafe { std::slice::from_raw_parts(self.buf_ptr(bid), len.min(self.buf_size)) }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our mapping. Only reached once no kernel request can use it
        // (see `Uring::drop`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

/// Memory the kernel reads or writes. Freed only when quiesced (see the module docs).
struct Mem {
    bufs: BufRing,
    recv_hdr: Box<libc::msghdr>,
    send_hdrs: Box<[libc::msghdr]>,
    send_iovs: Box<[libc::iovec]>,
    send_names: Box<[libc::sockaddr_storage]>,
    tx: TxQueue,
}

/// Bookkeeping of requests in flight.
struct State {
    /// Multishot receive armed, per socket (cleared by a CQE without `F_MORE`).
    armed: Vec<bool>,
    /// Receive to (re-)arm at the end of this iteration.
    rearm: Vec<bool>,
    /// Send in flight, per tx slot.
    send_pending: Vec<bool>,
    sends_inflight: usize,
    cancels_inflight: usize,
    /// Receive CQEs reaped while waiting for sends, to process (in order) next.
    stash: VecDeque<(u64, i32, u32)>,
    /// Buffer ids of the current batch, pushed back after `handle_batch`.
    held: Vec<u16>,
    stats: IoStats,
}

impl State {
    /// Accounts one CQE; returns it if it is a receive completion (to process or stash).
    fn reap(&mut self, ud: u64, res: i32, flags: u32) -> Option<(u64, i32, u32)> {
        let i = (ud & INDEX_MASK) as usize;
        match ud & !INDEX_MASK {
            TAG_RECV => {
                if !cqueue::more(flags) {
                    self.armed[i] = false;
                    self.rearm[i] = true;
                }
                return Some((ud, res, flags));
            }
            TAG_SEND if self.send_pending.get(i).copied().unwrap_or(false) => {
                self.send_pending[i] = false;
                self.sends_inflight -= 1;
                if res >= 0 {
                    self.stats.sent += 1;
                } else {
                    self.stats.send_errors += 1;
                    let r = &mut self.stats.send_error_reasons;
                    match -res {
                        libc::EAGAIN | libc::ENOBUFS | libc::ECANCELED => r.socket_full += 1,
                        _ => r.refused += 1,
                    }
                }
            }
            TAG_CANCEL => self.cancels_inflight = self.cancels_inflight.saturating_sub(1),
            _ => {}
        }
        None
    }

    /// Turns a receive completion into an `Rx` (or a counted drop). Returns whether it used up
    /// a unit of the batch (it carried a buffer).
    fn recv_entry<'b>(
        &mut self,
        (ud, res, flags): (u64, i32, u32),
        bufs: &'b BufRing,
        hdr: &libc::msghdr,
        sockets: &WorkerSockets,
        rx: &mut Vec<Rx<'b>>,
    ) -> io::Result<bool> {
        if res < 0 {
            match -res {
                libc::ENOBUFS => self.stats.no_buffers += 1,
                libc::ECANCELED | libc::EINTR | libc::EAGAIN => {}
                e @ (libc::EBADF
                | libc::ENOTSOCK
                | libc::EINVAL
                | libc::EFAULT
                | libc::EOPNOTSUPP) => {
                    return Err(io::Error::from_raw_os_error(e));
                }
                _ => self.stats.rx_errors += 1,
            }
            return Ok(false);
        }
        let Some(bid) = cqueue::buffer_select(flags) else {
            self.stats.rx_errors += 1;
            return Ok(false);
        };
        if bid >= bufs.entries {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "CQE names an unknown buffer",
            ));
        }
        self.held.push(bid);
        // SAFETY: this CQE hands buffer `bid` to us; it goes back to the ring only through
        // `held` after the batch, which takes `&mut BufRing` and so ends this borrow first.
        let buf = unsafe { bufs.buf(bid, res as usize) };
        let Ok(out) = types::RecvMsgOut::parse(buf, hdr) else {
            self.stats.rx_errors += 1;
            return Ok(true);
        };
        if out.is_payload_truncated() {
            self.stats.truncated += 1;
            return Ok(true);
        }
        let Some(from) = sockaddr_from_bytes(out.name_data()) else {
            self.stats.rx_errors += 1;
            return Ok(true);
        };
        // `payload_data` borrows `out`; re-slice `buf` to keep the buffer's lifetime.
        let payload = out.payload_data();
        let off = payload.as_ptr() as usize - buf.as_ptr() as usize;
        rx.push(Rx {
            via: sockets.via((ud & INDEX_MASK) as usize),
            from: canonical(from),
            data: &buf[off..off + payload.len()],
        });
        Ok(true)
    }
}

/// One worker's ring and everything it shares with the kernel.
struct Uring {
    ring: IoUring,
    mem: ManuallyDrop<Mem>,
    st: State,
    fds: Vec<RawFd>,
    v6: Vec<bool>,
    registered: bool,
    /// No request that references `mem` is in flight.
    quiesced: bool,
}

/// Pushes one SQE, submitting first if the queue is full.
///
/// # Safety
/// Every pointer in `e` must stay valid (and, for buffers the kernel writes, unaliased) until
/// the request's final CQE has been reaped.
unsafe fn push_sqe(ring: &mut IoUring, e: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: forwarded from the caller.
        if unsafe { ring.submission().push(e) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Submits pending SQEs and waits up to `timeout` for `want` completions. Timeouts and
/// interruptions are not errors.
fn enter(ring: &IoUring, want: usize, timeout: Duration) -> io::Result<()> {
    let ts = types::Timespec::from(timeout);
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(want, &args) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// A ring with the flags the loop uses: SINGLE_ISSUER + DEFER_TASKRUN, else COOP_TASKRUN,
/// else none.
fn build_ring(sq: u32, cq: u32) -> io::Result<IoUring> {
    let first = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .setup_cqsize(cq)
        .setup_clamp()
        .build(sq);
    match first {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_coop_taskrun()
            .setup_submit_all()
            .setup_cqsize(cq)
            .setup_clamp()
            .build(sq)
            .or_else(|_| IoUring::builder().setup_cqsize(cq).setup_clamp().build(sq)),
        r => r,
    }
}

fn zeroed_msghdr() -> libc::msghdr {
    // SAFETY: `msghdr` is plain data (integers and raw pointers); all-zero is valid.
    unsafe { mem::zeroed() }
}

impl Uring {
    fn new(sockets: &WorkerSockets, opts: &LoopOptions) -> io::Result<Self> {
        let nsock = sockets.count();
        let fds: Vec<RawFd> = (0..nsock).map(|s| sockets.get(s).as_raw_fd()).collect();
        let v6 = sockets.families()?;
        let entries = opts.ring_buffers.max(opts.batch).next_power_of_two();
        let sq = (opts.tx_capacity + 2 * nsock + 8).next_power_of_two();
        // Every receive CQE holds a buffer until processed, so the CQ never holds more than
        // `entries` of them, plus sends, cancels and one final CQE per socket.
        let cq = (entries + sq + 2 * nsock + 8)
            .next_power_of_two()
            .max(2 * sq);
        let ring = build_ring(sq as u32, cq as u32)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_EXT_ARG",
            ));
        }
        let mut recv_hdr = Box::new(zeroed_msghdr());
        recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        let cap = opts.tx_capacity;
        let mem = Mem {
            bufs: BufRing::new(entries, RECVMSG_OUT_LEN + NAME_LEN + opts.buffer_len)?,
            recv_hdr,
            send_hdrs: vec![zeroed_msghdr(); cap].into_boxed_slice(),
            send_iovs: vec![
                libc::iovec {
                    iov_base: ptr::null_mut(),
                    iov_len: 0
                };
                cap
            ]
            .into_boxed_slice(),
            // SAFETY: `sockaddr_storage` is plain data; all-zero is valid.
            send_names: vec![unsafe { mem::zeroed::<libc::sockaddr_storage>() }; cap]
                .into_boxed_slice(),
            tx: TxQueue::new(cap),
        };
        let mut u = Uring {
            ring,
            mem: ManuallyDrop::new(mem),
            st: State {
                armed: vec![false; nsock],
                rearm: vec![true; nsock],
                send_pending: vec![false; cap],
                sends_inflight: 0,
                cancels_inflight: 0,
                stash: VecDeque::with_capacity(cq),
                held: Vec::with_capacity(entries),
                stats: IoStats::default(),
            },
            fds,
            v6,
            registered: false,
            quiesced: true,
        };
        // SAFETY: the ring memory is a live, page-aligned mapping of `entries` io_uring_buf
        // entries; `Mem` is kept alive (or leaked) until after `unregister_buf_ring` in `drop`.
        unsafe {
            u.ring.submitter().register_buf_ring_with_flags(
                u.mem.bufs.ring_addr(),
                u.mem.bufs.entries,
                BGID,
                0,
            )?;
        }
        u.registered = true;
        u.mem.bufs.publish();
        u.arm_receives()?;
        u.ring.submit()?;
        Ok(u)
    }

    /// Queues a multishot receive for every socket that needs one.
    fn arm_receives(&mut self) -> io::Result<()> {
        for s in 0..self.fds.len() {
            if !self.st.rearm[s] {
                continue;
            }
            let e = opcode::RecvMsgMulti::new(types::Fd(self.fds[s]), &*self.mem.recv_hdr, BGID)
                .build()
                .user_data(TAG_RECV | s as u64);
            self.quiesced = false;
            // SAFETY: the request reads `recv_hdr` and writes buffers of the registered ring,
            // all in `Mem`, which outlives it (module docs).
            unsafe { push_sqe(&mut self.ring, &e)? };
            self.st.rearm[s] = false;
            self.st.armed[s] = true;
        }
        Ok(())
    }

    fn run(
        &mut self,
        sockets: &WorkerSockets,
        handler: &mut impl Handler,
        shutdown: &AtomicBool,
        opts: &LoopOptions,
    ) -> io::Result<IoStats> {
        let batch = opts.batch;
        let mut ticker = Ticker::new(opts.tick);
        let mut rx_store: Vec<Rx<'static>> = Vec::with_capacity(batch);

        while !shutdown.load(Ordering::Relaxed) {
            // 1. Wait for completions, at most until the next tick.
            if self.st.stash.is_empty() && self.ring.completion().is_empty() {
                enter(&self.ring, 1, ticker.remaining(Instant::now()))?;
            } else if !self.ring.submission().is_empty() {
                self.ring.submit()?;
            }

            // 2. Gather up to `batch` received datagrams: stashed CQEs first (they are older).
            let Uring { ring, mem, st, .. } = &mut *self;
            let Mem {
                bufs, recv_hdr, tx, ..
            } = &mut **mem;
            let bufs: &BufRing = bufs;
            let (truncated0, errors0) = (st.stats.truncated, st.stats.send_errors);
            let mut rx = recycle(mem::take(&mut rx_store));
            let mut n = 0;
            while n < batch {
                let Some(e) = st.stash.pop_front() else { break };
                n += usize::from(st.recv_entry(e, bufs, recv_hdr, sockets, &mut rx)?);
            }
            if n < batch {
                let mut cq = ring.completion();
                while n < batch {
                    let Some(c) = cq.next() else { break };
                    if let Some(e) = st.reap(c.user_data(), c.result(), c.flags()) {
                        n += usize::from(st.recv_entry(e, bufs, recv_hdr, sockets, &mut rx)?);
                    }
                }
            }

            // 3. Hand them to the handler, then give the buffers back to the kernel.
            let truncated = st.stats.truncated - truncated0;
            if truncated > 0 {
                handler.on_truncated(truncated);
            }
            if !rx.is_empty() {
                handler.handle_batch(&rx, tx);
                st.stats.record_batch(rx.len());
            }
            rx_store = recycle(rx);
            if !st.held.is_empty() {
                let bufs = &mut mem.bufs;
                for &bid in &st.held {
                    bufs.push(bid);
                }
                bufs.publish();
                st.held.clear();
            }

            // 4. Timers.
            if ticker.due(Instant::now()) {
                handler.tick(&mut mem.tx);
            }

            // 5. Re-arm receives that ended, then send (which also submits the re-arms).
            self.arm_receives()?;
            if !self.mem.tx.is_empty() {
                self.send(sockets)?;
            } else if !self.ring.submission().is_empty() {
                self.ring.submit()?;
            }
            let errors = self.st.stats.send_errors - errors0;
            if errors > 0 {
                handler.on_send_errors(errors);
            }
            handler.on_io_stats(&self.st.stats);
        }
        Ok(self.st.stats.clone())
    }

    /// Sends every queued datagram and reaps every send CQE (receive CQEs met meanwhile are
    /// stashed), then clears the queue.
    fn send(&mut self, sockets: &WorkerSockets) -> io::Result<()> {
        let Uring {
            ring,
            mem,
            st,
            fds,
            v6,
            ..
        } = &mut *self;
        let mem: &mut Mem = mem;
        let hdrs = mem.send_hdrs.as_mut_ptr();
        let iovs = mem.send_iovs.as_mut_ptr();
        let names = mem.send_names.as_mut_ptr();
        let tx: &TxQueue = &mem.tx;
        for i in 0..tx.len().min(st.send_pending.len()) {
            let (meta, data) = tx.get(i);
            let Some(s) = sockets.index(meta.via) else {
                st.stats.send_errors += 1;
                st.stats.send_error_reasons.no_socket += 1;
                continue;
            };
            // SAFETY: `i < tx_capacity`, the length of all three arrays; writes go through
            // pointers derived once above, and no send using slot `i` is in flight.
            let e = unsafe {
                let namelen = write_sockaddr(meta.to, v6[s], &mut *names.add(i));
                iovs.add(i).write(libc::iovec {
                    iov_base: data.as_ptr().cast_mut().cast(),
                    iov_len: data.len(),
                });
                let h = &mut *hdrs.add(i);
                h.msg_name = names.add(i).cast();
                h.msg_namelen = namelen;
                h.msg_iov = iovs.add(i);
                h.msg_iovlen = 1;
                h.msg_control = ptr::null_mut();
                h.msg_controllen = 0;
                h.msg_flags = 0;
                opcode::SendMsg::new(types::Fd(fds[s]), hdrs.add(i))
                    .build()
                    .user_data(TAG_SEND | i as u64)
            };
            // SAFETY: the header, iovec, sockaddr and payload (tx slot `i`) live in `Mem` and
            // are not modified until this send's CQE is reaped below; on an error return the
            // ring is quiesced (or `Mem` leaked) before `Mem` is freed.
            unsafe { push_sqe(ring, &e)? };
            st.send_pending[i] = true;
            st.sends_inflight += 1;
        }

        let deadline = Instant::now() + SEND_TIMEOUT;
        let mut cancelled = false;
        while st.sends_inflight > 0 {
            let now = Instant::now();
            if !cancelled && now >= deadline {
                for i in 0..st.send_pending.len() {
                    if st.send_pending[i] {
                        let e = opcode::AsyncCancel::new(TAG_SEND | i as u64)
                            .build()
                            .user_data(TAG_CANCEL);
                        // SAFETY: a cancel request carries no pointers.
                        unsafe { push_sqe(ring, &e)? };
                        st.cancels_inflight += 1;
                    }
                }
                cancelled = true;
            }
            let wait = if cancelled {
                Duration::from_millis(10)
            } else {
                deadline - now
            };
            enter(ring, st.sends_inflight, wait)?;
            for c in ring.completion() {
                if let Some(e) = st.reap(c.user_data(), c.result(), c.flags()) {
                    st.stash.push_back(e);
                }
            }
        }
        mem.tx.clear();
        Ok(())
    }

    /// Cancels every request in flight and waits for their final CQEs. True when nothing that
    /// references `Mem` is left in the kernel.
    fn quiesce(&mut self) -> bool {
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        let Uring { ring, st, .. } = &mut *self;
        // Receive CQEs already reaped but unprocessed are dropped; their buffers need no return.
        st.stash.clear();
        st.held.clear();
        let mut targets = Vec::new();
        targets.extend(
            (0..st.armed.len())
                .filter(|&s| st.armed[s])
                .map(|s| TAG_RECV | s as u64),
        );
        targets.extend(
            (0..st.send_pending.len())
                .filter(|&i| st.send_pending[i])
                .map(|i| TAG_SEND | i as u64),
        );
        for t in targets {
            let e = opcode::AsyncCancel::new(t).build().user_data(TAG_CANCEL);
            // SAFETY: a cancel request carries no pointers.
            if unsafe { push_sqe(ring, &e) }.is_err() {
                return false;
            }
            st.cancels_inflight += 1;
        }
        while st.armed.iter().any(|&a| a) || st.sends_inflight > 0 || st.cancels_inflight > 0 {
            if Instant::now() >= deadline || enter(ring, 1, Duration::from_millis(10)).is_err() {
                return false;
            }
            for c in ring.completion() {
                st.reap(c.user_data(), c.result(), c.flags());
            }
        }
        st.rearm.fill(false);
        true
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if !self.quiesced {
            self.quiesced = self.quiesce();
        }
        if self.registered && self.quiesced {
            self.registered = self.ring.submitter().unregister_buf_ring(BGID).is_err();
        }
        if self.quiesced && !self.registered {
            // SAFETY: no request that references `Mem` is in flight and the kernel no longer
            // knows the buffer ring, so nothing outside this value points into `Mem`; it is not
            // used again.
            unsafe { ManuallyDrop::drop(&mut self.mem) };
        } else {
            tracing::error!("io_uring did not quiesce; leaking its buffers");
        }
    }
}

/// The io_uring worker loop. See [`super::run_loop`].
pub(crate) fn run(
    sockets: &WorkerSockets,
    handler: &mut impl Handler,
    shutdown: &AtomicBool,
    opts: &LoopOptions,
) -> io::Result<IoStats> {
    let mut u = Uring::new(sockets, opts)?;
    let stats = u.run(sockets, handler, shutdown, opts)?;
    u.quiesced = u.quiesce();
    Ok(stats)
}
