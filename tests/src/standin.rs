// SPDX-License-Identifier: Apache-2.0
//! The metadata stand-in: what answers on the node's metadata addresses.
//!
//! HTTP on TCP 80 and 53, UDP echo on 80 and 53 (all dual-stack), and raw ICMP
//! sockets that count echo requests. Everything that arrives is tallied, so a
//! scenario can tell "refused by the guard" from "sent, but never answered".

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, TcpStream},
    os::unix::net::UnixDatagram,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::netns::NetNs;
use server::{open_sockets, Server};

mod imds;
mod server;

/// Requests the log keeps (the oldest go first).
const MAX_LOGGED: usize = 4096;

/// One HTTP request the stand-in received, and the status it answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Logged {
    pub source: IpAddr,
    pub method: String,
    pub target: String,
    /// Lower-case names, in the order sent.
    pub headers: Vec<(String, String)>,
    pub status: u16,
}

impl Logged {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// The ports served over both TCP and UDP.
pub const STANDIN_PORTS: [u16; 3] = [80, 53, BARRIER_PORT];

/// A port only scenarios' barriers use (discard): a datagram sent there after an
/// attempt, once arrived, shows that the attempt's packets had their chance to.
pub const BARRIER_PORT: u16 = 9;

/// How long `arrivals()` waits for the serving thread before answering with what
/// it has (only if that thread is wedged).
const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// How many of something arrived, from where, to which address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub count: u64,
    pub sources: BTreeMap<IpAddr, u64>,
    pub destinations: BTreeMap<IpAddr, u64>,
}

/// What `Arrivals::tcp`/`udp` lend for a port nothing arrived on.
static NOTHING: Tally = Tally { count: 0, sources: BTreeMap::new(), destinations: BTreeMap::new() };

impl Tally {
    /// How many arrived from `source`.
    pub fn from(&self, source: IpAddr) -> u64 {
        self.sources.get(&source).copied().unwrap_or(0)
    }

    /// How many arrived for `destination`.
    pub fn to(&self, destination: IpAddr) -> u64 {
        self.destinations.get(&destination).copied().unwrap_or(0)
    }

    fn record(&mut self, source: IpAddr, destination: IpAddr) {
        self.count += 1;
        *self.sources.entry(source.to_canonical()).or_default() += 1;
        *self.destinations.entry(destination.to_canonical()).or_default() += 1;
    }
}

/// A snapshot of everything the stand-in saw since it started or was reset.
/// IPv4 peers of the dual-stack sockets appear as plain IPv4 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Arrivals {
    /// TCP connections accepted, by port.
    pub tcp_accepted: BTreeMap<u16, Tally>,
    /// UDP datagrams received, by port.
    pub udp_received: BTreeMap<u16, Tally>,
    /// ICMP and ICMPv6 echo requests that reached the node.
    pub echo_requests: Tally,
    /// Socket errors the stand-in hit, by text; expected to stay empty.
    pub errors: BTreeMap<String, u64>,
    /// Every HTTP request received, in order (the last [`MAX_LOGGED`]).
    pub requests: Vec<Logged>,
}

impl Arrivals {
    pub fn tcp(&self, port: u16) -> &Tally {
        self.tcp_accepted.get(&port).unwrap_or(&NOTHING)
    }

    pub fn udp(&self, port: u16) -> &Tally {
        self.udp_received.get(&port).unwrap_or(&NOTHING)
    }

    fn log(&mut self, request: Logged) {
        if self.requests.len() >= MAX_LOGGED {
            self.requests.remove(0);
        }
        self.requests.push(request);
    }

    /// Connections, datagrams and echo requests, all together.
    pub fn total(&self) -> u64 {
        let tcp: u64 = self.tcp_accepted.values().map(|t| t.count).sum();
        let udp: u64 = self.udp_received.values().map(|t| t.count).sum();
        tcp + udp + self.echo_requests.count
    }
}

/// The running stand-in. Stops, and closes its sockets, on drop.
pub struct Standin {
    shared: Arc<Shared>,
    wake: UnixDatagram,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    synced: Condvar,
    /// Token-less requests of the AWS tree are answered 401 (`imds`).
    require_imdsv2: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    arrivals: Arrivals,
    /// Snapshots asked for, and how many of those the server has caught up with.
    sync_asked: u64,
    sync_done: u64,
    stop: bool,
}

impl Standin {
    /// Opens every socket inside `ns` and starts serving on a background thread.
    pub fn start(ns: &NetNs) -> Result<Standin> {
        let sockets =
            ns.run(open_sockets).with_context(|| format!("could not start the metadata stand-in in {}", ns.name()))?;
        let (wake, woken) = UnixDatagram::pair().context("could not create the stand-in's wake-up socket pair")?;
        woken.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            synced: Condvar::new(),
            require_imdsv2: std::sync::atomic::AtomicBool::new(false),
        });
        let server = Server::new(sockets, woken);
        let for_server = shared.clone();
        let thread = thread::Builder::new()
            .name("metadata-standin".into())
            .spawn(move || server.run(&for_server))
            .context("could not spawn the stand-in thread")?;
        Ok(Standin { shared, wake, thread: Some(thread) })
    }

    /// Everything seen so far, including whatever already sits in the sockets'
    /// queues (so a datagram sent before this call is counted). Packets still
    /// in flight are not: to prove nothing arrived, wait a little first.
    pub fn arrivals(&self) -> Arrivals {
        self.synced().arrivals.clone()
    }

    /// Whether a request of the AWS tree needs an IMDSv2 token the stand-in issued
    /// (as `HttpTokens: required`); off, token-less requests are served (`optional`).
    /// Either way a token it did not issue is answered 401.
    pub fn require_imdsv2(&self, on: bool) {
        self.shared.require_imdsv2.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets everything seen so far.
    pub fn reset(&self) {
        self.synced().arrivals = Arrivals::default();
    }

    /// Lets the server drain its queues, then hands over the state.
    fn synced(&self) -> MutexGuard<'_, State> {
        let mut state = self.shared.state.lock().unwrap();
        state.sync_asked += 1;
        let ticket = state.sync_asked;
        // A full socket buffer only means a wake-up is already pending.
        let _ = self.wake.send(&[0]);
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while state.sync_done < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.shared.synced.wait_timeout(state, left).unwrap().0;
        }
        state
    }
}

/// Asks for /latest/meta-data/ on `stream` (connected to the stand-in's HTTP port), as
/// an SDK's first request does, and expects `HTTP/1.x 200` within `timeout`.
pub fn ask_metadata(mut stream: TcpStream, timeout: Duration) -> std::io::Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: metadata\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    if head.starts_with(b"HTTP/1.") && &head[9..12] == b"200" {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("unexpected answer {:?}", String::from_utf8_lossy(&head))))
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().stop = true;
        let _ = self.wake.send(&[0]);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
