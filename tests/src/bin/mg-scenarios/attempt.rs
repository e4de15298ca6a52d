// SPDX-License-Identifier: Apache-2.0
//! A pod (or host) process trying to reach an address: the child side.
//!
//! The runner re-executes itself as `mg-scenarios attempt ...`; the child joins the
//! given network namespace and cgroup *before* it opens any socket (a socket belongs
//! to the namespace and cgroup of its creator), makes its attempts, and prints one
//! JSON line with the outcomes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// TCP connect, then an HTTP GET; `ok` only with a 200 answer.
    Http,
    /// UDP `sendto` without connecting.
    UdpSendto,
    /// UDP `connect`, then `send`.
    UdpConnect,
    /// TCP Fast Open: `sendto(MSG_FASTOPEN)` on an unconnected socket.
    TcpFastOpen,
    /// A raw socket sending an ICMP (or ICMPv6) echo request.
    RawIcmp,
    /// A raw socket sending a hand-made TCP SYN.
    RawTcpSyn,
    /// A raw socket sending a hand-made UDP datagram.
    RawUdp,
    /// A raw socket sending a hand-made TCP SYN to `dest` with a loose source route
    /// through `via` (`IP_OPTIONS`): addressed to `via`, its route names `dest`.
    RawTcpSynSourceRouted,
    /// [`Kind::RawTcpSynSourceRouted`]'s SYN with the whole IPv4 header written by the
    /// pod (`IP_HDRINCL`), the route in its options.
    RawHdrinclSourceRouted,
    /// The same with two words of no-operations before the route: more options than
    /// the backstop's walk reads, which it refuses whatever follows.
    RawHdrinclPaddedSourceRouted,
    /// An ordinary UDP socket whose `IP_OPTIONS` record the route (no source route).
    UdpRecordRoute,
    /// An ordinary UDP socket whose `IP_OPTIONS` set a loose source route through
    /// `via` and then `dest`, sending to `final_hop`: addressed to `via`, and no
    /// socket hook sees `dest` (they see `final_hop`).
    UdpSourceRouted,
    /// TCP connect at once, create `ready_file`, then wait for `go_file` before
    /// sending the HTTP request on that same connection.
    HeldHttp,
    /// TCP connect submitted through io_uring instead of connect(2).
    IoUringConnect,
    /// A TCP socket created in `socket_netns` (the host's), passed over a unix socket
    /// with SCM_RIGHTS, then connected from the pod.
    HandedHostSocket,
}

/// What one child process is asked to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub kind: Kind,
    pub dest: IpAddr,
    pub port: u16,
    /// Reach an IPv4 destination from an IPv6 socket, through `::ffff:a.b.c.d`.
    #[serde(default)]
    pub mapped: bool,
    /// Attempts to make (each on a fresh socket).
    #[serde(default = "one")]
    pub count: u64,
    /// Pause between attempts.
    #[serde(default)]
    pub interval_us: u64,
    /// Keep going until this long has passed, whatever `count` says (0: use count).
    #[serde(default)]
    pub duration_ms: u64,
    /// Keep going until this file exists, whatever `count` says.
    #[serde(default)]
    pub stop_file: Option<PathBuf>,
    /// For [`Kind::HeldHttp`]: the file whose appearance lets the request go.
    #[serde(default)]
    pub go_file: Option<PathBuf>,
    /// For [`Kind::HeldHttp`]: created once the connection is established.
    #[serde(default)]
    pub ready_file: Option<PathBuf>,
    /// For [`Kind::HandedHostSocket`]: where the socket is created.
    #[serde(default)]
    pub socket_netns: Option<PathBuf>,
    /// For [`Kind::RawTcpSynSourceRouted`]: the first hop, the packet's own destination.
    #[serde(default)]
    pub via: Option<IpAddr>,
    /// For [`Kind::UdpSourceRouted`]: where the datagram ends, after `dest`.
    #[serde(default)]
    pub final_hop: Option<IpAddr>,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Outcome {
    pub pid: u32,
    pub ok: u64,
    /// Attempts refused with EPERM (the guard's answer).
    pub eperm: u64,
    /// Other failures, by error text.
    pub other: BTreeMap<String, u64>,
    /// The slowest attempt, in microseconds.
    pub max_us: u64,
    /// When the last successful attempt began (µs since the Unix epoch; 0: none did).
    #[serde(default)]
    pub last_ok_started_unix_us: u64,
}

impl Outcome {
    pub(crate) fn total(&self) -> u64 {
        self.ok + self.eperm + self.other.values().sum::<u64>()
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The child's main: join, attempt, report on stdout.
pub(crate) fn child_main(request_json: &str) -> Result<()> {
    let req: Request = serde_json::from_str(request_json).context("bad attempt request")?;
    let handed = match (&req.kind, &req.socket_netns) {
        (Kind::HandedHostSocket, Some(ns)) => Some(crate::raw::handed_socket(ns, &target(&req))?),
        (Kind::HandedHostSocket, None) => bail!("a handed socket needs socket_netns"),
        _ => None,
    };
    join(&req)?;
    if let Some(sock) = handed {
        let mut out = Outcome { pid: std::process::id(), ..Default::default() };
        let t = Instant::now();
        match crate::raw::connect_and_get(sock, &target(&req)) {
            Ok(()) => out.ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => out.eperm += 1,
            Err(e) => *out.other.entry(e.to_string()).or_default() += 1,
        }
        out.max_us = t.elapsed().as_micros() as u64;
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let mut out = Outcome { pid: std::process::id(), ..Default::default() };
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let keep_going = if let Some(stop) = &req.stop_file {
            !stop.exists()
        } else if req.duration_ms > 0 {
            start.elapsed() < Duration::from_millis(req.duration_ms)
        } else {
            n < req.count
        };
        if !keep_going {
            break;
        }
        let t = Instant::now();
        let began = unix_us();
        match once(&req) {
            Ok(()) => {
                out.ok += 1;
                out.last_ok_started_unix_us = began;
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => out.eperm += 1,
            Err(e) => *out.other.entry(e.to_string()).or_default() += 1,
        }
        out.max_us = out.max_us.max(t.elapsed().as_micros() as u64);
        n += 1;
        if req.interval_us > 0 {
            std::thread::sleep(Duration::from_micros(req.interval_us));
        }
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// Microseconds since the Unix epoch: comparable across processes.
pub(crate) fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn join(req: &Request) -> Result<()> {
    std::fs::write(req.cgroup.join("cgroup.procs"), "0")
        .with_context(|| format!("could not join cgroup {}", req.cgroup.display()))?;
    let ns = std::fs::File::open(&req.netns).with_context(|| format!("could not open {}", req.netns.display()))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("could not join network namespace {}", req.netns.display()))?;
    Ok(())
}

fn target(req: &Request) -> SocketAddr {
    match (req.dest, req.mapped) {
        (IpAddr::V4(v4), true) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), req.port),
        (ip, _) => SocketAddr::new(ip, req.port),
    }
}

fn once(req: &Request) -> std::io::Result<()> {
    let to = target(req);
    match req.kind {
        Kind::Http => http_get(to),
        Kind::UdpSendto => {
            let sock = udp_socket(&to)?;
            sendto(&sock, b"metadata?", &to)
        }
        Kind::UdpConnect => {
            let sock = udp_socket(&to)?;
            let s = std::net::UdpSocket::from(sock);
            s.connect(to)?;
            s.send(b"metadata?").map(drop)
        }
        Kind::HeldHttp => held_http(to, req.ready_file.as_deref(), req.go_file.as_deref()),
        Kind::IoUringConnect => crate::raw::io_uring_connect(&to),
        Kind::HandedHostSocket => unreachable!("handled before joining the pod"),
        Kind::TcpFastOpen => crate::raw::fast_open(&to),
        Kind::RawIcmp => crate::raw::icmp_echo(&to),
        Kind::RawTcpSyn => crate::raw::tcp_syn(&to),
        Kind::RawTcpSynSourceRouted => crate::raw::tcp_syn_source_routed(&to, req.via),
        Kind::RawHdrinclSourceRouted => crate::raw::tcp_syn_hdrincl_source_routed(&to, req.via, 0),
        Kind::RawHdrinclPaddedSourceRouted => crate::raw::tcp_syn_hdrincl_source_routed(&to, req.via, 2),
        Kind::UdpRecordRoute => crate::raw::udp_record_route(&to),
        Kind::UdpSourceRouted => crate::raw::udp_source_routed(&to, req.via, req.final_hop),
        Kind::RawUdp => crate::raw::udp(&to),
    }
}

pub(crate) fn udp_socket(to: &SocketAddr) -> std::io::Result<OwnedFd> {
    let family = if to.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn sendto(sock: &OwnedFd, data: &[u8], to: &SocketAddr) -> std::io::Result<()> {
    let addr = nix::sys::socket::SockaddrStorage::from(*to);
    nix::sys::socket::sendto(sock.as_raw_fd(), data, &addr, nix::sys::socket::MsgFlags::empty())
        .map(drop)
        .map_err(std::io::Error::from)
}

/// Connect (dual-stack when the target is IPv6) and expect `HTTP/1.x 200`.
fn http_get(to: SocketAddr) -> std::io::Result<()> {
    let stream = std::net::TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    request_on(stream)
}

fn held_http(to: SocketAddr, ready: Option<&std::path::Path>, go: Option<&std::path::Path>) -> std::io::Result<()> {
    let stream = std::net::TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)?;
    // Closed with a reset, not left retransmitting: a request the backstop drops would
    // otherwise be retried (and audited) for minutes, into later scenarios.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and an option value of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if let Some(ready) = ready {
        std::fs::write(ready, "")?;
    }
    while go.is_some_and(|g| !g.exists()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    request_on(stream)
}

pub(crate) fn request_on(stream: std::net::TcpStream) -> std::io::Result<()> {
    metadata_guard_tests::standin::ask_metadata(stream, CONNECT_TIMEOUT)
}

/// Runs one request as a child process of this very program.
pub(crate) fn spawn(req: &Request) -> Result<std::process::Child> {
    let json = serde_json::to_string(req)?;
    std::process::Command::new("/proc/self/exe")
        .args(["attempt", &json])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("could not start an attempt process")
}

pub(crate) fn wait(child: std::process::Child) -> Result<Outcome> {
    let out = child.wait_with_output().context("attempt process failed")?;
    if !out.status.success() {
        bail!("attempt process exited with {}", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("attempt process printed {line:?}"))
}

pub(crate) fn run(req: &Request) -> Result<Outcome> {
    wait(spawn(req)?)
}

/// A process making `req`'s attempt over and over until [`Prober::finish`] stops it:
/// proof that a block never opens. Killed and reaped when dropped unfinished.
pub(crate) struct Prober {
    child: Option<std::process::Child>,
    stop: PathBuf,
}

impl Prober {
    /// Starts `req` repeating every `interval_us` until a stop file (which `stop`
    /// names; any left from before is removed) appears.
    pub(crate) fn start(mut req: Request, interval_us: u64, stop: PathBuf) -> Result<Prober> {
        let _ = std::fs::remove_file(&stop);
        req.interval_us = interval_us;
        req.stop_file = Some(stop.clone());
        Ok(Prober { child: Some(spawn(&req)?), stop })
    }

    /// Stops the attempts and returns what they met.
    pub(crate) fn finish(mut self) -> Result<Outcome> {
        std::fs::write(&self.stop, "").with_context(|| format!("could not write {}", self.stop.display()))?;
        wait(self.child.take().context("the prober has finished already")?)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
