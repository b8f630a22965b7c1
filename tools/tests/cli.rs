//! The `rebindgw` executable as an operator meets it: `gateway --check`, SIGHUP on a running
//! gateway, JSON logs, shell completions and the man page.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rebindgw");

fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let d = std::env::temp_dir().join(format!("rebindgw-cli-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn link_key(dir: &Path) -> PathBuf {
    let key = dir.join("host1.key");
    let out = Command::new(BIN)
        .args(["link-keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    key
}

/// A config for one worker on loopback; `extra` is appended at the top level.
fn config(dir: &Path, host: &str, extra: &str, rate: f64) -> PathBuf {
    let key = link_key_path(dir);
    let text = format!(
        r#"listen = ["127.0.0.1:0"]
host_link = "127.0.0.1:0"
admin = "127.0.0.1:0"
state_dir = "{state}"
slots = 8
workers = 1
io = "mmsg"
{extra}
[[hosts]]
addr = "{host}"
link_key_file = "{key}"

[rate_limits]
handshake_per_prefix = {{ per_second = {rate:.1}, burst = 400.0 }}
"#,
        state = dir.join("state").display(),
        key = key.display(),
    );
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn link_key_path(dir: &Path) -> PathBuf {
    let key = dir.join("host1.key");
    if !key.exists() {
        link_key(dir);
    }
    key
}

#[test]
fn check_accepts_a_good_config_and_names_the_key_of_a_bad_one() {
    let dir = temp_dir("check");
    let good = config(&dir, "127.0.0.1:7500", "", 200.0);
    let out = Command::new(BIN)
        .args(["gateway", "--check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "configuration ok"
    );
    assert!(
        !dir.join("state").exists(),
        "--check starts nothing and creates nothing"
    );

    // The README's old example: a loopback host_link with a host on another machine.
    let bad = config(&dir, "10.0.0.2:7500", "", 200.0);
    let out = Command::new(BIN)
        .args(["gateway", "--check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host_link") && err.contains("10.0.0.2:7500"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // The same config refused at start too, before anything is created.
    let out = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("host_link"));
    assert!(!dir.join("state").exists());

    // A link key file others can read.
    let good = config(&dir, "127.0.0.1:7500", "", 200.0);
    std::fs::set_permissions(
        link_key_path(&dir),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["gateway", "--check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("hosts"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Lines of a child's stderr, read on a thread.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(child: &mut Child) -> Lines {
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a pid of our own child and a valid signal number.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0);
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

#[test]
fn sighup_reloads_rate_limits_and_log_level_and_keeps_running() {
    let dir = temp_dir("hup");
    let cfg = config(&dir, "127.0.0.1:7500", "log_format = \"json\"", 200.0);
    let mut child = Command::new(BIN)
        .args(["gateway", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(&mut child);
    let running = json(&lines.wait_for("gateway running"));
    assert_eq!(running["level"], "INFO");

    // A new rate limit: applied, and the gateway stays up.
    config(&dir, "127.0.0.1:7500", "log_format = \"json\"", 350.0);
    signal(&child, libc::SIGHUP);
    let line = json(&lines.wait_for("configuration reloaded"));
    assert!(
        line["applied"].as_str().unwrap().contains("rate_limits"),
        "{line}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP must not stop the gateway"
    );

    // log_level = "warn" and a new `window_secs`: the filter is applied (the INFO line that
    // says so is filtered out) and `window_secs` is reported as needing a restart.
    config(
        &dir,
        "127.0.0.1:7500",
        "log_format = \"json\"\nlog_level = \"warn\"\nwindow_secs = 20",
        350.0,
    );
    signal(&child, libc::SIGHUP);
    let line = json(&lines.wait_for("until a restart"));
    assert_eq!(line["level"], "WARN");
    assert!(
        line["keys"].as_str().unwrap().contains("window_secs"),
        "{line}"
    );
    assert_eq!(
        lines
            .seen
            .iter()
            .filter(|l| l.contains("configuration reloaded"))
            .count(),
        1,
        "the second reload's INFO line is below the new level"
    );
    assert!(child.try_wait().unwrap().is_none());

    signal(&child, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Drain: no INFO line ("stopping", "gateway stopped") after the level went to warn.
    while let Ok(l) = lines.rx.recv_timeout(Duration::from_secs(2)) {
        lines.seen.push(l);
    }
    for l in &lines.seen {
        json(l);
    }
    assert!(!lines.seen.iter().any(|l| l.contains("gateway stopped")));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn log_format_flag_wins_over_the_config() {
    let dir = temp_dir("json");
    let cfg = config(&dir, "127.0.0.1:7500", "log_format = \"text\"", 200.0);
    let mut child = Command::new(BIN)
        .args(["gateway", "--log-format", "json", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = Lines::of(&mut child);
    let line = json(&lines.wait_for("gateway running"));
    assert_eq!(line["message"], "gateway running");
    signal(&child, libc::SIGTERM);
    assert!(child.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn completions_and_man_page_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        for sub in ["gateway", "loadgen", "enroll", "link-keygen"] {
            assert!(text.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with(".ie") || text.contains(".TH"), "{text}");
    for sub in ["gateway", "loadgen", "completions"] {
        assert!(text.contains(sub), "man page lacks {sub}");
    }
}
