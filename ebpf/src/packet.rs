// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! Reading a packet's destination for the backstop and the uplink: a fast look at the
//! first four bytes of the destination address (direct packet access, for the
//! prefilters), and the full destination — address, transport protocol and port —
//! past IPv4 options and IPv6 extension headers (helper loads, only for packets the
//! prefilter could not pass).
//!
//! Every function takes the offset of the IP header: 0 in cgroup_skb programs (their
//! data starts there), past the Ethernet header and its VLAN tags in tc programs.

use aya_ebpf::programs::sk_buff::SkBuff;
use metadata_guard_common::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use crate::verdict::Destination;

const IPV4_VERSION: u8 = 4;
const IPV6_VERSION: u8 = 6;
const IPV4_PROTOCOL_OFFSET: usize = 9;
const IPV4_SADDR_OFFSET: usize = 12;
const IPV4_DADDR_OFFSET: usize = 16;
const IPV4_FRAG_OFFSET: usize = 6;
/// The fixed part of the IPv4 header (options follow; `ihl` says how many).
pub const IPV4_HEADER_LEN: usize = 20;
/// The header length field of the first byte, in 32-bit words, and its value without options.
const IPV4_IHL_MASK: u8 = 0x0f;
const IPV4_IHL_UNIT: usize = 4;
const IPV4_MIN_IHL: u8 = 5;
/// Fragment offset bits of the IPv4 flags/fragment field (host order).
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV6_NEXTHDR_OFFSET: usize = 6;
const IPV6_SADDR_OFFSET: usize = 8;
const IPV6_DADDR_OFFSET: usize = 24;
const IPV6_HEADER_LEN: usize = 40;
/// Enough of the packet to hold the first four bytes of either family's destination.
const LEAD_BYTES: usize = IPV6_DADDR_OFFSET + 4;

/// IPv6 extension headers the walk steps over (RFC 8200 §4, RFC 4302 for AH).
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// How many extension headers the walk reads. A longer chain leaves the port unknown,
/// which blocks wherever any port is blocked (fail-closed).
const IPV6_MAX_EXT_HEADERS: usize = 8;
/// Hop-by-hop, routing and destination options count their length in 8-byte units
/// beyond the first 8; AH in 4-byte units beyond the first 8.
const EXT_UNIT: usize = 8;
const AUTH_UNIT: usize = 4;
const AUTH_EXTRA_UNITS: usize = 2;
const FRAG_HEADER_LEN: usize = 8;
/// Fragment offset bits of the fragment header's offset/flags field (host order).
const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;

/// Transport protocols whose header starts with source and destination ports, as
/// TCP's does: the port rules apply to them as to TCP and UDP.
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
/// Destination port offset within those headers.
const L4_DPORT_OFFSET: usize = 2;

/// The prefilters' view of a destination: its family, its first 16 bits and the next 16.
pub type Lead = (u8, u16, u16);

/// The destination's family, first two bytes and next two (each big-endian), read
/// straight from the packet whose IP header starts at `L3`; `None` when the linear
/// data is too short (the caller then reads it all). A constant offset keeps every
/// packet access a constant one for the verifier.
#[inline(always)]
pub fn lead<const L3: usize>(skb: &SkBuff) -> Option<Lead> {
    // SAFETY: `data`/`data_end` of the program's own context; every read below is of
    // bytes the bounds check proved inside the packet, as the verifier demands.
    unsafe {
        let data = (*skb.skb).data as usize + L3;
        let end = (*skb.skb).data_end as usize;
        if data + LEAD_BYTES > end {
            return None;
        }
        let at =
            |offset: usize| u16::from_be_bytes([*((data + offset) as *const u8), *((data + offset + 1) as *const u8)]);
        match *(data as *const u8) >> 4 {
            IPV4_VERSION => Some((AF_INET, at(IPV4_DADDR_OFFSET), at(IPV4_DADDR_OFFSET + 2))),
            IPV6_VERSION => Some((AF_INET6, at(IPV6_DADDR_OFFSET), at(IPV6_DADDR_OFFSET + 2))),
            _ => None,
        }
    }
}

/// Whether the packet whose IP header starts at `L3` is IPv4 with options (`ihl` over
/// 5): its first byte, read straight from the packet (with a helper where the linear
/// data is shorter than a fixed header, which a locally built header never is). The
/// bounds check covers the fixed header, not the one byte: a check of `data + 1`
/// becomes `data < end` in LLVM's hands, which proves no byte to the verifier.
#[inline(always)]
pub fn has_ipv4_options<const L3: usize>(skb: &SkBuff) -> bool {
    // SAFETY: as in `lead`: the byte read is proved inside the packet first.
    let first = unsafe {
        let data = (*skb.skb).data as usize + L3;
        let end = (*skb.skb).data_end as usize;
        if data + IPV4_HEADER_LEN > end {
            None
        } else {
            Some(*(data as *const u8))
        }
    };
    let Some(first) = first.or_else(|| skb.load::<u8>(L3).ok()) else { return false };
    first >> 4 == IPV4_VERSION && first & IPV4_IHL_MASK > IPV4_MIN_IHL
}

/// The length of an IPv4 header, options included, from its first byte.
#[inline(always)]
pub fn ipv4_header_len(first: u8) -> usize {
    (first & IPV4_IHL_MASK) as usize * IPV4_IHL_UNIT
}

/// The packet's destination, protocol and port, from its IP header (at `l3`) and the
/// headers behind it.
#[inline(always)]
pub fn destination(ctx: &SkBuff, l3: usize) -> Option<Destination> {
    let first = ctx.load::<u8>(l3).ok()?;
    let mut addr = [0u8; 16];
    if first >> 4 == IPV4_VERSION {
        let header = ctx.load::<[u8; IPV4_HEADER_LEN]>(l3).ok()?;
        let ihl = ipv4_header_len(first);
        let protocol = header[IPV4_PROTOCOL_OFFSET];
        addr[..4].copy_from_slice(&header[IPV4_DADDR_OFFSET..IPV4_DADDR_OFFSET + 4]);
        let frag = u16::from_be_bytes([header[IPV4_FRAG_OFFSET], header[IPV4_FRAG_OFFSET + 1]]) & IPV4_FRAG_OFFSET_MASK;
        // Later fragments carry no transport header: their port is unknown.
        let port = if frag == 0 { l4_port(ctx, protocol, l3 + ihl) } else { None };
        Some(Destination {
            family: AF_INET,
            addr,
            port: port.unwrap_or(0),
            port_known: port.is_some(),
            protocol,
            mapped: false,
        })
    } else if first >> 4 == IPV6_VERSION {
        let header = ctx.load::<[u8; IPV6_HEADER_LEN]>(l3).ok()?;
        addr.copy_from_slice(&header[IPV6_DADDR_OFFSET..IPV6_DADDR_OFFSET + 16]);
        let (protocol, l4_offset) = skip_extension_headers(ctx, l3, header[IPV6_NEXTHDR_OFFSET]);
        let port = match l4_offset {
            Some(offset) => l4_port(ctx, protocol, offset),
            None => None,
        };
        Some(Destination {
            family: AF_INET6,
            addr,
            port: port.unwrap_or(0),
            port_known: port.is_some(),
            protocol,
            mapped: false,
        })
    } else {
        None
    }
}

/// Walks the IPv6 extension headers after the fixed header: the transport protocol
/// and the offset of its header, or `None` as the offset where the packet does not
/// show it (a later fragment, a chain longer than the walk, a truncated packet).
#[inline(always)]
fn skip_extension_headers(ctx: &SkBuff, l3: usize, mut next: u8) -> (u8, Option<usize>) {
    let mut offset = l3 + IPV6_HEADER_LEN;
    let mut i = 0;
    while i < IPV6_MAX_EXT_HEADERS {
        if !is_extension_header(next) {
            return (next, Some(offset));
        }
        let Ok(h) = ctx.load::<[u8; 4]>(offset) else { return (next, None) };
        match next {
            NEXTHDR_AUTH => offset += (h[1] as usize + AUTH_EXTRA_UNITS) * AUTH_UNIT,
            NEXTHDR_FRAGMENT => {
                if u16::from_be_bytes([h[2], h[3]]) & IPV6_FRAG_OFFSET_MASK != 0 {
                    return (h[0], None);
                }
                offset += FRAG_HEADER_LEN;
            }
            _ => offset += (h[1] as usize + 1) * EXT_UNIT,
        }
        next = h[0];
        i += 1;
    }
    if is_extension_header(next) {
        (next, None)
    } else {
        (next, Some(offset))
    }
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(next, NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT)
}

/// The destination port; `Some(0)` for protocols without ports, `None` when the
/// packet ends before it.
#[inline(always)]
fn l4_port(ctx: &SkBuff, protocol: u8, l4_offset: usize) -> Option<u16> {
    match protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_DCCP | IPPROTO_SCTP => {
            ctx.load::<u16>(l4_offset + L4_DPORT_OFFSET).map(u16::from_be).ok()
        }
        _ => Some(0),
    }
}

/// The packet's source address (network order, IPv4 in the first four bytes); zero
/// when the packet ends before it.
#[inline(always)]
pub fn source(ctx: &SkBuff, l3: usize, family: u8) -> [u8; 16] {
    let mut addr = [0u8; 16];
    if family == AF_INET {
        if let Ok(a) = ctx.load::<[u8; 4]>(l3 + IPV4_SADDR_OFFSET) {
            addr[..4].copy_from_slice(&a);
        }
    } else if let Ok(a) = ctx.load::<[u8; 16]>(l3 + IPV6_SADDR_OFFSET) {
        addr = a;
    }
    addr
}
