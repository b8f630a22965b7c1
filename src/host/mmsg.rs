//! Batched UDP receive and send with `recvmmsg(2)` / `sendmmsg(2)`.
//!
//! The only unsafe code of the host. Buffers, address storage, iovecs and headers are owned
//! by [`RecvBatch`] / [`SendBatch`], allocated once, and never reallocated while the kernel
//! holds pointers into them (pointers are rebuilt right before each call).
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// Received datagrams: `bufs[i * size..][..lens[i]]` from `addrs[i]`.
pub(super) struct RecvBatch {
    size: usize,
    bufs: Vec<u8>,
    storage: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: Vec<usize>,
    addrs: Vec<Option<SocketAddr>>,
    count: usize,
}

impl RecvBatch {
    /// `batch` buffers of `size` bytes each.
    pub(super) fn new(batch: usize, size: usize) -> Self {
        RecvBatch {
            size,
            bufs: vec![0u8; batch * size],
            // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
            storage: vec![unsafe { mem::zeroed() }; batch],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                batch
            ],
            // SAFETY: mmsghdr is plain old data (integers and raw pointers); all-zero (null
            // pointers, zero lengths) is a valid value, and every field is set before use.
            hdrs: vec![unsafe { mem::zeroed() }; batch],
            lens: vec![0; batch],
            addrs: vec![None; batch],
            count: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    /// Datagram `i` of the last receive and its source; `None` for a truncated datagram or an
    /// unknown address family.
    pub(super) fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        let a = self.addrs[i]?;
        Some((a, &self.bufs[i * self.size..i * self.size + self.lens[i]]))
    }

    /// Blocks until at least one datagram arrives (or the socket's read timeout passes), then
    /// takes whatever else is already queued, up to the batch size.
    pub(super) fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        let fd: RawFd = sock.as_raw_fd();
        let n = self.hdrs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * self.size..].as_mut_ptr().cast(),
                iov_len: self.size,
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.storage[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: `hdrs` holds `n` initialised headers whose name, iovec and buffer pointers
        // point into `storage`, `iovs` and `bufs`, which are live, not moved, and exclusively
        // borrowed (`&mut self`) for the duration of the call. Each iovec covers exactly its
        // own `size`-byte slice of `bufs`, so the kernel writes only inside our allocations.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            self.count = 0;
            return Err(io::Error::last_os_error());
        }
        self.count = r as usize;
        for i in 0..self.count {
            let h = &self.hdrs[i];
            let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lens[i] = (h.msg_len as usize).min(self.size);
            self.addrs[i] = if truncated {
                None
            } else {
                from_storage(&self.storage[i], h.msg_hdr.msg_namelen)
            };
        }
        Ok(self.count)
    }
}

fn from_storage(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match s.ss_family as libc::c_int {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET, length checked);
            // sockaddr_storage is large and aligned enough for any sockaddr type.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6 (family AF_INET6, length checked).
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` as a sockaddr into `s`; returns its length.
fn to_storage(addr: &SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is plain old data; all-zero is valid.
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            // SAFETY: sockaddr_storage is at least as large and as aligned as sockaddr_in.
            unsafe {
                (s as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: sockaddr_in6 is plain old data; all-zero is valid.
            let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: sockaddr_storage is at least as large and as aligned as sockaddr_in6.
            unsafe {
                (s as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Datagrams queued for one `sendmmsg` call: `bufs[i * size..][..lens[i]]` to `dests[i]`.
pub(super) struct SendBatch {
    size: usize,
    bufs: Vec<u8>,
    dests: Vec<SocketAddr>,
    lens: Vec<usize>,
    storage: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl SendBatch {
    pub(super) fn new(batch: usize, size: usize) -> Self {
        SendBatch {
            size,
            bufs: vec![0u8; batch * size],
            dests: Vec::with_capacity(batch),
            lens: Vec::with_capacity(batch),
            // SAFETY: plain old data; all-zero is valid (see RecvBatch::new).
            storage: vec![unsafe { mem::zeroed() }; batch],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                batch
            ],
            // SAFETY: plain old data; all-zero is valid (see RecvBatch::new).
            hdrs: vec![unsafe { mem::zeroed() }; batch],
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.lens.len() == self.hdrs.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// The buffer for the next datagram; commit it with [`SendBatch::push`]. Call only when
    /// not full.
    pub(super) fn next_buf(&mut self) -> &mut [u8] {
        let i = self.lens.len();
        &mut self.bufs[i * self.size..(i + 1) * self.size]
    }

    /// Queues `next_buf()[..len]` for `to`.
    pub(super) fn push(&mut self, to: SocketAddr, len: usize) {
        debug_assert!(!self.is_full() && len <= self.size);
        self.dests.push(to);
        self.lens.push(len.min(self.size));
    }

    /// Copies `payload` in and queues it; false if it does not fit a buffer.
    pub(super) fn push_copy(&mut self, to: SocketAddr, payload: &[u8]) -> bool {
        if payload.len() > self.size || self.is_full() {
            return false;
        }
        self.next_buf()[..payload.len()].copy_from_slice(payload);
        self.push(to, payload.len());
        true
    }

    /// Sends everything queued and empties the batch. A datagram the kernel refuses (e.g. an
    /// ICMP error reported on this socket) is skipped. Returns (sent, failed).
    pub(super) fn flush(&mut self, sock: &impl AsRawFd) -> (usize, usize) {
        let fd = sock.as_raw_fd();
        let n = self.lens.len();
        for i in 0..n {
            let namelen = to_storage(&self.dests[i], &mut self.storage[i]);
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * self.size..].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.storage[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = namelen;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        let (mut at, mut sent, mut failed) = (0usize, 0usize, 0usize);
        while at < n {
            // SAFETY: headers `at..n` are initialised above and point into `storage`, `iovs`
            // and `bufs`, which stay live and unmoved (exclusively borrowed) during the call;
            // each iovec covers `lens[i] <= size` bytes of its own buffer slice. The kernel
            // only reads them (and writes `msg_len`).
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[at..].as_mut_ptr(),
                    (n - at) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                at += r as usize;
                sent += r as usize;
            } else if r == 0 {
                break;
            } else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first remaining datagram failed: skip it.
                at += 1;
                failed += 1;
            }
        }
        self.dests.clear();
        self.lens.clear();
        (sent, failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    #[test]
    fn batch_roundtrip_v4_and_v6() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(a) = UdpSocket::bind(bind) else {
                continue; // no IPv6 loopback here
            };
            let b = UdpSocket::bind(bind).unwrap();
            b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let to = b.local_addr().unwrap();
            let mut s = SendBatch::new(8, 64);
            for i in 0..5u8 {
                assert!(s.push_copy(to, &[i; 10][..usize::from(i)]));
            }
            assert!(!s.push_copy(to, &[0; 65]));
            assert_eq!(s.flush(&a), (5, 0));
            assert!(s.is_empty());
            let mut r = RecvBatch::new(8, 64);
            let mut got = Vec::new();
            while got.len() < 5 {
                r.recv(&b).unwrap();
                for i in 0..r.len() {
                    let (from, d) = r.get(i).unwrap();
                    assert_eq!(from, a.local_addr().unwrap());
                    got.push(d.to_vec());
                }
            }
            let want: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; usize::from(i)]).collect();
            assert_eq!(got, want);
            // A datagram larger than the buffer is flagged as truncated.
            a.send_to(&[7; 100], to).unwrap();
            r.recv(&b).unwrap();
            assert!(r.get(0).is_none());
        }
    }
}
