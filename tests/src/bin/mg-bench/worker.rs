// SPDX-License-Identifier: Apache-2.0
//! The pod side of every measurement: a child process that joins a pod's network
//! namespace once, then takes one JSON command a line on stdin and answers each with
//! one JSON line on stdout.
//!
//! It moves itself between cgroups on request (a socket belongs to the cgroup of
//! the task that creates it), so "guard absent" and "guard attached" differ only in
//! which cgroup the very same process sits in, and samples can alternate freely.
//! Timing happens here, around the syscalls alone: spawning and talking to the
//! worker never counts.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::SocketAddrV4,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    /// socket + connect + abortive close (SO_LINGER 0: no TIME_WAIT, so tens of
    /// thousands of connects never run out of ephemeral ports), `count` times.
    TcpConnect { dest: SocketAddrV4, count: u64 },
    /// One UDP socket, `count` unconnected sendto calls of 32 bytes.
    UdpSendto { dest: SocketAddrV4, count: u64 },
    /// socket + connect + send of 32 bytes + close, `count` times (a DNS client's
    /// pattern: every hook of the guard runs once per operation).
    UdpConnectSend { dest: SocketAddrV4, count: u64 },
    /// One TCP connection writing 64 KiB buffers for `ms` milliseconds.
    Bulk { dest: SocketAddrV4, ms: u64 },
    /// `count` connects, each timed on its own (for refusals).
    Refused { dest: SocketAddrV4, count: u64 },
    /// One non-blocking connect, waited for at most `timeout_ms`.
    Probe { dest: SocketAddrV4, timeout_ms: u64 },
    /// Connects as fast as possible for `ms` milliseconds.
    Storm { dest: SocketAddrV4, ms: u64 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    /// Wall time of the whole loop.
    pub ns: u64,
    pub ok: u64,
    /// Failures by errno name.
    pub errors: BTreeMap<String, u64>,
    pub bytes: u64,
    /// Per-attempt times (Refused, Probe).
    pub samples_ns: Vec<u64>,
    /// Times of each whole batch of [`BATCH`] operations (TcpConnect, UdpSendto,
    /// UdpConnectSend).
    pub batches_ns: Vec<u64>,
    /// `net.ipv4.tcp_syn_retries` of the pod's namespace (Probe).
    pub syn_retries: Option<u32>,
    /// Set when the worker could not run the command at all.
    pub fatal: Option<String>,
}

impl Reply {
    pub(crate) fn attempts(&self) -> u64 {
        self.ok + self.errors.values().sum::<u64>()
    }

    /// One operation's time in this sample: the median batch's time over [`BATCH`]. A
    /// batch that an interrupt, a preemption or this shared machine's other work
    /// landed in is an outlier the median leaves out, where the sample's mean would
    /// carry it; every variant is measured alike.
    pub(crate) fn per_op_ns(&self) -> f64 {
        if self.batches_ns.is_empty() {
            return self.ns as f64 / self.attempts().max(1) as f64;
        }
        let batches: Vec<f64> = self.batches_ns.iter().map(|&n| n as f64).collect();
        crate::report::median(&batches) / BATCH as f64
    }

    /// A bulk sample's throughput in Gbit/s, over the whole sample: a batch of writes
    /// waits for the node's reader as often as for the guard, so a batch median
    /// would only pick one of those two states.
    pub(crate) fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.ns as f64
    }
}

/// Operations timed together (two clock reads per batch, ~1 % of a batch of the
/// cheapest operation, a UDP datagram).
pub(crate) const BATCH: u64 = 10;

/// Runs `one` `count` times, timing each whole batch of [`BATCH`] into `r`.
fn batched(r: &mut Reply, count: u64, mut one: impl FnMut(&mut Reply)) {
    let mut done = 0;
    while done < count {
        let n = BATCH.min(count - done);
        let t = Instant::now();
        for _ in 0..n {
            one(r);
        }
        if n == BATCH {
            r.batches_ns.push(t.elapsed().as_nanos() as u64);
        }
        done += n;
    }
}

#[derive(Serialize, Deserialize)]
struct Request {
    cgroup: PathBuf,
    op: Op,
}

/// The parent's handle on a running worker.
pub(crate) struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Starts `/proc/self/exe worker <netns>`.
    pub(crate) fn start(netns: &Path) -> Result<Worker> {
        let mut child = Command::new("/proc/self/exe")
            .arg("worker")
            .arg(netns)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("could not start a worker process (re-executing /proc/self/exe)")?;
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Ok(Worker { child, stdin, stdout })
    }

    /// Runs `op` from `cgroup`; fails if the worker died or could not run it.
    pub(crate) fn run(&mut self, cgroup: &Path, op: Op) -> Result<Reply> {
        let line = serde_json::to_string(&Request { cgroup: cgroup.to_path_buf(), op })?;
        writeln!(self.stdin, "{line}").context("the worker process is gone (writing a command failed)")?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).context("reading the worker's answer failed")?;
        if answer.is_empty() {
            bail!("the worker process exited while running {op:?}; see its error above");
        }
        let reply: Reply = serde_json::from_str(&answer).with_context(|| format!("the worker answered {answer:?}"))?;
        if let Some(e) = &reply.fatal {
            bail!("the worker could not run {op:?} from {}: {e}", cgroup.display());
        }
        Ok(reply)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing stdin ends the worker's loop; kill in case it is stuck in a syscall.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's main: `mg-bench worker <netns>`.
pub(crate) fn child_main(netns: &str) -> Result<()> {
    let ns = std::fs::File::open(netns).with_context(|| format!("could not open {netns}"))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("could not join network namespace {netns}"))?;
    let mut current: Option<PathBuf> = None;
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading a command failed")?;
        let cmd: Request = serde_json::from_str(&line).with_context(|| format!("bad command {line:?}"))?;
        let reply = (|| -> Result<Reply> {
            if current.as_ref() != Some(&cmd.cgroup) {
                std::fs::write(cmd.cgroup.join("cgroup.procs"), "0")
                    .with_context(|| format!("could not join cgroup {}", cmd.cgroup.display()))?;
                current = Some(cmd.cgroup.clone());
            }
            Ok(run_op(&cmd.op))
        })()
        .unwrap_or_else(|e| Reply { fatal: Some(format!("{e:#}")), ..Default::default() });
        let mut out = stdout.lock();
        writeln!(out, "{}", serde_json::to_string(&reply)?)?;
        out.flush()?;
    }
    Ok(())
}

fn run_op(op: &Op) -> Reply {
    let mut r = Reply::default();
    let start = Instant::now();
    match *op {
        Op::TcpConnect { dest, count } => batched(&mut r, count, |r| tally(r, connect_close(dest).map(drop))),
        Op::UdpSendto { dest, count } => match socket(libc::SOCK_DGRAM) {
            Ok(sock) => {
                let addr = sockaddr(dest);
                let payload = [0x5au8; 32];
                batched(&mut r, count, |r| {
                    // SAFETY: valid fd, buffer and sockaddr of the stated sizes.
                    let n = unsafe {
                        libc::sendto(
                            sock.as_raw_fd(),
                            payload.as_ptr().cast(),
                            payload.len(),
                            0,
                            (&addr as *const libc::sockaddr_in).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as u32,
                        )
                    };
                    tally(r, if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
                });
            }
            Err(e) => tally(&mut r, Err(e)),
        },
        Op::UdpConnectSend { dest, count } => batched(&mut r, count, |r| tally(r, udp_connect_send(dest))),
        Op::Bulk { dest, ms } => {
            if let Err(e) = bulk(&mut r, dest, Duration::from_millis(ms)) {
                tally(&mut r, Err(e));
            }
        }
        Op::Refused { dest, count } => {
            for _ in 0..count {
                let t = Instant::now();
                let result = connect_close(dest).map(drop);
                r.samples_ns.push(t.elapsed().as_nanos() as u64);
                tally(&mut r, result);
            }
        }
        Op::Probe { dest, timeout_ms } => {
            r.syn_retries =
                std::fs::read_to_string("/proc/sys/net/ipv4/tcp_syn_retries").ok().and_then(|s| s.trim().parse().ok());
            let t = Instant::now();
            let result = probe(dest, timeout_ms);
            r.samples_ns.push(t.elapsed().as_nanos() as u64);
            tally(&mut r, result);
        }
        Op::Storm { dest, ms } => {
            let until = Duration::from_millis(ms);
            while start.elapsed() < until {
                tally(&mut r, connect_close(dest).map(drop));
            }
        }
    }
    r.ns = start.elapsed().as_nanos() as u64;
    r
}

fn tally(r: &mut Reply, result: std::io::Result<()>) {
    match result {
        Ok(()) => r.ok += 1,
        Err(e) => {
            let name = match e.raw_os_error() {
                Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
                None => e.to_string(),
            };
            *r.errors.entry(name).or_default() += 1;
        }
    }
}

fn socket(ty: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(dest: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: dest.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*dest.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

fn connect_fd(fd: &OwnedFd, dest: SocketAddrV4) -> std::io::Result<()> {
    let addr = sockaddr(dest);
    // SAFETY: valid fd and sockaddr.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn udp_connect_send(dest: SocketAddrV4) -> std::io::Result<()> {
    let sock = socket(libc::SOCK_DGRAM)?;
    connect_fd(&sock, dest)?;
    let payload = [0x5au8; 32];
    // SAFETY: valid fd and buffer of the stated size.
    if unsafe { libc::send(sock.as_raw_fd(), payload.as_ptr().cast(), payload.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// socket, connect, close with SO_LINGER {1, 0} (RST instead of FIN + TIME_WAIT).
fn connect_close(dest: SocketAddrV4) -> std::io::Result<OwnedFd> {
    let sock = socket(libc::SOCK_STREAM)?;
    connect_fd(&sock, dest)?;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd and option of the stated size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    Ok(sock)
}

/// Bytes of one write of [`Op::Bulk`].
pub(crate) const BULK_WRITE: usize = 64 * 1024;

/// Writes [`BULK_WRITE`] bytes at a time for `duration`.
fn bulk(r: &mut Reply, dest: SocketAddrV4, duration: Duration) -> std::io::Result<()> {
    let sock = socket(libc::SOCK_STREAM)?;
    connect_fd(&sock, dest)?;
    let mut stream = std::net::TcpStream::from(sock);
    let buf = vec![0x42u8; BULK_WRITE];
    let start = Instant::now();
    while start.elapsed() < duration {
        stream.write_all(&buf)?;
        r.bytes += BULK_WRITE as u64;
    }
    r.ok = 1;
    Ok(())
}

/// Non-blocking connect and poll: `ETIMEDOUT` when nothing answered in time.
fn probe(dest: SocketAddrV4, timeout_ms: u64) -> std::io::Result<()> {
    let sock = socket(libc::SOCK_STREAM | libc::SOCK_NONBLOCK)?;
    match connect_fd(&sock, dest) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms as i32) };
    if n == 0 {
        return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
    }
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: valid fd, out-pointer and length.
    unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut i32).cast(), &mut len)
    };
    if err != 0 {
        return Err(std::io::Error::from_raw_os_error(err));
    }
    Ok(())
}
