//! `rebindgw`: the Mesh rebind gateway and its companions.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use rebindgw::logging::LogFormat;
use rebindgw::time::parse_duration;
use rebindgw::{engine, gateway, host, secrets, tunnel};
use rebindgw_tools::conformance;

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
    /// Run a host: the reference ECHO host (a test peer; see docs/hostlink.md), or with
    /// --forward or --services a forwarder to real UDP services (docs/tunnel.md).
    Host(HostArgs),
    /// Carry local applications' UDP datagrams to a host's service over a Mesh connection
    /// (docs/tunnel.md): listen on --local, follow network changes, print state changes.
    Connect(ConnectArgs),
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
    Demo(rebindgw_tools::demo::DemoArgs),
    /// Load-test a gateway with many clients, NAT churn and attacks.
    Loadgen(Box<rebindgw_tools::loadgen::LoadgenArgs>),
    /// System benchmarks (see perf/RESULTS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Print a readable summary of a running gateway's metrics (per host, too).
    Stats(gateway::admin::StatsArgs),
    /// Start a new key epoch on a running gateway now (authenticated with its admin key).
    Rotate(gateway::rotate::RotateArgs),
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
    /// Gateway fast path against a bare recvmmsg/sendmmsg relay and nginx's stream UDP proxy,
    /// in rotating order, plus the RTT each adds at half load.
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
        /// Rounds of relay, gateway and nginx runs in rotating order (the report takes medians).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// I/O backends to run the gateway and the relay on, comma-separated (uring, mmsg,
        /// xdp); the first is the headline and the half-load runs'. xdp implies --netns.
        #[arg(long, default_value = "uring", value_delimiter = ',')]
        io: Vec<rebindgw::io::IoBackend>,
        /// Leave out nginx (measured by default when installed; REBINDGW_NGINX names the binary).
        #[arg(long)]
        no_nginx: bool,
        /// Run every path over a veth pair between two network namespaces (rbfp-f: forwarder
        /// and reflector; rbfp-c: the generator) instead of loopback. Needs root.
        #[arg(long)]
        netns: bool,
        /// How the xdp backend attaches: auto (native, else skb), native or skb.
        #[arg(long, default_value = "auto")]
        xdp_mode: rebindgw::io::xdp::XdpMode,
        /// The load generator and the reflector on AF_XDP (generic mode) instead of kernel
        /// sockets, so their core is not the bottleneck; implies --netns; at most 64 clients.
        #[arg(long)]
        xdp_generator: bool,
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
    /// Disable the admin endpoint.
    #[arg(long, conflicts_with = "admin")]
    no_admin: bool,
    /// Every config key but log_format (gateway::config declares each once).
    #[command(flatten)]
    keys: gateway::config::GatewayFlags,
}

impl GatewayArgs {
    /// The config file (read again on every call) with the flags on top.
    fn to_config(&self) -> anyhow::Result<gateway::config::GatewayConfig> {
        let mut c = match &self.config {
            Some(path) => gateway::config::GatewayConfig::from_file(path)?,
            None => gateway::config::GatewayConfig::default(),
        };
        self.keys.apply_to(&mut c);
        if self.no_admin {
            c.admin = None;
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
    #[arg(long = "gateway", help = format!(
        "Gateway address or network (any port) host-link datagrams may come from (repeatable) \
         [default: {}]",
        host::HostConfig::default()
            .gateways
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" and "),
    ))]
    gateways: Vec<host::GatewayNet>,
    /// Forward client flows to this UDP service, as NAME=ADDR or ADDR (repeatable: the
    /// first is service 0, the next 1, ...) instead of echoing [default: none, echo host].
    #[arg(long = "forward", value_name = "[NAME=]ADDR")]
    forward: Vec<tunnel::Service>,
    /// A TOML file naming several services ([[service]] name, backend), after any --forward
    /// [default: none].
    #[arg(long, value_name = "FILE")]
    services: Option<PathBuf>,
    /// Forwarding: a flow unused this long is closed with its backend socket.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    flow_idle: Duration,
    /// Forwarding: flows one client connection may hold.
    #[arg(long, default_value_t = 1024)]
    max_flows_per_client: usize,
    /// Forwarding: bytes toward backends one client connection may have in flight.
    #[arg(long, default_value_t = 1 << 20)]
    max_bytes_in_flight: usize,
}

#[derive(clap::Args)]
struct ConnectArgs {
    /// The gateway's client address.
    #[arg(long)]
    gateway: SocketAddr,
    /// The credentials file: the JSON that rebindgw enroll prints.
    #[arg(long)]
    credentials: PathBuf,
    /// Local UDP address applications send to (their answers come back from it).
    #[arg(long)]
    local: SocketAddr,
    /// The host service to reach: its index in the host's --forward / services list.
    #[arg(long, default_value_t = 0)]
    service: u8,
    /// Print state changes as JSON objects, one per line, on stdout.
    #[arg(long)]
    json: bool,
    /// Handshake again after this many rebind tries without an ACK.
    #[arg(long, default_value_t = 5)]
    rebind_tries: u64,
    /// A local application flow unused this long is forgotten.
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    flow_idle: Duration,
    /// Local application flows (source addresses) at once.
    #[arg(long, default_value_t = 4096)]
    max_flows: usize,
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
        Command::Host(args) if !args.forward.is_empty() || args.services.is_some() => {
            forward_main(args)
        }
        Command::Connect(args) => connect_main(args),
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
            let report = rebindgw_tools::demo::run_demo(&args)?;
            println!("{}", report.to_human());
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Loadgen(args) => Ok(if rebindgw_tools::loadgen::run_cli(*args)? {
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
            no_nginx,
            netns,
            xdp_mode,
            xdp_generator,
            json,
        }) => {
            let opts = rebindgw_tools::bench::fastpath::FastpathOptions {
                clients,
                window,
                payload,
                duration,
                rounds,
                io,
                nginx: !no_nginx,
                netns,
                xdp_mode,
                xdp_generator,
            };
            let r = rebindgw_tools::bench::fastpath::run_fastpath(&opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for b in &r.backends {
                    println!(
                        "saturating echo rate on {}, medians of {rounds}: bare relay {:.0}/s, gateway {:.0}/s, ratio {:.3}",
                        b.io, b.relay_median_eps, b.gateway_median_eps, b.ratio
                    );
                }
                match (r.nginx_median_eps, r.ratio_vs_nginx, &r.nginx_skipped) {
                    (Some(n), Some(ratio), _) => {
                        println!("nginx stream UDP proxy {n:.0}/s, gateway / nginx {ratio:.3}")
                    }
                    (_, _, Some(why)) => println!("nginx not measured: {why}"),
                    _ => {}
                }
                println!(
                    "at half load ({}/s): p99 added over direct: gateway {} us, bare relay {} us{}",
                    r.half_load_rate,
                    r.gateway_added_p99_us,
                    r.relay_added_p99_us,
                    r.nginx_added_p99_us
                        .map_or(String::new(), |n| format!(", nginx {n} us"))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Memory { connections, slots }) => {
            let r = rebindgw_tools::bench::memory::measure(connections, slots)?;
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
        Command::Rotate(args) => {
            print!("{}", gateway::rotate::run_rotate(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Stats(args) => {
            print!("{}", gateway::admin::run_stats(&args)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Stops on SIGINT or SIGTERM.
fn shutdown_on_signals() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let shutdown = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, shutdown.clone())?;
    }
    Ok(shutdown)
}

/// `rebindgw host --forward`: the forwarding host; its counters go to stderr as JSON at exit.
fn forward_main(args: HostArgs) -> anyhow::Result<ExitCode> {
    let key = secrets::load_link_key(&args.link_key)?;
    let mut services = args.forward;
    if let Some(file) = &args.services {
        services.extend(tunnel::run::load_services(file)?);
    }
    anyhow::ensure!(services.len() <= 256, "at most 256 services");
    let cfg = tunnel::TunnelHostConfig {
        services,
        flow_idle: args.flow_idle,
        max_flows_per_client: args.max_flows_per_client,
        max_bytes_in_flight: args.max_bytes_in_flight,
        ..tunnel::TunnelHostConfig::default()
    };
    let mut opts = tunnel::run::ForwardOptions::new(args.listen, args.clients, key, cfg);
    if !args.gateways.is_empty() {
        opts.host.gateways = args.gateways;
    }
    let shutdown = shutdown_on_signals()?;
    let host = tunnel::run::ForwardHost::bind(opts)?;
    let stats = host.run(&shutdown)?;
    eprintln!("{}", serde_json::to_string(&stats)?);
    Ok(ExitCode::SUCCESS)
}

/// `rebindgw connect`: state changes on stdout (lines, or JSON with --json); its counters go
/// to stderr as JSON at exit.
fn connect_main(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write as _;
    let creds = tunnel::run::load_credentials(&args.credentials)?;
    let mut opts = tunnel::run::ConnectOptions::new(args.gateway, creds, args.local);
    opts.tunnel.service = args.service;
    opts.tunnel.flow_idle = args.flow_idle;
    opts.tunnel.max_flows = args.max_flows;
    opts.rebind_tries = args.rebind_tries;
    let shutdown = shutdown_on_signals()?;
    let connector = tunnel::run::Connector::bind(opts)?;
    if !args.json {
        println!(
            "listening on {} for applications, gateway {}",
            connector.local_addr()?,
            args.gateway
        );
    }
    let start = std::time::Instant::now();
    let json = args.json;
    let stats = connector.run(&shutdown, |e| {
        let mut out = std::io::stdout().lock();
        let t = start.elapsed().as_secs_f64();
        let _ = if json {
            let mut v = serde_json::to_value(e).unwrap_or_default();
            v["t"] = serde_json::json!((t * 1e3).round() / 1e3);
            let unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            v["unix"] = serde_json::json!((unix * 1e6).round() / 1e6);
            writeln!(out, "{v}")
        } else {
            writeln!(out, "[{t:9.3}s] {e}")
        };
        let _ = out.flush();
    })?;
    eprintln!("{}", serde_json::to_string(&stats)?);
    Ok(ExitCode::SUCCESS)
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

    /// The default each gateway flag's help shows is GatewayConfig::default()'s: given as the
    /// flag, it yields the default config.
    #[test]
    fn gateway_help_shows_the_config_defaults() {
        use gateway::config::{GatewayConfig, GatewayFlags};
        let mut cli = Cli::command();
        let cmd = cli.find_subcommand_mut("gateway").unwrap();
        let shown = GatewayFlags::shown_defaults();
        assert_eq!(shown.len(), 28, "every key but log_format has a flag");
        for (id, default) in shown {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("no flag {id}"));
            let help = arg.get_help().unwrap().to_string();
            let long = arg.get_long().unwrap();
            let Some(default) = default else {
                assert!(!help.contains("[default:"), "--{long}: {help}");
                assert!(!arg.get_action().takes_values(), "--{long} takes a value");
                continue;
            };
            assert!(
                help.ends_with(&format!("[default: {}]", default.text)),
                "--{long}: {help}"
            );
            if !default.literal {
                continue;
            }
            let mut argv = vec!["rebindgw".to_string(), "gateway".into()];
            for value in default.text.split(" and ") {
                argv.extend([format!("--{long}"), value.into()]);
            }
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            let Command::Gateway(args) = cli.command else {
                panic!("not gateway")
            };
            assert_ne!(
                format!("{:?}", args.keys),
                format!("{:?}", GatewayFlags::default()),
                "--{long} was not taken"
            );
            let mut c = GatewayConfig::default();
            args.keys.apply_to(&mut c);
            assert_eq!(c, GatewayConfig::default(), "--{long} {}", default.text);
        }
    }

    /// The default the host's --gateway help shows is HostConfig::default()'s.
    #[test]
    fn host_gateway_help_shows_the_host_default() {
        let mut cli = Cli::command();
        let cmd = cli.find_subcommand_mut("host").unwrap();
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_id() == "gateways")
            .unwrap();
        let help = arg.get_help().unwrap().to_string();
        let shown = help
            .split_once("[default: ")
            .and_then(|(_, d)| d.strip_suffix(']'))
            .unwrap_or_else(|| panic!("{help}"));
        let mut argv = vec!["rebindgw", "host", "--clients", "c", "--link-key", "k"];
        for net in shown.split(" and ") {
            argv.extend(["--gateway", net]);
        }
        let Command::Host(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not host")
        };
        assert_eq!(args.gateways, host::HostConfig::default().gateways);
    }

    #[test]
    fn flags_win_over_the_file_and_leave_the_rest() {
        let dir = std::env::temp_dir().join(format!("rebindgw-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gw.toml");
        std::fs::write(
            &file,
            "slots = 12\nwindow_secs = 10\nset_aside_corrupt = true\n\
             [[hosts]]\naddr = \"127.0.0.1:7500\"\nlink_key_file = \"k\"\n\
             [rate_limits]\nhandshake_global = { per_second = 5.0, burst = 6.0 }\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "rebindgw",
            "gateway",
            "--config",
            file.to_str().unwrap(),
            "--slots",
            "8",
            "--unrecognized-global",
            "7/9",
            "--no-admin",
            "--master-key",
            "/m.key",
        ])
        .unwrap();
        let Command::Gateway(args) = cli.command else {
            panic!("not gateway")
        };
        let c = args.to_config().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let r = &c.rate_limits;
        assert_eq!(c.slots, 8, "the flag wins");
        assert_eq!(c.window_secs, 10, "the file's value stays");
        assert!(c.set_aside_corrupt);
        assert_eq!(c.hosts.len(), 1);
        assert_eq!(c.admin, None);
        assert_eq!(c.master_key, Some(PathBuf::from("/m.key")));
        assert_eq!(
            r.unrecognized_global,
            gateway::ratelimit::Rate::new(7.0, 9.0)
        );
        assert_eq!(r.handshake_global, gateway::ratelimit::Rate::new(5.0, 6.0));
        let d = gateway::config::RateLimits::default();
        assert_eq!(r.handshake_per_prefix, d.handshake_per_prefix);
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
