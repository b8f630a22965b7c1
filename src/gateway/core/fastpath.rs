//! The fast path: client DATA to its host and host DATA to its client (one lock-free table
//! lookup each, no allocation), UNRECOGNIZED for unknown tuples (§5), and the dispatch of
//! host datagrams (replies and control messages go on to `hostlink.rs`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;

use crate::gateway::metrics::{C, H, WorkerMetrics};
use crate::gateway::ratelimit::Limited;
use crate::hostlink::{self, Control as LinkMsg, LinkError, LinkType};
use crate::io::batch::{MAX_CLIENT_DATAGRAM, Rx, TxQueue, Via};
use crate::registry::HostId;
use crate::table::{ConnRef, ConnRoute};
use crate::time::Ticks;
use crate::wire::{KEYS_ACK_TYPE, MsgType, Unrecognized, unrecognized_len};

use super::WorkerCore;

impl WorkerCore {
    pub(super) fn client_datagram(&mut self, now: Ticks, d: &Rx<'_>, tx: &mut TxQueue) {
        let len = d.data.len() as u64;
        if d.data.len() > MAX_CLIENT_DATAGRAM {
            self.metrics.inc(C::DropOversize);
            return;
        }
        match d.data.first().copied().and_then(MsgType::from_byte) {
            Some(MsgType::Data) => {
                self.metrics.inc(C::RxData);
                self.metrics.add(C::RxDataBytes, len);
                match self.shared.tuples.get(&d.from) {
                    Some(conn) => {
                        self.shared.touch(conn.epoch_byte, conn.index, self.secs);
                        self.forward_to_host(conn, d.data, tx)
                    }
                    None => {
                        self.metrics.inc(C::UnknownTuple);
                        self.unrecognized(now, d.via, d.from, d.data.len(), None, tx);
                    }
                }
            }
            Some(MsgType::Handshake) => {
                self.metrics.inc(C::RxHandshake);
                self.metrics.add(C::RxHandshakeBytes, len);
                self.forward_handshake(now, d, tx);
            }
            Some(MsgType::Rebind) => unreachable!("REBINDs are batched"),
            // PROTOCOL-EXT.md "Key delivery": forwarded like DATA, never answered.
            None if d.data.first() == Some(&KEYS_ACK_TYPE) => {
                self.metrics.inc(C::RxKeysAck);
                self.metrics.add(C::RxOtherBytes, len);
                match self.shared.tuples.get(&d.from) {
                    Some(conn) => self.forward_to_host(conn, d.data, tx),
                    None => self.metrics.inc(C::DropKeysAckUnknownTuple),
                }
            }
            Some(_) => {
                self.metrics.inc(C::RxWrongDirection);
                self.metrics.add(C::RxOtherBytes, len);
            }
            None => {
                self.metrics.inc(C::RxUnknownType);
                self.metrics.add(C::RxOtherBytes, len);
            }
        }
    }

    pub(super) fn forward_to_host(&mut self, conn: ConnRef, datagram: &[u8], tx: &mut TxQueue) {
        let Some(host) = self.live.hosts.get(usize::from(conn.host)) else {
            self.metrics.inc(C::DropNoRoute);
            return;
        };
        let sent = tx.push(Via::Host, host.addr, |slot| {
            hostlink::emit_conn_data(LinkType::ToHostData, conn.conn_id, datagram, slot)
        });
        if sent {
            let bytes = (datagram.len() + hostlink::DATA_HEADER_LEN) as u64;
            self.metrics.inc(C::TxHostData);
            self.metrics.add(C::TxHostBytes, bytes);
            self.metrics
                .host_add(usize::from(conn.host), H::TxPackets, 1);
            self.metrics
                .host_add(usize::from(conn.host), H::TxBytes, bytes);
        }
    }

    /// Answers an unknown source with UNRECOGNIZED, never larger than the trigger and under
    /// the rate limits (§5). It carries the current epoch, unless `rebind_epoch` (the epoch
    /// byte of the REBIND or cookie request that drew it) names the previous epoch during
    /// its grace period: then that epoch and a cookie under its `Kc` (§6, 1.1).
    pub(super) fn unrecognized(
        &mut self,
        now: Ticks,
        via: Via,
        from: SocketAddr,
        trigger: usize,
        rebind_epoch: Option<u8>,
        tx: &mut TxQueue,
    ) {
        if trigger < unrecognized_len(&from) {
            self.metrics.inc(C::UnrecognizedSmall);
            return;
        }
        match self.unrecognized_limit.check(&from, now) {
            Err(Limited::Prefix) => return self.metrics.inc(C::UnrecognizedPrefixRate),
            Err(Limited::Global) => return self.metrics.inc(C::UnrecognizedGlobalRate),
            Ok(()) => {}
        }
        let t = self.issued(now);
        let keys = match (&self.epochs.previous, rebind_epoch) {
            (Some(p), Some(b)) if p.keys.epoch_byte() == b => &p.keys,
            _ => &self.epochs.current.keys,
        };
        let u = Unrecognized {
            epoch_byte: keys.epoch_byte(),
            t,
            observed: from,
            cookie: keys.cookie(&from, t),
        };
        if tx.push(via, from, |slot| u.emit(slot)) {
            self.metrics.inc(C::UnrecognizedSent);
            self.metrics.inc(C::TxClientUnrecognized);
            self.metrics.add(C::TxClientBytes, u.len() as u64);
        }
    }

    pub(super) fn host_datagram(&mut self, now: Ticks, d: &Rx<'_>, tx: &mut TxQueue) {
        self.metrics.add(C::HostRxBytes, d.data.len() as u64);
        let Some(host) = self.live.hosts.iter().position(|h| h.addr == d.from) else {
            self.metrics.inc(C::DropHostBadSource);
            return;
        };
        self.metrics.host_add(host, H::RxPackets, 1);
        self.metrics.host_add(host, H::RxBytes, d.data.len() as u64);
        let host_index = host;
        let dropped = |m: &WorkerMetrics, c: C| {
            m.inc(c);
            m.host_add(host_index, H::Dropped, 1);
        };
        let host = host as HostId;
        match hostlink::link_type(d.data) {
            Ok(LinkType::ToClientData) => {
                self.metrics.inc(C::HostRxData);
                let Ok((conn_id, inner)) = hostlink::parse_conn_data(d.data) else {
                    return dropped(&self.metrics, C::DropHostMalformed);
                };
                match self.shared.conns.get(conn_id) {
                    // Only the host that registered a connection may speak for it.
                    Some(r) if r.host != host => dropped(&self.metrics, C::DropHostNotOwner),
                    Some(ConnRoute {
                        tuple: Some(tuple), ..
                    }) => self.send_to_client(tuple, inner, C::TxClientData, tx),
                    _ => dropped(&self.metrics, C::DropNoRoute),
                }
            }
            Ok(LinkType::ToClientReply) => {
                self.metrics.inc(C::HostRxReply);
                match hostlink::parse_tuple_data(d.data) {
                    Ok((client, inner)) if inner[0] == MsgType::HandshakeReply as u8 => {
                        match self.recent_handshakes.take(&client, inner.len(), host, now) {
                            Ok(()) => {
                                self.metrics.host_answered(host_index);
                                self.send_to_client(client, inner, C::TxClientReply, tx)
                            }
                            Err(c) => dropped(&self.metrics, c),
                        }
                    }
                    _ => dropped(&self.metrics, C::DropHostMalformed),
                }
            }
            Ok(t) if t.is_control() => {
                self.metrics.inc(C::HostRxControl);
                let live = self.live.clone();
                let peer = &live.hosts[host_index];
                // Decrypt outside the lock; only the replay check and what follows need it.
                let opened = LinkMsg::open_with_nonce(d.data, &peer.key, now);
                let shared = self.shared.clone();
                let mut ctl = shared.control();
                match opened.and_then(|o| ctl.guard.accept(&o, now).map(|()| o)) {
                    Ok(o) => {
                        self.metrics.host_answered(host_index);
                        let sent = o.sent;
                        self.control_message(&mut ctl, now, host, d.from, sent, o.msg, tx)
                    }
                    Err(LinkError::BadTag) => dropped(&self.metrics, C::DropHostBadTag),
                    Err(LinkError::Stale(_)) => dropped(&self.metrics, C::DropHostStale),
                    Err(LinkError::Replay | LinkError::GuardFull) => {
                        dropped(&self.metrics, C::DropHostReplay)
                    }
                    Err(_) => dropped(&self.metrics, C::DropHostMalformed),
                }
            }
            _ => dropped(&self.metrics, C::DropHostMalformed),
        }
    }

    pub(super) fn send_to_client(
        &mut self,
        to: SocketAddr,
        datagram: &[u8],
        c: C,
        tx: &mut TxQueue,
    ) {
        let Some(via) = self.client_via[usize::from(to.is_ipv6())] else {
            return self.metrics.inc(C::DropNoRoute);
        };
        if tx.push_bytes(Via::Client(via), to, datagram) {
            self.metrics.inc(c);
            self.metrics.add(C::TxClientBytes, datagram.len() as u64);
        }
    }
}
