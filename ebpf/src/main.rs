// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! metadata-guard's kernel side: refuse sockets outside the host's network namespace
//! that try to reach a blocked (metadata) destination.
//!
//! The hooks share one decision, [`judge`]; each hook only extracts the destination
//! from its context. Layouts and map names come from `metadata_guard_common`.
#![no_std]
#![no_main]

mod backstop;
mod conceal;
mod packet;
mod source_route;
mod uplink;
mod verdict;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::generated::bpf_get_netns_cookie,
    macros::{cgroup_sock_addr, map},
    maps::Array,
    programs::SockAddrContext,
};
use metadata_guard_common::{Hook, NetnsProbe, AF_INET, AF_INET6};
use verdict::{judge, may_be_blocked, Destination};

/// `bpf_sock_addr` return values.
const SOCK_ADDR_ALLOW: i32 = 1;

/// IPv4-mapped IPv6 addresses are `::ffff:a.b.c.d`: words 0 and 1 zero, word 2 this.
const V4_MAPPED_WORD2: u32 = 0x0000_ffff;

#[cgroup_sock_addr(connect4)]
pub fn mg_connect4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx, Hook::Connect4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mg_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx, Hook::Sendmsg4)
}

#[cgroup_sock_addr(connect6)]
pub fn mg_connect6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mg_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx, Hook::Sendmsg6)
}

#[inline(always)]
fn judge_v4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands every sock_addr program a valid context; each field
    // is read with a single load of its declared width, as the verifier demands.
    let ip = unsafe { (*sa).user_ip4 };
    // Almost every call is to a destination outside the policy: one field read and
    // the prefilter, nothing else.
    let Some(settings) = may_be_blocked(AF_INET, lead(ip), next(ip)) else { return SOCK_ADDR_ALLOW };
    // SAFETY: as above.
    let (port, protocol) = unsafe { ((*sa).user_port, (*sa).protocol) };
    let dest = Destination {
        family: AF_INET,
        addr: v4_bytes(ip),
        port: port_from_ctx(port),
        port_known: true,
        protocol: protocol as u8,
        mapped: false,
    };
    judge(ctx, settings, hook, &dest)
}

#[inline(always)]
fn judge_v6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in judge_v4; user_ip6 is read word by word with constant indexes
    // because copying the array can produce a context access the verifier rejects.
    let (w0, w1, w2, w3) = unsafe { ((*sa).user_ip6[0], (*sa).user_ip6[1], (*sa).user_ip6[2], (*sa).user_ip6[3]) };
    // A v6 socket reaches IPv4 destinations through their mapped form; judge those
    // exactly as the IPv4 address, or `::ffff:169.254.169.254` would be a way around.
    let mapped = w0 == 0 && w1 == 0 && u32::from_be(w2) == V4_MAPPED_WORD2;
    let (family, first) = if mapped { (AF_INET, w3) } else { (AF_INET6, w0) };
    let Some(settings) = may_be_blocked(family, lead(first), next(first)) else { return SOCK_ADDR_ALLOW };
    // SAFETY: as above.
    let (port, protocol) = unsafe { ((*sa).user_port, (*sa).protocol) };
    let port = port_from_ctx(port);
    let protocol = protocol as u8;
    let dest = if mapped {
        Destination { family: AF_INET, addr: v4_bytes(w3), port, port_known: true, protocol, mapped: true }
    } else {
        let mut addr = [0u8; 16];
        addr[0..4].copy_from_slice(&w0.to_ne_bytes());
        addr[4..8].copy_from_slice(&w1.to_ne_bytes());
        addr[8..12].copy_from_slice(&w2.to_ne_bytes());
        addr[12..16].copy_from_slice(&w3.to_ne_bytes());
        Destination { family: AF_INET6, addr, port, port_known: true, protocol, mapped: false }
    };
    judge(ctx, settings, hook, &dest)
}

/// The first two bytes of an address word as the kernel stores it (network order).
#[inline(always)]
fn lead(word_be: u32) -> u16 {
    // One byte swap and a shift (reassembling the two bytes took eight instructions).
    (u32::from_be(word_be) >> 16) as u16
}

/// The third and fourth bytes of an address word as the kernel stores it.
#[inline(always)]
fn next(word_be: u32) -> u16 {
    u32::from_be(word_be) as u16
}

/// The address bytes in network order, in the first four bytes.
#[inline(always)]
fn v4_bytes(ip_be: u32) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&ip_be.to_ne_bytes());
    addr
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port_from_ctx(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[map]
static MG_NETNS_PROBE: Array<NetnsProbe> = Array::with_max_entries(1, 0);

/// Loaded only for a moment on kernels without `SO_NETNS_COOKIE` (before 5.14): the
/// agent connects a UDP socket from the host's namespace to a random token address
/// and this program records that socket's netns cookie. It never refuses anything.
#[cgroup_sock_addr(connect4)]
pub fn mg_netns_probe(ctx: SockAddrContext) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if let Some(slot) = MG_NETNS_PROBE.get_ptr_mut(0) {
        // SAFETY: valid context (see judge_v4) and a map value pointer the verifier
        // has checked for null.
        unsafe {
            if (*sa).user_ip4 == (*slot).token_ip4 && (*sa).user_port == (*slot).token_port {
                (*slot).cookie = bpf_get_netns_cookie(ctx.sock_addr.cast());
            }
        }
    }
    SOCK_ADDR_ALLOW
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
