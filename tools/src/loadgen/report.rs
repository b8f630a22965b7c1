//! The run's results: latency histograms, counters, the pass/fail verdict, and the human and
//! JSON renderings.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::options::AttackMode;

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
#[derive(Clone, Debug)]
pub struct LatencyHist(Histogram<u64>);

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"))
    }
}

impl LatencyHist {
    pub fn record(&mut self, d: Duration) {
        self.record_us(d.as_micros().min(u128::from(u64::MAX)) as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    pub fn add(&mut self, other: &LatencyHist) {
        // Same bounds on both sides, so this cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }

    /// The value at quantile `q` in µs (0 when empty).
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }

    /// The histogram in HdrHistogram's V2 serialization, hex-encoded (exact; for merging
    /// the histograms of several processes).
    pub fn to_hex(&self) -> String {
        use hdrhistogram::serialization::Serializer as _;
        let mut out = Vec::new();
        hdrhistogram::serialization::V2Serializer::new()
            .serialize(&self.0, &mut out)
            .expect("serializing to a Vec cannot fail");
        hex::encode(out)
    }

    /// Reads [`LatencyHist::to_hex`] output.
    pub fn from_hex(s: &str) -> Result<LatencyHist, String> {
        let bytes = hex::decode(s).map_err(|e| format!("histogram hex: {e}"))?;
        let h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| format!("histogram: {e:?}"))?;
        let mut out = LatencyHist::default();
        out.0
            .add(&h)
            .map_err(|e| format!("histogram bounds: {e:?}"))?;
        Ok(out)
    }

    pub fn summary(&self) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        if self.0.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: self.0.len(),
            mean_ms: self.0.mean() / 1000.0,
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            p999_ms: ms(self.0.value_at_quantile(0.999)),
            max_ms: ms(self.0.max()),
        }
    }
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
            fmt_ms(self.p50_ms),
            fmt_ms(self.p90_ms),
            fmt_ms(self.p99_ms),
            fmt_ms(self.p999_ms),
            fmt_ms(self.max_ms),
            self.count
        )
    }
}

/// `0.123 ms`, `12.3 ms`, `1.23 s`.
pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.3} ms")
    }
}

/// `38.1k`, `1.20M`.
pub fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunSettings {
    pub gateways: Vec<String>,
    pub clients: usize,
    pub threads: usize,
    /// Load-generator processes (`--processes`); `threads` counts over all of them.
    #[serde(default = "one")]
    pub processes: usize,
    pub duration_s: f64,
    /// "open" or "closed".
    pub load: String,
    /// Open loop: offered packets per second in total.
    pub rate: Option<f64>,
    /// Closed loop: outstanding echoes per client.
    pub window: Option<u32>,
    pub payload: String,
    pub churn_per_sec: f64,
    pub move_kind: String,
    /// What a moved client does at once: none, send or notify.
    #[serde(default)]
    pub on_move: String,
    pub storms_at_s: Vec<f64>,
    pub attacks: Vec<String>,
    pub attack_rate: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientsReport {
    pub requested: usize,
    /// Clients that completed a handshake.
    pub connected: u64,
    pub failed_to_connect: u64,
    /// Connections lost later (a rebind ran out).
    pub failed_after_connect: u64,
    /// ... of which the client's core handshook again by itself and connected.
    #[serde(default)]
    pub reconnected: u64,
    /// From `Client::new` (or the core's `Reconnecting`) to `ClientEvent::Connected`.
    pub handshake: Percentiles,
    /// Time from the first handshake until every client was up (or the connect timeout).
    pub connect_phase_s: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrafficReport {
    /// DATA payloads sent / echoes received, over the whole run (drain included).
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    /// Payloads sent while the sending client's tuple had moved and it was not yet rebound:
    /// the gateway cannot forward these, so they are expected losses.
    pub sent_during_outage: u64,
    /// Payloads whose echo was still due when their client's socket was closed by a move.
    pub in_flight_at_move: u64,
    /// Echoes of pre-move packets that arrived at the new socket after all (subtracted from
    /// the expected losses).
    pub late_echoes: u64,
    /// `sent_during_outage + in_flight_at_move - late_echoes`.
    pub expected_losses: u64,
    /// Loss not explained by moves: `(lost - expected) / (sent - expected)`.
    pub steady_loss_pct: f64,
    /// Rates over the measured phase.
    pub tx_pps: f64,
    pub rx_pps: f64,
    /// Payload bytes only (no DATA, UDP or IP headers).
    pub tx_payload_mbit: f64,
    /// Echo round-trip time.
    pub rtt: Percentiles,
    /// Closed loop: echoes written off after the echo timeout.
    pub echo_timeouts: u64,
    /// Open loop: sends the pacer skipped because the generator fell behind.
    pub pacer_skipped: u64,
    pub socket_send_errors: u64,
    /// Datagrams at a client socket from an address other than its gateway.
    pub stray_datagrams: u64,
    /// Echoes that carried another client's stamp (must be 0).
    pub misdelivered: u64,
    /// Received payloads without our stamp.
    pub foreign_payloads: u64,
    /// Moves that failed to bind a new socket.
    pub move_errors: u64,
    /// Clients told of a network change (SIGUSR1, a move they could not see).
    #[serde(default)]
    pub notified: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RebindsReport {
    /// NAT moves of connected clients (churn and storms).
    pub moves: u64,
    /// Moves that began an outage (a move during an outage extends it; recovery is
    /// measured from the first).
    pub outages: u64,
    pub storms: u64,
    /// Outages ended by a `Rebound` event to the moved-to tuple.
    pub succeeded: u64,
    /// Outages ended by a rebind that ran out (`Reconnecting` or `Failed(RebindTimeout)`).
    pub failed: u64,
    /// Outages with neither by the end of the run.
    pub unrecovered: u64,
    /// `Rebound` events not caused by a move (e.g. a late UNRECOGNIZED, §5 says it is a hint).
    pub extra: u64,
    pub abandoned: u64,
    /// From the move to the client's next `Rebound`.
    pub recovery: Percentiles,
    /// From the move to the first echo of a packet sent after the move.
    pub traffic_recovery: Percentiles,
    /// Each storm: how long its moves took and when its last client recovered.
    #[serde(default)]
    pub storm_detail: Vec<StormReport>,
}

/// One storm (every client moved at once). Times are from its scheduled instant.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StormReport {
    /// Offset into the measured phase.
    pub at_s: f64,
    /// Connected clients it moved, and how many of those recovered (a `Rebound` to the
    /// moved-to tuple before another move).
    pub moved: u64,
    pub recovered: u64,
    /// When the generator had made the last move (moves are made one after another).
    pub moves_done_s: f64,
    /// When the last moved client recovered: the time to recover all, if all did.
    pub last_recovery_s: f64,
    pub all_recovered: bool,
}

/// Final counters of one shard.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub connected: u64,
    pub conn_failed: u64,
    pub failed_later: u64,
    pub sent: u64,
    pub received: u64,
    pub sent_bytes: u64,
    pub sent_during_outage: u64,
    pub in_flight_at_move: u64,
    pub late_echoes: u64,
    pub moves: u64,
    pub outages: u64,
    pub move_errors: u64,
    pub notified: u64,
    pub storms: u64,
    pub rebinds_ok: u64,
    pub rebinds_failed: u64,
    pub unrecovered: u64,
    pub extra: u64,
    pub abandoned: u64,
    pub echo_timeouts: u64,
    pub pacer_skipped: u64,
    pub send_errors: u64,
    pub stray: u64,
    pub misdelivered: u64,
    pub foreign: u64,
    /// Clients connected again by their core's own handshake after a rebind ran out (each
    /// also counted in `failed_later`).
    #[serde(default)]
    pub reconnected: u64,
}

impl Counters {
    pub fn merge(&mut self, o: &Counters) {
        macro_rules! add {
            ($($f:ident),*) => { $( self.$f += o.$f; )* };
        }
        add!(
            connected,
            conn_failed,
            failed_later,
            sent,
            received,
            sent_bytes,
            sent_during_outage,
            in_flight_at_move,
            late_echoes,
            moves,
            outages,
            move_errors,
            notified,
            storms,
            rebinds_ok,
            rebinds_failed,
            unrecovered,
            extra,
            abandoned,
            echo_timeouts,
            pacer_skipped,
            send_errors,
            stray,
            misdelivered,
            foreign,
            reconnected
        );
    }
}

/// One storm as one shard saw it. Times are offsets from the storm's scheduled instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StormStat {
    /// Connected clients this storm moved.
    pub moved: u64,
    /// ... of which recovered (a `Rebound` to the moved-to tuple).
    pub recovered: u64,
    /// When the last of its moves was made.
    pub last_move_s: f64,
    /// When the last of its clients recovered.
    pub last_recovery_s: f64,
}

impl StormStat {
    pub fn merge(&mut self, o: &StormStat) {
        self.moved += o.moved;
        self.recovered += o.recovered;
        self.last_move_s = self.last_move_s.max(o.last_move_s);
        self.last_recovery_s = self.last_recovery_s.max(o.last_recovery_s);
    }
}

/// What the generator saw of one rotation command (`POST /rotate` to the admin endpoint).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RotationCommand {
    /// When it went out, in seconds into the measured phase (scheduled at `at_s` of its
    /// [`RotationReport`]).
    pub sent_s: f64,
    /// From sending the request to the gateway's answer (the rotation and its registrations
    /// are committed to the store by then).
    pub took_ms: f64,
    pub ok: bool,
    /// The gateway's answer, or why the command failed.
    pub answer: String,
    /// The epoch the rotation started, read from the answer.
    pub epoch: Option<u32>,
}

impl RotationCommand {
    /// The epoch named by an answer such as `rotated: epoch 3, grace 12 s, ...`.
    pub fn epoch_of(answer: &str) -> Option<u32> {
        let rest = answer.split("epoch ").nth(1)?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    }
}

/// One rotation as one shard saw it. Times are from the rotation's scheduled instant.
#[derive(Clone, Debug, Default)]
pub struct RotationStat {
    /// Clients that installed the next epoch's keys (a KEYS, `keys_installed` of the client
    /// core) after this rotation and before the next.
    pub installed: u64,
    /// ... of which were still live (connected, not failed) at the end of the run.
    pub installed_live: u64,
    /// Clients that switched to the keys they installed after this rotation
    /// (`keys_switched`: an UNRECOGNIZED named the new epoch).
    pub switched: u64,
    /// Handshakes completed (new connections) after this rotation and before the next.
    pub handshakes: u64,
    /// From the rotation to each client's installation.
    pub delivery: LatencyHist,
}

/// [`RotationStat`] in a child's JSON report (the histogram as [`LatencyHist::to_hex`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RawRotation {
    pub installed: u64,
    pub installed_live: u64,
    pub switched: u64,
    pub handshakes: u64,
    pub delivery: String,
}

impl RotationStat {
    pub fn merge(&mut self, o: &RotationStat) {
        self.installed += o.installed;
        self.installed_live += o.installed_live;
        self.switched += o.switched;
        self.handshakes += o.handshakes;
        self.delivery.add(&o.delivery);
    }

    pub fn to_raw(&self) -> RawRotation {
        RawRotation {
            installed: self.installed,
            installed_live: self.installed_live,
            switched: self.switched,
            handshakes: self.handshakes,
            delivery: self.delivery.to_hex(),
        }
    }

    pub fn from_raw(r: &RawRotation) -> Result<RotationStat, String> {
        Ok(RotationStat {
            installed: r.installed,
            installed_live: r.installed_live,
            switched: r.switched,
            handshakes: r.handshakes,
            delivery: LatencyHist::from_hex(&r.delivery)?,
        })
    }
}

/// One rotation of the run (`--rotate-at`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RotationReport {
    /// Scheduled offset into the measured phase; delivery times are measured from it.
    pub at_s: f64,
    /// The command (`None` in the children of a multi-process run: the parent sends it).
    pub command: Option<RotationCommand>,
    /// Clients live (connected, not failed) at the end of the run.
    pub live_clients: u64,
    /// Clients that installed the new epoch's keys, and how many of those were live at the
    /// end; `installed_fraction` is `installed_live / live_clients`.
    pub installed: u64,
    pub installed_live: u64,
    pub installed_fraction: f64,
    /// From the rotation's scheduled instant to each client's installation of its keys.
    pub delivery: Percentiles,
    /// Clients that switched to these keys (an UNRECOGNIZED named the new epoch: after the
    /// previous epoch's grace, or at a rebind that the gateway sent to the new epoch).
    pub switched: u64,
    /// Handshakes completed (new connections) after this rotation and before the next one
    /// (or the end of the run), a client core's own re-handshake after a rebind ran out
    /// (`clients.reconnected`) included. The generator never reconnects a failed client.
    pub handshakes: u64,
}

/// A child process's raw results, in its JSON report, so that the parent of a
/// multi-process run can merge counters and histograms exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RawResult {
    pub counters: Counters,
    pub storms: Vec<StormStat>,
    /// [`LatencyHist::to_hex`] of the echo RTT, handshake, recovery and traffic-recovery
    /// histograms.
    pub rtt: String,
    pub handshake: String,
    pub recovery: String,
    pub traffic_recovery: String,
    pub connect_s: f64,
    pub measured_s: f64,
    pub settle_s: f64,
    /// (sent, received, sent payload bytes) at the start and end of the measured phase.
    pub at_run_start: (u64, u64, u64),
    pub at_run_end: (u64, u64, u64),
    /// One per `--rotate-at` time.
    #[serde(default)]
    pub rotations: Vec<RawRotation>,
}

fn one() -> usize {
    1
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AttackReport {
    pub mode: String,
    pub sent: u64,
    pub sent_bytes: u64,
    pub replies: u64,
    pub reply_bytes: u64,
    /// `reply_bytes / sent_bytes`: must stay <= 1 (the gateway never amplifies).
    pub reply_ratio: f64,
    /// UNRECOGNIZED replies (the expected answer to cookie-failing or unknown-tuple traffic).
    pub unrecognized: u64,
    /// Forgeries accepted: REBIND_ACK, DATA or HANDSHAKE_REPLY at an attack tuple, or the
    /// victim connection's binding moved. Must be 0.
    pub accepted: u64,
    /// wrong-r / wrong-slot / replay: forged REBINDs that passed the cookie check (built on a
    /// fresh UNRECOGNIZED for the attack tuple), so they reached the trial decryption.
    pub past_cookie: u64,
    /// Replay: REBINDs captured from clients that were available to replay.
    pub captured: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VictimReport {
    /// DATA sent by the victim connection (the target of wrong-r / wrong-slot) during attacks.
    pub probes: u64,
    pub echoes: u64,
    /// UNRECOGNIZED at the victim: its binding moved (a forgery was accepted). Must be 0.
    pub unrecognized: u64,
}

/// The outcome of a run. [`LoadReport::passed`] is the verdict; `failures` says why not.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub passed: bool,
    pub failures: Vec<String>,
    pub settings: RunSettings,
    pub clients: ClientsReport,
    pub traffic: TrafficReport,
    pub rebinds: RebindsReport,
    pub attacks: Vec<AttackReport>,
    pub victim: Option<VictimReport>,
    /// Rotation mode (`--rotate-at`): one entry per rotation, empty otherwise.
    #[serde(default)]
    pub rotations: Vec<RotationReport>,
    /// Seconds: measured phase, settle, drain.
    pub measured_s: f64,
    pub settle_s: f64,
    /// Child processes only: the raw results for the parent to merge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawResult>,
}

impl LoadReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Fills `failures` and `passed` from the numbers.
    pub fn judge(&mut self, max_loss_pct: Option<f64>) {
        let mut f = Vec::new();
        let c = &self.clients;
        if c.failed_to_connect > 0 {
            f.push(format!(
                "{} of {} clients failed to connect",
                c.failed_to_connect, c.requested
            ));
        }
        if c.failed_after_connect > 0 {
            f.push(format!(
                "{} clients failed after connecting ({} of them handshook again)",
                c.failed_after_connect, c.reconnected
            ));
        }
        let r = &self.rebinds;
        if r.failed > 0 {
            f.push(format!(
                "{} of {} outages ended in a failed rebind",
                r.failed, r.outages
            ));
        }
        if r.unrecovered > 0 {
            f.push(format!(
                "{} of {} outages had not recovered by the end",
                r.unrecovered, r.outages
            ));
        }
        let live = (c.connected + c.reconnected).saturating_sub(c.failed_after_connect);
        for (k, st) in r.storm_detail.iter().enumerate() {
            if st.moved < live {
                f.push(format!(
                    "storm {} moved only {} of {live} connected clients",
                    k + 1,
                    st.moved
                ));
            }
        }
        if self.traffic.misdelivered > 0 {
            f.push(format!(
                "{} echoes reached the wrong client",
                self.traffic.misdelivered
            ));
        }
        if let Some(m) = max_loss_pct
            && self.traffic.steady_loss_pct > m
        {
            f.push(format!(
                "steady-state loss {:.3}% exceeds --max-loss {m}%",
                self.traffic.steady_loss_pct
            ));
        }
        for a in &self.attacks {
            if a.accepted > 0 {
                f.push(format!(
                    "attack {}: {} forgeries accepted",
                    a.mode, a.accepted
                ));
            }
            if a.reply_ratio > 1.0 {
                f.push(format!(
                    "attack {}: reply/request bytes {:.3} > 1 (amplification)",
                    a.mode, a.reply_ratio
                ));
            }
        }
        if let Some(v) = &self.victim
            && v.unrecognized > 0
        {
            f.push(format!(
                "victim connection lost its binding {} times (a forged REBIND was accepted)",
                v.unrecognized
            ));
        }
        // The rotations are judged where the commands were sent (not in children).
        for (k, r) in self.rotations.iter().enumerate() {
            if let Some(c) = &r.command
                && !c.ok
            {
                f.push(format!(
                    "rotation {} at {:.2} s failed: {}",
                    k + 1,
                    r.at_s,
                    c.answer.trim()
                ));
            }
        }
        if let Some((k, r)) = self.rotations.iter().enumerate().next_back()
            && r.command.is_some()
            && r.installed_live < r.live_clients
        {
            f.push(format!(
                "{} of {} live clients never installed the keys of the last rotation ({} at                  {:.2} s)",
                r.live_clients - r.installed_live,
                r.live_clients,
                k + 1,
                r.at_s
            ));
        }
        self.failures = f;
        self.passed = self.failures.is_empty();
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The human-readable report.
    pub fn to_human(&self) -> String {
        let mut s = String::new();
        let st = &self.settings;
        let load = match (st.rate, st.window) {
            (Some(r), _) => format!("open loop {} pps", fmt_rate(r)),
            (_, Some(w)) => format!("closed loop, window {w}"),
            _ => st.load.clone(),
        };
        let procs = if st.processes > 1 {
            format!(" in {} processes", st.processes)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "loadgen: {} clients on {} threads{procs} -> {}, {:.1} s, {load}, payload {} B",
            st.clients,
            st.threads,
            st.gateways.join(" "),
            st.duration_s,
            st.payload
        );
        if st.churn_per_sec > 0.0 || !st.storms_at_s.is_empty() {
            let _ = writeln!(
                s,
                "  churn {}/s ({}), storms at {:?} s, on move: {}",
                st.churn_per_sec,
                st.move_kind,
                st.storms_at_s,
                if st.on_move.is_empty() {
                    "none"
                } else {
                    &st.on_move
                }
            );
        }
        let c = &self.clients;
        let _ = writeln!(
            s,
            "clients    {}/{} connected in {:.2} s, {} failed to connect, {} failed later \
             ({} handshook again)",
            c.connected,
            c.requested,
            c.connect_phase_s,
            c.failed_to_connect,
            c.failed_after_connect,
            c.reconnected
        );
        let _ = writeln!(s, "handshake  {}", c.handshake.line());
        let t = &self.traffic;
        let _ = writeln!(
            s,
            "traffic    tx {}/s rx {}/s ({:.1} Mbit/s payload), sent {} received {}",
            fmt_rate(t.tx_pps),
            fmt_rate(t.rx_pps),
            t.tx_payload_mbit,
            t.sent,
            t.received
        );
        let _ = writeln!(
            s,
            "loss       {:.3}% total, {:.3}% steady-state ({} lost to moves: {} sent during \
             outages, {} in flight at a move)",
            t.loss_pct,
            t.steady_loss_pct,
            t.expected_losses,
            t.sent_during_outage,
            t.in_flight_at_move
        );
        let _ = writeln!(s, "echo rtt   {}", t.rtt.line());
        if t.echo_timeouts
            + t.pacer_skipped
            + t.socket_send_errors
            + t.stray_datagrams
            + t.misdelivered
            + t.foreign_payloads
            > 0
        {
            let _ = writeln!(
                s,
                "           echo timeouts {}, pacer skipped {}, send errors {}, stray {}, \
                 misdelivered {}, foreign {}",
                t.echo_timeouts,
                t.pacer_skipped,
                t.socket_send_errors,
                t.stray_datagrams,
                t.misdelivered,
                t.foreign_payloads
            );
        }
        let r = &self.rebinds;
        let _ = writeln!(
            s,
            "rebinds    {} moves ({} storms), {} outages: {} recovered, {} failed, {} unrecovered; \
             {} extra, {} abandoned",
            r.moves,
            r.storms,
            r.outages,
            r.succeeded,
            r.failed,
            r.unrecovered,
            r.extra,
            r.abandoned
        );
        let _ = writeln!(s, "recovery   {}", r.recovery.line());
        let _ = writeln!(s, "traffic-up {}", r.traffic_recovery.line());
        for (k, st) in r.storm_detail.iter().enumerate() {
            let _ = writeln!(
                s,
                "storm {}    at {:.2} s: {} moved (moves done after {}), {} recovered, {}",
                k + 1,
                st.at_s,
                st.moved,
                fmt_ms(st.moves_done_s * 1e3),
                st.recovered,
                if st.all_recovered {
                    format!(
                        "all recovered {} after the storm",
                        fmt_ms(st.last_recovery_s * 1e3)
                    )
                } else {
                    format!(
                        "{} NOT recovered (last recovery {} after the storm)",
                        st.moved - st.recovered.min(st.moved),
                        fmt_ms(st.last_recovery_s * 1e3)
                    )
                }
            );
        }
        for a in &self.attacks {
            let _ = writeln!(
                s,
                "attack {:<16} sent {} ({} B), replies {} ({} B, ratio {:.3}), unrecognized {}, \
                 past cookie {}, captured {}, ACCEPTED {}",
                a.mode,
                a.sent,
                a.sent_bytes,
                a.replies,
                a.reply_bytes,
                a.reply_ratio,
                a.unrecognized,
                a.past_cookie,
                a.captured,
                a.accepted
            );
        }
        if let Some(v) = &self.victim {
            let _ = writeln!(
                s,
                "victim     {} probes, {} echoes, {} UNRECOGNIZED",
                v.probes, v.echoes, v.unrecognized
            );
        }
        for (k, r) in self.rotations.iter().enumerate() {
            let cmd = match &r.command {
                Some(c) => format!(
                    "sent at {:.3} s, {} in {}: {}",
                    c.sent_s,
                    if c.ok { "answered" } else { "FAILED" },
                    fmt_ms(c.took_ms),
                    c.answer.trim()
                ),
                None => "sent by the parent process".into(),
            };
            let _ = writeln!(s, "rotation {} at {:.2} s: {cmd}", k + 1, r.at_s);
            let _ = writeln!(
                s,
                "  keys     installed by {}/{} live clients ({:.1}%; {} in all), {} switched, \
                 {} handshakes after it",
                r.installed_live,
                r.live_clients,
                100.0 * r.installed_fraction,
                r.installed,
                r.switched,
                r.handshakes
            );
            let _ = writeln!(s, "  delivery {}", r.delivery.line());
        }
        if self.passed() {
            let _ = writeln!(s, "result     PASS");
        } else {
            let _ = writeln!(s, "result     FAIL");
            for f in &self.failures {
                let _ = writeln!(s, "  - {f}");
            }
        }
        s
    }
}

/// Builds an [`AttackReport`] skeleton for a mode.
pub fn attack_report(mode: AttackMode) -> AttackReport {
    AttackReport {
        mode: mode.name().to_owned(),
        ..AttackReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_percentiles() {
        let mut h = LatencyHist::default();
        assert_eq!(h.summary(), Percentiles::default());
        for us in 1..=1000 {
            h.record_us(us);
        }
        h.record(Duration::from_secs(2));
        let p = h.summary();
        assert_eq!(p.count, 1001);
        assert!((p.p50_ms - 0.5).abs() < 0.01, "{p:?}");
        assert!((p.p90_ms - 0.9).abs() < 0.01, "{p:?}");
        assert!((p.p99_ms - 0.99).abs() < 0.01, "{p:?}");
        assert!((p.max_ms - 2000.0).abs() < 2.0, "{p:?}");
        let mut other = LatencyHist::default();
        other.record_us(0);
        h.add(&other);
        assert_eq!(h.len(), 1002);
        let back = LatencyHist::from_hex(&h.to_hex()).unwrap();
        assert_eq!(back.summary(), h.summary());
        assert!(LatencyHist::from_hex("zz").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_ms(0.1234), "0.123 ms");
        assert_eq!(fmt_ms(12.34), "12.3 ms");
        assert_eq!(fmt_ms(1234.0), "1.23 s");
        assert_eq!(fmt_rate(38_123.0), "38.1k");
        assert_eq!(fmt_rate(999.0), "999");
        assert_eq!(fmt_rate(1_200_000.0), "1.20M");
    }

    #[test]
    fn verdict() {
        let mut r = LoadReport::default();
        r.clients.requested = 10;
        r.judge(None);
        assert!(r.passed() && r.passed);
        r.clients.failed_to_connect = 1;
        r.rebinds.unrecovered = 2;
        r.traffic.steady_loss_pct = 3.0;
        let mut a = attack_report(AttackMode::Replay);
        a.accepted = 1;
        a.reply_ratio = 1.5;
        r.attacks.push(a);
        r.judge(Some(1.0));
        assert!(!r.passed());
        assert_eq!(r.failures.len(), 5, "{:?}", r.failures);
        let human = r.to_human();
        assert!(human.contains("FAIL") && human.contains("replay"));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["passed"], false);
        assert_eq!(json["attacks"][0]["mode"], "replay");
    }

    #[test]
    fn rotation_epoch_from_the_answer() {
        let a = "rotated: epoch 3, grace 12 s, 1001 connections registered for key delivery\n";
        assert_eq!(RotationCommand::epoch_of(a), Some(3));
        assert_eq!(
            RotationCommand::epoch_of("rotated: epoch 12, grace 1 s, epoch 10 dropped early"),
            Some(12)
        );
        assert_eq!(RotationCommand::epoch_of("unauthorized"), None);
    }

    #[test]
    fn rotation_stats_merge_exactly_through_the_raw_form() {
        let mut a = RotationStat {
            installed: 3,
            installed_live: 3,
            switched: 1,
            handshakes: 0,
            ..RotationStat::default()
        };
        for ms in [10, 20, 30] {
            a.delivery.record(Duration::from_millis(ms));
        }
        let mut b = RotationStat {
            installed: 2,
            installed_live: 1,
            switched: 2,
            handshakes: 4,
            ..RotationStat::default()
        };
        for ms in [40, 5000] {
            b.delivery.record(Duration::from_millis(ms));
        }
        let json = serde_json::to_string(&b.to_raw()).unwrap();
        let back = RotationStat::from_raw(&serde_json::from_str(&json).unwrap()).unwrap();
        a.merge(&back);
        assert_eq!(
            (a.installed, a.installed_live, a.switched, a.handshakes),
            (5, 4, 3, 4)
        );
        let p = a.delivery.summary();
        assert_eq!(p.count, 5);
        assert!((p.p50_ms - 30.0).abs() < 0.1, "{p:?}");
        assert!((p.max_ms - 5000.0).abs() < 5.0, "{p:?}");
        assert!(RotationStat::from_raw(&RawRotation::default()).is_err());
    }

    #[test]
    fn rotation_verdict() {
        let cmd = |ok: bool| RotationCommand {
            sent_s: 2.0,
            took_ms: 50.0,
            ok,
            answer: if ok {
                "rotated: epoch 2, grace 12 s"
            } else {
                "refused (409)"
            }
            .into(),
            epoch: ok.then_some(2),
        };
        let rot = |ok: bool, live: u64, got: u64| RotationReport {
            at_s: 2.0,
            command: Some(cmd(ok)),
            live_clients: live,
            installed: got,
            installed_live: got,
            installed_fraction: got as f64 / live as f64,
            ..RotationReport::default()
        };
        let mut r = LoadReport {
            rotations: vec![rot(true, 10, 9), rot(true, 10, 10)],
            ..LoadReport::default()
        };
        r.judge(None);
        assert!(
            r.passed(),
            "only the last rotation must reach everyone: {:?}",
            r.failures
        );
        r.rotations[1].installed_live = 8;
        r.judge(None);
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        assert!(
            r.failures[0].contains("2 of 10 live clients"),
            "{:?}",
            r.failures
        );
        r.rotations = vec![rot(false, 10, 0)];
        r.judge(None);
        assert_eq!(r.failures.len(), 2, "{:?}", r.failures);
        assert!(r.failures[0].contains("refused (409)"));
        let human = r.to_human();
        assert!(
            human.contains("rotation 1 at 2.00 s") && human.contains("FAILED"),
            "{human}"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["rotations"][0]["command"]["ok"], false);
        // A child's report has no command: nothing to judge there.
        r.rotations[0].command = None;
        r.judge(None);
        assert!(r.passed());
    }
}
