//! The peer a user would pick instead of the gateway for plain UDP relaying: nginx's `stream`
//! UDP proxy (Debian's nginx), tuned as its documentation suggests for UDP load: one worker
//! pinned to core 0 (where the gateway's worker and the bare relay run), `reuseport`, a 4 MiB
//! receive buffer, `multi_accept on`, no `proxy_responses` limit.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running nginx, stopped (`nginx -s stop`) and reaped on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    binary: PathBuf,
    conf: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

/// The nginx binary: `$REBINDGW_NGINX`, else `nginx` on PATH or in /usr/sbin. `Err` says why
/// there is none.
pub fn find_nginx() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("REBINDGW_NGINX") {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .ok_or_else(|| "no nginx binary (apt install nginx, or set REBINDGW_NGINX)".into())
}

fn free_udp_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(UdpSocket::bind(SocketAddr::new(ip, 0))?
        .local_addr()?
        .port())
}

/// Debian builds the stream module as a dynamic module (package libnginx-mod-stream).
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// The configuration for a UDP proxy on `listen` in front of `upstream`; `stream_module`
/// is loaded first when the nginx binary has the module outside (Debian's).
pub fn config(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    stream_module: Option<&Path>,
) -> String {
    let d = dir.display();
    let load = stream_module.map_or(String::new(), |m| format!("load_module {};\n", m.display()));
    format!(
        "# rebindgw bench: nginx stream UDP proxy, tuned for UDP load
{load}worker_processes 1;
worker_cpu_affinity 01;
worker_rlimit_nofile 65536;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 16384;
    multi_accept on;
}}
stream {{
    server {{
        listen {listen} udp reuseport rcvbuf=4m;
        proxy_pass {upstream};
        proxy_timeout 30s;
    }}
}}
"
    )
}

impl Nginx {
    /// Starts nginx in `dir` as a UDP proxy on `ip` to `upstream` (which must echo what it
    /// gets), and waits until a probe comes back through it. nginx runs in the caller's
    /// network namespace.
    pub fn start(
        binary: &Path,
        dir: &Path,
        ip: IpAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir)?;
        let listen = SocketAddr::new(ip, free_udp_port(ip)?);
        let conf = dir.join("nginx.conf");
        let module = Path::new(STREAM_MODULE);
        let module = module.is_file().then_some(module);
        std::fs::write(&conf, config(dir, listen, upstream, module))?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut n = Nginx {
            addr: listen,
            binary: binary.to_owned(),
            conf,
            dir: dir.to_owned(),
            child: Some(child),
        };
        n.wait_ready()?;
        Ok(n)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let probe = UdpSocket::bind(SocketAddr::new(self.addr.ip(), 0))?;
        probe.set_read_timeout(Some(Duration::from_millis(100)))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                bail!("nginx exited with {status}: {}", log.trim());
            }
            let _ = probe.send_to(b"Dnginx-probe", self.addr);
            if let Ok(n) = probe.recv(&mut buf)
                && &buf[..n] == b"Dnginx-probe"
            {
                return Ok(());
            }
        }
        bail!("nginx did not relay a probe within 10 s")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new(&self.binary)
            .arg("-p")
            .arg(&self.dir)
            .arg("-e")
            .arg(self.dir.join("error.log"))
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_is_the_tuned_udp_proxy() {
        let c = config(
            Path::new("/tmp/x"),
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.0.1:9001".parse().unwrap(),
            Some(Path::new("/m/stream.so")),
        );
        assert!(c.starts_with("# rebindgw bench"), "{c}");
        assert!(
            c.contains("load_module /m/stream.so;\nworker_processes 1;"),
            "{c}"
        );
        for line in [
            "worker_processes 1;",
            "worker_cpu_affinity 01;",
            "multi_accept on;",
            "listen 127.0.0.1:9000 udp reuseport rcvbuf=4m;",
            "proxy_pass 127.0.0.1:9001;",
        ] {
            assert!(c.contains(line), "{line} missing from\n{c}");
        }
        assert!(!c.contains("proxy_responses"), "no responses limit");
    }
}

/// Starts the real nginx in front of a plain UDP echo and sends datagrams through it.
#[cfg(test)]
mod live {
    use super::*;

    #[test]
    fn nginx_relays_udp_to_an_echo() {
        let binary = match find_nginx() {
            Ok(b) => b,
            Err(why) => {
                assert!(
                    std::env::var_os("REBINDGW_REQUIRE_TOOLS").is_none(),
                    "{why} but REBINDGW_REQUIRE_TOOLS is set"
                );
                println!("SKIPPED nginx_relays_udp_to_an_echo: {why}");
                return;
            }
        };
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let dir = std::env::temp_dir().join(format!("rebindgw-nginx-test-{}", std::process::id()));
        let nginx = Nginx::start(&binary, &dir, "127.0.0.1".parse().unwrap(), upstream).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 64];
        for i in 0..10u8 {
            client.send_to(&[b'D', i], nginx.addr).unwrap();
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[b'D', i]);
        }
        drop(nginx);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
