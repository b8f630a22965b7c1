//! The AF_XDP backend (`io = "xdp"`, docs/xdp.md).
//!
//! [`Xdp::setup`] loads a hand-assembled XDP program (`prog.rs`) that steers the gateway's
//! UDP ports to one AF_XDP socket per receive queue, attaches it as a bpf_link (native mode,
//! else generic/skb), and opens the sockets (`sys.rs`: UMEM, fill/completion/RX/TX rings;
//! zero-copy where the driver allows, else copy mode). Each worker then runs
//! [`run_loop_xdp`]: the same [`Handler`] interface as the other backends, with the XSK as one
//! more source beside the worker's kernel sockets, which stay open (traffic on queues without
//! a socket, anything the program passes, the host link, and replies we cannot address at
//! layer 2 go through them).
//!
//! Received frames are parsed in place (`frame.rs`) and handed to the handler as slices of the
//! UMEM: no copy on receive. Replies get their own Ethernet/IP/UDP headers, written straight
//! into a UMEM frame with the payload (one copy, from the `TxQueue` slot). The destination MAC
//! comes from a neighbour cache learned from received frames (sender IP → sender MAC, i.e. the
//! layer-2 next hop the sender's traffic came through); a destination not in the cache is sent
//! through the kernel socket (counted), which resolves it with ARP/ND.
#![deny(unsafe_code)]

pub mod frame;
pub mod prog;
mod sys;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::batch::{TxQueue, Via};
use super::mmsg::{RecvBufs, SendBufs, poll_fds};
use super::{Handler, IoStats, LoopOptions, Rx, Ticker, WorkerSockets, recycle};
use crate::wire::canonical;
use frame::Mac;

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, else generic (skb) mode.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (skb) mode only.
    Skb,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Skb => "skb",
        })
    }
}

impl FromStr for XdpMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(XdpMode::Auto),
            "native" | "drv" | "driver" => Ok(XdpMode::Native),
            "skb" | "generic" => Ok(XdpMode::Skb),
            o => Err(format!(
                "unknown XDP mode {o:?} (expected \"auto\", \"native\" or \"skb\")"
            )),
        }
    }
}

/// What [`Xdp::setup`] needs besides the listen addresses.
#[derive(Clone, Debug)]
pub struct XdpConfig {
    /// The interface; `None`: the one that owns the listen addresses' IP.
    pub interface: Option<String>,
    pub mode: XdpMode,
    /// Busy polling: after a batch, a worker spins on its RX ring this long for more frames
    /// before it sleeps in `poll(2)` (an idle worker sleeps at once). Zero: never spin.
    pub spin: Duration,
}

/// [`XdpConfig::spin`]'s default: off. On veth here spinning 50 us gave smaller batches and
/// no clear gain (docs/xdp.md), and it burns the core a shared machine needs.
pub const DEFAULT_SPIN: Duration = Duration::ZERO;

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            interface: None,
            mode: XdpMode::Auto,
            spin: DEFAULT_SPIN,
        }
    }
}

/// UMEM frames per socket: half for receiving (always in the fill ring or being handled),
/// half for sending.
const FRAMES: u32 = 2048;
const RING: u32 = 1024;
const RX_FRAMES: u32 = 1024;
/// Neighbour cache entries; when full, the cache starts over (relearning is one frame).
const NEIGH_MAX: usize = 1 << 16;

/// The attached program and its map; detached when the last worker drops its `Arc`.
struct Attach {
    map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

/// The program attached to one interface, and the AF_XDP sockets for the workers.
pub struct Xdp {
    workers: Vec<Option<XdpWorker>>,
    summary: String,
}

impl fmt::Debug for Xdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)
    }
}

/// One worker's AF_XDP socket and what it needs to build frames.
pub struct XdpWorker {
    xsk: sys::Xsk,
    attach: Arc<Attach>,
    queue: u32,
    mac: Mac,
    mtu: usize,
    listen: Vec<SocketAddr>,
    neigh: Neighbours,
    spin: Duration,
}

impl Drop for XdpWorker {
    fn drop(&mut self) {
        let _ = sys::map_delete(&self.attach.map, self.queue);
    }
}

impl Xdp {
    /// Attaches the program for `listen` (resolved addresses, no port 0) and opens a socket
    /// for each of the first `workers` receive queues. `Err(reason)` if anything is refused;
    /// nothing stays attached then.
    pub fn setup(cfg: &XdpConfig, listen: &[SocketAddr], workers: usize) -> Result<Xdp, String> {
        let mut ports: Vec<u16> = listen.iter().map(|a| a.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() || ports.len() > prog::MAX_PORTS || ports.contains(&0) {
            return Err(format!(
                "needs 1..={} resolved listen ports, got {ports:?}",
                prog::MAX_PORTS
            ));
        }
        let ifname = match &cfg.interface {
            Some(i) => i.clone(),
            None => {
                let mut found: Option<String> = None;
                for a in listen {
                    if a.ip().is_unspecified() {
                        return Err(format!(
                            "listen address {a} is unspecified: set `xdp_interface`"
                        ));
                    }
                    let i = sys::interface_of(a.ip())
                        .map_err(|e| format!("getifaddrs: {e}"))?
                        .ok_or_else(|| format!("no interface has the address {}", a.ip()))?;
                    if found.as_ref().is_some_and(|f| *f != i) {
                        return Err(format!(
                            "listen addresses are on two interfaces ({} and {i}): set `xdp_interface`",
                            found.unwrap_or_default()
                        ));
                    }
                    found = Some(i);
                }
                found.ok_or("no listen address")?
            }
        };
        let ifindex = sys::ifindex(&ifname).map_err(|e| format!("interface {ifname:?}: {e}"))?;
        let mac = sys::mac(&ifname).map_err(|e| format!("{ifname}: SIOCGIFHWADDR: {e}"))?;
        let mtu = sys::mtu(&ifname).map_err(|e| format!("{ifname}: SIOCGIFMTU: {e}"))?;
        let queues = sys::rx_queues(&ifname);
        let nsock = (workers as u32).min(queues).max(1);
        let map = sys::xskmap_create(queues.max(1)).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                format!("XSKMAP: {e} (needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_NET_RAW)")
            } else {
                format!("XSKMAP: {e}")
            }
        })?;
        let insns = prog::program(&ports, map.as_raw_fd());
        let prog = sys::prog_load(&insns)?;
        let attempts: &[(u32, &str)] = match cfg.mode {
            XdpMode::Auto => &[
                (sys::XDP_FLAGS_DRV_MODE, "native"),
                (sys::XDP_FLAGS_SKB_MODE, "skb"),
            ],
            XdpMode::Native => &[(sys::XDP_FLAGS_DRV_MODE, "native")],
            XdpMode::Skb => &[(sys::XDP_FLAGS_SKB_MODE, "skb")],
        };
        let mut refusals = Vec::new();
        let mut link = None;
        for &(flags, name) in attempts {
            match sys::xdp_link(&prog, ifindex, flags) {
                Ok(l) => {
                    link = Some((l, name));
                    break;
                }
                Err(e) => refusals.push(format!("{name}: {e}")),
            }
        }
        let (link, mode) =
            link.ok_or_else(|| format!("attaching to {ifname} refused ({})", refusals.join("; ")))?;
        let attach = Arc::new(Attach {
            map,
            _prog: prog,
            _link: link,
        });
        let mut out = Vec::with_capacity(workers);
        let mut zc = 0;
        for q in 0..nsock {
            let xsk = match sys::Xsk::open(ifindex, q, FRAMES, RING, true) {
                Ok(x) => x,
                Err(_) => sys::Xsk::open(ifindex, q, FRAMES, RING, false)
                    .map_err(|e| format!("AF_XDP socket on {ifname} queue {q}: {e}"))?,
            };
            zc += usize::from(xsk.zerocopy);
            // Every receive frame goes to the fill ring now, before the socket is in the map,
            // so datagrams arriving before the worker runs wait in the RX ring.
            let mut xsk = xsk;
            if xsk.fill.free(RX_FRAMES) < RX_FRAMES {
                return Err("AF_XDP fill ring smaller than the receive frames".into());
            }
            for f in 0..RX_FRAMES {
                xsk.fill.push(u64::from(f) * sys::FRAME as u64);
            }
            xsk.fill.submit();
            sys::map_update(&attach.map, q, xsk.fd.as_raw_fd() as u32)
                .map_err(|e| format!("XSKMAP update: {e}"))?;
            out.push(Some(XdpWorker {
                xsk,
                attach: attach.clone(),
                queue: q,
                mac,
                mtu,
                listen: listen.to_vec(),
                neigh: Neighbours::default(),
                spin: cfg.spin,
            }));
        }
        out.resize_with(workers, || None);
        let summary = format!(
            "AF_XDP on {ifname} ({mode} mode, {nsock} of {queues} queues, {} zero-copy, ports {ports:?}, mtu {mtu})",
            if zc == nsock as usize {
                "all"
            } else if zc == 0 {
                "none"
            } else {
                "some"
            }
        );
        Ok(Xdp {
            workers: out,
            summary,
        })
    }

    /// Worker `i`'s socket; `None` if the interface has fewer queues than workers (that
    /// worker then runs a kernel-socket backend: its queue's traffic is passed to the kernel).
    pub fn take_worker(&mut self, i: usize) -> Option<XdpWorker> {
        self.workers.get_mut(i).and_then(Option::take)
    }

    /// One line for the log: interface, mode, queues, zero-copy, ports.
    pub fn summary(&self) -> &str {
        &self.summary
    }
}

/// Moves the calling thread (only it) into the network namespace at `path` (e.g.
/// `/var/run/netns/NAME`); sockets it creates afterwards, and threads it spawns, live there.
/// For tests and benchmarks that run both ends of a veth pair in one process.
pub fn enter_netns(path: &str) -> io::Result<()> {
    sys::enter_netns(path)
}

/// Sender IP → (sender MAC, the local IP it addressed): the layer-2 next hop for replies.
#[derive(Default)]
pub struct Neighbours {
    map: HashMap<IpAddr, (Mac, IpAddr)>,
}

impl Neighbours {
    /// Learns from a received frame; cheap when nothing changed.
    pub fn learn(&mut self, peer: IpAddr, mac: Mac, local: IpAddr) {
        if mac[0] & 1 != 0 || peer.is_unspecified() || peer.is_multicast() {
            return; // not a unicast sender
        }
        if self.map.get(&peer) == Some(&(mac, local)) {
            return;
        }
        if self.map.len() >= NEIGH_MAX && !self.map.contains_key(&peer) {
            self.map.clear();
        }
        self.map.insert(peer, (mac, local));
    }

    pub fn get(&self, peer: IpAddr) -> Option<(Mac, IpAddr)> {
        self.map.get(&peer).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The worker loop over its AF_XDP socket and its kernel sockets. See [`super::run_loop`].
pub fn run_loop_xdp(
    mut w: XdpWorker,
    sockets: &WorkerSockets,
    handler: &mut impl Handler,
    shutdown: &AtomicBool,
    opts: &LoopOptions,
) -> io::Result<IoStats> {
    opts.check()?;
    sockets.check()?;
    let nsock = sockets.count();
    let fds: Vec<RawFd> = (0..nsock).map(|s| sockets.get(s).as_raw_fd()).collect();
    let v6 = sockets.families()?;
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .copied()
        .chain([w.xsk.fd.as_raw_fd()])
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let batch = opts.batch.clamp(1, super::mmsg::MAX_VLEN);
    let mut readable = vec![false; nsock + 1];
    let mut ranges: Vec<(usize, usize, usize)> = Vec::with_capacity(nsock);
    let mut rxb = RecvBufs::new(batch, opts.buffer_len);
    let mut txb = SendBufs::new(opts.tx_capacity);
    let mut tx = TxQueue::new(opts.tx_capacity);
    let mut by_xdp = vec![false; opts.tx_capacity];
    let mut rx_store: Vec<Rx<'static>> = Vec::with_capacity(batch);
    let mut stats = IoStats::default();
    let mut ticker = Ticker::new(opts.tick);
    let mut assume_ready = false;
    let (mut busy, mut skipped_polls) = (false, 0u32);
    let mut ip_id: u16 = 0;
    let max_frame = (w.mtu + frame::ETH_LEN).min(sys::FRAME);

    // The receive frames went to the fill ring at setup; the rest are the send pool.
    let mut pool: Vec<u64> = (RX_FRAMES..FRAMES)
        .map(|f| u64::from(f) * sys::FRAME as u64)
        .collect();

    while !shutdown.load(Ordering::Relaxed) {
        // 1. Wait for input (kernel sockets and the XSK), at most until the next tick. Frames
        //    already in the RX ring, or arriving while we spin after a busy batch, skip the
        //    sleep (and its cross-core wake-up); the kernel sockets are still polled, without
        //    waiting, at least every 16th round.
        if assume_ready {
            readable.fill(true);
        } else {
            let mut ready = w.xsk.rx.ready(1) > 0;
            if !ready && busy && !w.spin.is_zero() {
                let until = Instant::now() + w.spin;
                while !ready && Instant::now() < until {
                    std::hint::spin_loop();
                    ready = w.xsk.rx.ready(1) > 0;
                }
            }
            if ready && skipped_polls < 16 {
                skipped_polls += 1;
                readable.fill(false);
                readable[nsock] = true;
            } else {
                skipped_polls = 0;
                let wait = if ready {
                    Duration::ZERO
                } else {
                    ticker.remaining(Instant::now())
                };
                poll_fds(&mut pfds, Some(wait))?;
                for (r, p) in readable.iter_mut().zip(&pfds) {
                    *r = p.revents != 0;
                }
                readable[nsock] |= ready;
            }
        }

        // 2. The XSK first (the fast path), then the kernel sockets, up to `batch` in all.
        let n_xdp = if readable[nsock] {
            w.xsk.rx.ready(batch as u32)
        } else {
            0
        };
        ranges.clear();
        let mut total = n_xdp as usize;
        for s in 0..nsock {
            if readable[s] && total < batch {
                let n = rxb.recv(fds[s], total, batch - total)?;
                if n > 0 {
                    ranges.push((s, total, total + n));
                    total += n;
                }
            }
        }
        assume_ready = total == batch;
        busy = total > 0;

        // 3. Hand them to the handler: XSK frames in place, then the kernel sockets' datagrams.
        let mut rx = recycle(mem::take(&mut rx_store));
        let mut truncated = 0;
        for k in 0..n_xdp {
            let d = w.xsk.rx.peek(k);
            let parsed = w
                .xsk
                .frame(d.addr, d.len)
                .and_then(|f| Some((f, frame::parse(f).ok()?)));
            let Some((f, p)) = parsed else {
                stats.rx_errors += 1;
                continue;
            };
            let Some(i) = w.listen.iter().position(|a| {
                a.port() == p.dst.port()
                    && a.is_ipv6() == p.dst.is_ipv6()
                    && (a.ip().is_unspecified() || a.ip() == p.dst.ip())
            }) else {
                stats.rx_errors += 1;
                continue;
            };
            let data = &f[p.payload.0..p.payload.1];
            if data.len() > opts.buffer_len {
                truncated += 1;
                continue;
            }
            w.neigh.learn(p.src.ip(), p.src_mac, p.dst.ip());
            rx.push(Rx {
                via: Via::Client(i as u8),
                from: canonical(p.src),
                data,
            });
        }
        stats.xdp_received += u64::from(n_xdp);
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

        // The handler is done with the frames: back to the fill ring (room is guaranteed: the
        // ring holds all receive frames).
        if n_xdp > 0 {
            let free = w.xsk.fill.free(n_xdp);
            for k in 0..n_xdp.min(free) {
                let base = w.xsk.rx.peek(k).addr & !(sys::FRAME as u64 - 1);
                w.xsk.fill.push(base);
            }
            w.xsk.fill.submit();
            w.xsk.rx.release(n_xdp);
            if w.xsk.fill.needs_wakeup() {
                w.xsk.kick_rx();
            }
        }

        // 4. Timers.
        if ticker.due(Instant::now()) {
            handler.tick(&mut tx);
        }

        // 5. Send: client datagrams to a known neighbour as frames on the XSK, the rest
        //    (host link, unknown neighbours, oversize) through the kernel sockets.
        if !tx.is_empty() {
            let done = w.xsk.comp.ready(RING);
            for k in 0..done {
                pool.push(w.xsk.comp.peek(k) & !(sys::FRAME as u64 - 1));
            }
            w.xsk.comp.release(done);
            let mut queued = 0u32;
            let room = w.xsk.tx.free(tx.len() as u32);
            for (j, (m, data)) in tx.iter().enumerate() {
                by_xdp[j] = false;
                let Via::Client(i) = m.via else { continue };
                let Some(listen) = w.listen.get(usize::from(i)) else {
                    continue;
                };
                let Some((dst_mac, local)) = w.neigh.get(m.to.ip()) else {
                    continue;
                };
                let src_ip = if listen.ip().is_unspecified() {
                    local
                } else {
                    listen.ip()
                };
                if queued == room
                    || frame::header_len(m.to.is_ipv6()) + data.len() > max_frame
                    || src_ip.is_ipv6() != m.to.is_ipv6()
                {
                    continue;
                }
                let Some(base) = pool.pop() else { continue };
                ip_id = ip_id.wrapping_add(1);
                let spec = frame::FrameSpec {
                    src_mac: w.mac,
                    dst_mac,
                    src: SocketAddr::new(src_ip, listen.port()),
                    dst: m.to,
                    ip_id,
                };
                match frame::build(&spec, data, w.xsk.frame_mut(base)) {
                    Some(len) => {
                        w.xsk.tx.push(libc::xdp_desc {
                            addr: base,
                            len: len as u32,
                            options: 0,
                        });
                        queued += 1;
                        by_xdp[j] = true;
                    }
                    None => pool.push(base),
                }
            }
            if queued > 0 {
                w.xsk.tx.submit();
                // In copy mode one kick sends at most 32 frames (the kernel's TX batch): kick
                // until the ring is drained, so frames do not wait for the next batch.
                for _ in 0..(queued / 32 + 2) {
                    w.xsk.kick_tx();
                    if w.xsk.tx.free(RING) == RING {
                        break;
                    }
                }
                stats.sent += u64::from(queued);
                stats.xdp_sent += u64::from(queued);
            }
            let no_socket = tx
                .iter()
                .filter(|(m, _)| sockets.index(m.via).is_none())
                .count() as u64;
            let mut errors = no_socket;
            let r = &mut stats.send_error_reasons;
            r.no_socket += no_socket;
            let mut kernel = 0;
            for s in 0..nsock {
                let via = sockets.via(s);
                let msgs = tx
                    .iter()
                    .enumerate()
                    .filter(|&(j, (m, _))| m.via == via && !by_xdp[j])
                    .map(|(_, (m, d))| (m.to, d));
                let c = txb.send_all(fds[s], v6[s], msgs, super::mmsg::LOOP_SEND_WAIT);
                stats.sent += c.sent;
                if via != Via::Host {
                    kernel += c.sent;
                }
                errors += c.dropped;
                r.refused += c.refused;
                r.socket_full += c.dropped - c.refused;
            }
            stats.xdp_kernel_sent += kernel;
            if errors > 0 {
                stats.send_errors += errors;
                handler.on_send_errors(errors);
            }
            tx.clear();
        } else if w.xsk.tx.free(RING) < RING && w.xsk.tx.needs_wakeup() {
            // The kernel left frames in the TX ring (it was busy): kick it again.
            w.xsk.kick_tx();
        }
        handler.on_io_stats(&stats);
    }
    if let Some((dropped, ring_full, fill_empty)) = w.xsk.kernel_stats() {
        tracing::debug!(
            dropped,
            ring_full,
            fill_empty,
            neighbours = w.neigh.len(),
            "AF_XDP socket closed"
        );
    }
    Ok(stats)
}

#[cfg(test)]
mod tests;
