//! `rebindgw`: the Mesh rebind gateway and its companions.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use rebindgw::logging::LogFormat;
use rebindgw::time::parse_duration;
use rebindgw::{conformance, engine, gateway, host, secrets};

#[derive(Parser)]
#[command(
    name = "rebindgw",
    version,
    about = "Mesh rebind gateway: one-packet, ID-free UDP connection rebinding"
)]
struct Cli {
    /// Log line format on stderr: text or json (one object per line) [default: text, or the
    /// gateway config's log_format]. RUST_LOG sets the filter (default: warn,rebindgw=info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check every known-answer vector in FILE (the format of tests/data/v1.json).
    Conformance {
        /// The vectors file (JSON, the format of tests/data/v1.json).
        file: PathBuf,
    },
    /// Write a new 32-byte master secret (mode 0600).
    Keygen {
        /// File to create (refused if it exists); the gateway's master_key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the gateway (every config key is also a flag; flags win). SIGHUP reloads.
    Gateway(Box<GatewayArgs>),
    /// Run the reference ECHO host (a test peer, not a real service; see docs/hostlink.md).
    Host(HostArgs),
    /// Add a client to a host's clients file and print its credentials as JSON.
    Enroll {
        /// The host's clients file (created with mode 0600 if missing).
        #[arg(long)]
        clients: PathBuf,
        /// The client's name: unique in the file; letters, digits, '-', '_' and '.'.
        #[arg(long)]
        name: String,
    },
    /// Write a new 16-byte host link key (mode 0600) for a host's link_key_file.
    LinkKeygen {
        /// File to create (refused if it exists); give the same file to the gateway's
        /// hosts entry and to the host.
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
    /// Print a readable summary of a running gateway's metrics (per host, too).
    Stats(gateway::admin::StatsArgs),
    /// Print a shell completion script on stdout (e.g. rebindgw completions bash >
    /// /etc/bash_completion.d/rebindgw).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout (e.g. rebindgw man > rebindgw.1).
    Man,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Gateway fast path against a bare recvmmsg/sendmmsg relay, alternating, plus the RTT
    /// each adds at half load.
    Fastpath {
        /// Echo clients, each with its own socket.
        #[arg(long, default_value_t = 32)]
        clients: usize,
        /// Echo requests each client keeps outstanding.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Payload bytes per echo.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Length of each run (e.g. 3s, 500ms; a plain number is seconds).
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        duration: Duration,
        /// Alternating rounds of relay and gateway runs (the report takes medians).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// I/O backend of the gateway and the relay.
        #[arg(long, default_value = "uring")]
        io: rebindgw::io::IoBackend,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resident memory per connection.
    Memory {
        /// Connections to register.
        #[arg(long, default_value_t = 65_536)]
        connections: usize,
        /// S, slots per key set.
        #[arg(long, default_value_t = 16)]
        slots: usize,
    },
}

#[derive(Clone, clap::Args)]
struct GatewayArgs {
    /// TOML config file; see the README's Configuration section [default: none, every key at
    /// its default].
    #[arg(long, env = "REBINDGW_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration, link key files and master key, print "configuration ok" or the
    /// error, and exit 0 or 1 without starting anything.
    #[arg(long)]
    check: bool,
    /// Client-facing address (repeatable; replaces the key listen) [default: 0.0.0.0:7400 and
    /// [::]:7400].
    #[arg(long)]
    listen: Vec<SocketAddr>,
    /// Host as ADDR=LINK_KEY_FILE (repeatable; replaces the key hosts) [default: none; at
    /// least one is needed].
    #[arg(long = "host", value_parser = gateway::config::parse_host)]
    hosts: Vec<gateway::config::HostEntry>,
    /// Local address of the workers' host-link sockets; must reach every host (port 0: one
    /// ephemeral port per worker) [default: 127.0.0.1:0].
    #[arg(long)]
    host_link: Option<SocketAddr>,
    /// Admin address: Prometheus /metrics and /healthz [default: 127.0.0.1:7480].
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Disable the admin endpoint.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    #[arg(long, help = format!(
        "State directory: the registry and, by default, the master key [default: {}]",
        gateway::config::GatewayConfig::default().state_dir.display()
    ))]
    state_dir: Option<PathBuf>,
    /// Start even if the registry is damaged: move bad records (or an unreadable file) aside.
    #[arg(long)]
    set_aside_corrupt: bool,
    /// Master secret file (rebindgw keygen) [default: STATE_DIR/master.key, created on first
    /// start].
    #[arg(long)]
    master_key: Option<PathBuf>,
    /// S, slots per key set, 1..=32 [default: 16].
    #[arg(long)]
    slots: Option<usize>,
    /// W, the freshness window in seconds [default: 30].
    #[arg(long)]
    window_secs: Option<u64>,
    /// Workers; 0 is one per core [default: 0].
    #[arg(long)]
    workers: Option<usize>,
    /// Connection capacity, reserved at start; 0 is min(2^S, 2^20) [default: 0].
    #[arg(long)]
    max_connections: Option<usize>,
    /// I/O backend: uring or mmsg (uring falls back to mmsg if unusable) [default: uring].
    #[arg(long)]
    io: Option<rebindgw::io::IoBackend>,
    /// UNRECOGNIZED replies per source prefix (/24, /56), PER_SECOND/BURST [default:
    /// 2000/4000].
    #[arg(long, value_parser = gateway::config::parse_rate)]
    unrecognized_per_prefix: Option<gateway::ratelimit::Rate>,
    /// UNRECOGNIZED replies for the whole gateway, PER_SECOND/BURST [default: 200000/100000].
    #[arg(long, value_parser = gateway::config::parse_rate)]
    unrecognized_global: Option<gateway::ratelimit::Rate>,
    /// HANDSHAKEs forwarded per source prefix, PER_SECOND/BURST [default: 200/400].
    #[arg(long, value_parser = gateway::config::parse_rate)]
    handshake_per_prefix: Option<gateway::ratelimit::Rate>,
    /// HANDSHAKEs forwarded for the whole gateway, PER_SECOND/BURST [default: 20000/20000].
    #[arg(long, value_parser = gateway::config::parse_rate)]
    handshake_global: Option<gateway::ratelimit::Rate>,
    /// Log filter, e.g. info or warn,rebindgw=debug; SIGHUP applies a changed config value
    /// [default: RUST_LOG, else warn,rebindgw=info].
    #[arg(long)]
    log_level: Option<String>,
    /// Release connections with no client datagram for this many seconds; 0 never
    /// [default: 900].
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
}

impl GatewayArgs {
    /// The config file (read again on every call) with the flags on top.
    fn to_config(&self) -> anyhow::Result<gateway::config::GatewayConfig> {
        let mut c = match &self.config {
            Some(path) => gateway::config::GatewayConfig::from_file(path)?,
            None => gateway::config::GatewayConfig::default(),
        };
        if !self.listen.is_empty() {
            c.listen = self.listen.clone();
        }
        if !self.hosts.is_empty() {
            c.hosts = self.hosts.clone();
        }
        if self.no_admin {
            c.admin = None;
        }
        if self.set_aside_corrupt {
            c.set_aside_corrupt = true;
        }
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => {
                $(if let Some(v) = self.$field.clone() { $target = v; })*
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
        if let Some(k) = &self.master_key {
            c.master_key = Some(k.clone());
        }
        if let Some(l) = &self.log_level {
            c.log_level = Some(l.clone());
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
    /// The enrolled-clients file (rebindgw enroll).
    #[arg(long)]
    clients: PathBuf,
    /// This host's link key file (rebindgw link-keygen), shared with the gateway.
    #[arg(long)]
    link_key: PathBuf,
    /// Gateway address or network (any port) host-link datagrams may come from
    /// (repeatable; default 127.0.0.0/8 and ::1).
    #[arg(long = "gateway")]
    gateways: Vec<host::GatewayNet>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.log_format;
    if let Command::Gateway(args) = cli.command {
        return gateway_main(*args, format);
    }
    if let Err(e) = rebindgw::logging::init(format.unwrap_or_default(), None) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `rebindgw gateway`: the configuration decides the log format and filter, so it is read
/// before logging starts. `--check` exits 1 on a bad configuration; a failed start exits 2.
fn gateway_main(args: GatewayArgs, format: Option<LogFormat>) -> ExitCode {
    let checked = args
        .to_config()
        .and_then(|cfg| gateway::reload::check(&cfg).map(|()| cfg));
    if args.check {
        return match checked {
            Ok(_) => {
                println!("configuration ok");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = checked.and_then(|cfg| {
        let log =
            rebindgw::logging::init(format.unwrap_or(cfg.log_format), cfg.log_level.as_deref())
                .map_err(anyhow::Error::msg)?;
        gateway::run::run_gateway(cfg, || args.to_config(), Some(&log))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
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
        Command::Gateway(_) => unreachable!("handled by gateway_main"),
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
            let enrolled = rebindgw::host::clients::enroll(&clients, &name)?;
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
                duration,
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
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "rebindgw",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats(args) => {
            print!("{}", gateway::admin::run_stats(&args)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every subcommand, with the path of subcommands that leads to it.
    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        let here = format!("{path} {}", cmd.get_name());
        let about = cmd.get_about().map(|s| s.to_string()).unwrap_or_default()
            + &cmd
                .get_long_about()
                .map(|s| s.to_string())
                .unwrap_or_default();
        if about.contains('`') || about.contains("[`") {
            out.push(format!("{here}: about has rustdoc syntax: {about:?}"));
        }
        if cmd.get_about().is_none() && !path.is_empty() && cmd.get_name() != "help" {
            out.push(format!("{here}: no about text"));
        }
        for arg in cmd.get_arguments() {
            if arg.is_hide_set() {
                continue;
            }
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let help = arg.get_help().map(|s| s.to_string()).unwrap_or_default();
            let long = arg
                .get_long_help()
                .map(|s| s.to_string())
                .unwrap_or_default();
            if help.is_empty() && long.is_empty() {
                out.push(format!("{here} --{id}: no help text"));
            }
            for text in [&help, &long] {
                if text.contains('`') || text.contains("[`") || text.contains("](") {
                    out.push(format!("{here} --{id}: rustdoc syntax in {text:?}"));
                }
            }
            for pv in arg.get_possible_values() {
                let text = pv.get_help().map(|s| s.to_string()).unwrap_or_default();
                if text.contains('`') || text.contains("](") {
                    out.push(format!(
                        "{here} --{id} {}: rustdoc syntax in {text:?}",
                        pv.get_name()
                    ));
                }
            }
            let takes_value = arg.get_action().takes_values();
            if takes_value && !arg.is_required_set() && !arg.is_positional() {
                let has_default = !arg.get_default_values().is_empty();
                let says_default = help.contains("default") || long.contains("default");
                if !has_default && !says_default && !arg.is_hide_default_value_set() {
                    out.push(format!(
                        "{here} --{id}: optional value with no default shown and none described"
                    ));
                }
                if has_default && arg.is_hide_default_value_set() {
                    out.push(format!("{here} --{id}: hides its default"));
                }
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &here, out);
        }
    }

    #[test]
    fn every_flag_has_help_and_shows_its_default() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut problems = Vec::new();
        walk(&cmd, "", &mut problems);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn attack_modes_are_listed_as_possible_values() {
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("loadgen")
            .unwrap()
            .render_long_help()
            .to_string();
        for mode in [
            "garbage",
            "wrong-r",
            "wrong-slot",
            "replay",
            "handshake-flood",
            "all",
        ] {
            assert!(help.contains(mode), "{mode} missing from:\n{help}");
        }
    }

    #[test]
    fn demo_duration_takes_units_like_loadgen() {
        let cli = Cli::try_parse_from(["rebindgw", "demo", "--duration", "10s"]).unwrap();
        let Command::Demo(d) = cli.command else {
            panic!("not demo")
        };
        assert_eq!(d.duration, Duration::from_secs(10));
        let cli = Cli::try_parse_from(["rebindgw", "demo", "--duration", "8"]).unwrap();
        let Command::Demo(d) = cli.command else {
            panic!("not demo")
        };
        assert_eq!(
            d.duration,
            Duration::from_secs(8),
            "plain numbers stay seconds"
        );
    }

    #[test]
    fn stats_admin_accepts_a_host_name() {
        let cli = Cli::try_parse_from(["rebindgw", "stats", "--admin", "localhost:7480"])
            .unwrap_or_else(|e| panic!("{e}"));
        let Command::Stats(args) = cli.command else {
            panic!("not stats")
        };
        let addr = gateway::admin::resolve_admin(&args.admin).unwrap();
        assert_eq!(addr.port(), 7480);
        assert!(addr.ip().is_loopback());
    }
}
