//! Resident memory per registered connection: a gateway core with `n` connections
//! registered through the host link, measured as the growth of the process's RSS.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use rebindgw::engine::{Backend, TrialKeys};
use rebindgw::gateway::core::{CoreConfig, EpochCrypto, HostPeer, Shared, WorkerCore};
use rebindgw::hostlink::{Control, LinkKey};
use rebindgw::io::batch::{Rx, TxQueue, Via};
use rebindgw::keys::{EpochKeys, MasterSecret};
use rebindgw::time::{TICKS_PER_SECOND, Ticks};

#[derive(Debug, Serialize)]
pub struct MemoryReport {
    pub connections: usize,
    pub slots: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_connection: f64,
    /// Of which: the two fast-path tables (allocated for the capacity up front).
    pub table_bytes: u64,
    /// RSS growth while the 30 s REGISTERED retransmit cache still held every reply.
    pub bytes_per_connection_with_register_cache: f64,
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> u64 {
    let page = 4096u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}

/// Registers `n` connections (n ≤ 2^slots) and measures the growth of RSS.
pub fn measure(n: usize, slots: usize) -> anyhow::Result<MemoryReport> {
    let keys = EpochKeys::derive(&MasterSecret::generate(), 1, slots)?;
    let trial = TrialKeys::new(Backend::best(), keys.slot_key_pairs())?;
    let host = SocketAddr::from(([127, 0, 0, 1], 7000));
    let link = LinkKey::generate();
    let mut cfg = CoreConfig::new(slots);
    cfg.max_connections = n;
    // Register messages are built before the baseline so they don't count.
    let now = Ticks(rebindgw::time::UNIX_EPOCH_TICKS + 1_800_000_000 * TICKS_PER_SECOND);
    let cipher = link.cipher();
    let msgs: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            Control::Register {
                boot: 1,
                request: i as u64,
                conn_id: 0x1000_0000 + i as u64,
                client: SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 40_000)),
            }
            .seal(&cipher, now)
        })
        .collect();
    let mut tx = TxQueue::new(64);
    let before = rss_bytes();
    let shared: Arc<Shared> = Shared::new(
        cfg,
        EpochCrypto { keys, trial },
        vec![HostPeer::new(host, &link)],
        None,
    );
    let mut worker = WorkerCore::new(0, shared.clone(), &[false]);
    for chunk in msgs.chunks(32) {
        let rx: Vec<Rx<'_>> = chunk
            .iter()
            .map(|m| Rx {
                via: Via::Host,
                from: host,
                data: m,
            })
            .collect();
        worker.handle_batch(now, &rx, &mut tx);
        tx.clear();
    }
    drop(msgs);
    anyhow::ensure!(
        shared.connections() == n,
        "registered {} of {n}",
        shared.connections()
    );
    let with_cache = rss_bytes();
    shared
        .control()
        .expire(Ticks(now.0 + 31 * TICKS_PER_SECOND));
    let after = rss_bytes();
    let table_bytes = (shared.tuples.memory_bytes() + shared.conns.memory_bytes()) as u64;
    Ok(MemoryReport {
        connections: n,
        slots,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_connection: after.saturating_sub(before) as f64 / n as f64,
        table_bytes,
        bytes_per_connection_with_register_cache: with_cache.saturating_sub(before) as f64
            / n as f64,
    })
}
