//! `rebindgw bench fastpath` end to end, kept short: every path it measures must carry
//! echoes, and the report must say how busy each core was. The veth/AF_XDP run needs root
//! (skipped with a printed reason otherwise; a failure with REBINDGW_REQUIRE_TOOLS set).

use std::time::Duration;

use rebindgw::io::IoBackend;
use rebindgw::io::xdp::XdpMode;
use rebindgw_tools::bench::fastpath::{FastpathOptions, FastpathReport, run_fastpath};

fn short(io: Vec<IoBackend>) -> FastpathOptions {
    FastpathOptions {
        clients: 4,
        window: 4,
        payload: 64,
        duration: Duration::from_millis(400),
        rounds: 1,
        io,
        nginx: false,
        ..FastpathOptions::default()
    }
}

fn assert_every_path_echoed(r: &FastpathReport, paths: &[&str]) {
    for p in paths {
        let run = r
            .saturating
            .iter()
            .find(|x| x.path == *p)
            .unwrap_or_else(|| panic!("no run of {p} in {:?}", r.saturating));
        assert!(run.received > 100, "{p} echoed only {run:?}");
        assert!(
            run.received <= run.sent,
            "{p}: more echoes than requests: {run:?}"
        );
        assert!(!run.core_busy.is_empty(), "{p}: no core figures");
        assert!(
            run.core_busy.iter().all(|b| (0.0..=1.0).contains(b)),
            "{run:?}"
        );
        assert!(run.echoes_per_forwarder_core_s > 0.0, "{run:?}");
    }
    for b in &r.backends {
        assert!(b.ratio > 0.0, "{b:?}");
    }
    for h in &r.half_load {
        assert!(h.received > 0, "half load {}: nothing came back", h.path);
    }
}

#[test]
fn the_loopback_bench_measures_the_gateway_and_the_bare_relay_on_uring_and_mmsg() {
    let r = run_fastpath(&short(vec![IoBackend::Uring, IoBackend::Mmsg])).unwrap();
    assert_eq!(r.placement, "loopback");
    assert_every_path_echoed(
        &r,
        &["bare-relay", "gateway", "bare-relay/mmsg", "gateway/mmsg"],
    );
    assert_eq!(
        r.nginx_skipped.as_deref(),
        Some("not asked for (--no-nginx)")
    );
}

fn skip(reason: &str) {
    assert!(
        std::env::var_os("REBINDGW_REQUIRE_TOOLS").is_none(),
        "{reason}, but REBINDGW_REQUIRE_TOOLS is set"
    );
    println!("SKIP the_veth_bench_measures_xdp_with_an_xdp_generator: {reason}");
}

#[test]
fn the_veth_bench_measures_xdp_with_an_xdp_generator() {
    // Root: the effective uid in /proc/self/status is 0.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return skip("needs root (network namespaces, XDP)");
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return skip("no ip(8)");
    }
    let opts = FastpathOptions {
        xdp_generator: true,
        xdp_mode: XdpMode::Skb,
        ..short(vec![IoBackend::Xdp, IoBackend::Uring])
    };
    let r = run_fastpath(&opts).unwrap();
    assert_eq!(r.placement, "netns-veth");
    assert_eq!(r.xdp_mode, "skb");
    assert_every_path_echoed(
        &r,
        &["bare-relay", "gateway", "bare-relay/uring", "gateway/uring"],
    );
    // The namespaces are gone afterwards.
    let left = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains("rbfp-"),
        "{left:?}"
    );
}
