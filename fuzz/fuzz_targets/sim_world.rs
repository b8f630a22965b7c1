//! The simulated world (`rebindgw::sim`): the real client, gateway and host cores over a
//! virtual clock, driven by a little program the input describes: add clients, send
//! payloads, NAT moves (to fresh tuples or to another client's), loss, jitter, targeted
//! drops of one message type, garbage datagrams to the gateway, epoch rotation, gateway
//! restart, time steps; a third of the worlds defer their commits to a modelled shared
//! store (cluster mode's core), which the program can take down and bring back.
//!
//! Invariants:
//! - every payload a client receives is one it sent (the host only echoes, to the owner);
//! - `Failed` is final, and a client never goes back to `Handshaking`;
//! - the gateway's connections never exceed the clients that connected;
//! - liveness: after the program, with a clean network and no rotation in the program, every
//!   client that is `Connected` gets an echo within 10 s of simulated time (it recovers from
//!   any move, loss or restart it went through).
#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rebindgw::client::ClientState;
use rebindgw::sim::{GATEWAY, SimConfig, World};

const MAX_CLIENTS: usize = 8;

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let commit_latency = if u.ratio(1, 3)? {
        Some(Duration::from_millis(u.int_in_range(0..=50u64)?))
    } else {
        None
    };
    let mut w = World::new(SimConfig {
        seed: u.arbitrary()?,
        enrolled: MAX_CLIENTS,
        commit_latency,
        ..SimConfig::default()
    });
    let mut sent: Vec<HashSet<Vec<u8>>> = Vec::new();
    let mut was_connected: Vec<bool> = Vec::new();
    let mut failed: Vec<bool> = Vec::new();
    let mut rotated = false;
    let mut epoch = w.cfg.epoch;
    for _ in 0..u.int_in_range(1..=48usize)? {
        let n = w.clients.len();
        match u.int_in_range(0..=9u8)? {
            0 if n < MAX_CLIENTS => {
                w.add_client();
                sent.push(HashSet::new());
                was_connected.push(false);
                failed.push(false);
            }
            1 if n > 0 => {
                let i = u.choose_index(n)?;
                let len = u.int_in_range(0..=64usize)?;
                let mut p = vec![0u8; len];
                u.fill_buffer(&mut p)?;
                if w.clients[i].core.send(&p).is_ok() {
                    sent[i].insert(p);
                }
            }
            2 if n > 0 => {
                let i = u.choose_index(n)?;
                if u.arbitrary()? {
                    w.move_client(i);
                } else {
                    let j = u.choose_index(n)?;
                    let t = w.clients[j].tuple;
                    if i != j {
                        w.move_client(j);
                    }
                    w.move_client_to(i, t);
                }
            }
            3 => w.cfg.loss = f64::from(u.int_in_range(0..=50u8)?) / 100.0,
            4 => w.cfg.jitter = Duration::from_millis(u.int_in_range(0..=100u64)?),
            5 => {
                let ty: u8 = u.arbitrary()?;
                let mut left = u.int_in_range(1..=4u8)?;
                w.drop_if(move |d| {
                    let hit = left > 0 && d.data.first() == Some(&ty);
                    left = left.saturating_sub(u8::from(hit));
                    hit
                });
            }
            6 => {
                let from = if n > 0 && u.arbitrary()? {
                    w.clients[u.choose_index(n)?].tuple
                } else {
                    "192.0.2.1:1".parse().unwrap()
                };
                let data: Vec<u8> = u.arbitrary()?;
                w.inject(from, GATEWAY, data);
            }
            7 if u.ratio(1, 4)? => {
                epoch += 1;
                w.rotate_epoch(epoch);
                rotated = true;
            }
            8 if u.ratio(1, 4)? => w.restart_gateway(),
            // The shared store of deferred commits goes down or comes back.
            9 if commit_latency.is_some() && u.ratio(1, 4)? => {
                w.gateway.store_down = !w.gateway.store_down;
            }
            _ => {
                let ms = u64::from(u.arbitrary::<u16>()?) % 5_000;
                w.run_for(Duration::from_millis(ms));
            }
        }
        check(&w, &sent, &mut was_connected, &mut failed);
    }
    // Liveness.
    if rotated {
        return Ok(());
    }
    w.cfg.loss = 0.0;
    w.cfg.jitter = Duration::ZERO;
    w.clear_drop();
    w.gateway.store_down = false;
    // Let pending rebinds finish or time out, then each live client must echo.
    w.run_for(Duration::from_secs(40));
    check(&w, &sent, &mut was_connected, &mut failed);
    for i in 0..w.clients.len() {
        if w.clients[i].core.state() != ClientState::Connected {
            continue;
        }
        let before = w.clients[i].received.len();
        let p = format!("liveness {i}").into_bytes();
        w.clients[i].core.send(&p).unwrap();
        sent[i].insert(p);
        assert!(
            w.drive_until(Duration::from_secs(10), |w| w.clients[i].received.len() > before),
            "client {i} connected but gets no echo"
        );
        check(&w, &sent, &mut was_connected, &mut failed);
    }
    Ok(())
}

fn check(w: &World, sent: &[HashSet<Vec<u8>>], was_connected: &mut [bool], failed: &mut [bool]) {
    for (i, c) in w.clients.iter().enumerate() {
        for p in &c.received {
            assert!(sent[i].contains(p), "client {i} received a payload it never sent");
        }
        let state = c.core.state();
        assert!(!failed[i] || matches!(state, ClientState::Failed(_)), "Failed is final");
        failed[i] |= matches!(state, ClientState::Failed(_));
        assert!(!was_connected[i] || state != ClientState::Handshaking);
        was_connected[i] |= matches!(state, ClientState::Connected | ClientState::Rebinding);
    }
    assert!(w.gateway.shared.connections() <= w.clients.len() * 8);
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
