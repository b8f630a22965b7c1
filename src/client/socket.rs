//! A blocking socket driver for the client state machine: one UDP socket, the clock, and
//! nothing else. Applications with their own event loop drive [`Client`] directly.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use super::{Client, ClientConfig, ClientEvent, ClientState, SendError};
use crate::time::{TickClock, Ticks};
use crate::wire::ClientCredentials;

/// Why [`UdpClient::connect`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    // Not `#[from]`: that would make the io::Error a source too, and a `{:#}` chain would
    // print it twice.
    #[error("socket error: {0}")]
    Io(io::Error),
    #[error("handshake failed: {0}")]
    Failed(super::ClientError),
    #[error("no HANDSHAKE_REPLY within {0:?}")]
    Timeout(Duration),
}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

/// A client connection over a real UDP socket.
///
/// It keeps itself connected as the core does: when a rebind runs out with the path silent
/// the core handshakes again by itself ([`ClientEvent::Reconnecting`], state `Handshaking`,
/// then [`ClientEvent::Connected`] with a new conn_id), and every call that runs I/O
/// (`recv`, `drive`, `wait_event`) keeps that handshake going. Meanwhile
/// [`UdpClient::send`] returns [`SendError::NotConnected`]; payloads queued for the dead
/// connection are dropped. Only `Failed` (e.g. that handshake timing out) means the
/// application must connect again.
pub struct UdpClient {
    client: Client,
    /// The edge where `Instant`s become the core's ticks.
    clock: TickClock,
    socket: UdpSocket,
    gateway: SocketAddr,
    buf: Vec<u8>,
    events: VecDeque<ClientEvent>,
    received: VecDeque<Vec<u8>>,
}

impl UdpClient {
    /// Binds `bind`, handshakes through `gateway`, and returns once connected.
    pub fn connect(
        gateway: SocketAddr,
        bind: SocketAddr,
        creds: ClientCredentials,
        config: ClientConfig,
        timeout: Duration,
    ) -> Result<UdpClient, ConnectError> {
        let now = Instant::now();
        let clock = TickClock::new(now, Ticks::wall_clock());
        let mut c = UdpClient {
            client: Client::new(config, creds, clock.ticks(now)),
            clock,
            socket: UdpSocket::bind(bind)?,
            gateway,
            buf: vec![0u8; 2048],
            events: VecDeque::new(),
            received: VecDeque::new(),
        };
        let deadline = now + timeout;
        loop {
            match c.client.state() {
                ClientState::Connected => return Ok(c),
                ClientState::Failed(e) => return Err(ConnectError::Failed(e)),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ConnectError::Timeout(timeout));
            }
            c.step(deadline)?;
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Queues and sends one payload as DATA.
    pub fn send(&mut self, payload: &[u8]) -> Result<(), SendError> {
        self.client.send(payload)?;
        // A send error surfaces on the next step; DATA is best-effort like UDP.
        let _ = self.flush();
        Ok(())
    }

    /// Runs I/O and timers until a payload arrives or `timeout` passes.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.received.pop_front() {
                return Ok(Some(p));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.step(deadline)?;
        }
    }

    /// Runs I/O and timers for `period`.
    pub fn drive(&mut self, period: Duration) -> io::Result<()> {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            self.step(deadline)?;
        }
        Ok(())
    }

    /// Runs until an event matching `want` arrives or `timeout` passes.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&ClientEvent) -> bool,
    ) -> io::Result<Option<ClientEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(&mut want) {
                return Ok(self.events.remove(i));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.step(deadline)?;
        }
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Moves to a new local socket without telling the state machine, as when a NAT
    /// mapping changes under the application.
    pub fn move_socket(&mut self, bind: SocketAddr) -> io::Result<()> {
        self.socket = UdpSocket::bind(bind)?;
        Ok(())
    }

    /// The application knows the network changed: ask for a cookie at once.
    pub fn network_changed(&mut self) -> io::Result<()> {
        self.client.network_changed(self.clock.now());
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        let now = self.clock.now();
        while let Some(n) = self.client.poll_transmit(now, &mut self.buf) {
            match self.socket.send_to(&self.buf[..n], self.gateway) {
                Ok(_) => {}
                // Loopback buffers full or no route: the protocol retries.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn collect(&mut self) {
        while let Some(e) = self.client.poll_event() {
            self.events.push_back(e);
        }
        while let Some(p) = self.client.poll_received() {
            self.received.push_back(p);
        }
    }

    /// One round: send what is due, wait for a datagram or the next timer, handle it.
    fn step(&mut self, deadline: Instant) -> io::Result<()> {
        self.flush()?;
        let now = Instant::now();
        let wake = self
            .client
            .poll_timeout()
            .map_or(deadline, |t| self.clock.instant(t).min(deadline));
        let wait = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(wait))?;
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) if from == self.gateway => {
                let datagram = self.buf[..n].to_vec();
                self.client.handle(self.clock.now(), &datagram);
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // ICMP port unreachable from an earlier send: the gateway may be restarting.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
        let now = self.clock.now();
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        self.collect();
        self.flush()
    }
}
