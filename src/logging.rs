//! Log set-up (text or JSON lines on stderr, a filter a reload can change) and rate-limited
//! warnings: a condition that can repeat (a failing disk, a corrupt store) logs at most once
//! per interval, with the count of what it held back.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The filter used when neither `log_level` nor RUST_LOG names one.
pub const DEFAULT_FILTER: &str = "warn,rebindgw=info";

/// How log lines are written.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, fields).
    Json,
}

/// Changes the log filter of the running process.
pub struct LogHandle(reload::Handle<EnvFilter, Registry>);

/// The filter in force: `level` (the config key or flag `log_level`) if given, else RUST_LOG,
/// else [`DEFAULT_FILTER`].
pub fn filter_for(level: Option<&str>) -> Result<EnvFilter, String> {
    let text = match level {
        Some(l) => l.to_string(),
        None => std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_FILTER.to_string()),
    };
    EnvFilter::builder()
        .parse(&text)
        .map_err(|e| format!("bad log filter {text:?}: {e}"))
}

/// Installs the process's logger on stderr. An invalid `level` is an error.
pub fn init(format: LogFormat, level: Option<&str>) -> Result<LogHandle, String> {
    let (filter, handle) = reload::Layer::new(filter_for(level)?);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let done = match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .try_init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true))
            .try_init(),
    };
    done.map_err(|e| format!("installing the logger: {e}"))?;
    Ok(LogHandle(handle))
}

impl LogHandle {
    /// Puts a new filter in force (see [`filter_for`]).
    pub fn set_level(&self, level: Option<&str>) -> Result<(), String> {
        let filter = filter_for(level)?;
        self.0
            .reload(filter)
            .map_err(|e| format!("changing the log filter: {e}"))
    }
}

pub struct LogEvery {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogEvery {
    pub const fn new(every: Duration) -> Self {
        LogEvery {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when this occurrence may be logged, `n` being how many were held back since
    /// the last one logged; `None` (and one more held back) otherwise.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval_with_a_count() {
        let mut l = LogEvery::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check(t0), Some(0));
        assert_eq!(l.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.check(t0 + Duration::from_secs(2)), None);
        assert_eq!(l.check(t0 + Duration::from_secs(11)), Some(2));
    }
}
