//! `poll(2)` over a handful of sockets, for thin single-threaded loops (the tunnel's
//! `connect` and `host --forward`). Safe: the one unsafe call is `mmsg::poll_fds`.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Reusable `poll(2)` state: add the sockets, wait, then ask which are readable.
#[derive(Debug, Default)]
pub struct Poller {
    fds: Vec<libc::pollfd>,
}

impl Poller {
    pub fn new() -> Poller {
        Poller::default()
    }

    /// Forgets the sockets of the previous round.
    pub fn clear(&mut self) {
        self.fds.clear();
    }

    /// Watches `sock` for reading; returns its index for [`Poller::readable`].
    pub fn add(&mut self, sock: &impl AsRawFd) -> usize {
        self.fds.push(libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        self.fds.len() - 1
    }

    /// Waits until a socket is readable (or has an error pending) or `timeout` passes
    /// (`None`: forever). Returns how many are ready; `EINTR` counts as none.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        for p in &mut self.fds {
            p.revents = 0;
        }
        super::mmsg::poll_fds(&mut self.fds, timeout)
    }

    /// Was socket `i` readable (or in error) after the last [`Poller::wait`]?
    pub fn readable(&self, i: usize) -> bool {
        self.fds
            .get(i)
            .is_some_and(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn reports_the_readable_socket() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut p = Poller::new();
        let (ia, ib) = (p.add(&a), p.add(&b));
        assert_eq!(p.wait(Some(Duration::from_millis(1))).unwrap(), 0);
        a.send_to(b"x", b.local_addr().unwrap()).unwrap();
        assert_eq!(p.wait(Some(Duration::from_secs(5))).unwrap(), 1);
        assert!(p.readable(ib) && !p.readable(ia));
    }
}
