// SPDX-License-Identifier: Apache-2.0
//! Counts IPv4 packets of one protocol arriving in the node namespace, whatever
//! socket (if any) would take them: the proof that a raw packet was stopped, not
//! just ignored by a server.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use metadata_guard_tests::netns::NetNs;

/// Offset of the destination address in an IPv4 header.
const IPV4_DADDR_OFFSET: usize = 16;

pub(crate) struct PacketTap {
    fd: OwnedFd,
    seen: u64,
    dest: Ipv4Addr,
}

impl PacketTap {
    /// A raw socket for `protocol` in `ns`, counting packets to `dest`.
    pub(crate) fn open(ns: &NetNs, protocol: i32, dest: Ipv4Addr) -> Result<PacketTap> {
        let fd = ns.run(|| {
            // SAFETY: plain socket(2); owned right away.
            let fd = unsafe {
                libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, protocol)
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh fd we own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        });
        let fd = fd.context("could not open a raw packet tap in the node namespace")?;
        Ok(PacketTap { fd, seen: 0, dest })
    }

    /// Packets to the destination so far (drains what is queued).
    pub(crate) fn count(&mut self) -> u64 {
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                return self.seen;
            }
            let n = n as usize;
            if n >= IPV4_DADDR_OFFSET + 4 && buf[IPV4_DADDR_OFFSET..IPV4_DADDR_OFFSET + 4] == self.dest.octets() {
                self.seen += 1;
            }
        }
    }
}
