// SPDX-License-Identifier: Apache-2.0
//! The simulated node on the real kernel: pods reach the stand-in over TCP, UDP
//! and ICMP, and nothing (namespace, thread, fd, cgroup) outlives its handle.
//!
//! Needs root. Without it the tests skip, unless CI=true, where they fail.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::{
    cgroups::{find_cgroup2_mount, TestCgroup},
    gate,
    netns::NetNs,
    standin::{Standin, STANDIN_PORTS},
    world::{SimNode, IMDS_V4, IMDS_V6, STANDIN_ADDRS},
};
use nix::{
    sys::{
        signal::Signal,
        socket::{self as sock, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage},
        time::TimeVal,
        wait::{waitpid, WaitStatus},
    },
    unistd::{fork, ForkResult, Pid},
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// The tests count this process's fds and threads, so they must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

fn privileged() -> bool {
    gate::root_or_skip("network namespaces, raw sockets, cgroups")
}

#[test]
fn pods_reach_the_standin_and_everything_goes_away() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap();
    // Compared as sets: the other test's thread may finish meanwhile, never start.
    let fds_before = open_fds()?;
    let threads_before = entries("/proc/self/task")?;
    exercise_world()?;
    // Threads are joined, but the kernel may list one for a moment longer.
    let deadline = Instant::now() + TIMEOUT;
    while !entries("/proc/self/task")?.is_subset(&threads_before) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let threads_left: Vec<_> = entries("/proc/self/task")?.difference(&threads_before).cloned().collect();
    assert!(threads_left.is_empty(), "threads left behind: {threads_left:?}");
    let fds_left: Vec<_> = open_fds()?.difference(&fds_before).cloned().collect();
    assert!(fds_left.is_empty(), "fds (namespaces, sockets) left behind: {fds_left:?}");
    Ok(())
}

fn exercise_world() -> Result<()> {
    let mut sim = SimNode::new("mgt-node")?;
    let standin = Standin::start(sim.node())?;
    let pod = sim.add_pod("mgt-pod")?;
    let pod_v4 = IpAddr::from(pod.ipv4);
    let pod_v6 = IpAddr::from(pod.ipv6);

    let ino = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.ino());
    let host = ino("/proc/self/ns/net".as_ref())?;
    ensure!(ino(&sim.node().path())? != host && ino(&pod.ns.path())? != host, "a namespace is the host's");
    ensure!(
        ino(&NetNs::from_path(&pod.ns.path())?.path())? == ino(&pod.ns.path())?,
        "from_path opened another namespace"
    );
    ensure!(NetNs::from_path("/proc/self/ns/uts".as_ref()).is_err(), "from_path took a UTS namespace");

    for &dest in STANDIN_ADDRS {
        for port in STANDIN_PORTS {
            let to = SocketAddr::new(dest, port);
            let status = pod.ns.run(|| http_status(to)).with_context(|| format!("HTTP to {to} from the pod"))?;
            ensure!(status == 200, "HTTP to {to} answered {status}");
        }
    }
    let seen = standin.arrivals();
    let v4_addrs = STANDIN_ADDRS.iter().filter(|a| a.is_ipv4()).count() as u64;
    assert_eq!(seen.tcp(80).count, STANDIN_ADDRS.len() as u64);
    assert_eq!(seen.tcp(53).count, STANDIN_ADDRS.len() as u64);
    assert_eq!(seen.tcp(80).from(pod_v4), v4_addrs);
    assert_eq!(seen.tcp(80).from(pod_v6), 1);
    assert_eq!((seen.tcp(80).to(IMDS_V4), seen.tcp(80).to(IMDS_V6)), (1, 1));
    standin.reset();
    assert_eq!(standin.arrivals().total(), 0, "reset left counts");

    for to in [SocketAddr::new(IMDS_V4, 53), SocketAddr::new(IMDS_V6, 53), SocketAddr::new(IMDS_V4, 80)] {
        pod.ns.run(|| udp_echo(to)).with_context(|| format!("UDP to {to} from the pod"))?;
    }
    for to in [IMDS_V4, IMDS_V6] {
        pod.ns.run(|| ping(to)).with_context(|| format!("ping {to} from the pod"))?;
    }
    let seen = standin.arrivals();
    assert_eq!(seen.udp(53).count, 2);
    assert_eq!((seen.udp(53).from(pod_v4), seen.udp(53).from(pod_v6)), (1, 1));
    assert_eq!((seen.udp(53).to(IMDS_V4), seen.udp(53).to(IMDS_V6)), (1, 1));
    assert_eq!(seen.udp(80).count, 1);
    assert_eq!(seen.echo_requests.to(IMDS_V4), 1);
    assert_eq!(seen.echo_requests.to(IMDS_V6), 1);
    assert_eq!(seen.echo_requests.from(pod_v4), 1);
    assert_eq!(seen.tcp(80).count, 0);
    assert!(seen.errors.is_empty(), "stand-in errors: {:?}", seen.errors);
    serde_json::to_string(&seen).context("arrivals do not serialise")?;
    Ok(())
}

#[test]
fn cgroups_kill_their_processes_and_vanish() -> Result<()> {
    if !privileged() {
        return Ok(());
    }
    let _serial = SERIAL.lock().unwrap();
    let mount = find_cgroup2_mount()?;
    let root = TestCgroup::create(&mount, &format!("mg-world-test-{}", std::process::id()))?;
    // The middle handle is a temporary: the leaf must keep "a" alive.
    let leaf = root.child("a")?.child("b")?;
    let other = root.child("c")?;
    ensure!(root.path().join("a/b").is_dir(), "a/b went away with its parent's handle");
    ensure!(root.child("c").is_err(), "made cgroup c twice");
    ensure!(leaf.id() == std::fs::metadata(leaf.path())?.ino() && leaf.id() != root.id());

    let sleepers = [sleeper()?, sleeper()?];
    leaf.add_process(sleepers[0].as_raw() as u32)?;
    other.add_process(sleepers[1].as_raw() as u32)?;
    assert_eq!(leaf.procs()?, vec![sleepers[0].as_raw() as u32]);
    assert_eq!(other.procs()?, vec![sleepers[1].as_raw() as u32]);

    let path = root.path().to_path_buf();
    drop((root, other));
    ensure!(!path.join("c").exists(), "c outlived its only handle");
    ensure!(path.join("a/b").is_dir(), "the tree went while the leaf still holds it");
    drop(leaf);
    ensure!(!path.exists(), "{} is still there", path.display());
    for pid in sleepers {
        assert_eq!(waitpid(pid, None)?, WaitStatus::Signaled(pid, Signal::SIGKILL, false));
    }
    Ok(())
}

/// A child process that waits to be killed.
fn sleeper() -> Result<Pid> {
    // SAFETY: the child only calls pause(), which is async-signal-safe.
    match unsafe { fork() }? {
        ForkResult::Child => loop {
            // SAFETY: no arguments, no memory touched.
            unsafe { libc::pause() };
        },
        ForkResult::Parent { child } => Ok(child),
    }
}

fn entries(dir: &str) -> Result<BTreeSet<String>> {
    std::fs::read_dir(dir)?.map(|e| Ok(e?.file_name().to_string_lossy().into_owned())).collect()
}

/// Each open fd with what it refers to, e.g. `7 -> net:[4026532301]`.
fn open_fds() -> Result<BTreeSet<String>> {
    let mut fds = BTreeSet::new();
    for fd in entries("/proc/self/fd")? {
        // The fd read_dir itself used is gone by now.
        if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            fds.insert(format!("{fd} -> {}", target.display()));
        }
    }
    Ok(fds)
}

fn http_status(to: SocketAddr) -> Result<u16> {
    let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: metadata\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    answer.get(9..12).and_then(|s| s.parse().ok()).with_context(|| format!("no HTTP status in {answer:?}"))
}

/// Over a connected socket, so the echo only counts if it comes from `to`.
fn udp_echo(to: SocketAddr) -> Result<()> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let socket = UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.connect(to)?;
    socket.send(b"metadata?")?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf)?;
    ensure!(&buf[..n] == b"metadata?", "echo came back as {:?}", &buf[..n]);
    Ok(())
}

/// One echo request on a raw socket, and its reply.
fn ping(to: IpAddr) -> Result<()> {
    let (family, protocol, request, reply) = match to {
        IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp, 8, 0),
        IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6, 128, 129),
    };
    let fd: OwnedFd = sock::socket(family, SockType::Raw, SockFlag::SOCK_CLOEXEC, protocol)?;
    sock::setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(TIMEOUT.as_secs() as _, 0))?;
    let id = (std::process::id() as u16).to_be_bytes();
    let mut packet = vec![request, 0, 0, 0, id[0], id[1], 0, 1];
    packet.extend_from_slice(b"metadata-guard");
    if to.is_ipv4() {
        // The kernel checksums ICMPv6 on raw sockets, but not ICMP.
        let sum = checksum(&packet).to_be_bytes();
        packet[2..4].copy_from_slice(&sum);
    }
    let dest = SockaddrStorage::from(SocketAddr::new(to, 0));
    sock::sendto(std::os::fd::AsRawFd::as_raw_fd(&fd), &packet, &dest, MsgFlags::empty())?;
    let mut buf = [0u8; 1500];
    loop {
        let n =
            sock::recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf, MsgFlags::empty()).context("no echo reply")?;
        // Raw IPv4 sockets hand over the IP header too.
        let icmp = if to.is_ipv4() { &buf[usize::from(buf[0] & 0x0f) * 4..n] } else { &buf[..n] };
        if icmp.len() >= 8 && icmp[0] == reply && icmp[4..6] == id {
            return Ok(());
        }
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
