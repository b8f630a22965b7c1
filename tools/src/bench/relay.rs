//! The two stand-ins of the fast-path benchmark: a bare relay (the gateway's data path with
//! no tables, limits, metrics or protocol: a HashMap from tuple to id, on the same
//! recvmmsg/sendmmsg or io_uring loop) and a reflector host.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rebindgw::hostlink::{self, LinkType};
use rebindgw::io::batch::{Rx, TxQueue, Via};
use rebindgw::io::{self, BatchSocket, Handler, IoBackend, LoopOptions, WorkerSockets};

/// A thread that runs until stopped.
pub struct Running {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

pub(super) fn spawn(
    name: &str,
    addr: SocketAddr,
    body: impl FnOnce(&AtomicBool) + Send + 'static,
) -> std::io::Result<Running> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || body(&flag))?;
    Ok(Running {
        addr,
        stop,
        thread: Some(thread),
    })
}

/// Answers host-link TO_HOST_DATA with TO_CLIENT_DATA for the same conn_id, and echoes any
/// other datagram as it is (for the direct, no-hop baseline).
pub fn spawn_reflector(sock: UdpSocket) -> std::io::Result<Running> {
    let addr = sock.local_addr()?;
    let mut bs = BatchSocket::new(sock)?;
    spawn("reflector", addr, move |stop| {
        super::pin(1);
        let mut tx = TxQueue::new(64);
        while !stop.load(Ordering::Acquire) {
            let _ = bs.recv_batch(Some(Duration::from_millis(5)), |from, d| {
                tx.push(Via::Host, from, |slot| {
                    slot[..d.len()].copy_from_slice(d);
                    if d.first() == Some(&(LinkType::ToHostData as u8)) {
                        slot[0] = LinkType::ToClientData as u8;
                    }
                    d.len()
                });
            });
            if !tx.is_empty() {
                let _ = bs.send_batch(tx.iter().map(|(m, b)| (m.to, b)));
                tx.clear();
            }
        }
    })
}

/// The bare relay's handler.
struct BareRelay {
    host: SocketAddr,
    ids: HashMap<SocketAddr, u64>,
    tuples: Vec<SocketAddr>,
}

impl Handler for BareRelay {
    fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
        for d in rx {
            match d.via {
                Via::Client(_) => {
                    let next = self.tuples.len() as u64;
                    let id = *self.ids.entry(d.from).or_insert(next);
                    if id == next {
                        self.tuples.push(d.from);
                    }
                    tx.push(Via::Host, self.host, |slot| {
                        hostlink::emit_conn_data(LinkType::ToHostData, id, d.data, slot)
                    });
                }
                Via::Host => {
                    if let Ok((id, inner)) = hostlink::parse_conn_data(d.data)
                        && let Some(t) = self.tuples.get(id as usize)
                    {
                        tx.push_bytes(Via::Client(0), *t, inner);
                    }
                }
            }
        }
    }

    fn tick(&mut self, _tx: &mut TxQueue) {}
}

/// Runs the bare relay on `backend`'s loop: one client socket on `listen`, one host socket on
/// `host_link`'s address, one thread.
/// On xdp the relay attaches the gateway's AF_XDP program and socket to the interface of
/// `listen` (in the caller's network namespace), and fails with the reason if it can't,
/// rather than measure another backend under xdp's name.
pub fn spawn_bare_relay(
    listen: SocketAddr,
    host_link: SocketAddr,
    host: SocketAddr,
    backend: IoBackend,
    xdp_mode: io::xdp::XdpMode,
) -> std::io::Result<Running> {
    let sockets = WorkerSockets {
        clients: vec![io::bind_udp(listen, false, 4 << 20)?],
        host: io::bind_udp(host_link, false, 4 << 20)?,
    };
    let addr = sockets.clients[0].local_addr()?;
    let (xdp, xdp_worker) = if backend == IoBackend::Xdp {
        let cfg = io::xdp::XdpConfig {
            mode: xdp_mode,
            ..io::xdp::XdpConfig::default()
        };
        let mut x = io::xdp::Xdp::setup(&cfg, &[addr], 1).map_err(|why| {
            std::io::Error::other(format!("AF_XDP unusable for the bare relay: {why}"))
        })?;
        let w = x.take_worker(0).ok_or_else(|| {
            std::io::Error::other("AF_XDP gave the bare relay no socket for queue 0")
        })?;
        (Some(x), Some(w))
    } else {
        (None, None)
    };
    spawn("bare-relay", addr, move |stop| {
        // Core 0, where the gateway pins its first worker.
        super::pin(0);
        let mut relay = BareRelay {
            host,
            ids: HashMap::new(),
            tuples: Vec::new(),
        };
        let _ = io::run_worker(
            backend,
            xdp_worker,
            &sockets,
            &mut relay,
            stop,
            &LoopOptions::default(),
        );
        // The program stays attached until the loop is done.
        drop(xdp);
    })
}
