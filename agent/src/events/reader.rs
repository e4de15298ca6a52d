// SPDX-License-Identifier: Apache-2.0
//! Reads the kernel's event ring buffer and decodes each record into an [`Attempt`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use metadata_guard_common::{Event, Hook, Verdict, AF_INET};
use tokio::io::unix::AsyncFd;

use crate::attempt::{Attempt, Protocol};

pub(crate) struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Result<EventReader> {
        // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, for as long
        // as the AsyncFd owns the RingBuf.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("could not watch the event ring buffer: {e}"))?;
        Ok(EventReader { ring })
    }

    /// Waits until events are ready, then appends all of them (at most `max`) to `out`.
    pub(crate) async fn read(&mut self, out: &mut Vec<Attempt>, max: usize) -> Result<()> {
        let mut guard = self.ring.readable_mut().await.context("waiting on the event ring buffer failed")?;
        let clock = Clock::now();
        let ring = guard.get_inner_mut();
        while out.len() < max {
            let Some(item) = ring.next() else { break };
            if let Some(attempt) = decode(&item, &clock) {
                out.push(attempt);
            }
        }
        if out.len() < max {
            guard.clear_ready();
        }
        Ok(())
    }
}

impl EventReader {
    /// Appends what is queued now (at most `max`), without waiting: at shutdown, so
    /// that attempts made before SIGTERM are audited by this agent, not left in the
    /// pinned ring buffer for the next one.
    pub(crate) fn drain(&mut self, out: &mut Vec<Attempt>, max: usize) {
        let clock = Clock::now();
        let ring = self.ring.get_mut();
        while out.len() < max {
            let Some(item) = ring.next() else { break };
            if let Some(attempt) = decode(&item, &clock) {
                out.push(attempt);
            }
        }
    }
}

/// Wall and monotonic time read together, to place kernel timestamps on the wall clock.
pub(super) struct Clock {
    wall: SystemTime,
    monotonic_ns: u64,
}

impl Clock {
    pub(super) fn now() -> Clock {
        let mono =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(Duration::from).unwrap_or_default();
        Clock { wall: SystemTime::now(), monotonic_ns: mono.as_nanos() as u64 }
    }

    fn wall_time_of(&self, ktime_ns: u64) -> SystemTime {
        self.wall - Duration::from_nanos(self.monotonic_ns.saturating_sub(ktime_ns))
    }
}

/// `None` for a record that is not a whole [`Event`] or names an unknown hook/verdict
/// (an object newer than this agent): skipped rather than misreported.
pub(super) fn decode(bytes: &[u8], clock: &Clock) -> Option<Attempt> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: length checked; Event is plain old data, read unaligned.
    let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let destination = if e.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(e.addr[0], e.addr[1], e.addr[2], e.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(e.addr))
    };
    let comm_len = e.comm.iter().position(|&b| b == 0).unwrap_or(e.comm.len());
    Some(Attempt {
        time: clock.wall_time_of(e.ktime_ns),
        cgroup_id: e.cgroup_id,
        netns_cookie: e.netns_cookie,
        pid: (e.pid_tgid >> 32) as u32,
        tid: e.pid_tgid as u32,
        comm: String::from_utf8_lossy(&e.comm[..comm_len]).into_owned(),
        destination,
        port: e.port,
        protocol: Protocol::from_ip_protocol(e.protocol),
        hook: Hook::from_u8(e.hook)?,
        verdict: Verdict::from_u8(e.verdict)?,
        mapped: e.mapped != 0,
        request: None,
        // The uplink's packets may come from no socket, task or cgroup: their source
        // address and where they entered name the pod instead.
        source: (e.hook == Hook::Uplink as u8).then(|| source_of(&e)),
        ingress_ifindex: e.ingress_ifindex,
    })
}

fn source_of(e: &Event) -> IpAddr {
    if e.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(e.src_addr[0], e.src_addr[1], e.src_addr[2], e.src_addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(e.src_addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metadata_guard_common::AF_INET6;

    fn raw(e: &Event) -> Vec<u8> {
        // SAFETY: Event is plain old data.
        unsafe { std::slice::from_raw_parts((e as *const Event).cast::<u8>(), std::mem::size_of::<Event>()) }.to_vec()
    }

    fn event(family: u8, addr: [u8; 16]) -> Event {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        Event {
            ktime_ns: 1_000_000_000,
            cgroup_id: 42,
            netns_cookie: 7,
            pid_tgid: (1234u64 << 32) | 1235,
            addr,
            port: 80,
            family,
            protocol: 6,
            hook: Hook::Connect6 as u8,
            verdict: Verdict::Blocked as u8,
            mapped: 1,
            _pad: 0,
            comm,
            ingress_ifindex: 0,
            uplink_ifindex: 0,
            src_addr: [0; 16],
        }
    }

    #[test]
    fn mapped_attempt_reads_as_the_ipv4_destination() {
        let clock = Clock { wall: SystemTime::UNIX_EPOCH + Duration::from_secs(100), monotonic_ns: 3_000_000_000 };
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[169, 254, 169, 254]);
        let a = decode(&raw(&event(AF_INET, addr)), &clock).unwrap();
        assert_eq!(a.destination, "169.254.169.254".parse::<IpAddr>().unwrap());
        assert_eq!((a.pid, a.tid, a.comm.as_str(), a.port), (1234, 1235, "curl", 80));
        assert!(a.mapped);
        assert_eq!(a.protocol, Protocol::Tcp);
        // Happened 2 s before the clock was read.
        assert_eq!(a.time, SystemTime::UNIX_EPOCH + Duration::from_secs(98));
    }

    #[test]
    fn ipv6_destination_and_unknown_hooks() {
        let clock = Clock::now();
        let ip: Ipv6Addr = "fd00:ec2::254".parse().unwrap();
        let mut e = event(AF_INET6, ip.octets());
        assert_eq!(decode(&raw(&e), &clock).unwrap().destination, IpAddr::V6(ip));
        e.hook = 200;
        assert!(decode(&raw(&e), &clock).is_none());
        assert!(decode(&raw(&e)[..10], &clock).is_none());
    }
}
