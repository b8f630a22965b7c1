//! The neighbour cache (no privileges), and, as root, the backend end to end on a veth pair
//! between two network namespaces (`rbxa`/`rbxb`; skipped with a printed reason otherwise).

use super::*;
use crate::io::bind_udp;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

#[test]
fn neighbours_learn_update_and_ignore_multicast() {
    let mut n = Neighbours::default();
    let (a, b): (IpAddr, IpAddr) = ("10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap());
    assert_eq!(n.get(a), None);
    n.learn(a, [2, 0, 0, 0, 0, 1], b);
    assert_eq!(n.get(a), Some(([2, 0, 0, 0, 0, 1], b)));
    n.learn(a, [2, 0, 0, 0, 0, 9], b); // moved (or a router change): the latest wins
    assert_eq!(n.get(a), Some(([2, 0, 0, 0, 0, 9], b)));
    n.learn("10.0.0.3".parse().unwrap(), [3, 0, 0, 0, 0, 1], b); // multicast MAC
    n.learn("0.0.0.0".parse().unwrap(), [2, 0, 0, 0, 0, 1], b);
    n.learn("ff02::1".parse().unwrap(), [2, 0, 0, 0, 0, 1], b);
    assert_eq!(n.len(), 1);
    for i in 0..NEIGH_MAX as u32 + 5 {
        n.learn(IpAddr::from(i.to_be_bytes()).to_canonical(), [2; 6], b);
    }
    assert!(n.len() <= NEIGH_MAX);
}

#[test]
fn mode_parse() {
    assert_eq!("SKB".parse::<XdpMode>(), Ok(XdpMode::Skb));
    assert_eq!("native".parse::<XdpMode>(), Ok(XdpMode::Native));
    assert!("fast".parse::<XdpMode>().is_err());
    assert_eq!(
        "xdp".parse::<crate::io::IoBackend>(),
        Ok(crate::io::IoBackend::Xdp)
    );
}

#[test]
fn setup_refuses_unspecified_listen_without_interface() {
    let r = Xdp::setup(&XdpConfig::default(), &["0.0.0.0:7000".parse().unwrap()], 1);
    let e = r.unwrap_err();
    assert!(e.contains("xdp_interface"), "{e}");
    let r = Xdp::setup(
        &XdpConfig {
            interface: Some("rbx-no-such-if".into()),
            ..XdpConfig::default()
        },
        &["0.0.0.0:7000".parse().unwrap()],
        1,
    );
    assert!(r.unwrap_err().contains("rbx-no-such-if"));
}

/// `io = "xdp"` that cannot be set up falls back like io_uring does (to uring, else mmsg).
#[test]
fn select_falls_back_with_a_reason() {
    use crate::io::{IoBackend, select_backend_xdp};
    let (b, x) = select_backend_xdp(
        IoBackend::Xdp,
        &XdpConfig::default(),
        &["0.0.0.0:7000".parse().unwrap()],
        2,
    );
    assert!(x.is_none());
    assert!(matches!(b, IoBackend::Uring | IoBackend::Mmsg), "{b}");
    let (b, x) = select_backend_xdp(IoBackend::Mmsg, &XdpConfig::default(), &[], 2);
    assert_eq!((b, x.is_none()), (IoBackend::Mmsg, true));
}

/// Two namespaces joined by a veth pair, deleted on drop. `a` has .1/::1, `b` .2/::2.
pub(crate) struct Veth {
    pub a: &'static str,
    pub b: &'static str,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Veth {
    /// Namespaces `a`, `b` (prefix rbx), veth `{a}0` in `a` and `{b}0` in `b`,
    /// 10.99.`net`.1|2/24 and fd99::`net`:1|2/64.
    pub(crate) fn new(a: &'static str, b: &'static str, net: u8) -> Result<Veth, String> {
        Self::with_queues(a, b, net, 1)
    }

    /// The same with `queues` receive and transmit queues on both ends.
    pub(crate) fn with_queues(
        a: &'static str,
        b: &'static str,
        net: u8,
        queues: u8,
    ) -> Result<Veth, String> {
        assert!(a.starts_with("rbx") && b.starts_with("rbx"));
        let _ = ip(&["netns", "del", a]);
        let _ = ip(&["netns", "del", b]);
        ip(&["netns", "add", a])?;
        let v = Veth { a, b };
        ip(&["netns", "add", b])?;
        let (ia, ib) = (format!("{a}0"), format!("{b}0"));
        let q = queues.to_string();
        ip(&[
            "-n",
            a,
            "link",
            "add",
            &ia,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "type",
            "veth",
            "peer",
            "name",
            &ib,
            "numtxqueues",
            &q,
            "numrxqueues",
            &q,
            "netns",
            b,
        ])?;
        for (ns, dev, h) in [(a, &ia, 1), (b, &ib, 2)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.99.{net}.{h}/24"),
                "dev",
                dev,
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("fd99::{net}:{h}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", self.a]);
        let _ = ip(&["netns", "del", self.b]);
    }
}

#[derive(Default)]
pub(crate) struct Echo {
    pub received: u64,
    /// Answer here instead of to the sender.
    pub to: Option<SocketAddr>,
}

impl Handler for Echo {
    fn handle_batch(&mut self, rx: &[Rx<'_>], tx: &mut TxQueue) {
        for r in rx {
            self.received += 1;
            tx.push_bytes(r.via, self.to.unwrap_or(r.from), r.data);
        }
    }
    fn tick(&mut self, _tx: &mut TxQueue) {}
}

/// What the server thread reports once it is set up.
type Ready = Result<(String, UdpSocket), String>;

/// Starts an echo worker in namespace `ns` on `listen` with the xdp backend. Returns the
/// setup summary and a kernel socket on `other` (bound in `ns`), or the reason it could not.
pub(crate) fn start_server(
    ns: &'static str,
    listen: Vec<SocketAddr>,
    other: SocketAddr,
    mode: XdpMode,
    stop: Arc<AtomicBool>,
    reply_to: Option<SocketAddr>,
) -> (Ready, thread::JoinHandle<Option<io::Result<IoStats>>>) {
    let (tx, rx) = mpsc::channel::<Ready>();
    let join = thread::spawn(move || {
        let setup = || -> Result<(XdpWorker, WorkerSockets, String, UdpSocket), String> {
            sys::enter_netns(&format!("/var/run/netns/{ns}")).map_err(|e| format!("setns: {e}"))?;
            let clients = listen
                .iter()
                .map(|a| bind_udp(*a, true, 1 << 20))
                .collect::<io::Result<Vec<_>>>()
                .map_err(|e| format!("bind: {e}"))?;
            let host = bind_udp("127.0.0.1:0".parse().unwrap(), false, 0)
                .map_err(|e| format!("bind host: {e}"))?;
            let other = UdpSocket::bind(other).map_err(|e| format!("bind other: {e}"))?;
            let cfg = XdpConfig {
                mode,
                ..XdpConfig::default()
            };
            let mut x = Xdp::setup(&cfg, &listen, 1)?;
            let w = x.take_worker(0).ok_or("no worker socket")?;
            Ok((
                w,
                WorkerSockets { clients, host },
                x.summary().to_string(),
                other,
            ))
        };
        match setup() {
            Err(e) => {
                let _ = tx.send(Err(e));
                None
            }
            Ok((w, socks, summary, other)) => {
                let _ = tx.send(Ok((summary, other)));
                let mut h = Echo {
                    received: 0,
                    to: reply_to,
                };
                Some(run_loop_xdp(
                    w,
                    &socks,
                    &mut h,
                    &stop,
                    &LoopOptions::default(),
                ))
            }
        }
    });
    let ready = rx
        .recv()
        .unwrap_or_else(|_| Err("server thread died".into()));
    (ready, join)
}

/// One ICMP echo over a raw socket (no `ping` binary needed): did the reply come?
fn icmp_echo(dst: IpAddr) -> io::Result<bool> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (domain, proto, req, rep) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
    };
    let s = Socket::new(domain, Type::RAW, Some(proto))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut msg = vec![req, 0, 0, 0, 0x12, 0x34, 0, 1];
    msg.extend_from_slice(b"rebindgw-xdp-test");
    if dst.is_ipv4() {
        // ICMPv6 checksums are filled in by the kernel; ICMPv4 ones are ours.
        let c = frame::checksum_fold(frame::sum_be16(0, &msg));
        msg[2..4].copy_from_slice(&c.to_be_bytes());
    }
    s.send_to(&msg, &SocketAddr::new(dst, 0).into())?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let Ok(n) = std::io::Read::read(&mut &s, &mut buf) else {
            continue;
        };
        // A raw IPv4 socket hands over the IP header too.
        let at = if dst.is_ipv4() {
            usize::from(buf[0] & 0xf) * 4
        } else {
            0
        };
        if buf[..n].get(at) == Some(&rep) && buf[..n].get(at + 4..at + 6) == Some(&[0x12, 0x34]) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Prints why a root test is skipped; with REBINDGW_REQUIRE_TOOLS set (CI, as root) a skip
/// for any reason but "not root" is a failure.
fn skip(test: &str, reason: &str) {
    assert!(
        std::env::var_os("REBINDGW_REQUIRE_TOOLS").is_none(),
        "{test}: {reason}, but REBINDGW_REQUIRE_TOOLS is set"
    );
    println!("SKIP {test}: {reason}");
}

fn is_root() -> bool {
    crate::io::ids::effective_uid() == 0
}

#[test]
fn veth_echo_v4_v6_and_kernel_traffic_passes() {
    echo_case("rbxa", "rbxb", 7, XdpMode::Auto);
}

#[test]
fn veth_echo_skb_mode() {
    echo_case("rbxc", "rbxd", 8, XdpMode::Skb);
}

fn echo_case(a: &'static str, b: &'static str, net: u8, mode: XdpMode) {
    if !is_root() {
        println!("SKIP veth_echo: not root");
        return;
    }
    let veth = match Veth::new(a, b, net) {
        Ok(v) => v,
        Err(e) => {
            skip("veth_echo", &format!("cannot create namespaces: {e}"));
            return;
        }
    };
    let v4: SocketAddr = format!("10.99.{net}.1:7000").parse().unwrap();
    let v6: SocketAddr = format!("[fd99::{net}:1]:7000").parse().unwrap();
    let other: SocketAddr = format!("10.99.{net}.1:7001").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, join) = start_server(veth.a, vec![v4, v6], other, mode, stop.clone(), None);
    let (summary, other_sock) = match ready {
        Ok(r) => r,
        Err(e) => {
            skip("veth_echo", &format!("the kernel refused AF_XDP: {e}"));
            return;
        }
    };
    println!("{summary}");
    assert!(
        summary.contains(&format!("{mode} mode")) || mode == XdpMode::Auto,
        "{summary}"
    );

    // The client side, in namespace b.
    let client = thread::spawn(move || -> Result<(), String> {
        sys::enter_netns(&format!("/var/run/netns/{b}")).map_err(|e| e.to_string())?;
        for (to, bind) in [
            (v4, format!("10.99.{net}.2:0")),
            (v6, format!("[fd99::{net}:2]:0")),
        ] {
            let s = UdpSocket::bind(&bind).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2048];
            for i in 0..200u32 {
                let msg = [&i.to_be_bytes()[..], &[0x5a; 100][..]].concat();
                s.send_to(&msg, to).map_err(|e| e.to_string())?;
                let (n, from) = s
                    .recv_from(&mut buf)
                    .map_err(|e| format!("echo {i} to {to}: {e}"))?;
                if from != to || buf[..n] != msg[..] {
                    return Err(format!("echo {i} to {to}: wrong reply from {from}"));
                }
            }
            // Another port reaches the kernel's socket.
            if to == v4 {
                s.send_to(b"kernel", other).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    });
    let client_result = client.join().unwrap();
    other_sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 64];
    let other_got = other_sock
        .recv_from(&mut buf)
        .map(|(n, _)| buf[..n].to_vec());
    let pings = thread::spawn(move || {
        sys::enter_netns(&format!("/var/run/netns/{b}")).unwrap();
        (icmp_echo(v4.ip()), icmp_echo(v6.ip()))
    })
    .join()
    .unwrap();
    let show = || {
        let out = Command::new("ip")
            .args(["-n", a, "link", "show", "dev", &format!("{a}0")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let attached = show();
    assert!(attached.contains("prog/xdp"), "not attached: {attached}");
    stop.store(true, Ordering::Relaxed);
    let stats = join.join().unwrap().unwrap().unwrap();
    // The worker is gone: the bpf_link, and with it the program, is detached.
    let link = show();
    drop(veth);
    println!("{stats:?}");
    assert!(
        link.contains("mtu") && !link.contains("xdp"),
        "still attached: {link}"
    );
    client_result.unwrap();
    assert_eq!(other_got.unwrap(), b"kernel");
    assert!(pings.0.unwrap(), "ICMP echo (IPv4) through the kernel");
    assert!(pings.1.unwrap(), "ICMPv6 echo through the kernel");
    assert_eq!(stats.received, 400);
    assert!(stats.xdp_received >= 398, "{stats:?}");
    // The first reply per family may go through the kernel (no neighbour learned yet... it is
    // learned from the very datagram, so in practice all go as frames).
    assert!(stats.xdp_sent >= 398, "{stats:?}");
    assert_eq!(stats.send_errors, 0);
}

/// A reply to an address that never sent us a frame has no neighbour entry: it goes through
/// the kernel socket (which resolves it with ARP) and is counted, not dropped.
#[test]
fn unknown_neighbour_goes_through_the_kernel() {
    if !is_root() {
        println!("SKIP unknown_neighbour: not root");
        return;
    }
    let veth = match Veth::new("rbxi", "rbxj", 10) {
        Ok(v) => v,
        Err(e) => {
            skip(
                "unknown_neighbour",
                &format!("cannot create namespaces: {e}"),
            );
            return;
        }
    };
    ip(&["-n", "rbxj", "addr", "add", "10.99.10.3/24", "dev", "rbxj0"]).unwrap();
    let listen: SocketAddr = "10.99.10.1:7000".parse().unwrap();
    let third: SocketAddr = "10.99.10.3:7100".parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, join) = start_server(
        veth.a,
        vec![listen],
        "10.99.10.1:7001".parse().unwrap(),
        XdpMode::Auto,
        stop.clone(),
        Some(third),
    );
    if let Err(e) = ready {
        skip(
            "unknown_neighbour",
            &format!("the kernel refused AF_XDP: {e}"),
        );
        return;
    }
    let got = thread::spawn(move || -> io::Result<usize> {
        sys::enter_netns("/var/run/netns/rbxj")?;
        let from = UdpSocket::bind("10.99.10.2:0")?;
        let sink = UdpSocket::bind(third)?;
        sink.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        for i in 0..5u8 {
            from.send_to(&[i; 10], listen)?;
            let (len, src) = match sink.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) => return Err(io::Error::other(format!("reply {i}: {e}"))),
            };
            assert_eq!((len, src, buf[0]), (10, listen, i));
            n += 1;
        }
        Ok(n)
    })
    .join()
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let stats = join.join().unwrap().unwrap().unwrap();
    drop(veth);
    println!("{stats:?}");
    assert_eq!(got.unwrap(), 5);
    assert_eq!((stats.xdp_received, stats.xdp_sent), (5, 0), "{stats:?}");
    assert_eq!(stats.xdp_kernel_sent, 5, "{stats:?}");
}

/// Two queues, two workers: each worker's socket gets its queue's datagrams, and together
/// they answer every flow.
#[test]
fn two_queues_two_workers() {
    if !is_root() {
        println!("SKIP two_queues: not root");
        return;
    }
    let veth = match Veth::with_queues("rbxk", "rbxl", 12, 2) {
        Ok(v) => v,
        Err(e) => {
            skip("two_queues", &format!("cannot create namespaces: {e}"));
            return;
        }
    };
    let listen: SocketAddr = "10.99.12.1:7000".parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
    let stop2 = stop.clone();
    let server = thread::spawn(move || -> Vec<IoStats> {
        let setup = || -> Result<(Xdp, Vec<WorkerSockets>), String> {
            sys::enter_netns("/var/run/netns/rbxk").map_err(|e| e.to_string())?;
            let socks = (0..2)
                .map(|_| {
                    Ok(WorkerSockets {
                        clients: vec![bind_udp(listen, true, 1 << 20)?],
                        host: bind_udp("127.0.0.1:0".parse().unwrap(), false, 0)?,
                    })
                })
                .collect::<io::Result<Vec<_>>>()
                .map_err(|e| e.to_string())?;
            Ok((Xdp::setup(&XdpConfig::default(), &[listen], 2)?, socks))
        };
        let (mut x, socks) = match setup() {
            Ok(r) => r,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return Vec::new();
            }
        };
        let _ = ready_tx.send(Ok(x.summary().to_string()));
        let workers: Vec<_> = socks
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let w = x.take_worker(i).expect("a socket per queue");
                let stop = stop2.clone();
                thread::spawn(move || {
                    let mut h = Echo::default();
                    run_loop_xdp(w, &s, &mut h, &stop, &LoopOptions::default()).unwrap()
                })
            })
            .collect();
        workers.into_iter().map(|j| j.join().unwrap()).collect()
    });
    match ready_rx.recv().unwrap() {
        Ok(summary) => {
            println!("{summary}");
            assert!(summary.contains("2 of 2 queues"), "{summary}");
        }
        Err(e) => {
            skip("two_queues", &format!("the kernel refused AF_XDP: {e}"));
            return;
        }
    }
    let echoed = thread::spawn(move || -> io::Result<usize> {
        sys::enter_netns("/var/run/netns/rbxl")?;
        let mut n = 0;
        for flow in 0..64u8 {
            let s = UdpSocket::bind("10.99.12.2:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buf = [0u8; 64];
            for i in 0..3u8 {
                s.send_to(&[flow, i], listen)?;
                let (len, from) = s.recv_from(&mut buf)?;
                assert_eq!((&buf[..len], from), (&[flow, i][..], listen));
                n += 1;
            }
        }
        Ok(n)
    })
    .join()
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    let stats = server.join().unwrap();
    drop(veth);
    for s in &stats {
        println!("{s:?}");
    }
    assert_eq!(echoed.unwrap(), 192);
    assert_eq!(stats.iter().map(|s| s.xdp_received).sum::<u64>(), 192);
    assert!(
        stats.iter().all(|s| s.xdp_received > 0),
        "a queue got no flow: {stats:?}"
    );
}

/// CPU time (user + system) of the calling thread, at clock-tick (10 ms) resolution.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().map(|x| x.parse::<u64>().unwrap_or(0)).sum());
    Duration::from_millis(ticks * 10)
}

/// Echo throughput on veth between two namespaces, xdp (native mode) vs io_uring, alternating
/// rounds of `XDP_BENCH_SECS` (default 2) seconds, one server worker pinned to core 0 and a
/// `sendmmsg` client with a 256-datagram window pinned to core 1; prints the medians.
/// `sudo cargo test --release --lib io::xdp::tests::bench_echo -- --ignored --nocapture`
#[test]
#[ignore = "benchmark (root)"]
fn bench_echo() {
    use crate::io::{BatchSocket, IoBackend, run_loop};
    if !is_root() {
        println!("SKIP bench_echo: not root");
        return;
    }
    let secs: f64 = std::env::var("XDP_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rounds: usize = std::env::var("XDP_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mode: XdpMode = std::env::var("XDP_BENCH_MODE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(XdpMode::Native);
    let payload: usize = std::env::var("XDP_BENCH_PAYLOAD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let spin = std::env::var("XDP_BENCH_SPIN_US")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(DEFAULT_SPIN, Duration::from_micros);
    let veth = Veth::new("rbxe", "rbxf", 9).expect("namespaces");
    let listen: SocketAddr = "10.99.9.1:7000".parse().unwrap();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut results: Vec<(IoBackend, f64, f64)> = Vec::new();
    for round in 0..rounds {
        for backend in [IoBackend::Xdp, IoBackend::Uring] {
            let stop = Arc::new(AtomicBool::new(false));
            let (ready_tx, ready_rx) = mpsc::channel::<Result<String, String>>();
            let stop2 = stop.clone();
            let server_core = cores.first().copied();
            let server = thread::spawn(move || {
                if let Some(c) = server_core {
                    core_affinity::set_for_current(c);
                }
                sys::enter_netns("/var/run/netns/rbxe").unwrap();
                let clients = vec![bind_udp(listen, true, 4 << 20).unwrap()];
                let host = bind_udp("127.0.0.1:0".parse().unwrap(), false, 0).unwrap();
                let socks = WorkerSockets { clients, host };
                let mut h = Echo::default();
                let cpu0 = thread_cpu();
                let r = if backend == IoBackend::Xdp {
                    let cfg = XdpConfig {
                        mode,
                        spin,
                        ..XdpConfig::default()
                    };
                    let mut x = match Xdp::setup(&cfg, &[listen], 1) {
                        Ok(x) => x,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return None;
                        }
                    };
                    let _ = ready_tx.send(Ok(x.summary().to_string()));
                    let w = x.take_worker(0).unwrap();
                    run_loop_xdp(w, &socks, &mut h, &stop2, &LoopOptions::default())
                } else {
                    let _ = ready_tx.send(Ok("io_uring".into()));
                    run_loop(backend, &socks, &mut h, &stop2, &LoopOptions::default())
                };
                Some((r.unwrap(), thread_cpu() - cpu0))
            });
            let what = ready_rx.recv().unwrap().expect("setup");
            if round == 0 {
                println!("{backend}: {what}");
            }
            let client_core = cores.get(1).copied();
            let pps = thread::spawn(move || {
                if let Some(c) = client_core {
                    core_affinity::set_for_current(c);
                }
                sys::enter_netns("/var/run/netns/rbxf").unwrap();
                let sock = bind_udp("10.99.9.2:0".parse().unwrap(), false, 8 << 20).unwrap();
                let mut bs = BatchSocket::new(sock).unwrap();
                let msg = vec![0x5au8; payload];
                let window = 256u64;
                let (mut sent, mut got) = (0u64, 0u64);
                // Warm up (neighbour entries) before timing.
                bs.send_batch([(listen, &msg[..])]).unwrap();
                bs.recv_batch(Some(Duration::from_secs(1)), |_, _| ())
                    .unwrap();
                let start = Instant::now();
                while start.elapsed().as_secs_f64() < secs {
                    let k = (window - sent.saturating_sub(got).min(window)).min(64) as usize;
                    if k > 0 {
                        sent += bs
                            .send_batch(std::iter::repeat_n((listen, &msg[..]), k))
                            .unwrap() as u64;
                    }
                    let n = bs
                        .recv_batch(Some(Duration::from_millis(5)), |_, _| ())
                        .unwrap() as u64;
                    got += n;
                    if n == 0 && k == 0 {
                        sent = got; // lost: reopen the window
                    }
                }
                got as f64 / start.elapsed().as_secs_f64()
            })
            .join()
            .unwrap();
            stop.store(true, Ordering::Relaxed);
            let (stats, cpu) = server.join().unwrap().unwrap();
            let per_core = stats.received as f64 / cpu.as_secs_f64().max(0.01);
            println!(
                "round {round} {backend:>5}: {:7.1} kpps echoed; server {:.2} CPU-s, {:7.1} kpps per server core (xdp rx {}, xdp tx {}, kernel tx {}, mean batch {:.1})",
                pps / 1e3,
                cpu.as_secs_f64(),
                per_core / 1e3,
                stats.xdp_received,
                stats.xdp_sent,
                stats.xdp_kernel_sent,
                stats.mean_batch()
            );
            results.push((backend, pps, per_core));
        }
    }
    drop(veth);
    let median = |b: IoBackend, f: fn(&(IoBackend, f64, f64)) -> f64| {
        let mut v: Vec<f64> = results.iter().filter(|r| r.0 == b).map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (x, u) = (
        median(IoBackend::Xdp, |r| r.1),
        median(IoBackend::Uring, |r| r.1),
    );
    let (xc, uc) = (
        median(IoBackend::Xdp, |r| r.2),
        median(IoBackend::Uring, |r| r.2),
    );
    println!(
        "median echo: xdp {:.1} kpps, uring {:.1} kpps, ratio {:.2}; per server core: xdp {:.1}, uring {:.1}, ratio {:.2}",
        x / 1e3,
        u / 1e3,
        x / u,
        xc / 1e3,
        uc / 1e3,
        xc / uc
    );
}
