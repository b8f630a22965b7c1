//! The gateway on the AF_XDP backend (root only; skipped with a printed reason otherwise):
//! namespaces `rbxg` (host + gateway) and `rbxh` (client) joined by a veth pair; a client
//! connects through the gateway and echoes, and the gateway's counters show the client
//! traffic went through the XSK.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rebindgw::client::ClientConfig;
use rebindgw::client::socket::UdpClient;
use rebindgw::crypto;
use rebindgw::gateway::config::{GatewayConfig, HostEntry};
use rebindgw::gateway::metrics::{C, total};
use rebindgw::gateway::run::spawn_gateway;
use rebindgw::host::clients::enroll;
use rebindgw::host::{HostOptions, spawn_host};
use rebindgw::io::IoBackend;
use rebindgw::io::xdp::enter_netns;
use rebindgw::secrets::generate_link_key;

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

struct Namespaces;

impl Namespaces {
    fn new() -> Result<Namespaces, String> {
        let _ = ip(&["netns", "del", "rbxg"]);
        let _ = ip(&["netns", "del", "rbxh"]);
        ip(&["netns", "add", "rbxg"])?;
        let n = Namespaces;
        ip(&["netns", "add", "rbxh"])?;
        ip(&[
            "-n", "rbxg", "link", "add", "rbxg0", "type", "veth", "peer", "name", "rbxh0", "netns",
            "rbxh",
        ])?;
        for (ns, dev, a) in [
            ("rbxg", "rbxg0", "10.99.11.1/24"),
            ("rbxh", "rbxh0", "10.99.11.2/24"),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", a, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(n)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", "rbxg"]);
        let _ = ip(&["netns", "del", "rbxh"]);
    }
}

/// Prints why the test is skipped; with REBINDGW_REQUIRE_TOOLS set (CI, as root) that is a
/// failure instead.
fn skip(reason: &str) {
    assert!(
        std::env::var_os("REBINDGW_REQUIRE_TOOLS").is_none(),
        "{reason}, but REBINDGW_REQUIRE_TOOLS is set"
    );
    println!("SKIP gateway_on_xdp_over_veth: {reason}");
}

#[test]
fn gateway_on_xdp_over_veth() {
    if rebindgw::io::ids::effective_uid() != 0 {
        println!("SKIP gateway_on_xdp_over_veth: not root");
        return;
    }
    let ns = match Namespaces::new() {
        Ok(n) => n,
        Err(e) => {
            skip(&e);
            return;
        }
    };
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "rebindgw-xdp-{}-{}",
        std::process::id(),
        hex::encode(crypto::random_array::<6>())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let clients_file = dir.join("clients.toml");
    let (addr_tx, addr_rx) = mpsc::channel::<Result<(SocketAddr, IoBackend), String>>();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let d2 = dir.clone();
    let cf = clients_file.clone();
    let server = thread::spawn(move || {
        enter_netns("/var/run/netns/rbxg").unwrap();
        let key_file = d2.join("host.key");
        let key = generate_link_key(&key_file).unwrap();
        enroll(&cf, "seed").unwrap();
        let host = spawn_host(HostOptions::new(
            "127.0.0.1:0".parse().unwrap(),
            cf.clone(),
            key,
        ))
        .unwrap();
        let cfg = GatewayConfig {
            listen: vec!["10.99.11.1:0".parse().unwrap()],
            hosts: vec![HostEntry {
                addr: host.local_addr(),
                link_key_file: key_file,
            }],
            admin: None,
            state_dir: d2.join("state"),
            slots: 12,
            workers: 2,
            io: IoBackend::Xdp,
            ..GatewayConfig::default()
        };
        let gw = match spawn_gateway(cfg) {
            Ok(g) => g,
            Err(e) => {
                let _ = addr_tx.send(Err(format!("{e:#}")));
                return None;
            }
        };
        let _ = addr_tx.send(Ok((gw.client_addrs()[0], gw.io_backend())));
        let _ = stop_rx.recv();
        let (rx, tx) = (
            total(&gw.shared().metrics, C::XdpRx),
            total(&gw.shared().metrics, C::XdpTx),
        );
        assert!(rx >= 100 && tx >= 100, "xdp metrics: rx {rx}, tx {tx}");
        let stats = gw.stop().unwrap();
        let _ = host.stop();
        Some(stats)
    });
    let (gw_addr, backend) = addr_rx.recv().unwrap().unwrap();
    if backend != IoBackend::Xdp {
        let _ = stop_tx.send(());
        server.join().unwrap();
        drop(ns);
        let _ = std::fs::remove_dir_all(&dir);
        skip(&format!(
            "AF_XDP refused, the gateway fell back to {backend}"
        ));
        return;
    }
    let creds = enroll(&clients_file, "alice").unwrap().creds.clone();
    let client = thread::spawn(move || -> Result<usize, String> {
        enter_netns("/var/run/netns/rbxh").unwrap();
        let cfg = ClientConfig {
            keepalive: Duration::from_millis(200),
            ..ClientConfig::default()
        };
        let mut c = UdpClient::connect(
            gw_addr,
            "10.99.11.2:0".parse().unwrap(),
            creds,
            cfg,
            Duration::from_secs(8),
        )
        .map_err(|e| format!("connect: {e:?}"))?;
        let mut n = 0;
        for i in 0..100u32 {
            let p = [&i.to_be_bytes()[..], b" through AF_XDP"].concat();
            c.send(&p).map_err(|e| format!("send: {e:?}"))?;
            match c.recv(Duration::from_secs(3)) {
                Ok(Some(r)) if r == p => n += 1,
                other => return Err(format!("echo {i}: {other:?}")),
            }
        }
        Ok(n)
    });
    let echoed = client.join().unwrap();
    let _ = stop_tx.send(());
    let stats = server.join().unwrap().unwrap();
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    println!("{stats:?}");
    assert_eq!(echoed, Ok(100));
    assert!(stats.xdp_received >= 100, "{stats:?}");
    assert!(stats.xdp_sent >= 100, "{stats:?}");
}
