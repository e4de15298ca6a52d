// SPDX-License-Identifier: Apache-2.0
//! Learning the cookie of the host's network namespace, which the kernel programs
//! compare every socket's namespace against.
//!
//! Two mechanisms, chosen per kernel: `SO_NETNS_COOKIE` (5.14+) on a socket opened in
//! the host namespace; before that, a probe program that records the cookie of a UDP
//! connect made from the host namespace to a random token address.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    thread,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::Array,
    programs::{links::CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use metadata_guard_common::{map_names, program_names, NetnsProbe};

const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mechanism {
    SoNetnsCookie,
    ProbeProgram,
}

impl Mechanism {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Mechanism::SoNetnsCookie => "getsockopt(SO_NETNS_COOKIE) (kernel 5.14+)",
            Mechanism::ProbeProgram => "probe program on connect4 (kernels before 5.14)",
        }
    }
}

/// Runs `f` on a thread that has joined `netns` (or stays in ours when None), so the
/// agent's own threads never change namespace.
pub(super) fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    thread::scope(|s| {
        s.spawn(|| {
            if let Some(path) = netns {
                let ns =
                    File::open(path).with_context(|| format!("could not open network namespace {}", path.display()))?;
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("could not join network namespace {}", path.display()))?;
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("a thread in the host network namespace panicked"))?
    })
}

/// `Ok(None)` when this kernel has no `SO_NETNS_COOKIE`.
pub(crate) fn via_sockopt(netns: Option<&Path>) -> Result<Option<u64>> {
    in_netns(netns, || {
        let sock = UdpSocket::bind("127.0.0.1:0").or_else(|_| UdpSocket::bind("[::1]:0"));
        let sock = sock.context("could not open a UDP socket in the host network namespace")?;
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: valid fd, output buffer of the advertised length.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            return Ok(Some(cookie));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOPROTOOPT) {
            return Ok(None);
        }
        Err(err).context("getsockopt(SO_NETNS_COOKIE) failed")
    })
}

/// The fallback: attach the probe to a cgroup for a moment and connect from the host
/// namespace. The connecting thread is this process's, so the probe must sit on a
/// cgroup the agent is inside: `cgroup` itself (a DaemonSet pod is inside the root),
/// else the agent's own cgroup (an agent beside the cgroup it guards).
pub(crate) fn via_probe(ebpf: &mut Ebpf, cgroup: &Path, netns: Option<&Path>) -> Result<u64> {
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(program_names::NETNS_PROBE)
        .context("the kernel object has no netns probe program")?
        .try_into()?;
    program.load().context("the kernel refused to load the netns probe program")?;
    let own = own_cgroup().filter(|own| own.as_path() != cgroup);
    for candidate in std::iter::once(cgroup.to_path_buf()).chain(own) {
        let cookie = probe_from(ebpf, &candidate, netns)?;
        if cookie != 0 {
            return Ok(cookie);
        }
    }
    bail!(
        "this kernel has no SO_NETNS_COOKIE (it arrived in 5.14) and the fallback probe saw no connect: \
         the agent is neither inside cgroup {} nor in a cgroup it can find under the cgroup2 mount. Run the \
         agent inside that cgroup's subtree (a DaemonSet pod is inside the root) or use a 5.14+ kernel",
        cgroup.display()
    );
}

/// One probe with the program attached to `cgroup`: the cookie it saw, 0 for none.
fn probe_from(ebpf: &mut Ebpf, cgroup: &Path, netns: Option<&Path>) -> Result<u64> {
    let token = random_token();
    {
        let mut slot: Array<_, NetnsProbe> =
            Array::try_from(ebpf.map_mut(map_names::NETNS_PROBE).context("the kernel object has no netns probe map")?)?;
        slot.set(
            0,
            NetnsProbe {
                token_ip4: u32::from(*token.ip()).to_be(),
                token_port: u32::from(token.port().to_be()),
                cookie: 0,
            },
            0,
        )
        .context("could not arm the netns probe")?;
    }
    let program: &mut CgroupSockAddr = ebpf
        .program_mut(program_names::NETNS_PROBE)
        .context("the kernel object has no netns probe program")?
        .try_into()?;
    let cgroup_dir = File::open(cgroup).with_context(|| format!("could not open cgroup {}", cgroup.display()))?;
    let link = program.attach(&cgroup_dir, CgroupAttachMode::Single).context("could not attach the netns probe")?;
    // A connected UDP socket sends nothing; the connect alone runs the hook.
    let connected = in_netns(netns, || {
        let sock = UdpSocket::bind("0.0.0.0:0").context("could not open a UDP socket in the host namespace")?;
        sock.connect(token).context("could not connect the probe socket")?;
        Ok(())
    });
    program.detach(link).context("could not detach the netns probe")?;
    connected?;
    let slot: Array<_, NetnsProbe> = Array::try_from(ebpf.map(map_names::NETNS_PROBE).unwrap())?;
    Ok(slot.get(&0, 0)?.cookie)
}

/// This process's cgroup v2 directory, when it is visible under the detected cgroup2
/// mount (not inside a cgroup namespace that hides the host's paths).
fn own_cgroup() -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let relative = text.lines().find_map(|l| l.strip_prefix("0::"))?.trim_start_matches('/');
    let dir = crate::cgroup::resolve(None).ok()?.join(relative);
    dir.is_dir().then_some(dir)
}

/// A loopback address and port nobody else will connect to during the probe.
fn random_token() -> SocketAddrV4 {
    let mut bytes = [0u8; 5];
    // SAFETY: writes at most bytes.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let seed = u64::from(t.subsec_nanos()) ^ (u64::from(std::process::id()) << 24);
        bytes.copy_from_slice(&seed.to_le_bytes()[..5]);
    }
    let port = u16::from_le_bytes([bytes[3], bytes[4]]).max(1024);
    SocketAddrV4::new(Ipv4Addr::new(127, bytes[0], bytes[1], bytes[2].max(1)), port)
}
