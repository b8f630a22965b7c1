//! The tunnel's client side, sans-IO: maps the source addresses of local applications to
//! flow ids, frames their datagrams for [`crate::client::Client::send`], and routes the
//! frames that come back to the right application address.
//!
//! The driver (see [`crate::tunnel::run`]) feeds each datagram a local application sent with
//! [`TunnelClient::handle_app`], which writes the frame to send over the Mesh connection, and
//! each payload the connection received with [`TunnelClient::handle_tunnel`], which says
//! where to deliver it. [`TunnelClient::handle_timeout`] expires idle flows. Nothing
//! received can panic; every datagram not carried is counted by reason in
//! [`TunnelClientStats`].
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use super::frame::{Frame, Kind, MAX_APP_PAYLOAD};
use crate::time::Ticks;

/// Client tunables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelClientConfig {
    /// The host service this client's flows go to (its index in the host's list; 0 is the
    /// first, and the only one of `rebindgw host --forward ADDR`).
    pub service: u8,
    /// A flow (one local source address) unused for this long is forgotten; its id is not
    /// reused before every other id was.
    pub flow_idle: Duration,
    /// Flows at once; a datagram from a new source beyond it is dropped
    /// (`dropped_flow_limit`).
    pub max_flows: usize,
    /// Frames sent in this last stretch are kept (at most `resend_max` of them) so that
    /// [`TunnelClient::lost_in_rebind`] can give back those a rebind lost. Zero turns it off.
    pub resend_keep: Duration,
    pub resend_max: usize,
}

impl Default for TunnelClientConfig {
    fn default() -> Self {
        TunnelClientConfig {
            service: 0,
            flow_idle: Duration::from_secs(180),
            max_flows: 4096,
            resend_keep: Duration::from_millis(250),
            resend_max: 1024,
        }
    }
}

/// Counters; every datagram not carried lands in one `dropped_*` counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TunnelClientStats {
    /// Application datagrams framed for the tunnel, and their bytes.
    pub to_tunnel: u64,
    pub to_tunnel_bytes: u64,
    /// Datagrams delivered to applications, and their bytes.
    pub to_app: u64,
    pub to_app_bytes: u64,
    pub flows_opened: u64,
    pub flows_expired: u64,
    /// Flows the host closed (CLOSE frame).
    pub flows_closed_by_host: u64,
    pub acks_received: u64,
    /// An application datagram longer than [`MAX_APP_PAYLOAD`] (never truncated).
    pub dropped_too_big: u64,
    /// A new flow while `max_flows` flows are open.
    pub dropped_flow_limit: u64,
    /// A payload from the tunnel that is not a frame.
    pub dropped_malformed: u64,
    /// A frame for a flow this client does not know (expired, or never opened).
    pub dropped_unknown_flow: u64,
    /// A frame kind a host never sends to a client.
    pub dropped_unexpected: u64,
    /// Frames given back by [`TunnelClient::lost_in_rebind`] to send again.
    pub resent_after_rebind: u64,
}

/// Why [`TunnelClient::handle_app`] did not frame a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AppDrop {
    #[error(
        "datagram of {len} bytes exceeds the tunnel's maximum of {MAX_APP_PAYLOAD} \
         (the path carries 1200-byte DATA payloads; lower the application's datagram size)"
    )]
    TooBig { len: usize },
    #[error("flow limit reached ({0} flows)")]
    FlowLimit(usize),
    #[error("output buffer too short")]
    SmallBuffer,
}

struct Flow {
    app: SocketAddr,
    last_active: Ticks,
}

/// The sans-IO tunnel client. See the module docs.
pub struct TunnelClient {
    cfg: TunnelClientConfig,
    by_addr: HashMap<SocketAddr, u16>,
    flows: HashMap<u16, Flow>,
    next_flow: u16,
    /// Frames recently framed, oldest first, with when.
    recent: VecDeque<(Ticks, Vec<u8>)>,
    stats: TunnelClientStats,
}

impl std::fmt::Debug for TunnelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelClient")
            .field("service", &self.cfg.service)
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

impl TunnelClient {
    pub fn new(cfg: TunnelClientConfig) -> TunnelClient {
        TunnelClient {
            cfg,
            by_addr: HashMap::new(),
            flows: HashMap::new(),
            next_flow: 0,
            recent: VecDeque::new(),
            stats: TunnelClientStats::default(),
        }
    }

    pub fn stats(&self) -> &TunnelClientStats {
        &self.stats
    }

    /// Open flows.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// The flow id of a local application address, if it has one.
    pub fn flow_of(&self, app: SocketAddr) -> Option<u16> {
        self.by_addr.get(&app).copied()
    }

    /// A datagram a local application at `from` sent: writes its frame into `out` and
    /// returns the frame's length (give it to `Client::send`).
    pub fn handle_app(
        &mut self,
        now: Ticks,
        from: SocketAddr,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<usize, AppDrop> {
        if payload.len() > MAX_APP_PAYLOAD {
            self.stats.dropped_too_big += 1;
            return Err(AppDrop::TooBig { len: payload.len() });
        }
        let flow = match self.by_addr.get(&from) {
            Some(f) => *f,
            None => {
                if self.flows.len() >= self.cfg.max_flows {
                    self.stats.dropped_flow_limit += 1;
                    return Err(AppDrop::FlowLimit(self.cfg.max_flows));
                }
                let f = self.fresh_flow();
                self.by_addr.insert(from, f);
                self.flows.insert(
                    f,
                    Flow {
                        app: from,
                        last_active: now,
                    },
                );
                self.stats.flows_opened += 1;
                f
            }
        };
        if let Some(f) = self.flows.get_mut(&flow) {
            f.last_active = now;
        }
        let Some(n) = Frame::data(self.cfg.service, flow, payload).emit(out) else {
            return Err(AppDrop::SmallBuffer);
        };
        self.stats.to_tunnel += 1;
        self.stats.to_tunnel_bytes += payload.len() as u64;
        self.remember(now, &out[..n]);
        Ok(n)
    }

    fn remember(&mut self, now: Ticks, frame: &[u8]) {
        if self.cfg.resend_keep.is_zero() || self.cfg.resend_max == 0 {
            return;
        }
        while self.recent.len() >= self.cfg.resend_max
            || self
                .recent
                .front()
                .is_some_and(|(t, _)| now.since(*t) > self.cfg.resend_keep)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, frame.to_vec()));
    }

    /// A rebind that started at `started` completed at `now` (its REBIND round trip took
    /// `took`): the frames to send again. The gateway dropped the DATA that reached it from
    /// the new tuple before it accepted the REBIND: those that drew the UNRECOGNIZED (sent
    /// about one round trip before the rebind started) and those sent during the rebind. So
    /// this gives back the frames framed since `started - (2 × took + 2 ms)`, oldest first. A
    /// few may arrive twice; UDP applications take duplicates as they take loss.
    pub fn lost_in_rebind(&mut self, now: Ticks, started: Ticks, took: Duration) -> Vec<Vec<u8>> {
        let from = started.saturating_sub(
            took.saturating_mul(2)
                .saturating_add(Duration::from_millis(2)),
        );
        let again: Vec<Vec<u8>> = self
            .recent
            .iter()
            .filter(|(t, _)| *t >= from && *t <= now)
            .map(|(_, f)| f.clone())
            .collect();
        self.stats.resent_after_rebind += again.len() as u64;
        again
    }

    /// A payload the Mesh connection received: `Some((app, datagram))` to deliver `datagram`
    /// to the application at `app`; `None` if there is nothing to deliver (counted).
    pub fn handle_tunnel<'a>(
        &mut self,
        now: Ticks,
        payload: &'a [u8],
    ) -> Option<(SocketAddr, &'a [u8])> {
        let frame = match Frame::parse(payload) {
            Ok(f) => f,
            Err(_) => {
                self.stats.dropped_malformed += 1;
                return None;
            }
        };
        match frame.kind {
            Kind::Ack => {
                self.stats.acks_received += 1;
                None
            }
            Kind::Close => {
                if let Some(f) = self.flows.remove(&frame.flow) {
                    self.by_addr.remove(&f.app);
                    self.stats.flows_closed_by_host += 1;
                } else {
                    self.stats.dropped_unknown_flow += 1;
                }
                None
            }
            Kind::Data if frame.service != self.cfg.service => {
                self.stats.dropped_unexpected += 1;
                None
            }
            Kind::Data => {
                let Some(f) = self.flows.get_mut(&frame.flow) else {
                    self.stats.dropped_unknown_flow += 1;
                    return None;
                };
                f.last_active = now;
                self.stats.to_app += 1;
                self.stats.to_app_bytes += frame.payload.len() as u64;
                Some((f.app, frame.payload))
            }
        }
    }

    /// When [`TunnelClient::handle_timeout`] has flows to expire.
    pub fn poll_timeout(&self) -> Option<Ticks> {
        self.flows
            .values()
            .map(|f| f.last_active.saturating_add(self.cfg.flow_idle))
            .min()
    }

    /// Forgets flows idle for `flow_idle`.
    pub fn handle_timeout(&mut self, now: Ticks) {
        let idle = self.cfg.flow_idle;
        let stale: Vec<u16> = self
            .flows
            .iter()
            .filter(|(_, f)| now.since(f.last_active) >= idle)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            if let Some(f) = self.flows.remove(&id) {
                self.by_addr.remove(&f.app);
                self.stats.flows_expired += 1;
            }
        }
    }

    /// The next flow id not in use, cycling through all 65,536 before reusing one.
    fn fresh_flow(&mut self) -> u16 {
        loop {
            let f = self.next_flow;
            self.next_flow = self.next_flow.wrapping_add(1);
            if !self.flows.contains_key(&f) {
                return f;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn flows_by_source_and_routing_back() {
        let mut c = TunnelClient::new(TunnelClientConfig {
            max_flows: 2,
            flow_idle: Duration::from_secs(5),
            ..TunnelClientConfig::default()
        });
        let t = Ticks(1_000_000_000);
        let mut buf = [0u8; 1300];
        let n = c
            .handle_app(t, a("127.0.0.1:1000"), b"one", &mut buf)
            .unwrap();
        assert_eq!(&buf[..n], &[1, 0, 0, 0, b'o', b'n', b'e']);
        c.handle_app(t, a("127.0.0.1:2000"), b"two", &mut buf)
            .unwrap();
        c.handle_app(t, a("127.0.0.1:1000"), b"again", &mut buf)
            .unwrap();
        assert_eq!(c.flows(), 2);
        assert_eq!(
            c.handle_app(t, a("127.0.0.1:3000"), b"x", &mut buf),
            Err(AppDrop::FlowLimit(2))
        );
        let big = vec![0u8; MAX_APP_PAYLOAD + 1];
        assert!(matches!(
            c.handle_app(t, a("127.0.0.1:1000"), &big, &mut buf),
            Err(AppDrop::TooBig { .. })
        ));
        let back = Frame::data(0, 1, b"reply").to_vec();
        assert_eq!(
            c.handle_tunnel(t, &back),
            Some((a("127.0.0.1:2000"), &b"reply"[..]))
        );
        assert_eq!(c.handle_tunnel(t, &Frame::data(0, 9, b"?").to_vec()), None);
        assert_eq!(c.handle_tunnel(t, &[0; 24]), None);
        assert_eq!(
            c.handle_tunnel(t, &Frame::control(Kind::Ack, 0, 0).to_vec()),
            None
        );
        // The host closes flow 1; its address gets a new id next time.
        assert_eq!(
            c.handle_tunnel(t, &Frame::control(Kind::Close, 0, 1).to_vec()),
            None
        );
        assert_eq!(c.flow_of(a("127.0.0.1:2000")), None);
        // Idle expiry.
        let later = t.saturating_add(Duration::from_secs(6));
        assert!(c.poll_timeout().unwrap() <= later);
        c.handle_timeout(later);
        assert_eq!(c.flows(), 0);
        let s = c.stats();
        assert_eq!((s.to_tunnel, s.to_app, s.flows_opened), (3, 1, 2));
        assert_eq!((s.dropped_flow_limit, s.dropped_too_big), (1, 1));
        assert_eq!((s.dropped_unknown_flow, s.dropped_malformed), (1, 1));
        assert_eq!(
            (s.acks_received, s.flows_closed_by_host, s.flows_expired),
            (1, 1, 1)
        );
    }
}
