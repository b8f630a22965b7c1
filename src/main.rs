//! `rebindgw`: the Mesh rebind gateway and its companions.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use rebindgw::{conformance, engine, gateway, host, secrets};

#[derive(Parser)]
#[command(
    name = "rebindgw",
    version,
    about = "Mesh rebind gateway: one-packet, ID-free UDP connection rebinding"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every known-answer vector in FILE (the format of tests/data/v1.json).
    Conformance { file: PathBuf },
    /// Write a new 32-byte master secret (mode 0600).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the gateway (every config key is also a flag; flags win).
    Gateway(Box<GatewayArgs>),
    /// Run the reference echo host.
    Host(HostArgs),
    /// Add a client to a host's clients file and print its credentials as JSON.
    Enroll {
        /// The host's clients file (created with mode 0600 if missing).
        #[arg(long)]
        clients: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Write a new 16-byte host link key (mode 0600) for `[[hosts]] link_key_file`.
    LinkKeygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Gateway, echo host and load generator on loopback with embedded defaults.
    Demo(rebindgw::demo::DemoArgs),
    /// Load-test a gateway with many clients, NAT churn and attacks.
    Loadgen(Box<rebindgw::loadgen::LoadgenArgs>),
    /// System benchmarks (see perf/RESULTS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a readable summary of a running gateway's metrics.
    Stats {
        /// The gateway's admin address.
        #[arg(long, default_value = "127.0.0.1:7480")]
        admin: SocketAddr,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Gateway fast path against a bare recvmmsg/sendmmsg relay, alternating, plus the RTT
    /// each adds at half load.
    Fastpath {
        #[arg(long, default_value_t = 32)]
        clients: usize,
        #[arg(long, default_value_t = 8)]
        window: usize,
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 3)]
        duration: u64,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value = "uring")]
        io: rebindgw::io::IoBackend,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resident memory per connection.
    Memory {
        #[arg(long, default_value_t = 65_536)]
        connections: usize,
        #[arg(long, default_value_t = 16)]
        slots: usize,
    },
}

#[derive(clap::Args)]
struct GatewayArgs {
    /// TOML config file; see README "Configuration".
    #[arg(long, env = "REBINDGW_CONFIG")]
    config: Option<PathBuf>,
    /// Client-facing address (repeatable; replaces `listen`).
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Host as ADDR=LINK_KEY_FILE (repeatable; replaces `hosts`).
    #[arg(long = "host", value_parser = gateway::config::parse_host)]
    hosts: Vec<gateway::config::HostEntry>,
    /// Local address of the workers' host-link sockets.
    #[arg(long)]
    host_link: Option<SocketAddr>,
    /// Admin (metrics) address.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Disable the admin endpoint.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    master_key: Option<PathBuf>,
    /// S, slots per key set (1..=32).
    #[arg(long)]
    slots: Option<usize>,
    /// W, the freshness window in seconds.
    #[arg(long)]
    window_secs: Option<u64>,
    /// Workers (0: one per core).
    #[arg(long)]
    workers: Option<usize>,
    #[arg(long)]
    max_connections: Option<usize>,
    /// I/O backend: uring or mmsg.
    #[arg(long)]
    io: Option<rebindgw::io::IoBackend>,
    /// UNRECOGNIZED per source prefix, PER_SECOND/BURST.
    #[arg(long, value_parser = gateway::config::parse_rate)]
    unrecognized_per_prefix: Option<gateway::ratelimit::Rate>,
    #[arg(long, value_parser = gateway::config::parse_rate)]
    unrecognized_global: Option<gateway::ratelimit::Rate>,
    #[arg(long, value_parser = gateway::config::parse_rate)]
    handshake_per_prefix: Option<gateway::ratelimit::Rate>,
    #[arg(long, value_parser = gateway::config::parse_rate)]
    handshake_global: Option<gateway::ratelimit::Rate>,
    /// Release connections idle this many seconds (0: never).
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
}

impl GatewayArgs {
    fn into_config(self) -> anyhow::Result<gateway::config::GatewayConfig> {
        let mut c = match &self.config {
            Some(path) => gateway::config::GatewayConfig::from_file(path)?,
            None => gateway::config::GatewayConfig::default(),
        };
        if !self.listen.is_empty() {
            c.listen = self.listen;
        }
        if !self.hosts.is_empty() {
            c.hosts = self.hosts;
        }
        if self.no_admin {
            c.admin = None;
        }
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => {
                $(if let Some(v) = self.$field { $target = v; })*
            };
        }
        set! {
            host_link => c.host_link,
            state_dir => c.state_dir,
            slots => c.slots,
            window_secs => c.window_secs,
            workers => c.workers,
            max_connections => c.max_connections,
            io => c.io,
            unrecognized_per_prefix => c.rate_limits.unrecognized_per_prefix,
            unrecognized_global => c.rate_limits.unrecognized_global,
            handshake_per_prefix => c.rate_limits.handshake_per_prefix,
            handshake_global => c.rate_limits.handshake_global,
            idle_timeout_secs => c.idle_timeout_secs,
        }
        if let Some(a) = self.admin {
            c.admin = Some(a);
        }
        if let Some(k) = self.master_key {
            c.master_key = Some(k);
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(clap::Args)]
struct HostArgs {
    /// Host-link address the gateway sends to.
    #[arg(long, default_value = "127.0.0.1:7500")]
    listen: SocketAddr,
    /// The enrolled-clients file (`rebindgw enroll`).
    #[arg(long)]
    clients: PathBuf,
    /// This host's link key file (`rebindgw link-keygen`), shared with the gateway.
    #[arg(long)]
    link_key: PathBuf,
    /// Gateway address or network (any port) host-link datagrams may come from
    /// (repeatable; default 127.0.0.0/8 and ::1).
    #[arg(long = "gateway")]
    gateways: Vec<host::GatewayNet>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rebindgw=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Conformance { file } => {
            let backend = engine::backend_from_env()?;
            let report = conformance::check_file(&file, backend)?;
            for f in &report.failures {
                println!("FAIL {f}");
            }
            println!("{} passed, {} failed", report.passed, report.failed());
            Ok(if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Keygen { out } => {
            secrets::generate_master(&out)?;
            println!("wrote a new master secret to {} (mode 0600)", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Gateway(args) => {
            gateway::run::run_gateway(args.into_config()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Host(args) => {
            let key = secrets::load_link_key(&args.link_key)?;
            let mut opts = host::HostOptions::new(args.listen, args.clients, key);
            if !args.gateways.is_empty() {
                opts.config.gateways = args.gateways;
            }
            let shutdown = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, shutdown.clone())?;
            }
            let stats = host::run_host(opts, shutdown)?;
            eprintln!("{}", serde_json::to_string(&stats)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Enroll { clients, name } => {
            let enrolled = rebindgw::clients::enroll(&clients, &name)?;
            println!("{}", serde_json::to_string(&enrolled)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::LinkKeygen { out } => {
            secrets::generate_link_key(&out)?;
            println!("wrote a new host link key to {} (mode 0600)", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            let report = rebindgw::demo::run_demo(&args)?;
            println!("{}", report.to_human());
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Loadgen(args) => Ok(if rebindgw::loadgen::run_cli(*args)? {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }),
        Command::Bench(BenchCommand::Fastpath {
            clients,
            window,
            payload,
            duration,
            rounds,
            io,
            json,
        }) => {
            let opts = rebindgw::bench::fastpath::FastpathOptions {
                clients,
                window,
                payload,
                duration: Duration::from_secs(duration),
                rounds,
                io,
            };
            let r = rebindgw::bench::fastpath::run_fastpath(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "saturating echo rate, medians of {rounds}: bare relay {:.0}/s, gateway {:.0}/s, ratio {:.3}",
                    r.relay_median_eps, r.gateway_median_eps, r.ratio
                );
                println!(
                    "at half load ({}/s): p99 added over direct: gateway {} us, bare relay {} us",
                    r.half_load_rate, r.gateway_added_p99_us, r.relay_added_p99_us
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Memory { connections, slots }) => {
            let r = rebindgw::bench::memory::measure(connections, slots)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats { admin } => {
            let text = gateway::admin::fetch_metrics(admin, Duration::from_secs(3))?;
            print!("{}", gateway::admin::summarize(&text));
            Ok(ExitCode::SUCCESS)
        }
    }
}
