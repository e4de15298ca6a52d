// SPDX-License-Identifier: Apache-2.0
//! The stand-in's serving side: its sockets, and the thread that accepts, answers,
//! echoes and tallies what arrives.

use std::{
    io::{self, IoSlice, IoSliceMut, Read, Write},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd, OwnedFd, RawFd},
        unix::net::UnixDatagram,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    self as sock, sockopt, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockProtocol, SockType, SockaddrIn6, SockaddrStorage,
};

use super::{
    imds::{Head, Imds},
    Arrivals, Logged, Shared, STANDIN_PORTS,
};

/// What the stand-in answers to every request it serves.
pub(super) const STANDIN_BODY: &str = "metadata-standin\n";
/// A client that connects and then says nothing is dropped after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REQUEST: usize = 8192;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// The stand-in's sockets, all nonblocking.
pub(super) struct Sockets {
    tcp: Vec<(u16, TcpListener)>,
    udp: Vec<(u16, UdpSocket)>,
    icmp: OwnedFd,
    icmpv6: OwnedFd,
}

pub(super) fn open_sockets() -> Result<Sockets> {
    let mut sockets = Sockets {
        tcp: Vec::new(),
        udp: Vec::new(),
        icmp: raw_socket(AddressFamily::Inet, SockProtocol::Icmp)?,
        icmpv6: raw_socket(AddressFamily::Inet6, SockProtocol::IcmpV6)?,
    };
    // ICMPv6 has no IP header in what recv returns; the destination comes this way.
    sock::setsockopt(&sockets.icmpv6, sockopt::Ipv6RecvPacketInfo, &true)?;
    for port in STANDIN_PORTS {
        let fd = dual_stack_socket(SockType::Stream, port)?;
        sock::listen(&fd, Backlog::new(128)?).with_context(|| format!("could not listen on TCP port {port}"))?;
        sockets.tcp.push((port, TcpListener::from(fd)));
        let fd = dual_stack_socket(SockType::Datagram, port)?;
        sock::setsockopt(&fd, sockopt::Ipv6RecvPacketInfo, &true)?;
        sockets.udp.push((port, UdpSocket::from(fd)));
    }
    Ok(sockets)
}

/// A nonblocking socket bound to [::]:port that takes IPv4 too.
fn dual_stack_socket(ty: SockType, port: u16) -> Result<OwnedFd> {
    let what = if ty == SockType::Stream { "TCP" } else { "UDP" };
    let fd = sock::socket(AddressFamily::Inet6, ty, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)
        .with_context(|| format!("could not create a {what} socket"))?;
    sock::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let any = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0));
    sock::bind(fd.as_raw_fd(), &any).with_context(|| {
        format!("could not bind {what} [::]:{port}; is another stand-in running in this namespace?")
    })?;
    Ok(fd)
}

fn raw_socket(family: AddressFamily, protocol: SockProtocol) -> Result<OwnedFd> {
    sock::socket(family, SockType::Raw, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, protocol)
        .with_context(|| format!("could not open a raw {protocol:?} socket (needs CAP_NET_RAW)"))
}

/// An accepted connection waiting for its request.
struct Conn {
    stream: TcpStream,
    peer: IpAddr,
    request: Vec<u8>,
    deadline: Instant,
}

pub(super) struct Server {
    sockets: Sockets,
    woken: UnixDatagram,
    conns: Vec<Conn>,
    /// Receive buffer, big enough for any datagram.
    buf: Vec<u8>,
    imds: Imds,
}

impl Server {
    pub(super) fn new(sockets: Sockets, woken: UnixDatagram) -> Server {
        Server { sockets, woken, conns: Vec::new(), buf: vec![0; 65536], imds: Imds::default() }
    }

    pub(super) fn run(mut self, shared: &Shared) {
        loop {
            // Read the ticket before draining: every snapshot asked for by now is
            // answered with what the queues hold after the drain.
            while self.woken.recv(&mut [0u8; 64]).is_ok() {}
            let mut state = shared.state.lock().unwrap();
            if state.stop {
                return;
            }
            let ticket = state.sync_asked;
            self.drain(&mut state.arrivals);
            state.sync_done = ticket;
            shared.synced.notify_all();
            drop(state);
            self.serve_connections(shared);
            self.wait();
        }
    }

    /// Sleeps until any socket has something, a snapshot is asked for, or the
    /// oldest connection times out.
    fn wait(&self) {
        let s = &self.sockets;
        let mut fds: Vec<libc::pollfd> = [self.woken.as_raw_fd(), s.icmp.as_raw_fd(), s.icmpv6.as_raw_fd()]
            .into_iter()
            .chain(s.tcp.iter().map(|(_, l)| l.as_raw_fd()))
            .chain(s.udp.iter().map(|(_, u)| u.as_raw_fd()))
            .chain(self.conns.iter().map(|c| c.stream.as_raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        let timeout = match self.conns.iter().map(|c| c.deadline).min() {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()).as_millis().min(1000) as i32 + 1,
            None => -1,
        };
        // SAFETY: fds is a valid array of fds.len() pollfds. Errors (EINTR) only
        // mean one more round of draining.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
    }

    /// Takes everything the sockets hold, without blocking.
    fn drain(&mut self, seen: &mut Arrivals) {
        for (port, listener) in &self.sockets.tcp {
            loop {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let local = stream.local_addr().map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |a| a.ip());
                        seen.tcp_accepted.entry(*port).or_default().record(peer.ip(), local);
                        if stream.set_nonblocking(true).is_ok() {
                            let deadline = Instant::now() + REQUEST_TIMEOUT;
                            let peer = peer.ip().to_canonical();
                            self.conns.push(Conn { stream, peer, request: Vec::new(), deadline });
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => note(seen, &format!("accept on TCP port {port}"), &e),
                }
            }
        }
        for (port, udp) in &self.sockets.udp {
            while let Some(got) = receive(udp.as_raw_fd(), &mut self.buf, seen, &format!("UDP port {port}")) {
                seen.udp_received.entry(*port).or_default().record(got.source.ip(), got.destination);
                if let Err(e) = echo(udp, &got) {
                    note(seen, &format!("UDP echo on port {port}"), &e);
                }
            }
        }
        while let Some(got) = receive(self.sockets.icmp.as_raw_fd(), &mut self.buf, seen, "raw ICMP") {
            // What a raw IPv4 socket returns starts with the IP header.
            let header_len = usize::from(got.data.first().copied().unwrap_or(0) & 0x0f) * 4;
            if let (Some(&ICMP_ECHO_REQUEST), Some(dst)) = (got.data.get(header_len), got.data.get(16..20)) {
                let dst: [u8; 4] = dst.try_into().unwrap();
                seen.echo_requests.record(got.source.ip(), IpAddr::from(dst));
            }
        }
        while let Some(got) = receive(self.sockets.icmpv6.as_raw_fd(), &mut self.buf, seen, "raw ICMPv6") {
            if got.data.first() == Some(&ICMPV6_ECHO_REQUEST) {
                seen.echo_requests.record(got.source.ip(), got.destination);
            }
        }
    }

    /// Answers every connection whose request is complete (logging it first), drops
    /// stale ones.
    fn serve_connections(&mut self, shared: &Shared) {
        let now = Instant::now();
        let imds = &mut self.imds;
        self.conns.retain_mut(|conn| {
            let mut buf = [0u8; 2048];
            loop {
                match conn.stream.read(&mut buf) {
                    // Hung up before asking: nothing to answer.
                    Ok(0) => return false,
                    Ok(n) => {
                        conn.request.extend_from_slice(&buf[..n]);
                        if conn.request.windows(4).any(|w| w == b"\r\n\r\n") || conn.request.len() > MAX_REQUEST {
                            let response = answer(imds, shared, conn.peer, &conn.request);
                            // Small enough for any send buffer; a failure means the client left.
                            let _ = conn.stream.write_all(&response);
                            let _ = conn.stream.shutdown(Shutdown::Write);
                            return false;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return now < conn.deadline,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
        });
    }
}

/// The answer to one request, logged before it is sent.
fn answer(imds: &mut Imds, shared: &Shared, source: IpAddr, request: &[u8]) -> Vec<u8> {
    let require_v2 = shared.require_imdsv2.load(std::sync::atomic::Ordering::Relaxed);
    let (status, body, logged) = match Head::parse(request) {
        Some(head) => {
            let a = imds.answer(&head, require_v2);
            let logged =
                Logged { source, method: head.method, target: head.target, headers: head.headers, status: a.status };
            (a.status, a.body, Some(logged))
        }
        None => (200, STANDIN_BODY.to_owned(), None),
    };
    if let Some(logged) = logged {
        shared.state.lock().unwrap().arrivals.log(logged);
    }
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Unauthorized",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Datagram<'a> {
    data: &'a [u8],
    source: SocketAddr,
    /// Known only where IPV6_RECVPKTINFO is on; elsewhere `::`.
    destination: IpAddr,
}

/// One datagram from a nonblocking socket into `buf`, or None once it is empty.
fn receive<'a>(fd: RawFd, buf: &'a mut [u8], seen: &mut Arrivals, what: &str) -> Option<Datagram<'a>> {
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let (len, source, destination) = loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match sock::recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()) {
            Ok(msg) => msg,
            Err(Errno::EAGAIN) => return None,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                note(seen, &format!("receive on {what}"), &io::Error::from(e));
                return None;
            }
        };
        let mut destination = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        for c in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::Ipv6PacketInfo(info) = c {
                destination = IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr));
            }
        }
        // Every datagram socket names the sender; skip anything odd rather than guess.
        if let Some(source) = msg.address.as_ref().and_then(socket_addr) {
            break (msg.bytes, source, destination);
        }
    };
    Some(Datagram { data: &buf[..len], source, destination })
}

/// Sends a datagram back from the address it was sent to, so a connected client
/// socket accepts the answer.
fn echo(udp: &UdpSocket, got: &Datagram) -> io::Result<()> {
    // On a dual-stack socket both families are spoken as IPv6, IPv4 as ::ffff:a.b.c.d.
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let info =
        libc::in6_pktinfo { ipi6_addr: libc::in6_addr { s6_addr: v6(got.destination).octets() }, ipi6_ifindex: 0 };
    let to = SockaddrIn6::from(SocketAddrV6::new(v6(got.source.ip()), got.source.port(), 0, 0));
    sock::sendmsg(
        udp.as_raw_fd(),
        &[IoSlice::new(got.data)],
        &[ControlMessage::Ipv6PacketInfo(&info)],
        MsgFlags::MSG_DONTWAIT,
        Some(&to),
    )
    .map(drop)
    .map_err(io::Error::from)
}

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6().map(|v6| SocketAddr::from(SocketAddrV6::from(*v6)))
}

fn note(seen: &mut Arrivals, what: &str, err: &io::Error) {
    *seen.errors.entry(format!("{what}: {err}")).or_default() += 1;
}
