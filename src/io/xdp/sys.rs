//! The raw kernel interfaces of the AF_XDP backend: `bpf(2)` (XSKMAP, program load, XDP link),
//! interface facts (index, MAC, MTU, queues, the interface owning an address), and the AF_XDP
//! socket with its UMEM and four mmapped rings. All of the backend's unsafe code is here;
//! every block says why it is sound.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::mem;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};

use super::prog::Insn;

// ---------------------------------------------------------------------------------------------
// bpf(2)

const BPF_MAP_CREATE: i32 = 0;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_PROG_LOAD: i32 = 5;
const BPF_LINK_CREATE: i32 = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
pub const XDP_FLAGS_SKB_MODE: u32 = 2;
pub const XDP_FLAGS_DRV_MODE: u32 = 4;

/// A zeroed `union bpf_attr` (128 bytes is more than any command here uses; the kernel
/// accepts a larger attr whose tail is zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(&mut self, at: usize, b: &[u8]) -> &mut Self {
        self.0[at..at + b.len()].copy_from_slice(b);
        self
    }
}

/// `bpf(cmd, attr)`; the pointers written into `attr` must be live for the call.
///
/// # Safety
/// Every pointer stored in `attr` must be valid for the accesses `cmd` makes through it.
unsafe fn bpf(cmd: i32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a live, exclusively borrowed 128-byte buffer; the caller vouches for
    // the pointers inside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            ptr::from_mut(attr),
            mem::size_of::<Attr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful bpf() that creates a new descriptor, so
    // nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Creates an XSKMAP of `entries` queues.
pub fn xskmap_create(entries: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, BPF_MAP_TYPE_XSKMAP)
        .u32(4, 4)
        .u32(8, 4)
        .u32(12, entries)
        .bytes(28, b"rebindgw_xsks");
    // SAFETY: MAP_CREATE reads no pointers from the attr.
    Ok(owned(unsafe { bpf(BPF_MAP_CREATE, &mut a) }?))
}

/// `map[key] = value` (both u32).
pub fn map_update(map: &OwnedFd, key: u32, value: u32) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, ptr::from_ref(&key) as u64)
        .u64(16, ptr::from_ref(&value) as u64);
    // SAFETY: key and value point at live u32s, the sizes the map was created with.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut a) }.map(drop)
}

pub fn map_delete(map: &OwnedFd, key: u32) -> io::Result<()> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, ptr::from_ref(&key) as u64);
    // SAFETY: key points at a live u32.
    unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut a) }.map(drop)
}

/// Loads an XDP program; on failure the error carries the verifier's log.
pub fn prog_load(insns: &[Insn]) -> Result<OwnedFd, String> {
    let code: Vec<u64> = insns.iter().map(|i| i.encode()).collect();
    let license = b"Dual MIT/GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let attempt = |log_level: u32, log: &mut [u8]| {
        let mut a = Attr::new();
        a.u32(0, BPF_PROG_TYPE_XDP)
            .u32(4, code.len() as u32)
            .u64(8, code.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, log_level)
            .u32(28, if log_level > 0 { log.len() as u32 } else { 0 })
            .u64(
                32,
                if log_level > 0 {
                    log.as_mut_ptr() as u64
                } else {
                    0
                },
            )
            .bytes(48, b"rebindgw_xdp")
            .u32(68, BPF_XDP);
        // SAFETY: insns, license and log buffer are live for the call, with the lengths
        // given; the license is NUL-terminated.
        unsafe { bpf(BPF_PROG_LOAD, &mut a) }
    };
    match attempt(0, &mut log) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let _ = attempt(1, &mut log);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: String = text.lines().rev().take(6).collect::<Vec<_>>().join(" | ");
            Err(format!("BPF_PROG_LOAD: {e} (verifier: {tail})"))
        }
    }
}

/// Attaches `prog` to `ifindex` as a bpf_link (detached when the returned fd closes, also if
/// the process dies).
pub fn xdp_link(prog: &OwnedFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, BPF_XDP)
        .u32(12, flags);
    // SAFETY: LINK_CREATE for XDP reads no pointers from the attr.
    Ok(owned(unsafe { bpf(BPF_LINK_CREATE, &mut a) }?))
}

// ---------------------------------------------------------------------------------------------
// interfaces

pub fn ifindex(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that lives across the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}

/// `ioctl(SIOCGIF*)` on a throwaway socket, returning the filled `ifreq`.
fn ifreq_ioctl(name: &str, req: libc::c_ulong) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    for (d, &s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = owned(i64::from(fd));
    // SAFETY: `ifr` is a live, exclusively borrowed ifreq, which is what these requests take.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ptr::from_mut(&mut ifr)) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ifr)
}

pub fn mac(name: &str) -> io::Result<[u8; 6]> {
    let ifr = ifreq_ioctl(name, libc::SIOCGIFHWADDR)?;
    // SAFETY: SIOCGIFHWADDR filled the `ifru_hwaddr` member of the union.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut m = [0u8; 6];
    for (d, &s) in m.iter_mut().zip(&sa.sa_data) {
        *d = s as u8;
    }
    Ok(m)
}

pub fn mtu(name: &str) -> io::Result<usize> {
    let ifr = ifreq_ioctl(name, libc::SIOCGIFMTU)?;
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    Ok(unsafe { ifr.ifr_ifru.ifru_mtu }.max(0) as usize)
}

/// Receive queues of `name` (`ETHTOOL_GCHANNELS`: the larger of rx and combined), 1 if the
/// driver does not say.
pub fn rx_queues(name: &str) -> u32 {
    #[repr(C)]
    #[derive(Default)]
    struct Channels {
        cmd: u32,
        max_rx: u32,
        max_tx: u32,
        max_other: u32,
        max_combined: u32,
        rx: u32,
        tx: u32,
        other: u32,
        combined: u32,
    }
    const ETHTOOL_GCHANNELS: u32 = 0x3c;
    let mut ch = Channels {
        cmd: ETHTOOL_GCHANNELS,
        ..Channels::default()
    };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= ifr.ifr_name.len() {
        return 1;
    }
    for (d, &s) in ifr.ifr_name.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = ptr::from_mut(&mut ch).cast();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return 1;
    }
    let fd = owned(i64::from(fd));
    // SAFETY: SIOCETHTOOL with ifru_data pointing at a live `struct ethtool_channels`.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCETHTOOL as _,
            ptr::from_mut(&mut ifr),
        )
    };
    if r < 0 {
        return 1;
    }
    ch.rx.max(ch.combined).max(1)
}

/// The interface that has `ip` as one of its addresses.
pub fn interface_of(ip: IpAddr) -> io::Result<Option<String>> {
    let mut head: *mut libc::ifaddrs = ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let addr: Option<IpAddr> = match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                Some(std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()).into())
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                Some(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
            }
            _ => None,
        };
        if addr == Some(ip) {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no reference into it survives.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// AF_XDP socket

/// Anonymous memory, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn anon(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    fn ring(fd: RawFd, len: usize, pgoff: u64) -> io::Result<Mapping> {
        // SAFETY: maps the socket's ring at the offset the kernel defines for it; the kernel
        // checks `len` against the ring's size.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                pgoff as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly one mapping we created and nothing else unmaps.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One of the four rings: the shared producer/consumer indices and the descriptor array.
pub struct Ring<T> {
    _map: Mapping,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    descs: *mut T,
    mask: u32,
    /// Producer rings: our producer index; consumer rings: our consumer index.
    local: u32,
    /// The other side's index as last read.
    cached: u32,
}

impl<T: Copy> Ring<T> {
    fn new(fd: RawFd, off: &libc::xdp_ring_offset, size: u32, pgoff: u64) -> io::Result<Self> {
        let len = off.desc as usize + size as usize * mem::size_of::<T>();
        let map = Mapping::ring(fd, len, pgoff)?;
        let at = |o: u64| map.ptr.wrapping_add(o as usize);
        let producer = at(off.producer).cast::<AtomicU32>();
        let consumer = at(off.consumer).cast::<AtomicU32>();
        let flags = at(off.flags).cast::<AtomicU32>();
        let descs = at(off.desc).cast::<T>();
        Ok(Ring {
            producer,
            consumer,
            flags,
            descs,
            mask: size - 1,
            local: 0,
            cached: 0,
            _map: map,
        })
    }

    fn load(p: *const AtomicU32, o: Ordering) -> u32 {
        // SAFETY: `p` points at a 4-aligned u32 inside this ring's live mapping (offsets from
        // the kernel); the kernel only accesses it atomically too.
        unsafe { &*p }.load(o)
    }

    fn store(p: *const AtomicU32, v: u32) {
        // SAFETY: as in `load`.
        unsafe { &*p }.store(v, Ordering::Release)
    }

    pub fn needs_wakeup(&self) -> bool {
        Self::load(self.flags, Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    // ---- producer side (fill, tx) ----

    /// Free slots (refreshing the consumer index if fewer than `want` look free).
    pub fn free(&mut self, want: u32) -> u32 {
        let size = self.mask + 1;
        let mut free = size - self.local.wrapping_sub(self.cached);
        if free < want {
            self.cached = Self::load(self.consumer, Ordering::Acquire);
            free = size - self.local.wrapping_sub(self.cached);
        }
        free
    }

    /// Writes one descriptor at the local producer index (caller checked `free`).
    pub fn push(&mut self, d: T) {
        let i = (self.local & self.mask) as usize;
        // SAFETY: `i <= mask < size`, inside the descriptor array; the slot is ours until we
        // publish it (the caller checked it is free).
        unsafe { self.descs.add(i).write_volatile(d) };
        self.local = self.local.wrapping_add(1);
    }

    /// Publishes everything pushed.
    pub fn submit(&mut self) {
        Self::store(self.producer, self.local);
    }

    // ---- consumer side (rx, completion) ----

    /// Descriptors ready to read, at most `max`.
    pub fn ready(&mut self, max: u32) -> u32 {
        let mut n = self.cached.wrapping_sub(self.local);
        if n == 0 {
            self.cached = Self::load(self.producer, Ordering::Acquire);
            n = self.cached.wrapping_sub(self.local);
        }
        n.min(max)
    }

    /// The `k`-th ready descriptor (k < `ready()`).
    pub fn peek(&self, k: u32) -> T {
        let i = (self.local.wrapping_add(k) & self.mask) as usize;
        // SAFETY: in bounds as in `push`; the kernel published this slot (Acquire above) and
        // does not touch it until we release it.
        unsafe { self.descs.add(i).read_volatile() }
    }

    /// Gives `n` read descriptors back to the kernel.
    pub fn release(&mut self, n: u32) {
        self.local = self.local.wrapping_add(n);
        Self::store(self.consumer, self.local);
    }
}

/// An AF_XDP socket bound to one queue, with its own UMEM of `frames` frames of `FRAME` bytes.
pub struct Xsk {
    pub fd: OwnedFd,
    umem: Mapping,
    pub fill: Ring<u64>,
    pub comp: Ring<u64>,
    pub rx: Ring<libc::xdp_desc>,
    pub tx: Ring<libc::xdp_desc>,
    pub zerocopy: bool,
}

// SAFETY: the raw pointers point into mappings this value owns; it is moved to its worker
// thread before use and used by that thread alone.
unsafe impl Send for Xsk {}

pub const FRAME: usize = 4096;

fn setsockopt<T>(fd: RawFd, name: i32, v: &T) -> io::Result<()> {
    // SAFETY: passes a pointer to a live T and its exact size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            name,
            ptr::from_ref(v).cast(),
            mem::size_of::<T>() as u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Xsk {
    /// Creates the socket, registers a UMEM of `frames` frames, sets every ring to
    /// `ring_size` entries and binds to (`ifindex`, `queue`), zero-copy if `zerocopy`.
    pub fn open(
        ifindex: u32,
        queue: u32,
        frames: u32,
        ring_size: u32,
        zerocopy: bool,
    ) -> io::Result<Xsk> {
        let ctx = |what: &'static str| {
            move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(ctx("socket(AF_XDP)")(io::Error::last_os_error()));
        }
        let fd = owned(i64::from(fd));
        let raw = fd.as_raw_fd();
        let umem = Mapping::anon(frames as usize * FRAME).map_err(ctx("UMEM mmap"))?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr as u64,
            len: umem.len as u64,
            chunk_size: FRAME as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(raw, libc::XDP_UMEM_REG, &reg).map_err(ctx("XDP_UMEM_REG"))?;
        for name in [
            libc::XDP_UMEM_FILL_RING,
            libc::XDP_UMEM_COMPLETION_RING,
            libc::XDP_RX_RING,
            libc::XDP_TX_RING,
        ] {
            setsockopt(raw, name, &ring_size).map_err(ctx("ring size"))?;
        }
        // SAFETY: xdp_mmap_offsets is plain data; all-zero is valid.
        let mut off: libc::xdp_mmap_offsets = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::xdp_mmap_offsets>() as u32;
        // SAFETY: `off`/`len` are live and sized for the kernel's current struct.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                ptr::from_mut(&mut off).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(ctx("XDP_MMAP_OFFSETS")(io::Error::last_os_error()));
        }
        let fill = Ring::new(raw, &off.fr, ring_size, libc::XDP_UMEM_PGOFF_FILL_RING)
            .map_err(ctx("fill ring mmap"))?;
        let comp = Ring::new(
            raw,
            &off.cr,
            ring_size,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
        )
        .map_err(ctx("completion ring mmap"))?;
        let rx = Ring::new(raw, &off.rx, ring_size, libc::XDP_PGOFF_RX_RING as u64)
            .map_err(ctx("rx ring mmap"))?;
        let tx = Ring::new(raw, &off.tx, ring_size, libc::XDP_PGOFF_TX_RING as u64)
            .map_err(ctx("tx ring mmap"))?;
        let sa = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_USE_NEED_WAKEUP
                | if zerocopy {
                    libc::XDP_ZEROCOPY
                } else {
                    libc::XDP_COPY
                },
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `sa` is a live sockaddr_xdp of the stated size.
        let r = unsafe {
            libc::bind(
                raw,
                ptr::from_ref(&sa).cast(),
                mem::size_of::<libc::sockaddr_xdp>() as u32,
            )
        };
        if r != 0 {
            return Err(ctx("bind")(io::Error::last_os_error()));
        }
        Ok(Xsk {
            fd,
            umem,
            fill,
            comp,
            rx,
            tx,
            zerocopy,
        })
    }

    /// The bytes of a received frame. `addr..addr + len` comes from an RX descriptor; it is
    /// checked against the UMEM and `None` if outside.
    pub fn frame(&self, addr: u64, len: u32) -> Option<&[u8]> {
        let (a, l) = (usize::try_from(addr).ok()?, len as usize);
        if a.checked_add(l)? > self.umem.len {
            return None;
        }
        // SAFETY: in bounds of the UMEM (checked); the frame was handed to us by the RX ring
        // and the kernel does not write it until we give it back through the fill ring, which
        // happens only after this borrow of `self` ends.
        Some(unsafe { std::slice::from_raw_parts(self.umem.ptr.add(a), l) })
    }

    /// A whole frame for writing. `base` must be a frame-aligned address we own (from our
    /// TX pool: not in any ring).
    pub fn frame_mut(&mut self, base: u64) -> &mut [u8] {
        let a = base as usize;
        assert!(a.is_multiple_of(FRAME) && a + FRAME <= self.umem.len);
        // SAFETY: in bounds (asserted); a frame in our TX pool is in no ring, so the kernel
        // neither reads nor writes it; `&mut self` excludes other borrows of the UMEM.
        unsafe { std::slice::from_raw_parts_mut(self.umem.ptr.add(a), FRAME) }
    }

    /// Kicks TX (`sendto` with no data). Transient errors are ignored: the ring keeps the
    /// frames and the next kick sends them.
    pub fn kick_tx(&self) {
        // SAFETY: a zero-length sendto with no buffer and no address.
        unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                ptr::null(),
                0,
            )
        };
    }

    /// Wakes the driver to refill RX (`recvfrom` with no buffer), for need_wakeup mode.
    pub fn kick_rx(&self) {
        // SAFETY: a zero-length recvfrom with no buffer and no address.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
    }

    /// Kernel-side drop counters: (rx_dropped, rx_ring_full, rx_fill_ring_empty).
    pub fn kernel_stats(&self) -> Option<(u64, u64, u64)> {
        // SAFETY: plain data; all-zero is valid.
        let mut s: libc::xdp_statistics = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::xdp_statistics>() as u32;
        // SAFETY: `s`/`len` are live and sized for the struct.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                ptr::from_mut(&mut s).cast(),
                &mut len,
            )
        };
        (r == 0).then_some((s.rx_dropped, s.rx_ring_full, s.rx_fill_ring_empty_descs))
    }
}

/// Enters the network namespace at `path` on the calling thread (tests and benchmarks).
pub fn enter_netns(path: &str) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on a namespace fd we hold open; affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
