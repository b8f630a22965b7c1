//! The sans-IO connection registry of one key epoch: indexes in `[0, 2^S)`, each with its
//! `conn_id`, rebind secret (kept as the keyed KDF), last accepted rebind time `L`, current
//! tuple and host. It applies the per-connection freshness rule of PROTOCOL.md §6, check 7.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::rebind::{RebindKdf, RebindSecret};
use crate::time::Ticks;

/// Which host owns a connection; an index into the gateway's host list.
pub type HostId = u16;

/// One live connection (104 bytes: the registry holds one per index in use).
#[derive(Clone, Debug)]
pub struct Conn {
    pub conn_id: u64,
    pub kdf: RebindKdf,
    /// `L`: the `t` of the last accepted rebind (0 before the first).
    pub last_rebind: Ticks,
    /// The tuple the connection is bound to, if any (a NAT may have handed it on).
    tuple: Option<PackedTuple>,
    pub host: HostId,
}

impl Conn {
    pub fn tuple(&self) -> Option<SocketAddr> {
        self.tuple.map(SocketAddr::from)
    }
}

/// A tuple in 19 bytes (`SocketAddr` takes 32); flow info and scope are not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PackedTuple {
    addr: [u8; 16],
    port: u16,
    v6: bool,
}

impl From<SocketAddr> for PackedTuple {
    fn from(a: SocketAddr) -> Self {
        PackedTuple {
            addr: crate::wire::addr16(&a),
            port: a.port(),
            v6: a.is_ipv6(),
        }
    }
}

impl From<PackedTuple> for SocketAddr {
    fn from(p: PackedTuple) -> Self {
        let ip = std::net::Ipv6Addr::from(p.addr);
        match (p.v6, ip.to_ipv4_mapped()) {
            (false, Some(v4)) => SocketAddr::from((v4, p.port)),
            _ => SocketAddr::from((ip, p.port)),
        }
    }
}

/// The outcome of the freshness rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// `t > L`: bind to the new tuple.
    Accept,
    /// `t == L` from the connection's current tuple: answer with the ACK again.
    Duplicate,
    /// Anything else.
    Replay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("all {0} connection indexes are in use")]
    Full(u64),
    #[error("index {index} is outside the index space 2^{slots}")]
    OutOfRange { index: u32, slots: usize },
    /// A connection of a key epoch the gateway holds no registry for (neither the current
    /// epoch nor the one in its grace period).
    #[error("no registry for key epoch {0}")]
    UnknownEpoch(u32),
    #[error("index {0} is already registered")]
    Taken(u32),
}

/// A newly registered connection: what the host hands on to the client.
#[derive(Debug)]
pub struct Registered {
    pub index: u32,
    pub secret: RebindSecret,
}

/// Indexes below this live in a dense vector (allocation is sequential, so a gateway's
/// indexes are dense); the rest in a map, so no index can make the registry allocate 2^32
/// entries.
pub const DENSE_LIMIT: u32 = 1 << 20;

#[derive(Debug)]
pub struct Registry {
    slots: usize,
    /// Dense by index; grows up to the highest index ever allocated.
    conns: Vec<Option<Conn>>,
    /// Indexes at or past [`DENSE_LIMIT`] (S > 20, or restored from a vectors file).
    sparse: HashMap<u32, Conn>,
    /// The next fresh index to try past the dense part.
    next_sparse: u64,
    /// Freed indexes, reused before fresh ones.
    free: Vec<u32>,
    live: usize,
}

impl Registry {
    /// An empty registry for S = `slots` (1..=32, checked by the key schedule).
    pub fn new(slots: usize) -> Self {
        Self::with_capacity(slots, 0)
    }

    /// An empty registry with room for `capacity` connections reserved up front, so growth
    /// never doubles the allocation.
    pub fn with_capacity(slots: usize, capacity: usize) -> Self {
        Registry {
            slots,
            conns: Vec::with_capacity(capacity.min(DENSE_LIMIT as usize)),
            sparse: HashMap::new(),
            next_sparse: u64::from(DENSE_LIMIT),
            free: Vec::new(),
            live: 0,
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn capacity(&self) -> u64 {
        1u64 << self.slots
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Registers a connection bound to `tuple`, with a fresh `R` from the OS RNG.
    pub fn register(
        &mut self,
        conn_id: u64,
        host: HostId,
        tuple: Option<SocketAddr>,
    ) -> Result<Registered, RegistryError> {
        let index = self.allocate()?;
        let secret = RebindSecret::generate();
        self.put(index, conn_id, &secret, Ticks(0), tuple, host);
        Ok(Registered { index, secret })
    }

    /// Puts back a connection restored from the persistent store (or named by a vectors
    /// file: any index in `[0, 2^S)`, so indexes past the dense part go to a map).
    pub fn restore(
        &mut self,
        index: u32,
        conn_id: u64,
        secret: &RebindSecret,
        last_rebind: Ticks,
        tuple: Option<SocketAddr>,
        host: HostId,
    ) -> Result<(), RegistryError> {
        if u64::from(index) >= self.capacity() {
            return Err(RegistryError::OutOfRange {
                index,
                slots: self.slots,
            });
        }
        if self.get(index).is_some() {
            return Err(RegistryError::Taken(index));
        }
        if index < DENSE_LIMIT {
            let i = index as usize;
            if i >= self.conns.len() {
                // Indexes skipped over become free.
                self.free.extend((self.conns.len() as u32..index).rev());
                self.conns.resize_with(i + 1, || None);
            } else {
                self.free.retain(|f| *f != index);
            }
        }
        self.put(index, conn_id, secret, last_rebind, tuple, host);
        Ok(())
    }

    fn allocate(&mut self) -> Result<u32, RegistryError> {
        if let Some(i) = self.free.pop() {
            return Ok(i);
        }
        let next = self.conns.len() as u64;
        if next < u64::from(DENSE_LIMIT) && next < self.capacity() {
            self.conns.push(None);
            return Ok(next as u32);
        }
        while self.next_sparse < self.capacity() {
            let i = self.next_sparse as u32;
            self.next_sparse += 1;
            if !self.sparse.contains_key(&i) {
                return Ok(i);
            }
        }
        Err(RegistryError::Full(self.capacity()))
    }

    fn put(
        &mut self,
        index: u32,
        conn_id: u64,
        secret: &RebindSecret,
        last_rebind: Ticks,
        tuple: Option<SocketAddr>,
        host: HostId,
    ) {
        let conn = Conn {
            conn_id,
            kdf: RebindKdf::new(secret),
            last_rebind,
            tuple: tuple.map(PackedTuple::from),
            host,
        };
        if index < DENSE_LIMIT {
            self.conns[index as usize] = Some(conn);
        } else {
            self.sparse.insert(index, conn);
        }
        self.live += 1;
    }

    pub fn get(&self, index: u32) -> Option<&Conn> {
        if index < DENSE_LIMIT {
            self.conns.get(index as usize)?.as_ref()
        } else {
            self.sparse.get(&index)
        }
    }

    fn get_mut(&mut self, index: u32) -> Option<&mut Conn> {
        if index < DENSE_LIMIT {
            self.conns.get_mut(index as usize)?.as_mut()
        } else {
            self.sparse.get_mut(&index)
        }
    }

    /// Closes a connection; its index is reused later.
    pub fn remove(&mut self, index: u32) -> Option<Conn> {
        let conn = if index < DENSE_LIMIT {
            self.conns.get_mut(index as usize)?.take()?
        } else {
            self.sparse.remove(&index)?
        };
        self.free.push(index);
        self.live -= 1;
        Some(conn)
    }

    /// Forgets the tuple of `index` (another connection took it over).
    pub fn unbind_tuple(&mut self, index: u32) {
        if let Some(c) = self.get_mut(index) {
            c.tuple = None;
        }
    }

    /// The freshness rule (§6, check 7), without changing anything.
    pub fn freshness(&self, index: u32, t: Ticks, from: &SocketAddr) -> Option<Freshness> {
        let c = self.get(index)?;
        Some(if t > c.last_rebind {
            Freshness::Accept
        } else if t == c.last_rebind && c.tuple == Some(PackedTuple::from(*from)) {
            Freshness::Duplicate
        } else {
            Freshness::Replay
        })
    }

    /// Records an accepted rebind: `L = t`, tuple = `to`. Returns the previous tuple.
    pub fn commit_rebind(&mut self, index: u32, t: Ticks, to: SocketAddr) -> Option<SocketAddr> {
        let c = self.get_mut(index)?;
        c.last_rebind = t;
        c.tuple.replace(to.into()).map(SocketAddr::from)
    }

    /// Live connections with their indexes.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Conn)> {
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i as u32, c.as_ref()?)))
            .chain(self.sparse.iter().map(|(i, c)| (*i, c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], p))
    }

    #[test]
    fn allocates_reuses_and_fills() {
        let mut r = Registry::new(2);
        let a = r.register(10, 0, Some(addr(1))).unwrap().index;
        let b = r.register(11, 0, None).unwrap().index;
        assert_eq!((a, b), (0, 1));
        assert_eq!(r.remove(a).unwrap().conn_id, 10);
        assert!(r.remove(a).is_none());
        assert_eq!(
            r.register(12, 0, None).unwrap().index,
            0,
            "freed index reused"
        );
        r.register(13, 0, None).unwrap();
        r.register(14, 0, None).unwrap();
        assert_eq!(r.register(15, 0, None).unwrap_err(), RegistryError::Full(4));
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn packed_tuples_roundtrip() {
        for a in [
            "10.0.0.1:5",
            "[2001:db8::1]:443",
            "[::ffff:10.0.0.1]:5",
            "0.0.0.0:0",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(SocketAddr::from(PackedTuple::from(a)), a);
        }
        assert!(std::mem::size_of::<Option<Conn>>() <= 104);
    }

    #[test]
    fn huge_indexes_live_in_the_sparse_part() {
        let mut r = Registry::new(32);
        let s = RebindSecret([1; 32]);
        r.restore(4_000_000_000, 7, &s, Ticks(0), None, 0).unwrap();
        assert_eq!(r.get(4_000_000_000).unwrap().conn_id, 7);
        assert_eq!(
            r.register(8, 0, None).unwrap().index,
            0,
            "dense allocation unaffected"
        );
        assert_eq!(r.iter().count(), 2);
        assert_eq!(r.remove(4_000_000_000).unwrap().conn_id, 7);
        assert_eq!(r.len(), 1);
        // Past the dense part, allocation continues in the map.
        let mut big = Registry::new(21);
        big.conns.resize_with(DENSE_LIMIT as usize, || None);
        assert_eq!(big.register(1, 0, None).unwrap().index, DENSE_LIMIT);
    }

    #[test]
    fn secrets_are_random() {
        let mut r = Registry::new(4);
        let a = r.register(1, 0, None).unwrap().secret;
        let b = r.register(2, 0, None).unwrap().secret;
        assert_ne!(a, b);
    }

    #[test]
    fn freshness_rule() {
        let mut r = Registry::new(4);
        let x = r.register(1, 0, Some(addr(1))).unwrap().index;
        assert_eq!(r.freshness(x, Ticks(5), &addr(2)), Some(Freshness::Accept));
        assert_eq!(r.commit_rebind(x, Ticks(5), addr(2)), Some(addr(1)));
        assert_eq!(
            r.freshness(x, Ticks(5), &addr(2)),
            Some(Freshness::Duplicate)
        );
        assert_eq!(r.freshness(x, Ticks(5), &addr(3)), Some(Freshness::Replay));
        assert_eq!(r.freshness(x, Ticks(4), &addr(2)), Some(Freshness::Replay));
        assert_eq!(r.freshness(x, Ticks(6), &addr(3)), Some(Freshness::Accept));
        assert_eq!(r.freshness(9, Ticks(6), &addr(3)), None);
    }

    #[test]
    fn restore_keeps_l_and_free_list() {
        let mut r = Registry::new(4);
        let s = RebindSecret([1; 32]);
        r.restore(3, 33, &s, Ticks(100), Some(addr(1)), 2).unwrap();
        assert_eq!(
            r.restore(3, 33, &s, Ticks(100), None, 2),
            Err(RegistryError::Taken(3))
        );
        assert!(r.restore(16, 1, &s, Ticks(0), None, 0).is_err());
        assert_eq!(
            r.freshness(3, Ticks(100), &addr(9)),
            Some(Freshness::Replay)
        );
        let fresh: Vec<u32> = (0..3)
            .map(|i| r.register(i, 0, None).unwrap().index)
            .collect();
        let mut sorted = fresh.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
        assert_eq!(r.register(9, 0, None).unwrap().index, 4);
    }
}
