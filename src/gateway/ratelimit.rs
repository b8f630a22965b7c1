//! Token buckets for replies to unknown sources (PROTOCOL.md §5) and for HANDSHAKE forwarding:
//! one per source prefix (/24 for IPv4, /56 for IPv6) and one global, per worker.
//!
//! Prefix buckets live in a fixed array indexed by a keyed hash of the prefix, so memory is
//! bounded whatever the attacker sends. Prefixes that collide share a bucket, which only ever
//! makes the limit stricter.
#![forbid(unsafe_code)]

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher13;

use crate::time::{TICKS_PER_SECOND, Ticks};

/// A rate in events per second with a burst allowance.
#[derive(Clone, Copy, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub const fn new(per_second: f64, burst: f64) -> Rate {
        Rate { per_second, burst }
    }

    /// This rate split evenly over `n` workers.
    pub fn share(self, n: usize) -> Rate {
        let n = n.max(1) as f64;
        Rate {
            per_second: self.per_second / n,
            burst: (self.burst / n).max(1.0),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    tokens: f64,
    last: u64,
}

impl Bucket {
    fn take(&mut self, rate: Rate, now: Ticks) -> bool {
        let elapsed = now.0.saturating_sub(self.last) as f64 / TICKS_PER_SECOND as f64;
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.last = self.last.max(now.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(rate: Rate) -> Bucket {
        Bucket {
            tokens: rate.burst,
            last: 0,
        }
    }
}

/// The prefix of a source that shares a bucket.
pub fn source_prefix(addr: &SocketAddr) -> u64 {
    match addr.ip() {
        IpAddr::V4(v4) => 0x4 << 60 | u64::from(u32::from(v4) >> 8),
        IpAddr::V6(v6) => {
            let hi = u128::from(v6) >> 72; // keep the top 56 bits
            0x6 << 60 ^ hi as u64
        }
    }
}

/// Why a limiter refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    Prefix,
    Global,
}

pub struct Limiter {
    prefix_rate: Rate,
    global_rate: Rate,
    buckets: Box<[Bucket]>,
    global: Bucket,
    hasher: SipHasher13,
}

impl Limiter {
    /// `slots` prefix buckets (rounded up to a power of two).
    pub fn new(prefix_rate: Rate, global_rate: Rate, slots: usize) -> Limiter {
        let n = slots.next_power_of_two().max(1);
        let key: [u8; 16] = crate::crypto::random_array();
        Limiter {
            prefix_rate,
            global_rate,
            buckets: vec![Bucket::full(prefix_rate); n].into_boxed_slice(),
            global: Bucket::full(global_rate),
            hasher: SipHasher13::new_with_key(&key),
        }
    }

    /// New rates; every bucket keeps its level (capped by the new burst at its next use).
    pub fn set_rates(&mut self, prefix_rate: Rate, global_rate: Rate) {
        self.prefix_rate = prefix_rate;
        self.global_rate = global_rate;
    }

    /// Takes a token for `from` from its prefix bucket and from the global bucket.
    pub fn check(&mut self, from: &SocketAddr, now: Ticks) -> Result<(), Limited> {
        let mut h = self.hasher;
        h.write_u64(source_prefix(from));
        let slot = (h.finish() as usize) & (self.buckets.len() - 1);
        if !self.buckets[slot].take(self.prefix_rate, now) {
            return Err(Limited::Prefix);
        }
        if !self.global.take(self.global_rate, now) {
            return Err(Limited::Global);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            source_prefix(&a("10.1.2.3:1")),
            source_prefix(&a("10.1.2.200:9"))
        );
        assert_ne!(
            source_prefix(&a("10.1.2.3:1")),
            source_prefix(&a("10.1.3.3:1"))
        );
        assert_eq!(
            source_prefix(&a("[2001:db8:0:ab::1]:1")),
            source_prefix(&a("[2001:db8:0:aa::2]:1")),
            "same /56"
        );
        assert_ne!(
            source_prefix(&a("[2001:db8:0:1ab::1]:1")),
            source_prefix(&a("[2001:db8:0:2ab::1]:1"))
        );
    }

    #[test]
    fn burst_then_rate() {
        let mut l = Limiter::new(Rate::new(10.0, 5.0), Rate::new(1e9, 1e9), 64);
        let t0 = Ticks(1_000 * TICKS_PER_SECOND);
        let from = a("10.0.0.1:1");
        let ok = (0..20).filter(|_| l.check(&from, t0).is_ok()).count();
        assert_eq!(ok, 5, "burst");
        let later = Ticks(t0.0 + TICKS_PER_SECOND);
        let ok = (0..20).filter(|_| l.check(&from, later).is_ok()).count();
        assert_eq!(ok, 5, "refilled to the burst cap after a second at 10/s");
        // Another prefix is unaffected (unless it collides, which 64 slots make unlikely for one pair;
        // so use the global check instead of relying on that).
    }

    #[test]
    fn global_limit() {
        let mut l = Limiter::new(Rate::new(1e9, 1e9), Rate::new(1.0, 3.0), 64);
        let t0 = Ticks(1_000 * TICKS_PER_SECOND);
        let results: Vec<_> = (0..5u8)
            .map(|i| l.check(&SocketAddr::from(([10, i, 0, 1], 1)), t0))
            .collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
        assert_eq!(results[4], Err(Limited::Global));
    }

    #[test]
    fn share_splits() {
        let r = Rate::new(100.0, 10.0).share(4);
        assert_eq!(r, Rate::new(25.0, 2.5));
    }
}
