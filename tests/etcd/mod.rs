//! A throwaway single-node etcd for the cluster tests (feature `cluster`): started on free
//! loopback ports in a temporary directory, killed and removed on drop.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    child: Option<Child>,
    pub dir: std::path::PathBuf,
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Etcd {
    /// Kills the member (as kill -9 would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the member: its connections stay open but nothing
    /// is answered, as in a leader election or a stalled disk.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("etcd running").id().to_string();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(ok.success(), "kill {signal} {pid}");
    }

    /// Starts it (again, on its data) and waits until it accepts connections.
    pub fn start(&mut self) {
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        self.child = Some(
            Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(self.dir.join("data"))
                .args(["--listen-client-urls", &self.endpoint])
                .args(["--advertise-client-urls", &self.endpoint])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("t={peer_url}")])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.client_port).parse().unwrap();
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh single-node etcd, or `None` (after printing why) if there is no etcd binary.
pub fn start_etcd(test: &str) -> Option<Etcd> {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("REBINDGW_REQUIRE_TOOLS").is_none(),
            "etcd not found but REBINDGW_REQUIRE_TOOLS is set (apt install etcd-server)"
        );
        println!("SKIPPED {test}: no etcd binary (apt install etcd-server)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("rebindgw-etcd-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let mut etcd = Etcd {
        child: None,
        dir,
        endpoint: format!("http://127.0.0.1:{client_port}"),
        client_port,
        peer_port,
    };
    etcd.start();
    Some(etcd)
}
