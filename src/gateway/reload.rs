//! `rebindgw gateway --check` and SIGHUP: check a configuration the way a start would (keys,
//! link key files, master key, routes to the hosts), and put in force what a running gateway
//! can change: the hosts (new link keys, hosts appended), the rate limits and the log filter.
//! Everything else is reported as needing a restart.
#![forbid(unsafe_code)]

use anyhow::Context as _;

use super::config::GatewayConfig;
use super::core::{HostPeer, Live, Rates, Shared};
use crate::logging::LogHandle;
use crate::secrets;

/// Whether a reload applies `key` (config.rs declares this with each key).
pub fn reloadable(key: &str) -> bool {
    GatewayConfig::KEYS.iter().any(|k| k.live && k.name == key)
}

/// Reads each host's link key; the error names the key and the host.
pub fn load_hosts(cfg: &GatewayConfig) -> anyhow::Result<Vec<HostPeer>> {
    cfg.hosts
        .iter()
        .map(|h| {
            let key = secrets::load_link_key(&h.link_key_file).with_context(|| {
                format!(
                    "host {} (config key `hosts`, link_key_file {})",
                    h.addr,
                    h.link_key_file.display()
                )
            })?;
            Ok(HostPeer::new(h.addr, &key))
        })
        .collect()
}

/// Everything a start checks before it binds or writes anything: the keys, a route from
/// `host_link` to every host, the link key files and an existing master key.
pub fn check(cfg: &GatewayConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    cfg.probe_host_routes()?;
    load_hosts(cfg)?;
    let master = cfg.master_key_path();
    if master.exists() {
        secrets::load_master(&master).with_context(|| {
            format!("master key {} (config key `master_key`)", master.display())
        })?;
    } else if cfg.master_key.is_some() {
        anyhow::bail!(
            "config key `master_key`: {} does not exist; create it with `rebindgw keygen --out {}`",
            master.display(),
            master.display()
        );
    }
    Ok(())
}

/// What a reload did.
#[derive(Debug, Default, PartialEq)]
pub struct Reloaded {
    /// Keys whose new values are in force.
    pub applied: Vec<String>,
    /// Keys that changed in the file but keep their running values until a restart.
    pub need_restart: Vec<String>,
}

fn rates(cfg: &GatewayConfig) -> Rates {
    let c = cfg.core();
    c.rates()
}

/// Puts `new` in force where a running gateway can, and records in `running` what is now in
/// force. Nothing changes when `new` fails its checks.
pub fn apply(
    shared: &Shared,
    running: &mut GatewayConfig,
    new: GatewayConfig,
    log: Option<&LogHandle>,
) -> anyhow::Result<Reloaded> {
    check(&new)?;
    let mut done = Reloaded::default();

    let old_addrs: Vec<_> = running.hosts.iter().map(|h| h.addr).collect();
    let new_addrs: Vec<_> = new.hosts.iter().map(|h| h.addr).collect();
    if !new_addrs.starts_with(&old_addrs) {
        anyhow::bail!(
            "config key `hosts`: a reload may change link keys and append hosts, but removing \
             or reordering hosts needs a restart (connections name their host by position); \
             running {old_addrs:?}, file {new_addrs:?}"
        );
    }
    let hosts = load_hosts(&new)?;
    if let (Some(log), true) = (log, new.log_level != running.log_level) {
        log.set_level(new.log_level.as_deref())
            .map_err(|e| anyhow::anyhow!("config key `log_level`: {e}"))?;
        done.applied.push("log_level".into());
    }
    // Link key files may have new contents under the same names, so hosts always apply.
    if new.hosts != running.hosts {
        done.applied.push("hosts".into());
    }
    if new.rate_limits != running.rate_limits {
        done.applied.push("rate_limits".into());
    }
    shared.set_live(Live {
        hosts,
        rates: rates(&new),
    });
    running.hosts = new.hosts.clone();
    running.rate_limits = new.rate_limits.clone();
    if log.is_some() {
        running.log_level = new.log_level.clone();
    }

    // Every other key that differs keeps its running value.
    let table = |c: &GatewayConfig| match toml::Table::try_from(c) {
        Ok(t) => t,
        Err(_) => toml::Table::new(),
    };
    let (old, new) = (table(running), table(&new));
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        if !reloadable(k) && old.get(k) != new.get(k) {
            done.need_restart.push(k.clone());
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Backend, TrialKeys};
    use crate::gateway::config::HostEntry;
    use crate::gateway::core::{CoreConfig, EpochCrypto};
    use crate::gateway::ratelimit::Rate;
    use crate::keys::{EpochKeys, MasterSecret};

    fn temp_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "rebindgw-reload-{}-{}",
            std::process::id(),
            hex::encode(crate::crypto::random_array::<4>())
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn applies_hosts_and_rates_and_names_what_needs_a_restart() {
        let dir = temp_dir();
        let k1 = dir.join("h1.key");
        let k2 = dir.join("h2.key");
        secrets::generate_link_key(&k1).unwrap();
        secrets::generate_link_key(&k2).unwrap();
        let mut running = GatewayConfig {
            hosts: vec![HostEntry {
                addr: "127.0.0.1:7500".parse().unwrap(),
                link_key_file: k1.clone(),
            }],
            state_dir: dir.join("state"),
            ..GatewayConfig::default()
        };
        let keys = EpochKeys::derive(&MasterSecret::from_bytes([1; 32]), 1, 4).unwrap();
        let trial = TrialKeys::new(Backend::Portable, keys.slot_key_pairs()).unwrap();
        let shared = Shared::new(
            CoreConfig::new(4),
            EpochCrypto { keys, trial },
            load_hosts(&running).unwrap(),
            None,
        );

        let mut new = running.clone();
        new.hosts.push(HostEntry {
            addr: "127.0.0.1:7501".parse().unwrap(),
            link_key_file: k2,
        });
        new.rate_limits.handshake_global = Rate::new(7.0, 9.0);
        new.slots = 12;
        let done = apply(&shared, &mut running, new.clone(), None).unwrap();
        assert_eq!(done.applied, ["hosts", "rate_limits"]);
        assert_eq!(done.need_restart, ["slots"]);
        let live = shared.live();
        assert_eq!(live.hosts.len(), 2);
        assert_eq!(live.rates.handshake_global, Rate::new(7.0, 9.0));
        assert_eq!(running.slots, 16, "slots keeps its running value");

        // Removing a host is refused, and nothing changes.
        let mut bad = new.clone();
        bad.hosts.remove(0);
        bad.rate_limits.handshake_global = Rate::new(1.0, 1.0);
        let err = apply(&shared, &mut running, bad, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`hosts`"), "{err}");
        assert_eq!(shared.live().rates.handshake_global, Rate::new(7.0, 9.0));

        // A config that fails its checks changes nothing either.
        let mut bad = new;
        bad.rate_limits.handshake_global = Rate::new(-1.0, 1.0);
        assert!(apply(&shared, &mut running, bad, None).is_err());
        assert_eq!(shared.live().rates.handshake_global, Rate::new(7.0, 9.0));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_reloadable_keys_are_the_ones_apply_puts_in_force() {
        let live: Vec<_> = GatewayConfig::KEYS
            .iter()
            .filter(|k| k.live)
            .map(|k| k.name)
            .collect();
        assert_eq!(live, ["hosts", "log_level", "rate_limits"]);
        assert!(!reloadable("slots"));
    }
}
