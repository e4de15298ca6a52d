// SPDX-License-Identifier: Apache-2.0
//! A netlink socket bound to one network namespace, with the three exchanges the
//! guard needs: a request whose every message is acknowledged (a batch), a dump, and
//! reading multicast messages (NFLOG).

use std::{
    fmt, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const RECV_BUF: usize = 1 << 16;

/// One message to send: its type, flags beyond `NLM_F_REQUEST`, and body.
#[derive(Clone, Debug)]
pub struct Message {
    pub kind: u16,
    pub flags: u16,
    pub body: Vec<u8>,
}

/// A failed message of a request: the kernel's errno and, where it said one, why.
#[derive(Debug)]
pub struct NetlinkError {
    /// Index of the failed message in the request.
    pub index: usize,
    pub errno: i32,
    pub kernel_message: Option<String>,
}

impl fmt::Display for NetlinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "message {} was refused: {}", self.index, io::Error::from_raw_os_error(self.errno))?;
        if let Some(m) = &self.kernel_message {
            write!(f, " ({m})")?;
        }
        Ok(())
    }
}

impl std::error::Error for NetlinkError {}

/// One message received: type, flags, body after the 16-byte header.
#[derive(Clone, Debug)]
pub struct Received {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub body: Vec<u8>,
}

pub struct NlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl NlSocket {
    /// Opens a socket of `protocol` (e.g. `libc::NETLINK_NETFILTER`) in the calling
    /// thread's network namespace.
    pub fn open(protocol: libc::c_int) -> io::Result<NlSocket> {
        // SAFETY: plain socket(2); the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // Best effort: the kernel's own words make far better errors than an errno.
        // SAFETY: setsockopt with a pointer to a c_int and its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_EXT_ACK,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        // SAFETY: a zeroed sockaddr_nl is a valid "kernel assigns the port" address.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: bind with a valid sockaddr_nl and its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let seq = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs() as u32);
        Ok(NlSocket { fd, seq })
    }

    /// Opens the socket inside the network namespace at `netns` (e.g. `/proc/1/ns/net`):
    /// a socket acts on the namespace it was created in, so a short-lived thread
    /// enters the namespace, creates it and exits. `None` means the caller's own.
    pub fn open_in(netns: Option<&Path>, protocol: libc::c_int) -> io::Result<NlSocket> {
        let Some(path) = netns else { return NlSocket::open(protocol) };
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on an fd we own; it changes this short-lived thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
            NlSocket::open(protocol)
        })
        .join()
        .map_err(|_| io::Error::other("the thread opening a netlink socket in another namespace panicked"))?
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn set_nonblocking(&self) -> io::Result<()> {
        // SAFETY: fcntl on our own fd.
        let flags = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn set_recv_buffer(&self, bytes: usize) {
        let v = bytes as libc::c_int;
        // SAFETY: setsockopt with a pointer to a c_int; failure only means a smaller buffer.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
    }

    /// Sends `messages` in one write, each with `NLM_F_ACK` unless it is a batch
    /// marker (`ack_filter` says which get acks), and waits for every
    /// acknowledgement. The first refused message is the error.
    pub fn request(&mut self, messages: &[Message], wants_ack: impl Fn(&Message) -> bool) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut pending = std::collections::BTreeMap::new();
        for (index, m) in messages.iter().enumerate() {
            self.seq = self.seq.wrapping_add(1);
            let ack = wants_ack(m);
            let flags = NLM_F_REQUEST | m.flags | if ack { NLM_F_ACK } else { 0 };
            put_header(&mut buf, m.kind, flags, self.seq, m.body.len());
            buf.extend_from_slice(&m.body);
            if ack {
                pending.insert(self.seq, index);
            }
        }
        self.send(&buf)?;
        let mut first_error: Option<NetlinkError> = None;
        while !pending.is_empty() {
            for r in self.recv()? {
                if r.kind != NLMSG_ERROR {
                    continue;
                }
                let (errno, seq, text) = parse_error(&r);
                let Some(index) = pending.remove(&seq) else { continue };
                if errno != 0 && first_error.as_ref().is_none_or(|e| e.index > index) {
                    first_error = Some(NetlinkError { index, errno, kernel_message: text });
                }
            }
        }
        match first_error {
            Some(e) => Err(io::Error::other(e)),
            None => Ok(()),
        }
    }

    /// Sends one dump request and collects every reply up to `NLMSG_DONE`.
    pub fn dump(&mut self, kind: u16, body: &[u8]) -> io::Result<Vec<Received>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut buf = Vec::new();
        put_header(&mut buf, kind, NLM_F_REQUEST | NLM_F_DUMP, seq, body.len());
        buf.extend_from_slice(body);
        self.send(&buf)?;
        let mut out = Vec::new();
        loop {
            for r in self.recv()? {
                if r.seq != seq {
                    continue;
                }
                match r.kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let (errno, _, text) = parse_error(&r);
                        if errno == 0 {
                            return Ok(out);
                        }
                        let e = NetlinkError { index: 0, errno, kernel_message: text };
                        return Err(io::Error::other(e));
                    }
                    NLMSG_NOOP => {}
                    _ => out.push(r),
                }
            }
        }
    }

    /// Sends one request that is answered by a single message (or an error).
    pub fn query(&mut self, kind: u16, body: &[u8]) -> io::Result<Received> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut buf = Vec::new();
        put_header(&mut buf, kind, NLM_F_REQUEST, seq, body.len());
        buf.extend_from_slice(body);
        self.send(&buf)?;
        loop {
            for r in self.recv()? {
                if r.seq != seq {
                    continue;
                }
                if r.kind == NLMSG_ERROR {
                    let (errno, _, text) = parse_error(&r);
                    let e = NetlinkError { index: 0, errno, kernel_message: text };
                    return Err(io::Error::other(e));
                }
                return Ok(r);
            }
        }
    }

    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl addresses the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sendto with a valid buffer and address.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one datagram and splits it into messages.
    pub fn recv(&self) -> io::Result<Vec<Received>> {
        let mut buf = vec![0u8; RECV_BUF];
        // SAFETY: recv into a buffer we own, with its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(split(&buf[..n as usize]))
    }
}

impl AsRawFd for NlSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::os::fd::AsFd for NlSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.fd)
    }
}

pub fn put_header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body_len: usize) {
    buf.extend_from_slice(&((NLMSG_HDRLEN + body_len) as u32).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
}

pub fn split(mut data: &[u8]) -> Vec<Received> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        out.push(Received {
            kind: u16::from_ne_bytes(data[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(data[6..8].try_into().unwrap()),
            seq: u32::from_ne_bytes(data[8..12].try_into().unwrap()),
            body: data[NLMSG_HDRLEN..len].to_vec(),
        });
        data = data.get(crate::attr::align4(len)..).unwrap_or_default();
    }
    out
}

/// `struct nlmsgerr`: the errno (negative), the request's header, and with
/// extended acks (`NLM_F_ACK_TLVS` in the reply's flags) the kernel's message after
/// the echoed request (only its header with `NLM_F_CAPPED`).
fn parse_error(r: &Received) -> (i32, u32, Option<String>) {
    let body = &r.body;
    if body.len() < 4 + NLMSG_HDRLEN {
        return (libc::EPROTO, 0, None);
    }
    let errno = -i32::from_ne_bytes(body[0..4].try_into().unwrap());
    let orig_len = u32::from_ne_bytes(body[4..8].try_into().unwrap()) as usize;
    let seq = u32::from_ne_bytes(body[12..16].try_into().unwrap());
    let text = if r.flags & NLM_F_ACK_TLVS != 0 {
        let echoed = if r.flags & NLM_F_CAPPED != 0 { NLMSG_HDRLEN } else { orig_len.max(NLMSG_HDRLEN) };
        body.get(crate::attr::align4(4 + echoed)..)
            .and_then(|tlvs| crate::attr::Attrs::new(tlvs).find(NLMSGERR_ATTR_MSG))
            .map(|a| a.str())
    } else {
        None
    };
    (errno, seq, text)
}
