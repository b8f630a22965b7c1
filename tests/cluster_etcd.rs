//! The cluster registry against a real etcd (feature `cluster`; etcd from Debian's
//! `etcd-server`). Each test starts its own single-node etcd on free loopback ports in a
//! temporary directory. Without an `etcd` binary the tests print SKIPPED (and fail when
//! `REBINDGW_REQUIRE_TOOLS` is set, as in CI).
#![cfg(feature = "cluster")]

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rebindgw::cluster::etcd::{Committed, EtcdRegistry, Registered};
use rebindgw::cluster::mirror::{Applied, Change, Mirror};
use rebindgw::cluster::record::{ConnRecord, GatewayId, RecordSeal, conn_key};
use rebindgw::keys::MasterSecret;
use rebindgw::rebind::RebindSecret;
use rebindgw::time::Ticks;

const PREFIX: &str = "/mesh/test";

struct Etcd {
    child: Child,
    dir: std::path::PathBuf,
    endpoint: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
fn start_etcd(test: &str) -> Option<Etcd> {
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
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &endpoint])
        .args(["--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
        .spawn()
        .unwrap();
    let etcd = Etcd {
        child,
        dir,
        endpoint,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let addr: SocketAddr = format!("127.0.0.1:{client}").parse().unwrap();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(etcd)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn registry(etcd: &Etcd, me: GatewayId) -> EtcdRegistry {
    EtcdRegistry::connect(
        std::slice::from_ref(&etcd.endpoint),
        PREFIX,
        me,
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

fn seal() -> RecordSeal {
    RecordSeal::new(&MasterSecret::from_bytes([5; 32]), PREFIX)
}

fn record(index: u32, owner: GatewayId, l: u64, tuple: &str) -> ConnRecord {
    let conn_id = 0xC000 + u64::from(index);
    ConnRecord {
        conn_id,
        secret: seal().seal(1, index, conn_id, &RebindSecret([index as u8; 32])),
        last_rebind: Ticks(l),
        host: 0,
        owner,
        tuple: Some(tuple.parse().unwrap()),
    }
}

/// Two gateways register 150 connections each at once, both starting their search at the
/// same hint: every index is issued exactly once, and each gateway's mirror (range read,
/// then the watch) ends with all 300.
#[test]
fn concurrent_registrations_never_share_an_index() {
    let Some(etcd) = start_etcd("registrations") else {
        return;
    };
    runtime().block_on(async {
        const EACH: u32 = 150;
        const CAPACITY: u32 = 1024;
        let register_all = |me: GatewayId| {
            let etcd = &etcd;
            async move {
                let mut reg = registry(etcd, me).await;
                let mut mirror = Mirror::new(PREFIX, me);
                reg.load(&mut mirror).await.unwrap();
                let (_w, mut stream) = reg.watch(&mirror).await.unwrap();
                let mut mine = Vec::new();
                let mut taken = 0;
                let mut hint = 0;
                while mine.len() < EACH as usize {
                    // Catch up with what the other gateway wrote, without waiting for it.
                    while let Ok(Ok(Some(resp))) =
                        tokio::time::timeout(Duration::from_millis(1), stream.message()).await
                    {
                        let (changes, rev) = EtcdRegistry::changes(&resp);
                        for c in changes {
                            mirror.apply(c);
                        }
                        mirror.advance(rev);
                    }
                    let x = mirror.free_index(1, CAPACITY, hint).unwrap();
                    let rec = record(x, me, 1, "192.0.2.1:1000");
                    match reg.register(1, x, &rec).await.unwrap() {
                        Registered::Done { revision } => {
                            // What the gateway does with its own commits: apply them at
                            // once (the watch's copy of the event is then stale).
                            mirror.apply(Change::Put {
                                key: conn_key(PREFIX, 1, x).into_bytes(),
                                value: rec.encode(),
                                mod_revision: revision,
                            });
                            mine.push(x);
                        }
                        Registered::Taken => {
                            taken += 1;
                            hint = x + 1;
                        }
                    }
                }
                // Drain the watch until this mirror holds both gateways' connections.
                let deadline = Instant::now() + Duration::from_secs(10);
                while mirror.len() < 2 * EACH as usize {
                    assert!(Instant::now() < deadline, "mirror has {}", mirror.len());
                    if let Ok(Ok(Some(resp))) =
                        tokio::time::timeout(Duration::from_millis(200), stream.message()).await
                    {
                        let (changes, rev) = EtcdRegistry::changes(&resp);
                        for c in changes {
                            mirror.apply(c);
                        }
                        mirror.advance(rev);
                    }
                }
                (mine, taken, mirror)
            }
        };
        let ((a, taken_a, ma), (b, taken_b, mb)) = tokio::join!(register_all(1), register_all(2));
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 2 * EACH as usize, "an index was issued twice");
        println!("collisions decided by etcd: gateway 1 {taken_a}, gateway 2 {taken_b}");
        for m in [&ma, &mb] {
            for x in &a {
                assert_eq!(m.get(1, *x).unwrap().record.owner, 1);
            }
            for x in &b {
                assert_eq!(m.get(1, *x).unwrap().record.owner, 2);
            }
        }
    });
}

/// The same REBIND accepted by three gateways at once: exactly one compare-and-swap
/// succeeds; the others learn the winner's record. The first owner's mirror reports the loss.
#[test]
fn one_rebind_sent_to_three_gateways_commits_once() {
    let Some(etcd) = start_etcd("cas") else {
        return;
    };
    runtime().block_on(async {
        let mut regs = [
            registry(&etcd, 1).await,
            registry(&etcd, 2).await,
            registry(&etcd, 3).await,
        ];
        let first = record(7, 1, 100, "192.0.2.1:1000");
        assert!(matches!(
            regs[0].register(1, 7, &first).await.unwrap(),
            Registered::Done { .. }
        ));
        let mut mirrors: Vec<Mirror> = (1..=3).map(|me| Mirror::new(PREFIX, me)).collect();
        for (reg, m) in regs.iter_mut().zip(mirrors.iter_mut()) {
            reg.load(m).await.unwrap();
        }
        let (_w, mut stream) = regs[0].watch(&mirrors[0]).await.unwrap();
        let expected = mirrors[1].get(1, 7).unwrap().mod_revision;
        let [r1, r2, r3] = &mut regs[..] else {
            unreachable!()
        };
        let moved = |owner| {
            let mut r = first.clone();
            r.last_rebind = Ticks(200);
            r.owner = owner;
            r.tuple = Some("198.51.100.9:5000".parse().unwrap());
            r
        };
        let (a, b, c) = (moved(1), moved(2), moved(3));
        let (o1, o2, o3) = tokio::join!(
            r1.commit(1, 7, expected, &a),
            r2.commit(1, 7, expected, &b),
            r3.commit(1, 7, expected, &c),
        );
        let outcomes = [o1.unwrap(), o2.unwrap(), o3.unwrap()];
        let winners: Vec<usize> = (0..3)
            .filter(|&i| matches!(outcomes[i], Committed::Done { .. }))
            .collect();
        assert_eq!(winners.len(), 1, "{outcomes:?}");
        let winner = winners[0] as GatewayId + 1;
        for o in &outcomes {
            if let Committed::Conflict { current } = o {
                let current = current.as_ref().expect("the record is still there");
                assert_eq!(current.record.owner, winner);
                assert_eq!(current.record.last_rebind, Ticks(200));
            }
        }
        // Gateway 1's watch shows the new owner; unless it won, it lost the connection.
        let resp = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let (changes, _) = EtcdRegistry::changes(&resp);
        let applied: Vec<Applied> = changes.into_iter().map(|c| mirrors[0].apply(c)).collect();
        assert_eq!(
            applied,
            vec![Applied::Updated {
                epoch: 1,
                index: 7,
                owner_changed: winner != 1,
                lost: winner != 1,
            }]
        );
        // The sealed secret survived the rewrite and still opens at its key only.
        let stored = &mirrors[0].get(1, 7).unwrap().record;
        assert_eq!(seal().open(1, 7, stored).unwrap(), RebindSecret([7; 32]));
        // A commit against the old revision now fails even for the winner.
        assert!(matches!(
            regs[winner as usize - 1]
                .commit(1, 7, expected, &moved(winner))
                .await
                .unwrap(),
            Committed::Conflict { .. }
        ));
    });
}

/// A gateway's announcement lives with its lease: a second gateway cannot take the id while
/// it lives, and the id is free again once the lease ends.
#[test]
fn gateway_ids_are_leased() {
    let Some(etcd) = start_etcd("lease") else {
        return;
    };
    runtime().block_on(async {
        let mut a = registry(&etcd, 4).await;
        let mut again = registry(&etcd, 4).await;
        let lease = a.announce(Duration::from_secs(5)).await.unwrap().unwrap();
        a.keep_alive(lease).await.unwrap();
        assert_eq!(a.gateways().await.unwrap(), vec![4]);
        assert_eq!(again.announce(Duration::from_secs(5)).await.unwrap(), None);
        a.leave(lease).await.unwrap();
        assert_eq!(a.gateways().await.unwrap(), Vec::<GatewayId>::new());
        assert!(
            again
                .announce(Duration::from_secs(5))
                .await
                .unwrap()
                .is_some()
        );
    });
}
