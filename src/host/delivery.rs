//! In-band key delivery, the host's half (tests/data/PROTOCOL-EXT.md "Key delivery"): an
//! EPOCH_KEYS entry becomes a KEYS sealed for its client, resent with backoff until the
//! client's KEYS_ACK (and at once when the client moves: a REBOUND), then reported to the
//! gateway in a batched KEYS_DELIVERED.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::time::Duration;

use crate::hostlink::{Control, DATA_HEADER_LEN as LINK_DATA_HEADER, LinkType, SEAL_OVERHEAD};
use crate::time::Ticks;
use crate::wire::{EpochKeysEntry, keys_len, open_keys_ack, seal_keys};

use super::{HostCore, Transmit};

/// First KEYS retransmission; doubles up to [`KEYS_RESEND_MAX`] (PROTOCOL-EXT.md "On loss").
pub const KEYS_RESEND_FIRST: Duration = Duration::from_millis(500);
pub const KEYS_RESEND_MAX: Duration = Duration::from_secs(4);
/// KEYS_DELIVERED datagrams stay below this.
const MAX_DELIVERED_DATAGRAM: usize = 1400;

/// The KEYS a connection's client has to acknowledge.
pub(super) struct KeysOut {
    pub(super) epoch: u32,
    pub(super) kseq: u64,
    /// The sealed KEYS in its TO_CLIENT_DATA frame: a retransmission is byte-identical.
    pub(super) framed: Vec<u8>,
    pub(super) acked: bool,
    pub(super) next: Ticks,
    pub(super) backoff: Duration,
    /// The gateway that sent the EPOCH_KEYS (it gets the KEYS_DELIVERED).
    pub(super) reporter: SocketAddr,
}

/// Per-connection key delivery state.
#[derive(Default)]
pub(super) struct ConnKeys {
    /// The next `kseq` to seal.
    pub(super) next_kseq: u64,
    /// The last KEYS_ACK `aseq` accepted.
    pub(super) last_aseq: Option<u64>,
    pub(super) out: Option<KeysOut>,
}

impl HostCore {
    /// EPOCH_KEYS from gateway `from`: a KEYS for each connection's client, unless that
    /// delivery is under way (a duplicate entry does not restart it) or done (then it is
    /// reported again).
    pub(super) fn on_epoch_keys(
        &mut self,
        now: Ticks,
        from: SocketAddr,
        epoch: u32,
        entries: &[EpochKeysEntry],
    ) {
        for e in entries {
            let Some(conn) = self.conns.get_mut(&e.conn_id) else {
                self.counters.epoch_keys_unknown_conn += 1;
                continue;
            };
            // The gateway worker that sent this is alive (its ports change when it restarts):
            // answers go through it until the client's next DATA picks a worker again.
            conn.gateway = from;
            match conn.keys.out.as_mut() {
                Some(o) if o.epoch == epoch => {
                    self.counters.epoch_keys_duplicate += 1;
                    o.reporter = from;
                    if o.acked {
                        self.keys_report.push((from, epoch, e.conn_id));
                    } else {
                        // Not a new delivery: the same KEYS once more, through a live worker
                        // (the backoff goes on as it was).
                        self.queue.push_back(Transmit {
                            to: from,
                            payload: o.framed.clone(),
                        });
                        self.counters.keys_resent += 1;
                    }
                    continue;
                }
                Some(o) if o.epoch > epoch => {
                    self.counters.epoch_keys_stale += 1;
                    continue;
                }
                _ => {}
            }
            let kseq = conn.keys.next_kseq;
            conn.keys.next_kseq += 1;
            let mut framed = vec![0u8; LINK_DATA_HEADER + keys_len(e.keys.slot_keys.len())];
            framed[0] = LinkType::ToClientData as u8;
            framed[1..LINK_DATA_HEADER].copy_from_slice(&e.conn_id.to_be_bytes());
            seal_keys(&conn.tx, kseq, &e.keys, &mut framed[LINK_DATA_HEADER..]);
            let next = now.saturating_add(KEYS_RESEND_FIRST);
            self.queue.push_back(Transmit {
                to: conn.gateway,
                payload: framed.clone(),
            });
            conn.keys.out = Some(KeysOut {
                epoch,
                kseq,
                framed,
                acked: false,
                next,
                backoff: KEYS_RESEND_FIRST,
                reporter: from,
            });
            self.keys_due.push(Reverse((next, e.conn_id)));
            self.counters.keys_sent += 1;
        }
    }

    /// A KEYS_ACK from `conn_id`'s client (inside TO_HOST_DATA).
    pub(super) fn on_keys_ack(&mut self, conn_id: u64, inner: &[u8]) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            self.counters.data_unknown_conn += 1;
            return;
        };
        let Ok((aseq, epoch, kseq)) = open_keys_ack(&conn.rx, inner) else {
            self.counters.keys_ack_bad += 1;
            return;
        };
        if conn.keys.last_aseq.is_some_and(|last| aseq <= last) {
            self.counters.keys_ack_replay += 1;
            return;
        }
        let Some(out) = conn
            .keys
            .out
            .as_mut()
            .filter(|o| o.epoch == epoch && o.kseq == kseq)
        else {
            self.counters.keys_ack_unexpected += 1;
            return;
        };
        conn.keys.last_aseq = Some(aseq);
        if out.acked {
            // A retransmitted KEYS crossed the first KEYS_ACK.
            self.counters.keys_ack_repeated += 1;
            return;
        }
        out.acked = true;
        // The sealed copy is no longer needed.
        out.framed = Vec::new();
        self.counters.keys_acked += 1;
        self.keys_report.push((out.reporter, epoch, conn_id));
    }

    /// Resends the KEYS that are due (backoff 0.5 s doubling to 4 s).
    pub(super) fn resend_keys(&mut self, now: Ticks) {
        while let Some(&Reverse((due, conn_id))) = self.keys_due.peek() {
            if due > now {
                break;
            }
            self.keys_due.pop();
            let Some(conn) = self.conns.get_mut(&conn_id) else {
                continue;
            };
            let Some(out) = conn.keys.out.as_mut() else {
                continue;
            };
            if out.acked || out.next != due {
                continue;
            }
            out.backoff = (out.backoff * 2).min(KEYS_RESEND_MAX);
            out.next = now.saturating_add(out.backoff);
            self.keys_due.push(Reverse((out.next, conn_id)));
            self.queue.push_back(Transmit {
                to: conn.gateway,
                payload: out.framed.clone(),
            });
            self.counters.keys_resent += 1;
        }
    }

    /// Sends the acknowledged deliveries to their gateways, batched per gateway and epoch.
    pub(super) fn flush_keys_report(&mut self, now: Ticks) {
        if self.keys_report.is_empty() {
            return;
        }
        let mut report = std::mem::take(&mut self.keys_report);
        report.sort_unstable_by_key(|(to, epoch, _)| (*to, *epoch));
        let per = (MAX_DELIVERED_DATAGRAM - SEAL_OVERHEAD - 8 - 6) / 8;
        for group in report.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)) {
            let (to, epoch) = (group[0].0, group[0].1);
            for chunk in group.chunks(per) {
                let conn_ids: Vec<u64> = chunk.iter().map(|(_, _, c)| *c).collect();
                self.counters.keys_delivered_reported += conn_ids.len() as u64;
                let payload = Control::KeysDelivered { epoch, conn_ids }.seal(&self.link, now);
                self.queue.push_back(Transmit { to, payload });
            }
        }
    }

    /// When the next KEYS is due again, or now if acknowledgements wait to be reported.
    pub(super) fn keys_timeout(&self) -> Option<Ticks> {
        if !self.keys_report.is_empty() {
            return Some(Ticks(0));
        }
        self.keys_due.peek().map(|Reverse((t, _))| *t)
    }
}
