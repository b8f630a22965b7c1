//! The text parsers an operator feeds the binary: the clients file (`ClientsFile::parse`),
//! the gateway config (`GatewayConfig::from_toml`, then `validate` and `core`), the
//! `--rate` and `--host` flag parsers, and the metrics text parser. None may panic.
//!
//! Input: byte 0 picks the parser; the rest must be UTF-8.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rebindgw::gateway::config::{GatewayConfig, parse_host, parse_rate};
use rebindgw::gateway::metrics::parse_text;
use rebindgw::host::clients::ClientsFile;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match sel % 5 {
        0 => {
            if let Ok(f) = ClientsFile::parse(text, Path::new("clients.toml")) {
                for e in f.iter() {
                    assert!(f.get(&e.creds.client_id).is_some());
                    assert!(f.contains_name(&e.name));
                }
            }
        }
        1 => {
            if let Ok(c) = GatewayConfig::from_toml(text)
                && c.validate().is_ok()
            {
                let core = c.core();
                assert!((1..=32).contains(&core.slots));
                assert!(core.max_connections as u64 <= 1u64 << core.slots);
                let _ = c.master_key_path();
            }
        }
        2 => {
            if let Ok(r) = parse_rate(text) {
                let _ = r.share(3);
            }
        }
        3 => {
            let _ = parse_host(text);
        }
        _ => {
            let _ = parse_text(text);
        }
    }
});
