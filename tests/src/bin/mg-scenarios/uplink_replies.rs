// SPDX-License-Identifier: Apache-2.0
//! The node's own replies to the metadata address: a TCP reset for a SYN from the
//! metadata service to a closed port of the node. The kernel sends it from its
//! per-namespace control socket; where `mg_uplink` asks a packet's socket for its
//! namespace (`bpf_get_netns_cookie`), that socket is the host's and the reset leaves;
//! where it reads socket marks (5.10, 6.1), control sockets carry none and the reset
//! is refused (docs/threat-model.md says so).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use metadata_guard::{remove_host_table, Removal};
use metadata_guard_tests::{netns::NetNs, world::IMDS_V4};

use crate::harness::{budget, Ctx};

pub(crate) const SCENARIOS: [crate::Scenario; 1] = [(
    "uplink: the node's TCP reset to the metadata service leaves where the kernel names its socket's namespace",
    node_reset,
)];

/// A port nothing listens on in the node namespace.
const CLOSED_PORT: u16 = 1;
const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// From `ns`, a TCP connect bound to `source` towards `to`: whether it was refused by
/// a reset (true) or heard nothing within the wait (false).
fn reset_comes_back(ns: &NetNs, source: Ipv4Addr, to: SocketAddrV4, wait: Duration) -> Result<bool> {
    ns.run(|| -> Result<bool> {
        let sa = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
        // SAFETY: socket, bind, connect and getsockopt on our own fd with valid sockaddrs.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
            ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(fd);
            let from = sa(SocketAddrV4::new(source, 0));
            ensure!(
                libc::bind(fd.as_raw_fd(), (&from as *const libc::sockaddr_in).cast(), len) == 0,
                "bind {source}: {}",
                std::io::Error::last_os_error()
            );
            let dest = sa(to);
            libc::connect(fd.as_raw_fd(), (&dest as *const libc::sockaddr_in).cast(), len);
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                let mut err: libc::c_int = 0;
                let mut l = std::mem::size_of::<libc::c_int>() as u32;
                libc::getsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&mut err as *mut i32).cast(),
                    &mut l,
                );
                if err == libc::ECONNREFUSED {
                    return Ok(true);
                }
                ensure!(err == 0, "connect from {source} to {to}: {}", std::io::Error::from_raw_os_error(err));
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(false)
        }
    })
}

fn node_reset(ctx: &mut Ctx) -> Result<()> {
    let uplinks = crate::uplink_world::uplinks(ctx)?;
    let up = uplinks.current();
    let IpAddr::V4(imds) = IMDS_V4 else { unreachable!() };
    let node = SocketAddrV4::new(up.node_v4, CLOSED_PORT);
    ctx.uninstall()?;
    ensure!(
        reset_comes_back(&up.ns, imds, node, budget(ANSWER_WAIT))?,
        "without the guard the node's reset did not come back"
    );
    ctx.default_agent()?;
    let helper = ctx.status()?.packet_netns_from.as_deref() == Some("helper");
    // The host-side table's `output` chain judges the node's socketless packets too.
    // For this probe the uplink must judge alone: the agent stops (its programs stay
    // pinned; the table it owned on 6.9+ is left without an owner) and the table goes.
    ctx.stop_agent()?;
    ensure!(
        matches!(remove_host_table(Some(&ctx.node.node_netns()))?, Removal::Removed),
        "the host-side table was not there to remove"
    );
    let verdict = if helper { "allowed" } else { "blocked" };
    let before = ctx.kernel_count_at(Some("uplink"), verdict)?;
    let came = reset_comes_back(&up.ns, imds, node, budget(ANSWER_WAIT))?;
    let counted = ctx.kernel_count_at(Some("uplink"), verdict)? - before;
    if helper {
        ensure!(came, "the node's own TCP reset to the metadata service was refused, though the kernel names its socket's namespace here");
    } else {
        ensure!(
            !came,
            "the node's reset left, yet on this kernel the uplink cannot tell the control socket is the host's"
        );
    }
    ensure!(counted >= 1, "the uplink did not judge the node's reset ({verdict}: +{counted})");
    Ok(())
}
