//! `rebindgw conformance FILE`: checks every known-answer vector in a file of the `v1.json`
//! format (any master, epoch, S in 1..=32, address or count) against this implementation.
//!
//! Every section may hold one object or an array of them. A malformed file is an error that
//! names the field, and so is a file with no vectors at all; a vector that does not reproduce
//! is a failure line.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde_json::Value;

use rebindgw::engine::{Backend, TrialKeys};
use rebindgw::keys::{EpochKeys, MasterSecret};
use rebindgw::rebind::{RebindCredentials, RebindKdf, RebindSecret, build_rebind};
use rebindgw::registry::Registry;
use rebindgw::time::Ticks;
use rebindgw::verify::{EpochCrypto, RejectReason, verify_one};
use rebindgw::wire::{
    ClientCredentials, DataView, HandshakeReply, HandshakeView, Unrecognized, build_handshake,
    build_handshake_reply, open_handshake, open_handshake_reply, seal_data,
};

/// A file that is not a well-formed vectors file.
#[derive(Debug, thiserror::Error)]
pub enum ConformanceError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{path}: {problem}")]
    Field { path: String, problem: String },
}

/// The outcome of a run: one line per failing vector.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failures: Vec<String>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    fn record(&mut self, path: String, result: Result<(), String>) {
        match result {
            Ok(()) => self.passed += 1,
            Err(why) => self.failures.push(format!("{path}: {why}")),
        }
    }
}

type Res<T> = Result<T, ConformanceError>;

fn field_err(path: &str, problem: impl Into<String>) -> ConformanceError {
    ConformanceError::Field {
        path: path.to_string(),
        problem: problem.into(),
    }
}

/// A JSON value with its path, for error messages.
#[derive(Clone, Copy)]
struct At<'a> {
    v: &'a Value,
    path: &'a str,
}

impl<'a> At<'a> {
    fn get(&self, key: &str) -> Res<(String, &'a Value)> {
        let path = format!("{}.{key}", self.path);
        let v = self
            .v
            .get(key)
            .ok_or_else(|| field_err(&path, "missing field"))?;
        Ok((path, v))
    }

    fn opt(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key)
    }

    fn u64(&self, key: &str) -> Res<u64> {
        let (path, v) = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| field_err(&path, "expected an unsigned integer"))
    }

    fn u32(&self, key: &str) -> Res<u32> {
        let (path, n) = (format!("{}.{key}", self.path), self.u64(key)?);
        u32::try_from(n).map_err(|_| field_err(&path, "does not fit in u32"))
    }

    fn slots(&self, key: &str) -> Res<usize> {
        let n = self.u64(key)?;
        if !(1..=32).contains(&n) {
            return Err(field_err(
                &format!("{}.{key}", self.path),
                format!("slot count {n} outside 1..=32"),
            ));
        }
        Ok(n as usize)
    }

    fn str(&self, key: &str) -> Res<(String, &'a str)> {
        let (path, v) = self.get(key)?;
        let s = v
            .as_str()
            .ok_or_else(|| field_err(&path, "expected a string"))?;
        Ok((path, s))
    }

    fn bytes(&self, key: &str) -> Res<Vec<u8>> {
        let (path, s) = self.str(key)?;
        hex_bytes(&path, s)
    }

    fn array<const N: usize>(&self, key: &str) -> Res<[u8; N]> {
        let (path, s) = self.str(key)?;
        hex_array(&path, s)
    }

    fn ip(&self, key: &str) -> Res<IpAddr> {
        let (path, s) = self.str(key)?;
        s.parse()
            .map_err(|_| field_err(&path, format!("{s:?} is not an IP address")))
    }

    fn port(&self, key: &str) -> Res<u16> {
        let n = self.u64(key)?;
        u16::try_from(n).map_err(|_| field_err(&format!("{}.{key}", self.path), "not a port"))
    }

    fn list(&self, key: &str) -> Res<(String, &'a Vec<Value>)> {
        let (path, v) = self.get(key)?;
        let a = v
            .as_array()
            .ok_or_else(|| field_err(&path, "expected an array"))?;
        Ok((path, a))
    }
}

fn hex_bytes(path: &str, s: &str) -> Res<Vec<u8>> {
    hex::decode(s).map_err(|e| field_err(path, format!("invalid hex: {e}")))
}

fn hex_array<const N: usize>(path: &str, s: &str) -> Res<[u8; N]> {
    let b = hex_bytes(path, s)?;
    b.as_slice().try_into().map_err(|_| {
        field_err(
            path,
            format!("expected {N} bytes ({} hex digits), got {}", 2 * N, b.len()),
        )
    })
}

fn hex_list<const N: usize>(path: &str, list: &[Value]) -> Res<Vec<[u8; N]>> {
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let p = format!("{path}[{i}]");
            let s = v
                .as_str()
                .ok_or_else(|| field_err(&p, "expected a string"))?;
            hex_array(&p, s)
        })
        .collect()
}

/// Entries of a section: one object or an array of objects.
fn entries<'a>(root: &'a Value, name: &str) -> Vec<(String, &'a Value)> {
    match root.get(name) {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{name}[{i}]"), v))
            .collect(),
        Some(v) => vec![(name.to_string(), v)],
    }
}

fn expect_eq(what: &str, expected: &[u8], got: &[u8]) -> Result<(), String> {
    if expected == got {
        Ok(())
    } else {
        Err(format!(
            "{what} differs: expected {}, got {}",
            hex::encode(expected),
            hex::encode(got)
        ))
    }
}

/// Reads and checks a vectors file.
pub fn check_file(path: &Path, backend: Backend) -> Res<Report> {
    let text = std::fs::read_to_string(path).map_err(|source| ConformanceError::Read {
        path: path.display().to_string(),
        source,
    })?;
    check_json(&text, backend)
}

/// Checks every vector in `text` with trial decryption on `backend`.
pub fn check_json(text: &str, backend: Backend) -> Res<Report> {
    let root: Value = serde_json::from_str(text)?;
    if !root.is_object() {
        return Err(field_err("$", "expected a JSON object"));
    }
    let mut report = Report::default();

    // The first key schedule supplies master/epoch/slots to sections that omit them.
    let schedules = entries(&root, "key_schedule");
    let default_schedule = schedules.first().map(|(p, v)| At { v, path: p });
    let context = |e: At<'_>| -> Res<(MasterSecret, u32, usize)> {
        let base = match (e.opt("master"), default_schedule) {
            (Some(_), _) | (None, None) => e,
            (None, Some(s)) => s,
        };
        let master = MasterSecret::from_bytes(base.array("master")?);
        let epoch = if e.opt("epoch").is_some() { e } else { base }.u32("epoch")?;
        let slots = match (e.opt("slots"), base.opt("slots")) {
            (Some(_), _) => e.slots("slots")?,
            (None, Some(_)) => base.slots("slots")?,
            (None, None) => 16,
        };
        Ok((master, epoch, slots))
    };

    for (path, v) in &schedules {
        let e = At { v, path };
        let (master, epoch, slots) = context(e)?;
        let (kp, list) = e.list("slot_keys")?;
        let mut expected = Vec::new();
        for (i, pair) in list.iter().enumerate() {
            let p = format!("{kp}[{i}]");
            let pair = pair
                .as_array()
                .ok_or_else(|| field_err(&p, "expected [K0, K1]"))?;
            let keys = hex_list::<16>(&p, pair)?;
            let [k0, k1] = keys
                .try_into()
                .map_err(|_| field_err(&p, "expected exactly two keys"))?;
            expected.push([k0, k1]);
        }
        let cookie_key: [u8; 16] = e.array("cookie_key")?;
        report.record(
            path.clone(),
            (|| {
                let keys = EpochKeys::derive(&master, epoch, slots).map_err(|e| e.to_string())?;
                if expected.len() != slots {
                    return Err(format!("{} slot key pairs for S = {slots}", expected.len()));
                }
                for (i, (want, got)) in expected.iter().zip(keys.slot_key_pairs()).enumerate() {
                    for b in 0..2 {
                        expect_eq(&format!("K[{epoch}][{i}][{b}]"), &want[b], &got[b])?;
                    }
                }
                expect_eq(
                    "cookie key",
                    &cookie_key,
                    &*EpochKeys::cookie_key_bytes(&master, epoch),
                )
            })(),
        );
    }

    for (path, v) in entries(&root, "client_keys") {
        let e = At { v, path: &path };
        let (master, epoch, slots) = context(e)?;
        let index = e.u32("index")?;
        let (kp, list) = e.list("keys")?;
        let want = hex_list::<16>(&kp, list)?;
        report.record(
            path.clone(),
            (|| {
                let keys = EpochKeys::derive(&master, epoch, slots).map_err(|e| e.to_string())?;
                if u64::from(index) >= keys.index_space() {
                    return Err(format!("index {index} outside 2^{slots}"));
                }
                expect_eq(
                    "issued keys",
                    &want.concat(),
                    &keys.client_keys(index).concat(),
                )
            })(),
        );
    }

    for (path, v) in entries(&root, "unrecognized") {
        let e = At { v, path: &path };
        let (master, epoch, slots) = context(e)?;
        let observed = SocketAddr::new(e.ip("ip")?, e.port("port")?);
        let t = Ticks(e.u64("t")?);
        let cookie: [u8; 16] = e.array("cookie")?;
        let datagram = e.bytes("datagram")?;
        report.record(
            path.clone(),
            (|| {
                let keys = EpochKeys::derive(&master, epoch, slots).map_err(|e| e.to_string())?;
                let got = keys.cookie(&observed, t);
                expect_eq("cookie", &cookie, &got)?;
                let u = Unrecognized {
                    epoch_byte: keys.epoch_byte(),
                    t,
                    observed,
                    cookie: got,
                };
                let mut buf = [0u8; 64];
                let n = u.emit(&mut buf);
                expect_eq("datagram", &datagram, &buf[..n])?;
                match Unrecognized::parse(&datagram) {
                    Ok(parsed) if parsed == u => Ok(()),
                    other => Err(format!("datagram does not parse back: {other:?}")),
                }
            })(),
        );
    }

    for (path, v) in entries(&root, "rebind") {
        let e = At { v, path: &path };
        let (master, epoch, slots) = context(e)?;
        let index = e.u32("index")?;
        let conn_id = e.u64("conn_id")?;
        let secret = RebindSecret(e.array("R")?);
        let from = SocketAddr::new(e.ip("source_ip")?, e.port("source_port")?);
        let t = Ticks(e.u64("t")?);
        let (np, list) = e.list("nonces")?;
        let nonces = hex_list::<8>(&np, list)?;
        let cookie: [u8; 16] = e.array("cookie")?;
        let session_key: [u8; 16] = e.array("session_key")?;
        let rebind = e.bytes("rebind")?;
        let ack = e.bytes("rebind_ack")?;
        let now = Ticks(e.u64("gateway_now")?);
        let window = e.u64("window_ticks")?;
        report.record(
            path.clone(),
            (|| {
                let keys = EpochKeys::derive(&master, epoch, slots).map_err(|e| e.to_string())?;
                if nonces.len() != slots {
                    return Err(format!("{} nonces for S = {slots}", nonces.len()));
                }
                if u64::from(index) >= keys.index_space() {
                    return Err(format!("index {index} outside 2^{slots}"));
                }
                let got_cookie = keys.cookie(&from, t);
                expect_eq("cookie", &cookie, &got_cookie)?;
                let k = RebindKdf::new(&secret).session_key(&nonces, t);
                expect_eq("session key", &session_key, &*k)?;
                let issued = keys.client_keys(index);
                let creds = RebindCredentials {
                    conn_id,
                    secret: &secret,
                    slot_keys: &issued,
                };
                let (built, _) = build_rebind(&creds, keys.epoch_byte(), t, &got_cookie, &nonces);
                expect_eq("rebind datagram", &rebind, &built)?;
                let state = gateway_state(keys, backend)?;
                let mut registry = Registry::new(slots);
                registry
                    .restore(index, conn_id, &secret, Ticks(0), None, 0)
                    .map_err(|e| e.to_string())?;
                let verified =
                    verify_one(&rebind, &from, now, window, slots, &[&state], &mut registry)
                        .into_result()
                        .map_err(|r| format!("gateway rejected the rebind at check `{r}`"))?;
                if verified.index != index || verified.conn_id != conn_id {
                    return Err(format!(
                        "gateway recovered index {} conn_id {}",
                        verified.index, verified.conn_id
                    ));
                }
                expect_eq("rebind_ack", &ack, &verified.ack)
            })(),
        );
    }

    for (path, v) in entries(&root, "rebind_rejects") {
        let e = At { v, path: &path };
        let (master, epoch, slots) = context(e)?;
        let rebind = e.bytes("rebind")?;
        let from = SocketAddr::new(e.ip("source_ip")?, e.port("source_port")?);
        let now = Ticks(e.u64("gateway_now")?);
        let window = e.u64("window_ticks")?;
        let (ep, reason) = e.str("expect_reject_at")?;
        let expected = RejectReason::from_name(reason)
            .ok_or_else(|| field_err(&ep, format!("unknown check {reason:?}")))?;
        let (rp, registry) = e.list("registry")?;
        let mut conns = Vec::new();
        for (i, c) in registry.iter().enumerate() {
            let p = format!("{rp}[{i}]");
            let c = At { v: c, path: &p };
            let last = match c.opt("last_rebind") {
                Some(_) => Ticks(c.u64("last_rebind")?),
                None => Ticks(0),
            };
            conns.push((
                c.u32("index")?,
                c.u64("conn_id")?,
                RebindSecret(c.array("R")?),
                last,
            ));
        }
        report.record(
            path.clone(),
            (|| {
                let keys = EpochKeys::derive(&master, epoch, slots).map_err(|e| e.to_string())?;
                let state = gateway_state(keys, backend)?;
                let mut registry = Registry::new(slots);
                for (index, conn_id, secret, last) in &conns {
                    registry
                        .restore(*index, *conn_id, secret, *last, None, 0)
                        .map_err(|e| e.to_string())?;
                }
                let outcome =
                    verify_one(&rebind, &from, now, window, slots, &[&state], &mut registry);
                match outcome.into_result() {
                    Ok(_) => Err(format!("accepted; expected rejection at `{expected}`")),
                    Err(r) if r == expected => Ok(()),
                    Err(r) => Err(format!("rejected at `{r}`, expected `{expected}`")),
                }
            })(),
        );
    }

    for (path, v) in entries(&root, "handshake") {
        let e = At { v, path: &path };
        let creds = ClientCredentials {
            client_id: e.array("client_id")?,
            psk: e.array("psk")?,
        };
        let nonce: [u8; 16] = e.array("client_nonce")?;
        let server_nonce: [u8; 16] = e.array("server_nonce")?;
        let ticks = Ticks(e.u64("client_ticks")?);
        let want_hs = e.bytes("handshake")?;
        let want_reply = e.bytes("handshake_reply")?;
        let (rp, rv) = e.get("reply_fields")?;
        let r = At { v: rv, path: &rp };
        let (kp, list) = r.list("slot_keys")?;
        let fields = HandshakeReply {
            conn_id: r.u64("conn_id")?,
            epoch_byte: u8::try_from(r.u64("epoch_byte")?)
                .map_err(|_| field_err(&format!("{rp}.epoch_byte"), "not a byte"))?,
            index: r.u32("index")?,
            rebind_secret: r.array("R")?,
            kd_c2s: r.array("kd_c2s")?,
            kd_s2c: r.array("kd_s2c")?,
            slot_keys: hex_list::<16>(&kp, list)?,
        };
        let slots = r.slots("slots")?;
        report.record(
            path.clone(),
            (|| {
                if fields.slot_keys.len() != slots {
                    return Err(format!(
                        "{} slot keys for S = {slots}",
                        fields.slot_keys.len()
                    ));
                }
                let hs = build_handshake(&creds, &nonce, ticks);
                expect_eq("handshake", &want_hs, &hs)?;
                let view = HandshakeView::new_checked(&want_hs).map_err(|e| e.to_string())?;
                let got_ticks = open_handshake(&view, &creds.psk)
                    .map_err(|_| "host cannot open the handshake".to_string())?;
                if got_ticks != ticks {
                    return Err(format!("handshake opened to ticks {}", got_ticks.0));
                }
                let reply = build_handshake_reply(&creds.psk, &nonce, &server_nonce, &fields);
                expect_eq("handshake_reply", &want_reply, &reply)?;
                match open_handshake_reply(&want_reply, &creds.psk, &nonce) {
                    Ok(opened) if opened == fields => Ok(()),
                    Ok(_) => Err("handshake_reply opens to other fields".into()),
                    Err(e) => Err(format!("client cannot open handshake_reply: {e}")),
                }
            })(),
        );
    }

    for (path, v) in entries(&root, "data") {
        let e = At { v, path: &path };
        let key: [u8; 16] = e.array("key")?;
        let seq = e.u64("seq")?;
        let payload = e.bytes("payload")?;
        let want = e.bytes("datagram")?;
        report.record(
            path.clone(),
            (|| {
                let cipher = rebindgw::crypto::gcm(&key);
                let mut buf = vec![0u8; payload.len() + rebindgw::wire::DATA_OVERHEAD];
                let n = seal_data(&cipher, seq, &payload, &mut buf);
                expect_eq("datagram", &want, &buf[..n])?;
                let view = DataView::new_checked(&want).map_err(|e| e.to_string())?;
                let mut out = vec![0u8; want.len()];
                let m = view
                    .open(&cipher, &mut out)
                    .map_err(|_| "datagram does not open".to_string())?;
                expect_eq("opened payload", &payload, &out[..m])
            })(),
        );
    }

    // A file that checked nothing proves nothing: `0 passed, 0 failed` must not exit 0.
    if report.passed + report.failed() == 0 {
        return Err(field_err(
            "$",
            format!(
                "no vectors: expected at least one entry in a section named {}",
                SECTIONS.join(", ")
            ),
        ));
    }
    Ok(report)
}

/// The sections `check_json` reads, in the order it checks them.
const SECTIONS: [&str; 7] = [
    "key_schedule",
    "client_keys",
    "unrecognized",
    "rebind",
    "rebind_rejects",
    "handshake",
    "data",
];

fn gateway_state(keys: EpochKeys, backend: Backend) -> Result<EpochCrypto, String> {
    let trial = TrialKeys::new(backend, keys.slot_key_pairs()).map_err(|e| e.to_string())?;
    Ok(EpochCrypto::new(keys, trial))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = include_str!("../../tests/data/v1.json");

    #[test]
    fn shipped_vectors_pass_on_every_backend() {
        for b in [Backend::AesNi, Backend::Vaes] {
            if !b.is_supported() {
                eprintln!(
                    "skipped: backend {b} (this CPU lacks {})",
                    b.missing_features().join(", ")
                );
            }
        }
        for backend in Backend::all_supported() {
            let r = check_json(V1, backend).unwrap();
            assert!(r.failures.is_empty(), "{backend:?}: {:#?}", r.failures);
            assert_eq!(r.passed, 1 + 4 + 2 + 3 + 10 + 1 + 3, "every vector counted");
        }
    }

    #[test]
    fn a_changed_byte_is_a_failure_line() {
        let mut v: Value = serde_json::from_str(V1).unwrap();
        let s = v["rebind"][0]["rebind_ack"].as_str().unwrap().to_string();
        let flipped = format!(
            "{}{}",
            &s[..s.len() - 1],
            if s.ends_with('0') { '1' } else { '0' }
        );
        v["rebind"][0]["rebind_ack"] = Value::String(flipped);
        v["rebind_rejects"][3]["expect_reject_at"] = Value::String("aead".into());
        let r = check_json(&v.to_string(), Backend::Portable).unwrap();
        assert_eq!(r.failed(), 2, "{:#?}", r.failures);
        assert!(r.failures[0].starts_with("rebind[0]: rebind_ack differs"));
        assert!(r.failures[1].contains("rejected at `cookie`, expected `aead`"));
    }

    #[test]
    fn malformed_files_name_the_field() {
        let mut v: Value = serde_json::from_str(V1).unwrap();
        v["rebind"][1]["nonces"][3] = Value::String("zz".into());
        let err = check_json(&v.to_string(), Backend::Portable).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("rebind[1].nonces[3]: invalid hex"),
            "{err}"
        );

        let mut v: Value = serde_json::from_str(V1).unwrap();
        v["data"][0].as_object_mut().unwrap().remove("seq");
        let err = check_json(&v.to_string(), Backend::Portable).unwrap_err();
        assert_eq!(err.to_string(), "data[0].seq: missing field");

        let mut v: Value = serde_json::from_str(V1).unwrap();
        v["key_schedule"]["slots"] = 33.into();
        let err = check_json(&v.to_string(), Backend::Portable).unwrap_err();
        assert!(err.to_string().contains("key_schedule.slots"), "{err}");

        assert!(check_json("[1]", Backend::Portable).is_err());
        assert!(check_json("{", Backend::Portable).is_err());
    }

    #[test]
    fn a_file_without_vectors_is_an_error() {
        // `0 passed, 0 failed` must not read as success: a typo in every section name, an
        // empty object or empty sections would otherwise check nothing and exit 0.
        for text in [
            "{}",
            r#"{"about": "no vectors here"}"#,
            r#"{"handshakes": [{}], "Data": {}}"#,
            r#"{"data": [], "rebind": []}"#,
        ] {
            let err = check_json(text, Backend::Portable).unwrap_err();
            assert!(err.to_string().contains("no vectors"), "{text}: {err}");
        }
        // One vector is enough.
        let v: Value = serde_json::from_str(V1).unwrap();
        let one = serde_json::json!({ "data": v["data"][0].clone() });
        let r = check_json(&one.to_string(), Backend::Portable).unwrap();
        assert_eq!((r.passed, r.failed()), (1, 0));
    }

    #[test]
    fn sections_may_be_single_objects_or_arrays() {
        let mut v: Value = serde_json::from_str(V1).unwrap();
        let one = v["data"][1].clone();
        v["data"] = one;
        v["handshake"] = Value::Array(vec![v["handshake"].clone()]);
        let r = check_json(&v.to_string(), Backend::Portable).unwrap();
        assert!(r.failures.is_empty(), "{:#?}", r.failures);
    }
}
