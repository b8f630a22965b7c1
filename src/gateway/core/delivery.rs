//! In-band key delivery, the gateway's half (tests/data/PROTOCOL-EXT.md "Key delivery"):
//! at a rotation every live connection is registered anew in the new epoch (see
//! [`Shared::rotate_with_grace`](super::Shared::rotate_with_grace)); this module keeps those
//! registrations' keys until each host confirms (KEYS_DELIVERED) that its client has them,
//! sends them in batched EPOCH_KEYS with backoff, and at the end of grace moves every
//! connection still routed by its old registration to its new one.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::gateway::metrics::{C, H};
use crate::gateway::store::StoreOp;
use crate::hostlink::{Control as LinkMsg, SEAL_OVERHEAD};
use crate::io::batch::{TxQueue, Via};
use crate::rebind::RebindSecret;
use crate::registry::HostId;
use crate::table::{ConnRef, ConnRoute};
use crate::time::Ticks;
use crate::wire::{EpochKeysEntry, NewKeys, epoch_keys_entry_len};

use super::WorkerCore;
use super::shared::{Control, Shared};

/// EPOCH_KEYS datagrams stay below this (a common path MTU minus IP and UDP headers).
pub(super) const MAX_EPOCH_KEYS_DATAGRAM: usize = 1400;
/// First retransmission of an unconfirmed entry; doubles up to [`RESEND_MAX`]. The host
/// confirms only once its client acknowledged (which takes its own KEYS retransmissions,
/// 0.5 s doubling to 4 s), so this is slower than those.
const RESEND_FIRST: Duration = Duration::from_secs(1);
const RESEND_MAX: Duration = Duration::from_secs(16);
/// EPOCH_KEYS datagrams one `tick` sends at most (a tick comes every 10 ms): a rotation of
/// many connections is paced instead of overflowing the hosts' receive buffers at once.
const MAX_PER_TICK: usize = 32;

/// One connection's registration in the delivered epoch.
pub(super) struct Entry {
    /// Its index in the previous epoch, while that epoch's registry holds it.
    pub(super) old_index: Option<u32>,
    /// `x'` and `R'` in the delivered epoch (`None` until a restore has seen both halves).
    pub(super) index: Option<u32>,
    pub(super) secret: Option<RebindSecret>,
    pub(super) host: HostId,
    pub(super) acked: bool,
    /// EPOCH_KEYS sent for it so far.
    pub(super) sends: u8,
}

/// The keys of the current epoch still to be delivered, by `conn_id`.
#[derive(Default)]
pub struct KeyDelivery {
    /// The epoch whose keys these are.
    pub(super) epoch: u32,
    pub(super) entries: HashMap<u64, Entry>,
    /// When each entry is next sent: `(due, conn_id)`, soonest first.
    pub(super) due: BinaryHeap<Reverse<(Ticks, u64)>>,
    /// Entries not yet confirmed.
    pub(super) pending: usize,
    /// Entries registered in both epochs (each counts once as a connection).
    pub(super) dual: usize,
    /// The store op number of the rotation: nothing is sent before it is committed.
    pub(super) durable_at: u64,
    /// Cluster mode: registrations sent to the store and not decided yet, by ticket.
    pub(super) tickets: HashMap<u64, u64>,
    pub(super) next_ticket: u64,
    /// Cluster mode: registrations sent again at once after the store was unavailable, by
    /// `conn_id`.
    pub(super) retries: HashMap<u64, u8>,
}

impl KeyDelivery {
    /// Starts delivering `epoch`'s keys; whatever an earlier epoch left is forgotten (its
    /// secrets are zeroized as the entries drop).
    pub(super) fn start(&mut self, epoch: u32) {
        *self = KeyDelivery {
            epoch,
            // Tickets stay unique over rotations: a late answer to an earlier one's
            // registration names no entry of this one.
            next_ticket: self.next_ticket,
            ..KeyDelivery::default()
        };
    }

    pub(super) fn add(
        &mut self,
        conn_id: u64,
        old_index: u32,
        index: u32,
        secret: RebindSecret,
        host: HostId,
        now: Ticks,
    ) {
        self.entries.insert(
            conn_id,
            Entry {
                old_index: Some(old_index),
                index: Some(index),
                secret: Some(secret),
                host,
                acked: false,
                sends: 0,
            },
        );
        self.pending += 1;
        self.dual += 1;
        self.due.push(Reverse((now, conn_id)));
    }

    /// Cluster mode: `conn_id` (at `old_index` in the previous epoch) waits for the store
    /// to place its registration (`R` = `secret`); nothing is sent for it before. Returns
    /// the ticket naming it.
    pub(super) fn await_registration(
        &mut self,
        conn_id: u64,
        old_index: u32,
        secret: RebindSecret,
        host: HostId,
    ) -> u64 {
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.entries.insert(
            conn_id,
            Entry {
                old_index: Some(old_index),
                index: None,
                secret: Some(secret),
                host,
                acked: false,
                sends: 0,
            },
        );
        self.tickets.insert(ticket, conn_id);
        self.pending += 1;
        ticket
    }

    /// Cluster mode: a new ticket for `conn_id`'s registration, sent again.
    pub(super) fn reticket(&mut self, conn_id: u64) -> u64 {
        self.next_ticket += 1;
        self.tickets.insert(self.next_ticket, conn_id);
        self.next_ticket
    }

    /// Cluster mode: the connection a decided ticket named.
    pub(super) fn decided(&mut self, ticket: u64) -> Option<u64> {
        self.tickets.remove(&ticket)
    }

    /// Cluster mode: the store committed `conn_id`'s registration at `index`: its keys are
    /// sent from `now` on.
    pub(super) fn registered(&mut self, conn_id: u64, index: u32, now: Ticks) {
        if let Some(e) = self.entries.get_mut(&conn_id)
            && e.index.is_none()
        {
            e.index = Some(index);
            if e.old_index.is_some() {
                self.dual += 1;
            }
            self.due.push(Reverse((now, conn_id)));
        }
    }

    /// Cluster mode: registrations the store has not decided yet.
    pub(super) fn awaiting(&self) -> usize {
        self.tickets.len()
    }

    /// Forgets `conn_id` (closed or released); returns its entry.
    pub(super) fn remove(&mut self, conn_id: u64) -> Option<Entry> {
        let e = self.entries.remove(&conn_id)?;
        if !e.acked {
            self.pending = self.pending.saturating_sub(1);
        }
        if e.old_index.is_some() && e.index.is_some() {
            self.dual = self.dual.saturating_sub(1);
        }
        Some(e)
    }

    /// A restored record of the delivered epoch (`index`, `secret`) or of the previous one
    /// (`old_index`); [`KeyDelivery::finish_restore`] keeps the connections with both.
    pub(super) fn restored(
        &mut self,
        conn_id: u64,
        host: HostId,
        old_index: Option<u32>,
        new: Option<(u32, RebindSecret)>,
    ) {
        let e = self.entries.entry(conn_id).or_insert(Entry {
            old_index: None,
            index: None,
            secret: None,
            host,
            acked: false,
            sends: 0,
        });
        if old_index.is_some() {
            e.old_index = old_index;
        }
        if let Some((index, secret)) = new {
            e.index = Some(index);
            e.secret = Some(secret);
        }
    }

    /// After a restart during grace: keeps the connections registered in both epochs (the
    /// rotation's registrations) and sends them all again; the hosts answer for the
    /// clients that acknowledged already.
    pub(super) fn finish_restore(&mut self, now: Ticks) {
        self.entries
            .retain(|_, e| e.old_index.is_some() && e.index.is_some());
        self.pending = self.entries.len();
        self.dual = self.entries.len();
        self.due = self.entries.keys().map(|c| Reverse((now, *c))).collect();
    }

    /// Keys not yet confirmed.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

fn backoff(sends: u8) -> Duration {
    RESEND_FIRST
        .saturating_mul(1u32 << sends.min(5))
        .min(RESEND_MAX)
}

impl Shared {
    /// Moves every connection still routed by its registration in `previous` to its
    /// registration in the delivered epoch (end of grace, or a rotation that drops
    /// `previous`): same tuple, host and idle clock, new index. The caller persists the
    /// returned ops before the op that removes `previous`.
    pub(super) fn migrate(&self, ctl: &mut Control, previous: u32) -> Vec<StoreOp> {
        let epoch = ctl.delivery.epoch;
        let mut ops = Vec::new();
        let mut moves: Vec<(u64, u32, u32)> = ctl
            .delivery
            .entries
            .iter()
            .filter_map(|(c, e)| Some((*c, e.old_index?, e.index?)))
            .collect();
        // In a cluster, another gateway may have registered a connection in the new epoch
        // (it owned it at the rotation) while this one routes it now (its client rebound
        // here with its old keys during grace): it moves to that registration too.
        if self.cfg.commit == super::CommitMode::Deferred {
            let delivered: std::collections::HashSet<u64> =
                moves.iter().map(|(c, _, _)| *c).collect();
            let new: HashMap<u64, u32> = ctl
                .registries
                .iter()
                .find(|(e, _)| *e == epoch)
                .map(|(_, r)| r.iter().map(|(i, c)| (c.conn_id, i)).collect())
                .unwrap_or_default();
            if let Some((_, old)) = ctl.registries.iter().find(|(e, _)| *e == previous) {
                moves.extend(old.iter().filter_map(|(i, c)| {
                    let to = *new.get(&c.conn_id)?;
                    (!delivered.contains(&c.conn_id)).then_some((c.conn_id, i, to))
                }));
            }
        }
        for (conn_id, old, new) in moves {
            let Some(route) = ctl.conns.get(conn_id) else {
                continue;
            };
            if route.epoch_byte != previous as u8 || route.index != old {
                continue; // rebound under the new epoch already
            }
            let Some(reg) = ctl.registry_mut(epoch) else {
                break;
            };
            let last = reg.get(new).map_or(Ticks(0), |c| c.last_rebind);
            if let Some(t) = route.tuple {
                reg.commit_rebind(new, last, t);
                ops.push(StoreOp::Rebind {
                    epoch,
                    index: new,
                    last_rebind: last,
                    tuple: t,
                });
                let _ = ctl.tuples.insert(
                    t,
                    ConnRef {
                        conn_id,
                        index: new,
                        host: route.host,
                        owner: route.owner,
                        epoch_byte: epoch as u8,
                    },
                );
            }
            let _ = ctl.conns.insert(
                conn_id,
                ConnRoute {
                    index: new,
                    epoch_byte: epoch as u8,
                    ..route
                },
            );
            let seen = self.activity(previous as u8, old).load(Ordering::Relaxed);
            self.activity(epoch as u8, new)
                .store(seen, Ordering::Relaxed);
        }
        ops
    }
}

impl WorkerCore {
    /// Sends the EPOCH_KEYS that are due, batched per host, as far as `tx` has room. Only
    /// one worker at a time gets the entries (they are taken under the control lock).
    pub(super) fn send_epoch_keys(&mut self, now: Ticks, tx: &mut TxQueue) {
        if self.shared.keys_pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let shared = self.shared.clone();
        let epochs = shared.epochs();
        let keys = &epochs.current.keys;
        let slots = keys.slots();
        let per = (MAX_EPOCH_KEYS_DATAGRAM - SEAL_OVERHEAD - 8 - 7) / epoch_keys_entry_len(slots);
        let mut room = tx.capacity().saturating_sub(tx.len()).min(MAX_PER_TICK);
        let mut ctl = shared.control();
        if ctl.delivery.epoch != keys.epoch() || !shared.is_durable(ctl.delivery.durable_at) {
            return;
        }
        let mut batches: HashMap<HostId, Vec<EpochKeysEntry>> = HashMap::new();
        let mut full: Vec<(HostId, Vec<EpochKeysEntry>)> = Vec::new();
        while room > 0 {
            let Some(&Reverse((due, conn_id))) = ctl.delivery.due.peek() else {
                break;
            };
            if due > now {
                break;
            }
            ctl.delivery.due.pop();
            let d = &mut ctl.delivery;
            let Some(e) = d.entries.get_mut(&conn_id) else {
                continue;
            };
            let (Some(index), Some(secret), false) = (e.index, e.secret.as_ref(), e.acked) else {
                continue;
            };
            let entry = EpochKeysEntry {
                conn_id,
                keys: NewKeys {
                    epoch: d.epoch,
                    index,
                    rebind_secret: secret.0,
                    slot_keys: keys.client_keys(index).to_vec(),
                },
            };
            self.metrics.inc(if e.sends == 0 {
                C::KeysDelivered
            } else {
                C::KeysResent
            });
            let next = now.saturating_add(backoff(e.sends));
            e.sends = e.sends.saturating_add(1);
            let host = e.host;
            d.due.push(Reverse((next, conn_id)));
            let b = batches.entry(host).or_default();
            b.push(entry);
            if b.len() == per {
                full.push((host, std::mem::take(b)));
                room -= 1;
            }
        }
        let epoch = ctl.delivery.epoch;
        drop(ctl);
        full.extend(batches.into_iter().filter(|(_, b)| !b.is_empty()));
        for (host, entries) in full {
            let Some(peer) = self.live.hosts.get(usize::from(host)) else {
                continue;
            };
            let msg = LinkMsg::EpochKeys {
                epoch,
                slots: slots as u8,
                entries,
            }
            .seal(&peer.key, now);
            if tx.push_bytes(Via::Host, peer.addr, &msg) {
                self.metrics.inc(C::TxHostControl);
                self.metrics.add(C::TxHostBytes, msg.len() as u64);
                self.metrics.host_add(usize::from(host), H::TxPackets, 1);
                self.metrics
                    .host_add(usize::from(host), H::TxBytes, msg.len() as u64);
            }
        }
    }

    /// A host's KEYS_DELIVERED: these clients hold their keys of `epoch`.
    pub(super) fn keys_delivered(
        &mut self,
        ctl: &mut Control,
        host: HostId,
        epoch: u32,
        conn_ids: &[u64],
    ) {
        if epoch != ctl.delivery.epoch {
            return self.metrics.inc(C::DropKeysDeliveredEpoch);
        }
        for conn_id in conn_ids {
            match ctl.delivery.entries.get_mut(conn_id) {
                Some(e) if e.host == host => {
                    if !e.acked {
                        e.acked = true;
                        ctl.delivery.pending = ctl.delivery.pending.saturating_sub(1);
                        self.metrics.inc(C::KeysAcknowledged);
                    }
                }
                _ => self.metrics.inc(C::DropKeysDeliveredUnknown),
            }
        }
        self.shared
            .keys_pending
            .store(ctl.delivery.pending, Ordering::Release);
    }
}
