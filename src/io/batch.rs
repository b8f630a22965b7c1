//! Outgoing datagrams of one batch, in caller-owned slots: the core writes, the I/O loop
//! sends. Slots are allocated once per worker; nothing allocates per packet.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

/// Largest datagram a slot holds: a client datagram of up to [`MAX_CLIENT_DATAGRAM`] bytes
/// plus the 20-byte host-link header.
pub const SLOT_LEN: usize = 2048;
/// Client datagrams longer than this are dropped (counted as oversize).
pub const MAX_CLIENT_DATAGRAM: usize = SLOT_LEN - 20;

/// Which of the worker's sockets sends a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The client-facing socket of this address family (index into the worker's listeners).
    Client(u8),
    /// The worker's host-link socket.
    Host,
}

/// A queued datagram's destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxMeta {
    pub via: Via,
    pub to: SocketAddr,
    pub len: usize,
}

/// Fixed-capacity queue of outgoing datagrams.
pub struct TxQueue {
    buf: Box<[u8]>,
    meta: Vec<TxMeta>,
    capacity: usize,
    /// Datagrams refused because the queue was full.
    pub overflowed: u64,
}

impl TxQueue {
    pub fn new(capacity: usize) -> Self {
        TxQueue {
            buf: vec![0u8; capacity * SLOT_LEN].into_boxed_slice(),
            meta: Vec::with_capacity(capacity),
            capacity,
            overflowed: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.meta.len() == self.capacity
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes one datagram with `fill`, which gets a `SLOT_LEN` slot and returns the length
    /// it wrote. Returns false (and counts an overflow) when the queue is full.
    pub fn push(
        &mut self,
        via: Via,
        to: SocketAddr,
        fill: impl FnOnce(&mut [u8]) -> usize,
    ) -> bool {
        let i = self.meta.len();
        if i == self.capacity {
            self.overflowed += 1;
            return false;
        }
        let slot = &mut self.buf[i * SLOT_LEN..(i + 1) * SLOT_LEN];
        let len = fill(slot).min(SLOT_LEN);
        if len == 0 {
            return false;
        }
        self.meta.push(TxMeta { via, to, len });
        true
    }

    /// Like [`TxQueue::push`] for a writer that picks the destination itself: `fill` returns
    /// the destination and length, or `None` to queue nothing.
    pub fn push_from(
        &mut self,
        via: Via,
        fill: impl FnOnce(&mut [u8]) -> Option<(SocketAddr, usize)>,
    ) -> bool {
        let i = self.meta.len();
        if i == self.capacity {
            self.overflowed += 1;
            return false;
        }
        let slot = &mut self.buf[i * SLOT_LEN..(i + 1) * SLOT_LEN];
        match fill(slot) {
            Some((to, len)) if len > 0 => {
                self.meta.push(TxMeta {
                    via,
                    to,
                    len: len.min(SLOT_LEN),
                });
                true
            }
            _ => false,
        }
    }

    /// Queues a copy of `bytes` (at most `SLOT_LEN`).
    pub fn push_bytes(&mut self, via: Via, to: SocketAddr, bytes: &[u8]) -> bool {
        if bytes.len() > SLOT_LEN {
            return false;
        }
        self.push(via, to, |slot| {
            slot[..bytes.len()].copy_from_slice(bytes);
            bytes.len()
        })
    }

    /// Queued datagram `i`.
    pub fn get(&self, i: usize) -> (TxMeta, &[u8]) {
        let m = self.meta[i];
        (m, &self.buf[i * SLOT_LEN..i * SLOT_LEN + m.len])
    }

    pub fn iter(&self) -> impl Iterator<Item = (TxMeta, &[u8])> {
        (0..self.meta.len()).map(|i| self.get(i))
    }

    /// Empties the queue after the I/O loop has sent (or dropped) everything.
    pub fn clear(&mut self) {
        self.meta.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_full() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut q = TxQueue::new(2);
        assert!(q.push_bytes(Via::Host, to, b"ab"));
        assert!(q.push(Via::Client(0), to, |s| {
            s[..3].copy_from_slice(b"xyz");
            3
        }));
        assert!(!q.push_bytes(Via::Host, to, b"c"));
        assert_eq!(q.overflowed, 1);
        assert_eq!(q.get(0).1, b"ab");
        assert_eq!(q.get(1).0.via, Via::Client(0));
        assert_eq!(q.iter().count(), 2);
        q.clear();
        assert!(q.is_empty());
        assert!(!q.push_bytes(Via::Host, to, &[0u8; SLOT_LEN + 1]));
    }
}

/// One received datagram, as the I/O loop hands it to the core.
#[derive(Clone, Copy, Debug)]
pub struct Rx<'a> {
    pub via: Via,
    /// The sender, canonical (IPv4-mapped IPv6 shown as IPv4).
    pub from: SocketAddr,
    pub data: &'a [u8],
}
