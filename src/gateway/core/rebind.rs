//! REBINDs (§6): [`crate::verify`] decides, this applies its outcomes: the commit into the
//! registries and tables (through [`Committer`]), the store, REBOUND to the host, the
//! REBIND_ACK or UNRECOGNIZED to the client.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crate::gateway::metrics::{C, H, WorkerMetrics};
use crate::gateway::store::StoreOp;
use crate::hostlink::Control as LinkMsg;
use crate::io::batch::{Rx, TxQueue, Via};
use crate::registry::{HostId, Registry};
use crate::table::{ConnRef, ConnRoute};
use crate::time::Ticks;
use crate::verify::{self, EpochCrypto, Outcome, Registries};

use super::WorkerCore;
use super::commit::{CommitMode, Proposer};
use super::shared::{Control, Shared};

impl WorkerCore {
    /// Verifies the batch's REBINDs ([`verify::trial_batch`], then checks 5–7 under the
    /// control lock taken once) and applies the outcomes: metrics, UNRECOGNIZED for those that
    /// draw one, then REBOUND and the REBIND_ACK for the verified ones, in packet order.
    pub(super) fn verify_rebinds(&mut self, wall: Ticks, rx: &[Rx<'_>], tx: &mut TxQueue) {
        let now = self.issued(wall);
        let epochs = self.epochs.clone();
        let crypto: Vec<&EpochCrypto> = epochs.all().map(|e| &**e).collect();
        let rebinds = std::mem::take(&mut self.rebinds);
        let packets: Vec<(&[u8], &SocketAddr)> =
            rebinds.iter().map(|&i| (rx[i].data, &rx[i].from)).collect();
        let pending = verify::trial_batch(
            &packets,
            now,
            self.shared.window_ticks,
            self.shared.cfg.slots,
            &crypto,
        );
        let deferred = self.shared.cfg.commit == CommitMode::Deferred;
        let outcomes = match pending.decided() {
            Ok(outcomes) => outcomes,
            Err(pending) => {
                let shared = self.shared.clone();
                let mut ctl = shared.control();
                if deferred {
                    pending.finish(&mut Proposer(&ctl))
                } else {
                    pending.finish(&mut self.committer(&mut ctl))
                }
            }
        };
        // Rejections first, as checks 1–3 decide them before any commit.
        for (&i, outcome) in rebinds.iter().zip(&outcomes) {
            if let Outcome::Rejected {
                reason,
                cookie_request,
                unrecognized,
            } = *outcome
            {
                let d = &rx[i];
                self.metrics.inc(if cookie_request {
                    C::CookieRequest
                } else {
                    C::reject(reason)
                });
                if unrecognized {
                    let epoch = d.data.get(1).copied();
                    self.unrecognized(now, d.via, d.from, d.data.len(), epoch, tx);
                }
            }
        }
        for (&i, outcome) in rebinds.iter().zip(&outcomes) {
            let d = &rx[i];
            let v = match *outcome {
                Outcome::Rejected { .. } => continue,
                Outcome::Accepted {
                    epoch,
                    rebind,
                    host,
                    ..
                } if deferred => {
                    // Final only once the shared store agrees (`handle_commit`).
                    self.propose(now, epoch, &rebind, host, d.via, d.from);
                    continue;
                }
                Outcome::Accepted {
                    rebind, host, old, ..
                } => {
                    self.send_rebound(host, rebind.conn_id, rebind.t, old, d.from, tx);
                    self.metrics.inc(C::RebindAccepted);
                    rebind
                }
                Outcome::Duplicate { rebind, .. } => {
                    self.metrics.inc(C::RebindDuplicate);
                    rebind
                }
            };
            if tx.push_bytes(d.via, d.from, &v.ack) {
                self.metrics.inc(C::TxClientAck);
                self.metrics.add(C::TxClientBytes, v.ack.len() as u64);
            }
        }
        self.rebinds = rebinds;
    }

    /// Tells the host that a connection moved (§6, check 7, `t > L`). Sent from this
    /// worker's host socket, so the host's replies now come here.
    pub(super) fn send_rebound(
        &mut self,
        host: HostId,
        conn_id: u64,
        t: Ticks,
        old: Option<SocketAddr>,
        to: SocketAddr,
        tx: &mut TxQueue,
    ) {
        if let Some(peer) = self.live.hosts.get(usize::from(host)) {
            let msg = LinkMsg::Rebound {
                conn_id,
                t,
                old,
                new: to,
            };
            let sealed = msg.seal(&peer.key, t);
            if tx.push_bytes(Via::Host, peer.addr, &sealed) {
                self.metrics.inc(C::TxHostControl);
                self.metrics.add(C::TxHostBytes, sealed.len() as u64);
                self.metrics.host_add(usize::from(host), H::TxPackets, 1);
                self.metrics
                    .host_add(usize::from(host), H::TxBytes, sealed.len() as u64);
            }
        }
    }

    /// Points the tables at `to` for a connection (see [`Committer::bind_tuple`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bind_tuple(
        &self,
        ctl: &mut Control,
        epoch: u32,
        index: u32,
        conn_id: u64,
        host: HostId,
        old: Option<SocketAddr>,
        to: SocketAddr,
    ) {
        self.committer(ctl)
            .bind_tuple(epoch, index, conn_id, host, old, to);
    }

    /// The tables and store kept in step with `ctl`'s registries, by this worker.
    pub(super) fn committer<'a>(&'a self, ctl: &'a mut Control) -> Committer<'a> {
        Committer {
            ctl,
            shared: &self.shared,
            worker: self.id,
            secs: self.secs,
            metrics: &self.metrics,
        }
    }
}

/// The gateway's [`Registries`]: the registries under the control lock, with the tuple
/// tables, the activity clock and the store kept in step at each commit.
pub(super) struct Committer<'a> {
    pub(super) ctl: &'a mut Control,
    pub(super) shared: &'a Shared,
    /// The worker that commits: it becomes the connection's owner.
    pub(super) worker: u8,
    pub(super) secs: u32,
    pub(super) metrics: &'a WorkerMetrics,
}

impl Committer<'_> {
    /// Points the tables at `to` for a connection. A tuple belongs to at most one connection:
    /// if a NAT handed `to` on from another connection, that connection loses it.
    pub(super) fn bind_tuple(
        &mut self,
        epoch: u32,
        index: u32,
        conn_id: u64,
        host: HostId,
        old: Option<SocketAddr>,
        to: SocketAddr,
    ) {
        // A connection registered in two epochs (key delivery) that rebinds under the other
        // one: its old registration gives up the tuple, so only one ever holds it.
        if let Some(r) = self.ctl.conns.get(conn_id)
            && (r.epoch_byte != epoch as u8 || r.index != index)
        {
            if let Some((e, reg)) = self.ctl.registry_by_byte(r.epoch_byte)
                && reg.get(r.index).is_some_and(|c| c.conn_id == conn_id)
            {
                reg.unbind_tuple(r.index);
                self.shared.persist(StoreOp::Unbind {
                    epoch: e,
                    index: r.index,
                });
            }
            if let Some(t) = r.tuple.filter(|t| *t != to)
                && self
                    .ctl
                    .tuples
                    .get(&t)
                    .is_some_and(|p| p.conn_id == conn_id)
            {
                self.ctl.tuples.remove(&t);
            }
        }
        if let Some(old) = old.filter(|o| *o != to)
            && self
                .ctl
                .tuples
                .get(&old)
                .is_some_and(|r| r.conn_id == conn_id)
        {
            self.ctl.tuples.remove(&old);
        }
        if let Some(prev) = self.ctl.tuples.get(&to).filter(|p| p.conn_id != conn_id) {
            self.metrics.inc(C::TupleTakenOver);
            if let Some((prev_epoch, reg)) = self.ctl.registry_by_byte(prev.epoch_byte) {
                reg.unbind_tuple(prev.index);
                self.shared.persist(StoreOp::Unbind {
                    epoch: prev_epoch,
                    index: prev.index,
                });
            }
            if let Some(mut route) = self.ctl.conns.get(prev.conn_id) {
                route.tuple = None;
                let _ = self.ctl.conns.insert(prev.conn_id, route);
            }
        }
        let cref = ConnRef {
            conn_id,
            index,
            host,
            owner: self.worker,
            epoch_byte: epoch as u8,
        };
        // Neither insert can overflow: each connection holds at most one tuple and one route.
        let tuple = self.ctl.tuples.insert(to, cref).is_ok().then_some(to);
        let _ = self.ctl.conns.insert(
            conn_id,
            ConnRoute {
                tuple,
                owner: self.worker,
                index,
                epoch_byte: epoch as u8,
                host,
            },
        );
    }
}

impl Registries for Committer<'_> {
    fn registry(&self, epoch: u32) -> Option<&Registry> {
        self.ctl
            .registries
            .iter()
            .find(|(e, _)| *e == epoch)
            .map(|(_, r)| r)
    }

    /// Binds connection `index` of `epoch` to `to` (§6, check 7, `t > L`).
    fn commit(&mut self, epoch: u32, index: u32, t: Ticks, to: SocketAddr) -> Option<SocketAddr> {
        let registry = self.ctl.registry_mut(epoch)?;
        let conn = registry.get(index)?;
        let (conn_id, host) = (conn.conn_id, conn.host);
        let old = registry.commit_rebind(index, t, to);
        self.shared.touch(epoch as u8, index, self.secs);
        self.bind_tuple(epoch, index, conn_id, host, old, to);
        self.shared.persist(StoreOp::Rebind {
            epoch,
            index,
            last_rebind: t,
            tuple: to,
        });
        old
    }
}
