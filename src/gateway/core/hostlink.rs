//! The host link: HANDSHAKE forwarding and the recent-HANDSHAKE table that allows replies,
//! control messages (REGISTER, CLOSE, HELLO), host restarts and idle expiry.
#![forbid(unsafe_code)]

use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use siphasher::sip::SipHasher13;

use crate::gateway::metrics::{C, H};
use crate::gateway::store::{StoreOp, StoredConn};
use crate::hostlink::{self, Control as LinkMsg, HANDSHAKE_MAC_LEN, RegisterFailure};
use crate::io::batch::{Rx, TxQueue, Via};
use crate::rebind::RebindSecret;
use crate::registry::{HostId, RegistryError};
use crate::time::Ticks;
use crate::wire::{HANDSHAKE_LEN, MAX_TUPLE_LEN, emit_tuple};

use super::commit::{CommitMode, CommitRefusal, ParkedRegistration, RegisterResult};
use super::shared::{Control, HostBoot, RECENT_REGISTERS, RecentRegister};
use super::{WorkerCore, secs};

/// How long a forwarded HANDSHAKE lets its host answer the tuple: the host answers within
/// its REGISTER retries (2.5 s at most).
pub(super) const REPLY_KEEP: Duration = Duration::from_secs(10);

/// Replies a tuple can bank (one per forwarded HANDSHAKE).
pub(super) const MAX_REPLY_CREDITS: u8 = 4;

/// A tuple that sent a HANDSHAKE through this worker.
#[derive(Clone, Copy)]
pub(super) struct HandshakeSeen {
    pub(super) tuple: SocketAddr,
    pub(super) until: Ticks,
    /// The smallest HANDSHAKE that drew the outstanding credits: no reply may be larger.
    pub(super) max_len: u16,
    pub(super) host: HostId,
    pub(super) credits: u8,
}

/// A fixed-size, 4-way set-associative table of recent HANDSHAKE tuples, keyed by a keyed
/// hash (tuples are attacker-chosen). Allocated once; a full set evicts the entry that
/// expires first, so a flood can only cost a legitimate client a retried HANDSHAKE.
pub(super) struct RecentHandshakes {
    pub(super) slots: Box<[Option<HandshakeSeen>]>,
    pub(super) sets: usize,
    pub(super) hash: SipHasher13,
}

pub(super) const REPLY_WAYS: usize = 4;

impl RecentHandshakes {
    /// Protocol 1.1 makes every reply (`handshake_reply_len`, at most 639 bytes) fit in the
    /// 640-byte HANDSHAKE that draws it (a const assert in `wire`), so a reply is never
    /// allowed to exceed its HANDSHAKE.
    pub(super) fn new(entries: usize) -> Self {
        let sets = (entries / REPLY_WAYS).max(1).next_power_of_two();
        RecentHandshakes {
            slots: vec![None; sets * REPLY_WAYS].into_boxed_slice(),
            sets,
            hash: SipHasher13::new_with_key(&crate::crypto::random_array()),
        }
    }

    pub(super) fn set(&mut self, tuple: &SocketAddr) -> &mut [Option<HandshakeSeen>] {
        let mut h = self.hash;
        let mut t = [0u8; MAX_TUPLE_LEN];
        let n = emit_tuple(tuple, &mut t);
        h.write(&t[..n]);
        let i = (h.finish() as usize) & (self.sets - 1);
        &mut self.slots[i * REPLY_WAYS..(i + 1) * REPLY_WAYS]
    }

    /// A HANDSHAKE of `len` bytes from `tuple` went to `host`: allow one more reply.
    pub(super) fn record(&mut self, tuple: SocketAddr, len: usize, host: HostId, now: Ticks) {
        let until = now.saturating_add(REPLY_KEEP);
        let len = len.min(usize::from(u16::MAX)) as u16;
        let set = self.set(&tuple);
        if let Some(e) = set.iter_mut().flatten().find(|e| e.tuple == tuple) {
            if e.until < now {
                *e = HandshakeSeen {
                    tuple,
                    until,
                    max_len: len,
                    host,
                    credits: 1,
                };
            } else {
                e.credits = (e.credits + 1).min(MAX_REPLY_CREDITS);
                e.max_len = e.max_len.min(len);
                e.until = until;
                e.host = host;
            }
            return;
        }
        let victim = set
            .iter_mut()
            .min_by_key(|e| e.map_or(Ticks(0), |e| e.until))
            .expect("4 ways");
        *victim = Some(HandshakeSeen {
            tuple,
            until,
            max_len: len,
            host,
            credits: 1,
        });
    }

    /// Spends a credit for a reply of `len` bytes from `host` to `tuple`, or says why not.
    pub(super) fn take(
        &mut self,
        tuple: &SocketAddr,
        len: usize,
        host: HostId,
        now: Ticks,
    ) -> Result<(), C> {
        let set = self.set(tuple);
        let Some(slot) = set
            .iter_mut()
            .find(|e| e.is_some_and(|e| e.tuple == *tuple && e.until >= now))
        else {
            return Err(C::DropReplyUnsolicited);
        };
        let e = slot.as_mut().expect("found");
        if e.host != host {
            return Err(C::DropReplyWrongHost);
        }
        if len > usize::from(e.max_len) {
            return Err(C::DropReplyTooLarge);
        }
        e.credits -= 1;
        if e.credits == 0 {
            *slot = None;
        }
        Ok(())
    }
}

impl WorkerCore {
    pub(super) fn forward_handshake(&mut self, now: Ticks, d: &Rx<'_>, tx: &mut TxQueue) {
        //= PROTOCOL.md §4: HANDSHAKE of at least 640 bytes: forward it, with its source tuple,
        //# to a host (rate-limited per source). A shorter one is dropped.
        if d.data.len() < HANDSHAKE_LEN {
            self.metrics.inc(C::HandshakeShort);
            return;
        }
        if self.handshake_limit.check(&d.from, now).is_err() {
            self.metrics.inc(C::HandshakeRate);
            return;
        }
        if self.live.hosts.is_empty() {
            self.metrics.inc(C::DropNoRoute);
            return;
        }
        if 1 + MAX_TUPLE_LEN + d.data.len() + HANDSHAKE_MAC_LEN > crate::io::batch::SLOT_LEN {
            self.metrics.inc(C::HandshakeLong);
            return;
        }
        // The same tuple always reaches the same host, so a retransmitted HANDSHAKE meets the
        // host's nonce cache instead of registering twice.
        let mut h = self.shared.handshake_hash;
        let mut t = [0u8; crate::wire::MAX_TUPLE_LEN];
        let n = emit_tuple(&d.from, &mut t);
        h.write(&t[..n]);
        let host_id = (h.finish() % self.live.hosts.len() as u64) as usize;
        let host = &self.live.hosts[host_id];
        let sent = tx.push(Via::Host, host.addr, |slot| {
            hostlink::emit_handshake(&host.mac, &d.from, d.data, slot)
        });
        if sent {
            let bytes = (d.data.len() + 1 + n + HANDSHAKE_MAC_LEN) as u64;
            self.recent_handshakes
                .record(d.from, d.data.len(), host_id as HostId, now);
            self.metrics.inc(C::HandshakeForwarded);
            self.metrics.inc(C::TxHostHandshake);
            self.metrics.add(C::TxHostBytes, bytes);
            self.metrics.host_add(host_id, H::TxPackets, 1);
            self.metrics.host_add(host_id, H::TxBytes, bytes);
            self.metrics.handshake_sent(host_id, now);
        }
    }

    /// Is `boot` the host's current boot? The first boot id the gateway hears from a host
    /// (after its own start) is taken as current; a new one only arrives by HELLO.
    pub(super) fn boot_current(&self, ctl: &mut Control, host: HostId, boot: u64) -> bool {
        match ctl.boot_slot(host) {
            Some(b) => {
                let ok = b.boot == boot;
                if !ok {
                    self.metrics.inc(C::DropHostStaleBoot);
                }
                ok
            }
            slot @ None => {
                *slot = Some(HostBoot {
                    boot,
                    hello_sent: Ticks(0),
                });
                true
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn control_message(
        &mut self,
        ctl: &mut Control,
        now: Ticks,
        host: HostId,
        from: SocketAddr,
        sent: Ticks,
        msg: LinkMsg,
        tx: &mut TxQueue,
    ) {
        let live = self.live.clone();
        let peer = &live.hosts[usize::from(host)];
        let reply = match msg {
            LinkMsg::Register {
                boot,
                request,
                conn_id,
                client,
            } => {
                if !self.boot_current(ctl, host, boot) {
                    return;
                }
                match self.register(ctl, now, host, request, conn_id, client) {
                    Some(reply) => reply,
                    // Proposed to the shared store; answered in `handle_registration`.
                    None => return,
                }
            }
            LinkMsg::Close {
                boot,
                request,
                conn_id,
            } => {
                if !self.boot_current(ctl, host, boot) {
                    return;
                }
                let found = self.close(ctl, host, conn_id);
                LinkMsg::Closed {
                    request,
                    conn_id,
                    found,
                }
                .seal(&peer.key, now)
            }
            LinkMsg::Hello { boot } => {
                let Some(released) = self.hello(ctl, host, boot, sent) else {
                    return self.metrics.inc(C::DropHostStaleBoot);
                };
                LinkMsg::HelloAck { boot, released }.seal(&peer.key, now)
            }
            LinkMsg::KeysDelivered {
                epoch,
                ref conn_ids,
            } => {
                return self.keys_delivered(ctl, host, epoch, conn_ids);
            }
            _ => return self.metrics.inc(C::DropHostMalformed),
        };
        if tx.push_bytes(Via::Host, from, &reply) {
            self.metrics.inc(C::TxHostControl);
            self.metrics.add(C::TxHostBytes, reply.len() as u64);
            self.metrics.host_add(usize::from(host), H::TxPackets, 1);
            self.metrics
                .host_add(usize::from(host), H::TxBytes, reply.len() as u64);
        }
    }

    /// A host announced boot `boot` in a HELLO sent at `sent`. A new boot means the host
    /// restarted and forgot its connections: every connection it owns is released. Returns
    /// how many, or `None` for a HELLO older than the one that set the current boot (a
    /// delayed copy from before a restart must not release the new boot's connections).
    pub(super) fn hello(
        &mut self,
        ctl: &mut Control,
        host: HostId,
        boot: u64,
        sent: Ticks,
    ) -> Option<u32> {
        let deferred = self.shared.cfg.commit == CommitMode::Deferred;
        let slot = ctl.boot_slot(host);
        match slot {
            Some(b) if b.boot == boot => {
                b.hello_sent = b.hello_sent.max(sent);
                return Some(0);
            }
            Some(b) if sent <= b.hello_sent => return None,
            // In a cluster a host greets each gateway once it hears from it: a first HELLO is
            // no restart here. The gateway that knew the old boot releases, and the store
            // tells the others.
            None if deferred => {
                *slot = Some(HostBoot {
                    boot,
                    hello_sent: sent,
                });
                return Some(0);
            }
            _ => {}
        }
        *slot = Some(HostBoot {
            boot,
            hello_sent: sent,
        });
        self.metrics.inc(C::HostRestarts);
        let owned: Vec<(u32, u32, u64)> = ctl
            .registries
            .iter()
            .flat_map(|(e, r)| {
                r.iter()
                    .filter(|(_, c)| c.host == host)
                    .map(move |(i, c)| (*e, i, c.conn_id))
            })
            .collect();
        // The host's earlier boot may have requests cached; they must not be answered now.
        ctl.recent_registers.retain(|(h, _), _| *h != host);
        for &(epoch, index, conn_id) in &owned {
            self.release(ctl, epoch, index, conn_id);
        }
        self.metrics.add(C::Released, owned.len() as u64);
        Some(owned.len() as u32)
    }

    /// Registers a connection for a host and returns the sealed answer; `None` when the
    /// registration was proposed to the shared store (`CommitMode::Deferred`).
    pub(super) fn register(
        &mut self,
        ctl: &mut Control,
        now: Ticks,
        host: HostId,
        request: u64,
        conn_id: u64,
        client: SocketAddr,
    ) -> Option<Vec<u8>> {
        let shared = self.shared.clone();
        let live = self.live.clone();
        let peer = &live.hosts[usize::from(host)];
        let epochs = self.epochs.clone();
        let keys = &epochs.current.keys;
        if let Some(r) = ctl.recent_registers.get(&(host, request))
            && r.conn_id == conn_id
            && let Some(e) = epochs.all().find(|e| e.keys.epoch() == r.epoch)
        {
            self.metrics.inc(C::RegisterRepeat);
            return Some(
                LinkMsg::Registered {
                    request,
                    conn_id,
                    epoch: r.epoch,
                    index: r.index,
                    rebind_secret: r.secret.0,
                    slot_keys: e.keys.client_keys(r.index).to_vec(),
                }
                .seal(&peer.key, now),
            );
        }
        let fail = |reason: RegisterFailure| {
            LinkMsg::RegisterFailed {
                request,
                conn_id,
                reason: reason as u8,
            }
            .seal(&peer.key, now)
        };
        if ctl.conns.get(conn_id).is_some() {
            self.metrics.inc(C::RegisterDuplicate);
            return Some(fail(RegisterFailure::DuplicateConnId));
        }
        let epoch = keys.epoch();
        let at_capacity = ctl.connections() >= shared.cfg.max_connections;
        if shared.cfg.commit == CommitMode::Deferred {
            if at_capacity {
                self.metrics.inc(C::RegisterFull);
                return Some(fail(RegisterFailure::Full));
            }
            // The store picks the index (two gateways never issue the same one).
            self.propose_registration(now, epoch, host, request, conn_id, client);
            return None;
        }
        let registered = match ctl.registry_mut(epoch) {
            Some(reg) if !at_capacity => reg.register(conn_id, host, Some(client)),
            _ => Err(RegistryError::Full(shared.cfg.max_connections as u64)),
        };
        let Ok(reg) = registered else {
            self.metrics.inc(C::RegisterFull);
            return Some(fail(RegisterFailure::Full));
        };
        Some(self.finish_registration(
            ctl, now, host, request, conn_id, client, epoch, reg.index, reg.secret,
        ))
    }

    /// Binds, stores and remembers a registration made at `index`, and returns REGISTERED.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn finish_registration(
        &mut self,
        ctl: &mut Control,
        now: Ticks,
        host: HostId,
        request: u64,
        conn_id: u64,
        client: SocketAddr,
        epoch: u32,
        index: u32,
        secret: RebindSecret,
    ) -> Vec<u8> {
        let shared = self.shared.clone();
        let live = self.live.clone();
        let peer = &live.hosts[usize::from(host)];
        let epochs = self.epochs.clone();
        let keys = epochs
            .all()
            .find(|e| e.keys.epoch() == epoch)
            .map_or(&epochs.current.keys, |e| &e.keys);
        let reg = crate::registry::Registered { index, secret };
        self.bind_tuple(ctl, epoch, reg.index, conn_id, host, None, client);
        shared.persist(StoreOp::Register(StoredConn {
            epoch,
            index: reg.index,
            conn_id,
            secret: reg.secret.clone(),
            last_rebind: Ticks(0),
            tuple: Some(client),
            host,
        }));
        self.shared
            .activity(epoch as u8, reg.index)
            .store(secs(now), Ordering::Relaxed);
        self.metrics.inc(C::Registered);
        let reply = LinkMsg::Registered {
            request,
            conn_id,
            epoch,
            index: reg.index,
            rebind_secret: reg.secret.0,
            slot_keys: keys.client_keys(reg.index).to_vec(),
        }
        .seal(&peer.key, now);
        if ctl.recent_order.len() >= RECENT_REGISTERS
            && let Some(old) = ctl.recent_order.pop_front()
        {
            ctl.recent_registers.remove(&old);
        }
        ctl.recent_order.push_back((host, request));
        ctl.recent_registers.insert(
            (host, request),
            RecentRegister {
                conn_id,
                epoch,
                index: reg.index,
                secret: reg.secret,
                at: now,
            },
        );
        reply
    }

    /// Answers a registration the shared store decided: REGISTERED with the index it gave,
    /// or REGISTER_FAILED.
    pub(super) fn answer_registration(
        &mut self,
        now: Ticks,
        p: ParkedRegistration,
        result: RegisterResult,
        tx: &mut TxQueue,
    ) {
        let shared = self.shared.clone();
        let live = self.live.clone();
        let Some(peer) = live.hosts.get(usize::from(p.host)) else {
            return;
        };
        let fail = |reason: RegisterFailure| {
            LinkMsg::RegisterFailed {
                request: p.request,
                conn_id: p.conn_id,
                reason: reason as u8,
            }
            .seal(&peer.key, now)
        };
        let reply = match result {
            RegisterResult::Registered { index } => {
                let mut ctl = shared.control();
                // The store's watch may have brought this very registration first: take
                // it over as if it had not.
                if let Some(reg) = ctl.registry_mut(p.epoch)
                    && reg.get(index).is_some_and(|c| c.conn_id == p.conn_id)
                {
                    reg.remove(index);
                    super::remote::let_go(&mut ctl, p.conn_id, true);
                }
                let restored = ctl.registry_mut(p.epoch).map(|reg| {
                    reg.restore(
                        index,
                        p.conn_id,
                        &p.secret,
                        Ticks(0),
                        Some(p.client),
                        p.host,
                    )
                });
                if matches!(restored, Some(Ok(()))) && ctl.conns.get(p.conn_id).is_none() {
                    self.metrics.inc(C::CommitCommitted);
                    self.finish_registration(
                        &mut ctl, now, p.host, p.request, p.conn_id, p.client, p.epoch, index,
                        p.secret,
                    )
                } else {
                    // The epoch is gone, or the index or conn_id is held here already.
                    self.metrics.inc(C::CommitConflict);
                    fail(RegisterFailure::Refused)
                }
            }
            RegisterResult::Full => {
                self.metrics.inc(C::RegisterFull);
                fail(RegisterFailure::Full)
            }
            RegisterResult::Refused(why) => {
                self.metrics.inc(match why {
                    CommitRefusal::Conflict => C::CommitConflict,
                    CommitRefusal::Unavailable => C::CommitUnavailable,
                    CommitRefusal::Unknown => C::CommitUnknown,
                });
                fail(RegisterFailure::Refused)
            }
        };
        if tx.push_bytes(Via::Host, peer.addr, &reply) {
            self.metrics.inc(C::TxHostControl);
            self.metrics.add(C::TxHostBytes, reply.len() as u64);
        }
    }

    /// Closes a connection for its owning host.
    pub(super) fn close(&mut self, ctl: &mut Control, host: HostId, conn_id: u64) -> bool {
        let Some(route) = ctl.conns.get(conn_id) else {
            return false;
        };
        if route.host != host {
            self.metrics.inc(C::DropHostNotOwner);
            return false;
        }
        let Some((epoch, _)) = ctl.registry_by_byte(route.epoch_byte) else {
            return false;
        };
        self.release(ctl, epoch, route.index, conn_id);
        self.metrics.inc(C::Closed);
        true
    }

    /// Removes a connection from the registry and both tables, and from the store.
    pub(super) fn release(&mut self, ctl: &mut Control, epoch: u32, index: u32, conn_id: u64) {
        let route = ctl.conns.remove(conn_id);
        if let Some(reg) = ctl.registry_mut(epoch) {
            reg.remove(index);
        }
        // Its registration in the other epoch (a rotation's key delivery) goes too.
        ctl.release_other(epoch, conn_id, &self.shared);
        if let Some(t) = route.and_then(|r| r.tuple)
            && ctl.tuples.get(&t).is_some_and(|r| r.conn_id == conn_id)
        {
            ctl.tuples.remove(&t);
        }
        self.shared.persist(StoreOp::Remove {
            epoch,
            index,
            conn_id,
        });
    }

    /// Timers: releases connections idle for `idle_timeout` and tells their hosts (EXPIRED).
    /// One worker at a time sweeps, at most every `idle_timeout / 4` (1–10 s), taking the
    /// control lock once; a sweep stops when `tx` is full and goes on at the next tick.
    pub fn tick(&mut self, now: Ticks, tx: &mut TxQueue) {
        self.send_expired_pending(now, tx);
        self.send_epoch_keys(now, tx);
        self.expire_commits(now);
        let idle = self.shared.cfg.idle_timeout;
        if idle.is_zero() {
            return;
        }
        let due = self.shared.next_sweep.load(Ordering::Acquire);
        let every = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
        if now.0 < due
            || self
                .shared
                .next_sweep
                .compare_exchange(
                    due,
                    now.saturating_add(every).0,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_err()
        {
            return;
        }
        if !self.expire_idle(now, idle, tx) {
            // More to do: come back at the next tick.
            self.shared.next_sweep.store(now.0, Ordering::Release);
        }
    }

    /// Tells hosts about connections released with an epoch (end of grace), as much as
    /// `tx` has room for; the rest waits for the next tick.
    fn send_expired_pending(&mut self, now: Ticks, tx: &mut TxQueue) {
        let room = tx.capacity().saturating_sub(tx.len());
        for (host, conn_id) in self.shared.take_expired_pending(room) {
            self.metrics.inc(C::Expired);
            if let Some(peer) = self.live.hosts.get(usize::from(host)) {
                let msg = LinkMsg::Expired { conn_id }.seal(&peer.key, now);
                if tx.push_bytes(Via::Host, peer.addr, &msg) {
                    self.metrics.inc(C::TxHostControl);
                    self.metrics.add(C::TxHostBytes, msg.len() as u64);
                }
            }
        }
    }

    /// Returns false if it stopped because `tx` filled up.
    pub(super) fn expire_idle(&mut self, now: Ticks, idle: Duration, tx: &mut TxQueue) -> bool {
        let shared = self.shared.clone();
        let limit = i64::try_from(idle.as_secs()).unwrap_or(i64::MAX);
        let secs_now = secs(now);
        let room = tx.capacity().saturating_sub(tx.len());
        let mut ctl = shared.control();
        let mut idle_conns: Vec<(u32, u32, u64, HostId)> = Vec::new();
        let mut complete = true;
        // In a cluster, connections another gateway owns (no tuple here) are that
        // gateway's to expire; this one has no activity to judge them by.
        let owned_only = shared.cfg.commit == CommitMode::Deferred;
        'scan: for (epoch, reg) in &ctl.registries {
            for (index, c) in reg.iter() {
                if owned_only && c.tuple().is_none() {
                    continue;
                }
                let seen = shared.activity(*epoch as u8, index).load(Ordering::Relaxed);
                // Wrapping difference: a slot touched "ahead" of `now` reads as negative.
                if i64::from(secs_now.wrapping_sub(seen) as i32) > limit
                    // The registration that routes the connection keeps its clock; the
                    // other one (key delivery) goes with it.
                    && ctl
                        .conns
                        .get(c.conn_id)
                        .is_none_or(|r| r.epoch_byte == *epoch as u8 && r.index == index)
                {
                    if idle_conns.len() == room {
                        complete = false;
                        break 'scan;
                    }
                    idle_conns.push((*epoch, index, c.conn_id, c.host));
                }
            }
        }
        for (epoch, index, conn_id, host) in idle_conns {
            self.release(&mut ctl, epoch, index, conn_id);
            self.metrics.inc(C::Expired);
            if let Some(peer) = self.live.hosts.get(usize::from(host)) {
                let msg = LinkMsg::Expired { conn_id }.seal(&peer.key, now);
                if tx.push_bytes(Via::Host, peer.addr, &msg) {
                    self.metrics.inc(C::TxHostControl);
                    self.metrics.add(C::TxHostBytes, msg.len() as u64);
                }
            }
        }
        complete
    }
}
