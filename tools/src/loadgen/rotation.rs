//! Rotation mode (`--rotate-at`): the process that runs the load (the parent of a
//! multi-process run, never its children) asks the gateway for key rotations at fixed
//! offsets into the measured phase, with `rebindgw::gateway::rotate::request_rotation`, and
//! records each answer and how long it took. The shards time their clients' installation
//! of the delivered keys from the same offsets (see `shard.rs`, `track_keys`); children of
//! a multi-process run share the parent's measured-phase start (the `go UNIX_MS` instant).
#![forbid(unsafe_code)]

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rebindgw::gateway::rotate::{AdminKey, request_rotation};

use super::options::LoadgenOptions;
use super::report::RotationCommand;

/// How long one rotation command may take (connect, and each read and write).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A checked rotation plan: where to send the commands and when.
#[derive(Clone, Debug)]
pub struct RotationPlan {
    pub admin: SocketAddr,
    pub key: PathBuf,
    pub force: bool,
    pub at: Vec<Duration>,
}

impl RotationPlan {
    /// The plan of `opts`, if it rotates and this process sends the commands; resolves the
    /// admin address and loads the key once now, so that a typo fails before any client is
    /// enrolled.
    pub fn from_options(opts: &LoadgenOptions) -> anyhow::Result<Option<RotationPlan>> {
        if opts.rotate_at.is_empty() || opts.child.is_some() {
            return Ok(None);
        }
        let admin = opts
            .admin
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--rotate-at needs --admin HOST:PORT"))?;
        let key = opts
            .admin_key
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--rotate-at needs --admin-key PATH"))?;
        let addr = admin
            .to_socket_addrs()
            .with_context(|| format!("--admin: cannot resolve {admin:?}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("--admin: {admin:?} resolves to nothing"))?;
        check_key(&key)?;
        Ok(Some(RotationPlan {
            admin: addr,
            key,
            force: opts.rotate_force,
            at: opts.rotate_at.clone(),
        }))
    }

    /// Sends the commands at `start + at[k]`, one after another, until all are sent or
    /// `stop` is set; prints a line on stderr as each answer arrives (scripts wait for
    /// `rotation K at`). The outcomes of the commands sent, in order.
    pub fn run(&self, start: Instant, stop: &AtomicBool) -> Vec<RotationCommand> {
        let mut out = Vec::with_capacity(self.at.len());
        for (k, at) in self.at.iter().enumerate() {
            let due = start + *at;
            loop {
                if stop.load(Ordering::Acquire) {
                    return out;
                }
                let now = Instant::now();
                if now >= due {
                    break;
                }
                std::thread::sleep((due - now).min(Duration::from_millis(20)));
            }
            let sent = Instant::now();
            let r = request_rotation(self.admin, &self.key, self.force, COMMAND_TIMEOUT);
            let took = sent.elapsed();
            let (ok, answer) = match r {
                Ok(a) => (true, a.trim().to_owned()),
                Err(e) => (false, format!("{e:#}")),
            };
            let c = RotationCommand {
                sent_s: sent.saturating_duration_since(start).as_secs_f64(),
                took_ms: took.as_secs_f64() * 1e3,
                ok,
                epoch: if ok {
                    RotationCommand::epoch_of(&answer)
                } else {
                    None
                },
                answer,
            };
            eprintln!(
                "rotation {} at {:.3} s: {} in {:.1} ms: {}",
                k + 1,
                c.sent_s,
                if c.ok { "answered" } else { "FAILED" },
                c.took_ms,
                c.answer
            );
            out.push(c);
        }
        out
    }
}

/// The key file must load now (it is loaded again for each command).
fn check_key(path: &Path) -> anyhow::Result<()> {
    AdminKey::load(path)
        .map(drop)
        .with_context(|| format!("--admin-key {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> LoadgenOptions {
        let mut o = LoadgenOptions::new(vec!["127.0.0.1:7400".parse().unwrap()]);
        o.clients_file = Some("/tmp/c.toml".into());
        o
    }

    #[test]
    fn no_plan_without_rotations_or_in_a_child() {
        assert!(RotationPlan::from_options(&opts()).unwrap().is_none());
        let mut o = opts();
        o.rotate_at = vec![Duration::from_secs(1)];
        o.child = Some(super::super::options::ChildRole {
            index: 0,
            count: 2,
            first_client: 0,
            total_clients: 10,
        });
        assert!(RotationPlan::from_options(&o).unwrap().is_none());
    }

    #[test]
    fn a_missing_key_file_fails_early() {
        let mut o = opts();
        o.rotate_at = vec![Duration::from_secs(1)];
        o.admin = Some("127.0.0.1:1".into());
        o.admin_key = Some("/nonexistent/admin.key".into());
        let e = format!("{:#}", RotationPlan::from_options(&o).unwrap_err());
        assert!(e.contains("--admin-key /nonexistent/admin.key"), "{e}");
        o.admin = Some("no-such-host.invalid:1".into());
        let e = format!("{:#}", RotationPlan::from_options(&o).unwrap_err());
        assert!(e.contains("--admin"), "{e}");
    }

    #[test]
    fn a_refused_command_is_recorded_not_fatal() {
        let dir = std::env::temp_dir().join(format!(
            "loadgen-rot-{}-{}",
            std::process::id(),
            hex::encode(rebindgw::crypto::random_array::<4>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("admin.key");
        AdminKey::generate(&key).unwrap();
        // A port nobody listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let plan = RotationPlan {
            admin: port,
            key,
            force: false,
            at: vec![Duration::ZERO, Duration::from_millis(30)],
        };
        let stop = AtomicBool::new(false);
        let t = Instant::now();
        let out = plan.run(t, &stop);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|c| !c.ok && c.epoch.is_none()), "{out:?}");
        assert!(out[0].answer.contains("cannot reach"), "{out:?}");
        assert!(out[1].sent_s >= 0.03, "{out:?}");
        // A stop before the time: nothing sent.
        stop.store(true, Ordering::Release);
        let plan = RotationPlan {
            at: vec![Duration::from_secs(60)],
            ..plan
        };
        assert!(plan.run(Instant::now(), &stop).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
