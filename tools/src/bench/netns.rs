//! The veth placement of `rebindgw bench fastpath --netns`: three namespaces as if they were
//! three machines, the forwarder under test in `rbfp-f`, the load generator's sockets in
//! `rbfp-c` and the reflector (the host) in `rbfp-h`, with a veth pair from `rbfp-f` to each
//! of the others. AF_XDP needs a real interface (loopback has no XDP path to an XSK), so an
//! xdp run uses this placement, and so does every other path of that run, to keep the
//! comparison fair.
//!
//! A veth delivers on the sending CPU, so without help the forwarder's kernel receive work
//! would run on the generator's core and the reflector's on the forwarder's. Receive packet
//! steering on each interface moves it to the receiver's core (the forwarder's interfaces to
//! core 0, the others to core 1), as a NIC's interrupt would on separate machines. (veth's
//! native XDP still runs in the sender's NAPI, before RPS: an xdp forwarder's program and
//! its copy into the UMEM are paid by the generator's core.)
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{Context, bail};

/// The forwarder's namespace and its veth end.
pub const FORWARDER_NS: &str = "rbfp-f";
pub const FORWARDER_IF: &str = "rbfp-f0";
pub const FORWARDER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 31, 1));
/// The load generator's namespace and its veth end.
pub const CLIENT_NS: &str = "rbfp-c";
pub const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 31, 2));
/// The AF_XDP generator's tuples share one port, one address each: 10.99.31.100 upwards.
pub const MAX_XDP_TUPLES: usize = 64;

pub fn xdp_tuple_ip(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 99, 31, 100 + (k % MAX_XDP_TUPLES) as u8))
}
/// The reflector's namespace, and the forwarder's address towards it.
pub const HOST_NS: &str = "rbfp-h";
pub const HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 32, 2));
pub const HOST_LINK_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 32, 1));

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip(8) (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The two namespaces and the veth pair; removed on drop.
pub struct Veth(());

impl Veth {
    /// Creates them (removing leftovers of an earlier run first). Needs root.
    pub fn create() -> anyhow::Result<Veth> {
        remove();
        ip(&["netns", "add", FORWARDER_NS]).context("creating network namespaces needs root")?;
        let v = Veth(());
        ip(&["netns", "add", CLIENT_NS])?;
        ip(&["netns", "add", HOST_NS])?;
        for (fdev, peer, peer_ns) in [
            (FORWARDER_IF, "rbfp-c0", CLIENT_NS),
            ("rbfp-f1", "rbfp-h0", HOST_NS),
        ] {
            ip(&[
                "-n",
                FORWARDER_NS,
                "link",
                "add",
                fdev,
                "type",
                "veth",
                "peer",
                "name",
                peer,
                "netns",
                peer_ns,
            ])?;
        }
        let two_cores = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
        let addrs = [
            (
                FORWARDER_NS,
                FORWARDER_IF,
                format!("{FORWARDER_IP}/24"),
                "1",
            ),
            (FORWARDER_NS, "rbfp-f1", format!("{HOST_LINK_IP}/24"), "1"),
            (CLIENT_NS, "rbfp-c0", format!("{CLIENT_IP}/24"), "2"),
            (HOST_NS, "rbfp-h0", format!("{HOST_IP}/24"), "2"),
        ];
        for (ns, dev, addr, rps_mask) in &addrs {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            if two_cores {
                steer(ns, dev, rps_mask)?;
            }
        }
        for k in 0..MAX_XDP_TUPLES {
            let a = format!("{}/24", xdp_tuple_ip(k));
            ip(&["-n", CLIENT_NS, "addr", "add", &a, "dev", "rbfp-c0"])?;
        }
        // The direct (no hop) baseline goes from the generator to the reflector through the
        // forwarder's namespace, routed by its kernel.
        ip(&[
            "-n",
            CLIENT_NS,
            "route",
            "add",
            "10.99.32.0/24",
            "via",
            &FORWARDER_IP.to_string(),
        ])?;
        ip(&[
            "-n",
            HOST_NS,
            "route",
            "add",
            "10.99.31.0/24",
            "via",
            &HOST_LINK_IP.to_string(),
        ])?;
        run_in(FORWARDER_NS, "sysctl -qw net.ipv4.ip_forward=1")?;
        Ok(v)
    }

    /// The path `enter_netns` takes for namespace `name`.
    pub fn path(name: &str) -> String {
        format!("/var/run/netns/{name}")
    }
}

/// Runs `sh -c script` inside namespace `ns` (`ip netns exec` mounts that namespace's
/// sysfs, which the interfaces' RPS masks live in).
fn run_in(ns: &str, script: &str) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", script])
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "in {ns}: {script}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Receive packet steering of `dev`'s queue to the cores in `mask` (hex).
fn steer(ns: &str, dev: &str, mask: &str) -> anyhow::Result<()> {
    run_in(
        ns,
        &format!("echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus"),
    )
}

fn remove() {
    for ns in [FORWARDER_NS, CLIENT_NS, HOST_NS] {
        let _ = ip(&["netns", "del", ns]);
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        remove();
    }
}
