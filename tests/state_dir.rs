//! Gateway start-up and its state directory: one gateway per state directory and port,
//! nothing created when the configuration or a key is bad, private files, damaged registries.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rebindgw::crypto;
use rebindgw::gateway::config::{GatewayConfig, HostEntry};
use rebindgw::gateway::run::spawn_gateway;
use rebindgw::secrets::generate_link_key;

struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let d = std::env::temp_dir().join(format!(
            "rebindgw-statedir-{}-{}",
            std::process::id(),
            hex::encode(crypto::random_array::<6>())
        ));
        std::fs::create_dir_all(&d).unwrap();
        generate_link_key(&d.join("host.key")).unwrap();
        Dir(d)
    }

    fn config(&self, state: &str, listen: &str) -> GatewayConfig {
        GatewayConfig {
            listen: vec![listen.parse().unwrap()],
            hosts: vec![HostEntry {
                addr: "127.0.0.1:9".parse().unwrap(),
                link_key_file: self.0.join("host.key"),
            }],
            admin: None,
            state_dir: self.0.join(state),
            slots: 8,
            workers: 1,
            io: rebindgw::io::IoBackend::Mmsg,
            ..GatewayConfig::default()
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_second_gateway_on_the_same_state_dir_refuses_to_start() {
    let d = Dir::new();
    let first = spawn_gateway(d.config("state", "127.0.0.1:0")).unwrap();
    let err = match spawn_gateway(d.config("state", "127.0.0.1:0")) {
        Ok(_) => panic!("a second gateway started on the same state directory"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("in use by another gateway") && err.contains("state"),
        "{err}"
    );
    first.stop().unwrap();
    // Stopped, the directory is free again.
    spawn_gateway(d.config("state", "127.0.0.1:0"))
        .unwrap()
        .stop()
        .unwrap();
}

#[test]
fn a_second_gateway_on_the_same_port_refuses_to_start() {
    let d = Dir::new();
    let first = spawn_gateway(d.config("state1", "127.0.0.1:0")).unwrap();
    let port = first.client_addrs()[0].port();
    let err = match spawn_gateway(d.config("state2", &format!("127.0.0.1:{port}"))) {
        Ok(_) => panic!("a second gateway started on port {port}, splitting its clients"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("already") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    first.stop().unwrap();
}

#[test]
fn bad_keys_leave_no_state_dir_behind() {
    let d = Dir::new();
    std::fs::write(d.0.join("bad.key"), "abcd\n").unwrap();
    std::fs::set_permissions(d.0.join("bad.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cfg = d.config("state", "127.0.0.1:0");
    cfg.hosts[0].link_key_file = d.0.join("bad.key");
    let err = format!("{:#}", spawn_gateway(cfg).err().unwrap());
    assert!(err.contains("32 hex digits"), "{err}");
    assert!(!d.0.join("state").exists(), "state directory left behind");

    let mut cfg = d.config("state/deeper", "127.0.0.1:0");
    cfg.master_key = Some(d.0.join("missing-master.key"));
    let err = format!("{:#}", spawn_gateway(cfg).err().unwrap());
    assert!(err.contains("rebindgw keygen"), "{err}");
    assert!(!d.0.join("state").exists(), "state directory left behind");
}

#[test]
fn a_failed_start_removes_the_state_dir_it_created() {
    let d = Dir::new();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = d.config("fresh/state", "127.0.0.1:0");
    // The host-link socket is bound after the state directory is in place.
    cfg.host_link = taken.local_addr().unwrap();
    let err = format!("{:#}", spawn_gateway(cfg).err().unwrap());
    assert!(err.contains("host_link"), "{err}");
    assert!(!d.0.join("fresh").exists(), "state directory left behind");
}

#[test]
fn state_dirs_open_to_others_are_refused_and_the_registry_is_private() {
    let d = Dir::new();
    let state = d.0.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = format!(
        "{:#}",
        spawn_gateway(d.config("state", "127.0.0.1:0"))
            .err()
            .unwrap()
    );
    assert!(err.contains("chmod 700"), "{err}");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    spawn_gateway(d.config("state", "127.0.0.1:0"))
        .unwrap()
        .stop()
        .unwrap();
    assert_eq!(mode(&state.join("registry.redb")), 0o600);
    assert_eq!(mode(&state.join("master.key")), 0o600);
}

#[test]
fn a_damaged_registry_is_refused_unless_set_aside() {
    let d = Dir::new();
    let state = d.0.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let junk: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(state.join("registry.redb"), &junk).unwrap();
    let err = format!(
        "{:#}",
        spawn_gateway(d.config("state", "127.0.0.1:0"))
            .err()
            .unwrap()
    );
    assert!(
        err.contains("damaged") && err.contains("--set-aside-corrupt"),
        "{err}"
    );
    assert!(
        !state.join("master.key").exists(),
        "a master key was generated for a gateway that did not start"
    );
    let mut cfg = d.config("state", "127.0.0.1:0");
    cfg.set_aside_corrupt = true;
    let g = spawn_gateway(cfg).unwrap();
    assert_eq!(g.shared().connections(), 0);
    g.stop().unwrap();
    let moved: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("registry.corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(std::fs::read(state.join(&moved[0])).unwrap(), junk);
}
