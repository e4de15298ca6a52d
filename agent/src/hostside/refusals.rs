// SPDX-License-Identifier: Apache-2.0
//! Packets the host-side table refused (or, in audit mode, let through), copied to
//! the agent through NFLOG and turned into [`Attempt`]s for the same audit trail and
//! metrics as the socket hooks' events.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::{
    nflog::{self, LoggedPacket},
    nftables::NFPROTO_IPV4,
    NlSocket,
};
use tokio::io::unix::AsyncFd;

use super::{pods::EntryPods, table};
use crate::attempt::{Attempt, Hook, Protocol, Verdict};

const IPV6_HEADER_LEN: usize = 40;
const IPV6_EXTENSION_HEADERS: [u8; 4] = [0, 43, 60, 51]; // hop-by-hop, routing, destination options, AH
const IPV6_FRAGMENT: u8 = 44;
/// Extension headers walked before giving up on finding the ports.
const IPV6_MAX_EXTENSIONS: usize = 6;
const IPV4_HEADER_LEN: usize = 20;
/// IPv4 option kinds (RFC 791): end of list, no-operation, and the two source routes
/// the host side refuses (see `table/source_route.rs`).
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_SOURCE_ROUTES: [u8; 2] = [super::table::source_route::IPOPT_LSRR, super::table::source_route::IPOPT_SSRR];
/// A source route's type, length and pointer bytes before its addresses.
const SOURCE_ROUTE_HEAD: usize = 3;

/// Reads the NFLOG group of the host-side table.
pub(crate) struct RefusalReader {
    /// Bound by `open`; registered with the runtime that first reads (the host-side
    /// subsystem runs on a thread and a runtime of its own).
    bound: Option<NlSocket>,
    sock: Option<AsyncFd<NlSocket>>,
    pods: EntryPods,
}

impl RefusalReader {
    /// Binds to the table's log group in `host_netns`. One agent per node holds it.
    pub(crate) fn open(host_netns: Option<&Path>, cgroup_root: &Path) -> Result<RefusalReader> {
        let mut sock = NlSocket::open_in(host_netns, libc::NETLINK_NETFILTER)
            .context("could not open an NFLOG socket in the host network namespace")?;
        sock.set_recv_buffer(4 << 20);
        sock.request(&nflog::bind_messages(table::LOG_GROUP, table::LOG_SNAPLEN), |_| true).with_context(|| {
            format!(
                "could not bind to NFLOG group {} (is another listener on it, or nfnetlink_log missing?)",
                table::LOG_GROUP
            )
        })?;
        sock.set_nonblocking()?;
        let pods = EntryPods::open(host_netns, cgroup_root, Duration::ZERO)?;
        Ok(RefusalReader { bound: Some(sock), sock: None, pods })
    }

    /// Waits for logged packets and appends them to `out` as attempts.
    pub(crate) async fn read(&mut self, out: &mut Vec<Attempt>) -> Result<()> {
        if let Some(bound) = self.bound.take() {
            // SAFETY: the AsyncFd owns the socket, so the fd stays open while registered.
            let registered = unsafe { AsyncFd::register(bound) };
            self.sock = Some(registered.context("could not register the NFLOG socket with tokio")?);
        }
        let sock = self.sock.as_ref().context("the NFLOG socket was lost after a failed registration")?;
        let mut guard = sock.readable().await?;
        let packets = match guard.try_io(|s| s.get_ref().recv()) {
            Ok(Ok(msgs)) => msgs,
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!(
                    "host-side refusals arrived faster than they were read; some are not in the audit trail"
                );
                return Ok(());
            }
            // The socket-hook events share the pipeline: a bad read here must not stop them.
            Ok(Err(e)) => {
                tracing::warn!("could not read the host side's NFLOG socket: {e}");
                return Ok(());
            }
            Err(_would_block) => return Ok(()),
        };
        for p in packets.iter().filter_map(nflog::parse) {
            if let Some(a) = self.attempt(&p) {
                out.push(a);
            }
        }
        Ok(())
    }

    fn attempt(&mut self, p: &LoggedPacket) -> Option<Attempt> {
        let (destination, protocol, port) = decode(p.family, &p.payload)?;
        let verdict = if p.prefix == table::LOG_PREFIX_AUDITED { Verdict::Audited } else { Verdict::Blocked };
        let source = decode_source(p.family, &p.payload);
        let cgroup_id = self.pod_of(p, source).unwrap_or(0);
        Some(Attempt {
            time: SystemTime::now(),
            cgroup_id,
            netns_cookie: 0,
            pid: 0,
            tid: 0,
            comm: String::new(),
            destination,
            port,
            protocol: Protocol::from_ip_protocol(protocol),
            hook: Hook::Host,
            verdict,
            mapped: false,
            source,
            ingress_ifindex: 0,
            request: None,
        })
    }

    /// A cgroup of the pod that sent the packet (the lowest id, so that repeated
    /// attempts name the same container): by the interface it entered through when
    /// that is a pod's own — the bridge port, when `br_netfilter` reports one — and
    /// behind a bridge without it by its source address.
    fn pod_of(&mut self, p: &LoggedPacket, source: Option<IpAddr>) -> Option<u64> {
        let ifindex = if p.physindev != 0 { p.physindev } else { p.indev };
        if ifindex == 0 {
            return None;
        }
        self.pods.pod_of(ifindex, source)
    }
}

/// Destination, IP protocol and destination port (0 without one) of a packet from
/// its network header. An IPv4 packet with a source route is going to the route's
/// last address, not to the node it is addressed to: that is its destination here.
pub(super) fn decode(family: u8, pkt: &[u8]) -> Option<(IpAddr, u8, u16)> {
    let (dest, mut proto, mut offset) = if family == NFPROTO_IPV4 {
        let ihl = (*pkt.first()? & 0x0f) as usize * 4;
        let addressed = Ipv4Addr::from(<[u8; 4]>::try_from(pkt.get(16..20)?).ok()?);
        let dest = pkt.get(IPV4_HEADER_LEN..ihl).and_then(source_route_end).unwrap_or(addressed);
        let frag = u16::from_be_bytes([*pkt.get(6)?, *pkt.get(7)?]) & 0x1fff;
        let proto = *pkt.get(9)?;
        if frag != 0 {
            return Some((IpAddr::V4(dest), proto, 0));
        }
        (IpAddr::V4(dest), proto, ihl)
    } else {
        let dest = Ipv6Addr::from(<[u8; 16]>::try_from(pkt.get(24..40)?).ok()?);
        (IpAddr::V6(dest), *pkt.get(6)?, IPV6_HEADER_LEN)
    };
    if dest.is_ipv6() {
        for _ in 0..IPV6_MAX_EXTENSIONS {
            if proto == IPV6_FRAGMENT {
                let next = *pkt.get(offset)?;
                let frag = u16::from_be_bytes([*pkt.get(offset + 2)?, *pkt.get(offset + 3)?]) & 0xfff8;
                if frag != 0 {
                    return Some((dest, next, 0));
                }
                proto = next;
                offset += 8;
            } else if IPV6_EXTENSION_HEADERS.contains(&proto) {
                let next = *pkt.get(offset)?;
                let len = *pkt.get(offset + 1)? as usize;
                offset += if proto == 51 { (len + 2) * 4 } else { (len + 1) * 8 };
                proto = next;
            } else {
                break;
            }
        }
    }
    let port = match proto {
        6 | 17 => pkt.get(offset + 2..offset + 4).map_or(0, |p| u16::from_be_bytes([p[0], p[1]])),
        _ => 0,
    };
    Some((dest, proto, port))
}

/// The last address of an LSRR or SSRR option among IPv4 `options`; `None` without
/// one, or when the options end (or are cut off) before its first address.
fn source_route_end(options: &[u8]) -> Option<Ipv4Addr> {
    let mut rest = options;
    loop {
        match *rest.first()? {
            IPOPT_END => return None,
            IPOPT_NOOP => rest = &rest[1..],
            kind => {
                let len = usize::from(*rest.get(1)?);
                // A length shorter than its own two bytes would loop forever.
                if len < 2 {
                    return None;
                }
                if IPOPT_SOURCE_ROUTES.contains(&kind) {
                    let addresses = rest.get(SOURCE_ROUTE_HEAD..len.min(rest.len()))?;
                    let last = addresses.chunks_exact(4).next_back()?;
                    return Some(Ipv4Addr::new(last[0], last[1], last[2], last[3]));
                }
                rest = rest.get(len..)?;
            }
        }
    }
}

fn decode_source(family: u8, pkt: &[u8]) -> Option<IpAddr> {
    if family == NFPROTO_IPV4 {
        Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(pkt.get(12..16)?).ok()?)))
    } else {
        Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(pkt.get(8..24)?).ok()?)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever NFLOG hands over (a snap length cuts packets anywhere), decoding
        /// ends without a panic: an answer, or none.
        #[test]
        fn packets_of_any_bytes_decode_or_not_without_a_panic(
            family in prop::sample::select(vec![NFPROTO_IPV4, 10u8, 0, 7]),
            pkt in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let _ = decode(family, &pkt);
            let _ = decode_source(family, &pkt);
        }

        /// IPv4 headers with any options: the destination is the address field unless
        /// a source route names another.
        #[test]
        fn ipv4_options_of_any_content(options in proptest::collection::vec(any::<u8>(), 0..40), proto in any::<u8>()) {
            let words = options.len().div_ceil(4);
            let mut pkt = vec![0x45 + words as u8, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1];
            pkt.extend_from_slice(&options);
            pkt.resize(20 + words * 4, 0);
            pkt.extend_from_slice(&[0x30, 0x39, 0, 80]);
            let (dest, p, _) = decode(NFPROTO_IPV4, &pkt).unwrap();
            prop_assert_eq!(p, proto);
            let routed = source_route_end(&pkt[20..20 + words * 4]);
            prop_assert_eq!(dest, IpAddr::V4(routed.unwrap_or(Ipv4Addr::new(10, 0, 0, 1))));
        }
    }

    #[test]
    fn a_tcp_syn_decodes_to_destination_and_port() {
        let mut v4 = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 169, 254, 169, 254];
        v4.extend_from_slice(&[0x30, 0x39, 0, 80]);
        assert_eq!(decode(NFPROTO_IPV4, &v4), Some(("169.254.169.254".parse().unwrap(), 6, 80)));
        assert_eq!(decode_source(NFPROTO_IPV4, &v4), Some("10.0.0.2".parse().unwrap()));
    }

    #[test]
    fn a_source_routed_packet_decodes_to_the_last_address_of_its_route() {
        // To the node 10.0.0.1, loose source route on to 169.254.169.254, TCP to port 80.
        let mut v4 = vec![0x47, 0, 0, 52, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1];
        v4.extend_from_slice(&[1, 131, 7, 4, 169, 254, 169, 254]); // NOP, LSRR
        v4.extend_from_slice(&[0x30, 0x39, 0, 80]);
        assert_eq!(decode(NFPROTO_IPV4, &v4), Some(("169.254.169.254".parse().unwrap(), 6, 80)));
        // A strict route of two hops: the last one is where it ends.
        let mut ssrr = vec![0x48, 0, 0, 56, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1];
        ssrr.extend_from_slice(&[137, 11, 4, 10, 9, 9, 9, 100, 100, 100, 200, 0]);
        ssrr.extend_from_slice(&[0x30, 0x39, 0, 53]);
        assert_eq!(decode(NFPROTO_IPV4, &ssrr), Some(("100.100.100.200".parse().unwrap(), 17, 53)));
        // Other options leave the destination alone.
        let mut nops = vec![0x46, 0, 0, 48, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 169, 254, 169, 254];
        nops.extend_from_slice(&[1, 1, 1, 0, 0x30, 0x39, 0, 80]);
        assert_eq!(decode(NFPROTO_IPV4, &nops), Some(("169.254.169.254".parse().unwrap(), 6, 80)));
    }

    #[test]
    fn ipv6_extension_headers_are_walked_to_the_ports() {
        let mut v6 = vec![0x60, 0, 0, 0, 0, 16, 0, 64];
        v6.extend_from_slice(&[0; 16]);
        v6.extend_from_slice(&"fd00:ec2::254".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]); // hop-by-hop, next UDP
        v6.extend_from_slice(&[0x30, 0x39, 0, 80]);
        assert_eq!(decode(10, &v6), Some(("fd00:ec2::254".parse().unwrap(), 17, 80)));
    }
}
