//! `rebindgw bench`: system benchmarks that need the real data path.
//!
//! - `fastpath`: the gateway's forwarding path against a bare recvmmsg/sendmmsg relay, run
//!   and nginx's `stream` UDP proxy (the peer a user would pick instead), run alternately on
//!   the same load, and the RTT each hop adds at half load;
//! - `memory`: resident memory per registered connection.
#![forbid(unsafe_code)]

pub mod fastpath;
pub mod memory;
pub mod netns;
pub mod nginx;
pub mod relay;
pub mod xdpgen;

/// Pins the calling thread to `core` (modulo the cores present).
pub fn pin(core: usize) {
    if let Some(ids) = core_affinity::get_core_ids()
        && !ids.is_empty()
    {
        core_affinity::set_for_current(ids[core % ids.len()]);
    }
}
