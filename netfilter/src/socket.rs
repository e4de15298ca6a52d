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

impl NetlinkError {
    /// The errno behind a failed exchange of an [`NlSocket`]: the kernel's answer to
    /// a refused message, or else the system call's own. Callers sort failures by
    /// it right here, at the edge, so no errno is dug out of an error chain later.
    pub fn errno_of(e: &io::Error) -> Option<i32> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<NetlinkError>()).map(|n| n.errno).or(e.raw_os_error())
    }
}

/// One message received: type, flags, body after the 16-byte header.
#[derive(Clone, Debug, PartialEq, Eq)]
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
        split(&buf[..n as usize]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
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

/// A datagram that does not split into whole netlink messages: the kernel never
/// sends one, so it means a truncated read or a bug, never something to skip quietly
/// (a lost acknowledgement would leave a request waiting forever).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Malformed {
    /// Where in the datagram the bad message starts.
    pub offset: usize,
    pub datagram_len: usize,
    pub reason: &'static str,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed netlink datagram: at byte {} of {}, {}", self.offset, self.datagram_len, self.reason)
    }
}

impl std::error::Error for Malformed {}

/// Splits a datagram into its messages (each header's length, 4-byte aligned, leads
/// to the next).
pub fn split(datagram: &[u8]) -> Result<Vec<Received>, Malformed> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let data = &datagram[offset..];
        let bad = |reason| Malformed { offset, datagram_len: datagram.len(), reason };
        let Some(header) = data.get(..NLMSG_HDRLEN) else {
            return Err(bad("fewer bytes left than a message header (16)"));
        };
        let field = |at: usize| [header[at], header[at + 1]];
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len < NLMSG_HDRLEN {
            return Err(bad("a message length shorter than its own header"));
        }
        if len > data.len() {
            return Err(bad("a message length past the end of the datagram (truncated?)"));
        }
        out.push(Received {
            kind: u16::from_ne_bytes(field(4)),
            flags: u16::from_ne_bytes(field(6)),
            seq: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            body: data[NLMSG_HDRLEN..len].to_vec(),
        });
        // The last message's padding may be left out.
        offset = (offset + crate::attr::align4(len)).min(datagram.len());
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        put_header(&mut buf, kind, flags, seq, body.len());
        buf.extend_from_slice(body);
        buf.resize(crate::attr::align4(buf.len()), 0);
        buf
    }

    proptest! {
        /// Whatever the bytes, `split` ends without a panic, and what it returns lies
        /// inside them.
        #[test]
        fn split_takes_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(messages) = split(&data) {
                let total: usize = messages.iter().map(|m| NLMSG_HDRLEN + m.body.len()).sum();
                prop_assert!(total <= data.len());
            }
        }

        /// Whole messages come back as written; a datagram cut anywhere inside one is
        /// an error that says where, never a shorter list.
        #[test]
        fn whole_messages_round_trip_and_a_cut_one_is_an_error(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..5),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut datagram = Vec::new();
            for (n, b) in bodies.iter().enumerate() {
                datagram.extend(message(0x0a00 | n as u16, NLM_F_MULTI, n as u32, b));
            }
            let messages = split(&datagram).unwrap();
            prop_assert_eq!(messages.len(), bodies.len());
            for (n, (m, b)) in messages.iter().zip(&bodies).enumerate() {
                prop_assert_eq!((m.kind, m.seq, &m.body), (0x0a00 | n as u16, n as u32, b));
            }
            // Cut anywhere: at a message's end (its padding optional) the messages before
            // come back whole; anywhere else it is an error.
            let cut = cut.index(datagram.len());
            let mut ends = Vec::new();
            let mut at = 0;
            for b in &bodies {
                ends.push((at + NLMSG_HDRLEN + b.len(), at + message(0, 0, 0, b).len()));
                at = ends.last().unwrap().1;
            }
            let whole = ends.iter().filter(|(end, _)| *end <= cut).count();
            let at_boundary = cut == 0 || ends.iter().any(|(end, padded)| (*end..=*padded).contains(&cut));
            match split(&datagram[..cut]) {
                Ok(messages) => prop_assert!(at_boundary && messages.len() == whole, "cut at {}: {:?}", cut, messages),
                Err(e) => prop_assert!(!at_boundary, "cut at {} is a message boundary: {}", cut, e),
            }
        }

        /// An error reply of any length is read without a panic; a short one is EPROTO.
        #[test]
        fn error_replies_of_any_length(body in proptest::collection::vec(any::<u8>(), 0..64), flags in any::<u16>()) {
            let (errno, _, _) = parse_error(&Received { kind: NLMSG_ERROR, flags, seq: 1, body: body.clone() });
            if body.len() < 4 + NLMSG_HDRLEN {
                prop_assert_eq!(errno, libc::EPROTO);
            }
        }
    }

    #[test]
    fn a_malformed_datagram_says_where_and_why() {
        let mut datagram = message(NLMSG_DONE, NLM_F_MULTI, 7, &[0; 4]);
        datagram.extend_from_slice(&[40, 0, 0, 0, 3, 0]);
        let err = split(&datagram).unwrap_err();
        assert_eq!(err.offset, 20);
        assert_eq!(
            err.to_string(),
            "malformed netlink datagram: at byte 20 of 26, fewer bytes left than a message header (16)"
        );
        let mut short = message(NLMSG_DONE, 0, 1, &[]);
        short[0] = 8;
        assert!(split(&short).unwrap_err().reason.contains("shorter than its own header"));
        let mut long = message(NLMSG_DONE, 0, 1, &[]);
        long[0] = 200;
        assert!(split(&long).unwrap_err().reason.contains("past the end"));
        assert_eq!(split(&[]).unwrap(), Vec::new());
    }

    #[test]
    fn an_extended_ack_carries_the_kernels_words() {
        // errno -EPERM, the request's header (capped), then NLMSGERR_ATTR_MSG.
        let mut body = (-libc::EPERM).to_ne_bytes().to_vec();
        put_header(&mut body, 0x0a00, NLM_F_REQUEST, 42, 0);
        let mut w = crate::attr::AttrWriter::new();
        w.str(NLMSGERR_ATTR_MSG, "table is owned");
        body.extend_from_slice(&w.buf);
        let r = Received { kind: NLMSG_ERROR, flags: NLM_F_CAPPED | NLM_F_ACK_TLVS, seq: 42, body };
        assert_eq!(parse_error(&r), (libc::EPERM, 42, Some("table is owned".into())));
    }
}
