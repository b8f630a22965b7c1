//! The fast-path benchmark's load generator and reflector on the project's own AF_XDP loop
//! (`--xdp-generator`): on a 2-core machine a kernel-socket generator and reflector pay the
//! kernel's UDP stack four times per echo on their core, as much as the forwarder under
//! test pays on its own, so that core saturates first and the run measures the generator.
//! Over AF_XDP they build and parse frames in user space.
//!
//! Both run in generic (skb) XDP mode on their veth ends: native veth XDP runs in the
//! sender's NAPI, which would put the generator's receive work on the forwarder's core;
//! generic XDP runs after receive packet steering, on the receiver's core.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::netns::Veth;
use super::pin;
use super::relay::{Running, spawn};
use rebindgw::hostlink::LinkType;
use rebindgw::io::batch::{Rx, TxQueue, Via};
use rebindgw::io::xdp::{Xdp, XdpConfig, XdpMode, XdpWorker, enter_netns};
use rebindgw::io::{self, Handler, IoBackend, LoopOptions, WorkerSockets};

/// Attaches the project's XDP program to `interface` for the client sockets of `sockets` in
/// generic mode, with one AF_XDP socket for queue 0. Keep the [`Xdp`] until the loop is done.
pub fn attach(interface: &str, sockets: &WorkerSockets) -> anyhow::Result<(Xdp, XdpWorker)> {
    let listen = sockets
        .clients
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    let cfg = XdpConfig {
        interface: Some(interface.into()),
        mode: XdpMode::Skb,
        ..XdpConfig::default()
    };
    let mut xdp = Xdp::setup(&cfg, &listen, 1)
        .map_err(|why| anyhow::anyhow!("AF_XDP on {interface} for the generator side: {why}"))?;
    let worker = xdp
        .take_worker(0)
        .ok_or_else(|| anyhow::anyhow!("AF_XDP on {interface}: no socket for queue 0"))?;
    Ok((xdp, worker))
}

/// The reflector on AF_XDP: `sock` (made in namespace `ns`) answers on `interface` there.
pub fn spawn_xdp_reflector(sock: UdpSocket, ns: &str, interface: &str) -> anyhow::Result<Running> {
    let addr = sock.local_addr()?;
    let (ns, interface) = (Veth::path(ns), interface.to_string());
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
    let running = spawn("reflector", addr, move |stop| {
        let attached = (|| {
            enter_netns(&ns)?;
            let host = io::bind_udp(SocketAddr::new(addr.ip(), 0), false, 0)?;
            let sockets = WorkerSockets {
                clients: vec![sock],
                host,
            };
            let (xdp, worker) = attach(&interface, &sockets)?;
            anyhow::Ok((sockets, xdp, worker))
        })();
        match attached {
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
            Ok((sockets, xdp, worker)) => {
                let _ = ready_tx.send(Ok(()));
                pin(1);
                let _ = io::run_worker(
                    IoBackend::Xdp,
                    Some(worker),
                    &sockets,
                    &mut Reflect,
                    stop,
                    &LoopOptions::default(),
                );
                drop(xdp);
            }
        }
    })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the AF_XDP reflector thread died"))??;
    Ok(running)
}

/// Answers host-link TO_HOST_DATA with TO_CLIENT_DATA for the same conn_id, and echoes any
/// other datagram as it is (the direct baseline).
pub struct Reflect;

impl Handler for Reflect {
    fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
        for d in rx {
            tx.push(d.via, d.from, |slot| {
                slot[..d.data.len()].copy_from_slice(d.data);
                if d.data.first() == Some(&(LinkType::ToHostData as u8)) {
                    slot[0] = LinkType::ToClientData as u8;
                }
                d.data.len()
            });
        }
    }

    fn tick(&mut self, _tx: &mut TxQueue) {}
}

/// Binds one socket per address in `ips`, all on one port (the XDP program steers by port).
pub fn bind_same_port(ips: &[IpAddr]) -> anyhow::Result<Vec<std::net::UdpSocket>> {
    let first = io::bind_udp(SocketAddr::new(ips[0], 0), false, 4 << 20)?;
    let port = first.local_addr()?.port();
    let mut socks = vec![first];
    for &ip in &ips[1..] {
        socks.push(io::bind_udp(SocketAddr::new(ip, port), false, 4 << 20)?);
    }
    Ok(socks)
}

/// A closed-loop (`window` in flight per client tuple) or open-loop (`rate`) echo load from
/// the worker's client sockets, each one tuple.
pub struct EchoLoad {
    target: SocketAddr,
    window: usize,
    payload: usize,
    rate: Option<u64>,
    epoch: Instant,
    measure_from: Instant,
    end: Instant,
    outstanding: Vec<usize>,
    last_rx: Vec<Instant>,
    last_tick: Instant,
    credit: f64,
    rr: usize,
    pub sent: u64,
    pub received: u64,
    pub hist: Histogram<u64>,
}

/// What [`EchoLoad`] sends.
#[derive(Clone, Copy, Debug)]
pub struct LoadShape {
    /// Echoes in flight per tuple (closed loop).
    pub window: usize,
    /// Datagram length (at least 9: type and timestamp).
    pub payload: usize,
    /// Open loop at this many datagrams/s in total instead.
    pub rate: Option<u64>,
}

impl EchoLoad {
    pub fn new(
        target: SocketAddr,
        tuples: usize,
        shape: LoadShape,
        start: Instant,
        warmup: Duration,
        duration: Duration,
    ) -> EchoLoad {
        let now = start;
        EchoLoad {
            target,
            window: shape.window,
            payload: shape.payload.max(9),
            rate: shape.rate,
            epoch: now,
            measure_from: now + warmup,
            end: now + warmup + duration,
            outstanding: vec![0; tuples],
            last_rx: vec![now; tuples],
            last_tick: now,
            credit: 0.0,
            rr: 0,
            sent: 0,
            received: 0,
            hist: Histogram::new_with_bounds(1, 10_000_000, 3).expect("bounds"),
        }
    }

    /// When the measured window starts and ends.
    pub fn window_times(&self) -> (Instant, Instant) {
        (self.measure_from, self.end)
    }

    fn send(&mut self, k: usize, now: Instant, tx: &mut TxQueue) {
        if now >= self.end {
            return;
        }
        let t = (now.duration_since(self.epoch).as_nanos() as u64).to_be_bytes();
        let len = self.payload;
        let pushed = tx.push(Via::Client(k as u8), self.target, |slot| {
            slot[..len].fill(0);
            slot[0] = b'D';
            slot[1..9].copy_from_slice(&t);
            len
        });
        if pushed {
            self.outstanding[k] += 1;
            if now >= self.measure_from {
                self.sent += 1;
            }
        }
    }
}

impl Handler for EchoLoad {
    fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
        let now = Instant::now();
        let now_ns = now.duration_since(self.epoch).as_nanos() as u64;
        let measuring = now >= self.measure_from && now < self.end;
        for d in rx {
            let Via::Client(k) = d.via else { continue };
            let k = usize::from(k);
            if k >= self.outstanding.len() || d.data.len() < 9 || d.data[0] != b'D' {
                continue;
            }
            let t = u64::from_be_bytes(d.data[1..9].try_into().expect("8 bytes"));
            if measuring {
                self.received += 1;
                let _ = self.hist.record((now_ns.saturating_sub(t) / 1000).max(1));
            }
            self.outstanding[k] = self.outstanding[k].saturating_sub(1);
            self.last_rx[k] = now;
            if self.rate.is_none() {
                self.send(k, now, tx);
            }
        }
    }

    fn tick(&mut self, tx: &mut TxQueue) {
        let now = Instant::now();
        match self.rate {
            None => {
                for k in 0..self.outstanding.len() {
                    // Top up windows that lost datagrams.
                    if self.outstanding[k] < self.window
                        && (self.outstanding[k] == 0
                            || now.duration_since(self.last_rx[k]) > Duration::from_millis(20))
                    {
                        for _ in self.outstanding[k]..self.window {
                            self.send(k, now, tx);
                        }
                        self.last_rx[k] = now;
                    }
                }
            }
            Some(rate) => {
                let dt = now.duration_since(self.last_tick).as_secs_f64();
                self.credit = (self.credit + rate as f64 * dt).min(512.0);
                while self.credit >= 1.0 {
                    self.credit -= 1.0;
                    let k = self.rr % self.outstanding.len();
                    self.rr += 1;
                    self.send(k, now, tx);
                }
            }
        }
        self.last_tick = now;
    }
}

/// The loop options of the generator side: a 1 ms tick paces the open loop.
pub fn loop_options() -> LoopOptions {
    LoopOptions {
        tick: Duration::from_millis(1),
        tx_capacity: 1024,
        ..LoopOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn rx(k: u8, data: &[u8]) -> Rx<'_> {
        Rx {
            via: Via::Client(k),
            from: SocketAddr::from((Ipv4Addr::LOCALHOST, 9)),
            data,
        }
    }

    #[test]
    fn the_closed_loop_keeps_each_window_full_and_counts_echoes_only_while_measuring() {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, 7));
        let mut load = EchoLoad::new(
            target,
            2,
            LoadShape {
                window: 4,
                payload: 16,
                rate: None,
            },
            Instant::now(),
            Duration::ZERO,
            Duration::from_secs(60),
        );
        let mut tx = TxQueue::new(64);
        load.tick(&mut tx);
        assert_eq!(tx.len(), 8, "two tuples, four each");
        assert!(
            tx.iter()
                .all(|(m, d)| m.to == target && d.len() == 16 && d[0] == b'D')
        );
        let echo: Vec<u8> = tx.iter().next().map(|(_, d)| d.to_vec()).unwrap();
        tx.clear();
        load.handle_batch(&[rx(1, &echo), rx(1, b"short"), rx(9, &echo)], &mut tx);
        assert_eq!(
            load.received, 1,
            "the short datagram and the unknown tuple are ignored"
        );
        assert_eq!(tx.len(), 1, "one echo back, one new request");
        assert_eq!(tx.iter().next().unwrap().0.via, Via::Client(1));
        assert_eq!(load.outstanding, vec![4, 4]);
        assert!(load.hist.len() == 1);
    }

    #[test]
    fn the_open_loop_sends_at_its_rate() {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, 7));
        let mut load = EchoLoad::new(
            target,
            3,
            LoadShape {
                window: 1,
                payload: 16,
                rate: Some(100_000),
            },
            Instant::now(),
            Duration::ZERO,
            Duration::from_secs(60),
        );
        let mut tx = TxQueue::new(1024);
        std::thread::sleep(Duration::from_millis(2));
        load.tick(&mut tx);
        // 100,000/s for ≥ 2 ms is ≥ 200, capped at 512 per tick.
        assert!((200..=512).contains(&tx.len()), "{}", tx.len());
        let per_tuple: Vec<usize> = (0..3u8)
            .map(|k| tx.iter().filter(|(m, _)| m.via == Via::Client(k)).count())
            .collect();
        assert!(per_tuple.iter().max().unwrap() - per_tuple.iter().min().unwrap() <= 1);
    }

    #[test]
    fn the_reflector_turns_host_data_around_and_echoes_the_rest() {
        let mut tx = TxQueue::new(8);
        let host_data = [LinkType::ToHostData as u8, 1, 2, 3];
        Reflect.handle_batch(&[rx(0, &host_data), rx(0, b"Dabc")], &mut tx);
        let out: Vec<Vec<u8>> = tx.iter().map(|(_, d)| d.to_vec()).collect();
        assert_eq!(out[0], [LinkType::ToClientData as u8, 1, 2, 3]);
        assert_eq!(out[1], b"Dabc");
    }
}
