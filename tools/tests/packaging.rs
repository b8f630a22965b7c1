//! Runs scripts/check-packaging.sh: the systemd unit (systemd-analyze verify when present),
//! the licence files and perf/record.sh against perf/README.md.

#[test]
fn packaging_and_perf_script_checks() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = std::process::Command::new("bash")
        .arg(format!("{root}/scripts/check-packaging.sh"))
        .env("REBINDGW_BIN", env!("CARGO_BIN_EXE_rebindgw"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("check-packaging: ok"));
}
