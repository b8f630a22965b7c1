//! Mesh time: `ticks`, 100 ns intervals since 0001-01-01T00:00:00 UTC (PROTOCOL.md §2).
#![forbid(unsafe_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Ticks at the Unix epoch.
pub const UNIX_EPOCH_TICKS: u64 = 621_355_968_000_000_000;
/// Ticks per second.
pub const TICKS_PER_SECOND: u64 = 10_000_000;

/// A point in Mesh time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Ticks(pub u64);

impl Ticks {
    /// Converts a wall-clock instant. Times before 1970 clamp to the Unix epoch.
    pub fn from_system_time(t: SystemTime) -> Ticks {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Ticks(UNIX_EPOCH_TICKS.saturating_add(duration_ticks(since)))
    }

    /// The wall clock now. Only I/O drivers call this; the core takes `now` as an argument.
    pub fn wall_clock() -> Ticks {
        Ticks::from_system_time(SystemTime::now())
    }

    pub fn saturating_add(self, d: Duration) -> Ticks {
        Ticks(self.0.saturating_add(duration_ticks(d)))
    }

    pub fn saturating_sub(self, d: Duration) -> Ticks {
        Ticks(self.0.saturating_sub(duration_ticks(d)))
    }

    /// The time `ms` milliseconds after the Unix epoch (saturating).
    pub fn from_unix_ms(ms: u64) -> Ticks {
        Ticks(UNIX_EPOCH_TICKS.saturating_add(ms.saturating_mul(TICKS_PER_SECOND / 1000)))
    }

    /// Milliseconds since the Unix epoch (zero before it).
    pub fn unix_ms(self) -> u64 {
        self.0.saturating_sub(UNIX_EPOCH_TICKS) / (TICKS_PER_SECOND / 1000)
    }

    /// Absolute distance between two times.
    pub fn abs_diff(self, other: Ticks) -> u64 {
        self.0.abs_diff(other.0)
    }

    /// Time elapsed since `earlier`, zero if `earlier` is later.
    pub fn since(self, earlier: Ticks) -> Duration {
        let t = self.0.saturating_sub(earlier.0);
        Duration::new(t / TICKS_PER_SECOND, ((t % TICKS_PER_SECOND) * 100) as u32)
    }
}

/// `now + d`, saturating: lets timers written for `Instant` read the same over ticks.
impl std::ops::Add<Duration> for Ticks {
    type Output = Ticks;
    fn add(self, d: Duration) -> Ticks {
        self.saturating_add(d)
    }
}

/// Maps a driver's monotonic clock onto the ticks the sans-IO cores take: the wall clock at
/// creation plus the `Instant` time elapsed since, so the ticks never run backwards. Drivers
/// convert at the edge with it; the cores never see an `Instant`.
#[derive(Clone, Copy, Debug)]
pub struct TickClock {
    base: std::time::Instant,
    wall: Ticks,
}

impl TickClock {
    /// Starts at `wall` (usually [`Ticks::wall_clock`]) at the instant `base`.
    pub fn new(base: std::time::Instant, wall: Ticks) -> TickClock {
        TickClock { base, wall }
    }

    /// Starts at the wall clock, now.
    pub fn start() -> TickClock {
        TickClock::new(std::time::Instant::now(), Ticks::wall_clock())
    }

    /// The ticks at `t`.
    pub fn ticks(&self, t: std::time::Instant) -> Ticks {
        self.wall
            .saturating_add(t.saturating_duration_since(self.base))
    }

    /// The ticks now.
    pub fn now(&self) -> Ticks {
        self.ticks(std::time::Instant::now())
    }

    /// The instant of `t` (a deadline from a core), clamped to the base.
    pub fn instant(&self, t: Ticks) -> std::time::Instant {
        self.base + t.since(self.wall)
    }
}

/// A duration in ticks, saturating.
pub fn duration_ticks(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(TICKS_PER_SECOND)
        .saturating_add(u64::from(d.subsec_nanos() / 100))
}

/// Issues gateway times that never run backwards (PROTOCOL.md §6): the maximum of the wall
/// clock and the last issued time, so a clock step back cannot lock a connection out behind
/// its own `L`.
#[derive(Debug, Default, Clone)]
pub struct MonotoneTicks {
    last: u64,
}

impl MonotoneTicks {
    /// Starts at `floor`, e.g. the largest `L` persisted before a restart.
    pub fn with_floor(floor: Ticks) -> Self {
        MonotoneTicks { last: floor.0 }
    }

    /// Returns `max(wall, last issued)` and remembers it.
    pub fn issue(&mut self, wall: Ticks) -> Ticks {
        self.last = self.last.max(wall.0);
        Ticks(self.last)
    }

    pub fn last(&self) -> Ticks {
        Ticks(self.last)
    }
}

/// The command line's one duration syntax: a plain number is seconds (`10`, `1.5`), anything
/// else is humantime's (`250ms`, `10s`, `2m`, `1h30m`, `500us`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{s:?}: must be a non-negative number of seconds"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e} (expected e.g. 10, 10s, 250ms, 2m or 1h30m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_epoch_and_2026() {
        assert_eq!(Ticks::from_system_time(UNIX_EPOCH).0, UNIX_EPOCH_TICKS);
        // 2026-01-01T00:00:00Z = 1767225600 unix seconds; the vectors file states the ticks.
        let t = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        assert_eq!(Ticks::from_system_time(t).0, 639_028_224_000_000_000);
    }

    #[test]
    fn monotone_never_runs_backwards() {
        let mut m = MonotoneTicks::default();
        assert_eq!(m.issue(Ticks(100)), Ticks(100));
        assert_eq!(m.issue(Ticks(50)), Ticks(100));
        assert_eq!(m.issue(Ticks(150)), Ticks(150));
        let mut f = MonotoneTicks::with_floor(Ticks(1_000));
        assert_eq!(f.issue(Ticks(10)), Ticks(1_000));
    }

    #[test]
    fn since_and_durations() {
        let a = Ticks(1_000);
        let b = a.saturating_add(Duration::from_millis(1500));
        assert_eq!(b.0 - a.0, 15_000_000);
        assert_eq!(b.since(a), Duration::from_millis(1500));
        assert_eq!(a.since(b), Duration::ZERO);
    }

    #[test]
    fn durations_for_the_command_line() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        for bad in ["5 parsecs", "-1s", "-1", "nan", "", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
