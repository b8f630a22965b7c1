//! The load generator's only unsafe code: `epoll(7)`, `setrlimit(2)` and
//! `clock_gettime(2)` through `libc`.
//! Everything here is a thin, checked wrapper; no pointer escapes a function.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A level-triggered `epoll` instance whose registrations carry a `u64` token.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// Reusable buffer for [`Epoll::wait`].
pub struct Events {
    buf: Vec<libc::epoll_event>,
    len: usize,
}

impl Events {
    pub fn with_capacity(n: usize) -> Events {
        Events {
            buf: vec![libc::epoll_event { events: 0, u64: 0 }; n.max(1)],
            len: 0,
        }
    }

    /// Tokens of the ready registrations from the last wait.
    pub fn tokens(&self) -> impl Iterator<Item = u64> + '_ {
        self.buf[..self.len].iter().map(|e| e.u64)
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; on success it returns a fresh descriptor
        // that nothing else owns, so wrapping it in an OwnedFd is sound.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` is a valid, open descriptor owned by no one else (see above).
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for readability (level-triggered), reporting `token`.
    pub fn add(&self, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), token)
    }

    /// Stops watching `fd` (before it is set aside without being closed).
    pub fn delete(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0)
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is a valid epoll_event on our stack for the duration of the call; the
        // kernel copies it. Both descriptors are open (borrowed from live owners).
        cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) })?;
        Ok(())
    }

    /// Waits up to `timeout` (None: forever) with nanosecond resolution (`epoll_pwait2`).
    /// EINTR counts as a wake-up with no events.
    pub fn wait(&self, events: &mut Events, timeout: Option<Duration>) -> io::Result<usize> {
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        let cap = events.buf.len().min(i32::MAX as usize) as libc::c_int;
        // SAFETY: `events.buf` holds `cap` writable epoll_events; `ts_ptr` is null or points
        // to a timespec that outlives the call; a null sigmask means "leave it unchanged".
        let r = unsafe {
            libc::epoll_pwait2(
                self.fd.as_raw_fd(),
                events.buf.as_mut_ptr(),
                cap,
                ts_ptr,
                std::ptr::null(),
            )
        };
        match cvt(r) {
            Ok(n) => {
                events.len = n as usize;
                Ok(events.len)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                events.len = 0;
                Ok(0)
            }
            Err(e) => {
                events.len = 0;
                Err(e)
            }
        }
    }
}

/// Raises RLIMIT_NOFILE so that at least `want` descriptors can be open: the soft limit goes
/// to the hard limit, and the hard limit too when `want` exceeds it and we may (root, up to
/// `fs.nr_open`). Returns the resulting `(soft, hard)`.
pub fn raise_nofile_limit(want: u64) -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the kernel writes into.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    if want > lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: want.min(nr_open) as libc::rlim_t,
            rlim_max: want.min(nr_open) as libc::rlim_t,
        };
        // SAFETY: `raised` is a valid rlimit the kernel reads. Failure (no CAP_SYS_RESOURCE)
        // is fine: we fall back to the existing hard limit below.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok((raised.rlim_cur as u64, raised.rlim_max as u64));
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above; raising the soft limit to the hard limit is always permitted.
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `Instant` reads, shared by every process and
/// network namespace of the machine, so another program (a test driver) can compare it.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the kernel writes into; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn epoll_reports_readable_socket_token() {
        let ep = Epoll::new().unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        ep.add(&a, 42).unwrap();
        let mut ev = Events::with_capacity(8);
        assert_eq!(ep.wait(&mut ev, Some(Duration::from_millis(1))).unwrap(), 0);
        b.send_to(b"x", a.local_addr().unwrap()).unwrap();
        let n = ep.wait(&mut ev, Some(Duration::from_secs(2))).unwrap();
        assert_eq!(n, 1);
        assert_eq!(ev.tokens().collect::<Vec<_>>(), vec![42]);
        ep.delete(&a).unwrap();
        assert_eq!(ep.wait(&mut ev, Some(Duration::from_millis(1))).unwrap(), 0);
        ep.add(&a, 42).unwrap();
        drop(a); // closing removes it from the set
        assert_eq!(ep.wait(&mut ev, Some(Duration::from_millis(1))).unwrap(), 0);
    }

    #[test]
    fn nofile_limit_is_at_least_the_old_soft_limit() {
        let (soft, hard) = raise_nofile_limit(1024).unwrap();
        assert!(soft >= 1024 && hard >= soft);
    }
}
