//! `rebindgw demo`: a gateway, a reference echo host and the load generator on loopback,
//! with embedded defaults (temporary state, generated secrets), NAT churn, one NAT-reboot
//! storm and every attack mode at a low rate. Prints live progress and the final report.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::loadgen::{self, LoadReport, LoadgenOptions, options::AttackMode};
use rebindgw::gateway::config::{GatewayConfig, HostEntry};
use rebindgw::gateway::run::spawn_gateway;
use rebindgw::host::{HostOptions, spawn_host};

#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Length of the traffic phase (e.g. 20s, 1m; a plain number is seconds).
    #[arg(long, default_value = "20s", value_parser = rebindgw::time::parse_duration)]
    pub duration: Duration,
    /// Clients, each with its own source tuple on 127.0.0.0/8.
    #[arg(long, default_value_t = 300)]
    pub clients: usize,
    /// NAT moves per second (random clients move to a new tuple).
    #[arg(long, default_value_t = 20.0)]
    pub churn_per_sec: f64,
    /// Total DATA packets per second.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the demo; returns the load report (the caller exits non-zero when it failed).
pub fn run_demo(args: &DemoArgs) -> anyhow::Result<LoadReport> {
    let dir = TempDir(std::env::temp_dir().join(format!(
        "rebindgw-demo-{}-{}",
        std::process::id(),
        hex::encode(rebindgw::crypto::random_array::<4>())
    )));
    std::fs::create_dir_all(&dir.0).context("creating the demo's temporary directory")?;
    let key_file = dir.0.join("host.key");
    let link_key = rebindgw::secrets::generate_link_key(&key_file)?;
    let clients_file = dir.0.join("clients.toml");
    rebindgw::host::clients::enroll(&clients_file, "demo-first")?;

    let host = spawn_host(HostOptions::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        clients_file.clone(),
        link_key,
    ))?;
    let gateway = spawn_gateway(GatewayConfig {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        hosts: vec![HostEntry {
            addr: host.local_addr(),
            link_key_file: key_file,
        }],
        admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        state_dir: dir.0.join("state"),
        ..GatewayConfig::default()
    })?;
    eprintln!(
        "demo: gateway on {} (io {}, engine {}, metrics http://{}/metrics), echo host on {}",
        gateway.client_addrs()[0],
        gateway.io_backend().name(),
        gateway.engine_backend().name(),
        gateway.admin_addr().map_or("-".into(), |a| a.to_string()),
        host.local_addr()
    );
    eprintln!(
        "demo: {} clients for {:?} at {} pkt/s, {} NAT moves/s, a NAT reboot (all clients move) at {:?}, and attacks",
        args.clients,
        args.duration,
        args.rate,
        args.churn_per_sec,
        args.duration / 2
    );

    let mut opts = LoadgenOptions::new(gateway.client_addrs().to_vec());
    opts.clients = args.clients;
    opts.duration = args.duration;
    opts.load = loadgen::options::LoadMode::Open { rate: args.rate };
    opts.churn_per_sec = args.churn_per_sec;
    opts.storm_at = Some(args.duration / 2);
    opts.attacks = AttackMode::ALL.to_vec();
    opts.attack_rate = 50.0;
    opts.clients_file = Some(clients_file);
    let report = loadgen::run_with(opts, gateway.client_addrs(), true);

    if let Some(admin) = gateway.admin_addr()
        && let Ok(text) = rebindgw::gateway::admin::fetch_metrics(admin, Duration::from_secs(2))
    {
        eprintln!(
            "\ngateway metrics (rebindgw stats):\n{}",
            rebindgw::gateway::admin::summarize(&text)
        );
    }
    gateway.stop()?;
    host.stop()?;
    report
}
