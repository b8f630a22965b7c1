//! `rebindgw`: the Mesh rebind gateway and its companions.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use rebindgw::{conformance, engine, gateway, secrets};

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
    /// Print a readable summary of a running gateway's metrics.
    Stats {
        /// The gateway's admin address.
        #[arg(long, default_value = "127.0.0.1:7480")]
        admin: SocketAddr,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rebindgw=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
        Command::Stats { admin } => {
            let text = gateway::admin::fetch_metrics(admin, Duration::from_secs(3))?;
            print!("{}", gateway::admin::summarize(&text));
            Ok(ExitCode::SUCCESS)
        }
    }
}
