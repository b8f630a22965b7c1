//! Source addresses for client and attacker sockets.
//!
//! By default clients live in 127.0.0.0/8 (every address there is on `lo` on Linux, no
//! configuration needed): index `j` maps to `127.A.B.C` with `C = 1 + j % 254`,
//! `B = (j / 254) % 256` and `A` counting up from a base, so each /24 holds at most 254
//! clients and per-/24 rate limits in the gateway see a realistic spread. Clients use second
//! octets 1..=199; attackers use 200..=254, so attack tuples never collide with clients.
//! `--source-addrs` replaces the pool with explicit addresses and IPv4 CIDR blocks.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses per /24 that the loopback pool uses (`.1` to `.254`).
const PER_24: u64 = 254;
/// Largest explicit pool that is materialized.
const MAX_LISTED: usize = 1 << 22;

/// A pool of source IPs, indexed by a counter that wraps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddrPool {
    /// `127.A.B.C` with `A` in `first..first + count` (see the module docs).
    Loopback { first: u8, count: u8 },
    /// Explicit addresses, used round-robin.
    Listed(Vec<IpAddr>),
}

impl AddrPool {
    /// Loopback addresses for clients: 127.1.0.1 upwards (about 12.9 M addresses).
    pub fn clients_v4() -> AddrPool {
        AddrPool::Loopback {
            first: 1,
            count: 199,
        }
    }

    /// Loopback addresses for attack tuples: 127.200.0.1 upwards.
    pub fn attackers_v4() -> AddrPool {
        AddrPool::Loopback {
            first: 200,
            count: 55,
        }
    }

    /// Only `::1` (IPv6 has a single loopback address; tuples then differ by port only).
    pub fn loopback_v6() -> AddrPool {
        AddrPool::Listed(vec![IpAddr::V6(Ipv6Addr::LOCALHOST)])
    }

    /// Parses a comma-separated list of IPv4/IPv6 addresses and IPv4 CIDR blocks
    /// (`127.1.0.0/16`); a block contributes its addresses whose last octet is 1..=254.
    pub fn parse(spec: &str) -> Result<AddrPool, String> {
        let mut out = Vec::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if let Some((ip, len)) = item.split_once('/') {
                let ip: Ipv4Addr = ip.parse().map_err(|_| {
                    format!("{item:?}: expected an IPv4 CIDR block like 127.1.0.0/16")
                })?;
                let len: u32 = len
                    .parse()
                    .ok()
                    .filter(|l| (8..=32).contains(l))
                    .ok_or_else(|| format!("{item:?}: prefix length must be 8..=32"))?;
                let mask = if len == 32 {
                    u32::MAX
                } else {
                    !(u32::MAX >> len)
                };
                let base = u32::from(ip) & mask;
                let size = 1u64 << (32 - len);
                if out.len() as u64 + size > MAX_LISTED as u64 {
                    return Err(format!(
                        "{item:?}: more than {MAX_LISTED} addresses in total"
                    ));
                }
                for k in 0..size {
                    let a = base.wrapping_add(k as u32);
                    let last = a as u8;
                    if len >= 31 || (1..=254).contains(&last) {
                        out.push(IpAddr::V4(Ipv4Addr::from(a)));
                    }
                }
            } else {
                let ip: IpAddr = item
                    .parse()
                    .map_err(|_| format!("{item:?}: expected an IP address or IPv4 CIDR block"))?;
                out.push(ip);
            }
        }
        if out.is_empty() {
            return Err("--source-addrs: no addresses given".into());
        }
        let v4 = out[0].is_ipv4();
        if out.iter().any(|a| a.is_ipv4() != v4) {
            return Err("--source-addrs: mix of IPv4 and IPv6 addresses".into());
        }
        Ok(AddrPool::Listed(out))
    }

    /// The address for counter value `j` (wraps around the pool).
    pub fn get(&self, j: u64) -> IpAddr {
        match self {
            AddrPool::Loopback { first, count } => {
                let per_a = PER_24 * 256;
                let j = j % (per_a * u64::from(*count));
                let a = *first + (j / per_a) as u8;
                let b = ((j / PER_24) % 256) as u8;
                let c = (j % PER_24) as u8 + 1;
                IpAddr::V4(Ipv4Addr::new(127, a, b, c))
            }
            AddrPool::Listed(v) => v[(j % v.len() as u64) as usize],
        }
    }

    pub fn is_ipv4(&self) -> bool {
        self.get(0).is_ipv4()
    }

    /// Distinct addresses in the pool.
    pub fn len(&self) -> u64 {
        match self {
            AddrPool::Loopback { count, .. } => PER_24 * 256 * u64::from(*count),
            AddrPool::Listed(v) => v.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_pool_spreads_over_24s() {
        let p = AddrPool::clients_v4();
        assert_eq!(p.get(0), v4("127.1.0.1"));
        assert_eq!(p.get(253), v4("127.1.0.254"));
        assert_eq!(p.get(254), v4("127.1.1.1"));
        assert_eq!(p.get(254 * 256), v4("127.2.0.1"));
        assert_eq!(p.get(p.len()), v4("127.1.0.1"), "wraps");
        let last = p.get(p.len() - 1);
        assert_eq!(last, v4("127.199.255.254"));
        assert_eq!(AddrPool::attackers_v4().get(0), v4("127.200.0.1"));
        let a = AddrPool::attackers_v4();
        assert_eq!(a.get(a.len() - 1), v4("127.254.255.254"));
    }

    #[test]
    fn parse_lists_and_blocks() {
        let p = AddrPool::parse("127.5.0.0/23, 127.9.9.9").unwrap();
        assert_eq!(p.len(), 2 * 254 + 1);
        assert_eq!(p.get(0), v4("127.5.0.1"));
        assert_eq!(p.get(254), v4("127.5.1.1"));
        assert_eq!(p.get(508), v4("127.9.9.9"));
        assert_eq!(p.get(509), v4("127.5.0.1"));
        assert_eq!(AddrPool::parse("::1").unwrap().get(3), v4("::1"));
        assert_eq!(AddrPool::parse("10.0.0.7/32").unwrap().len(), 1);
        for bad in [
            "",
            "127.0.0.1/7",
            "127.0.0.1/x",
            "nope",
            "127.0.0.1,::1",
            "::1/64",
        ] {
            assert!(AddrPool::parse(bad).is_err(), "{bad:?}");
        }
    }
}
