// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! IPv4 source routes (loose, LSRR, and strict, SSRR): the packet backstop refuses a
//! pod's packet that carries one, whatever it names (issue 24).
//!
//! Why: a packet addressed to the node (or anything in it) with a source route naming
//! 169.254.169.254 is judged by its header's destination, the node's own address, and
//! where the node accepts source routes (`accept_source_route`) the kernel then sends
//! it on to the route's next address: the metadata service. The host-side table
//! refuses such packets where they enter the node; this is the backstop's half.
//!
//! Every pod IPv4 packet with an LSRR or SSRR option is refused, not only those whose
//! route names a blocked address or the node: source routing has no legitimate use
//! (RFC 7126 advises dropping it, hardening guides switch `accept_source_route` off), what
//! the node does with a route (which of its addresses, Services, DNAT rules lead where)
//! is more than a packet program can know, and the simple rule is also the one the
//! verifier can afford. Malformed options are refused too: the node's stack would drop
//! them anyway (`ip_options_compile`), and so are more options than the walk reads
//! ([`MAX_OPTIONS_WALKED`]): a walk that gives up must not pass.
//!
//! Walking the options is kept out of `mg_egress`: beside the rest of it the walk does
//! not fit the 5.10 verifier's budget. A tail call from `mg_egress` was the first
//! plan, but the arm64 kernels the guard supports (5.10, 6.1) refuse a program that
//! both tail-calls and makes BPF-to-BPF calls (5.10 allows the mix on x86-64 only), and
//! the egress programs make some (LLVM emits `memset` calls there). So this is a program of its
//! own, attached beside the egress program on the same cgroup (the agent's `options`
//! link): the kernel drops a packet any of them refuses. Every other packet leaves it
//! after one byte is read (IPv4 without options, IPv6). Like every link, it is pinned,
//! restored by the health check, and removed by `uninstall`.

use aya_ebpf::{bindings::bpf_sock, macros::cgroup_skb, programs::SkBuffContext};

use crate::{
    backstop::{self, DROP, PASS},
    packet,
    verdict::settings,
};

/// The options of the source routes (RFC 791): loose and strict.
const IPOPT_LSRR: u8 = 131;
const IPOPT_SSRR: u8 = 137;
/// End of the option list, and the one-byte filler.
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
/// Every other option has a type byte, a length byte (counting both) and data.
const OPTION_MIN_LEN: usize = 2;
/// A route's data: a pointer byte after the length, then addresses; the last one is
/// where the sender means the packet to end up.
const ROUTE_FIRST_ADDR: usize = 3;
const IPV4_ADDR_LEN: usize = 4;
/// How many options the walk reads. Each one it reads doubles the paths the 5.10
/// verifier follows (a one-byte no-operation or a longer option lead on to different
/// offsets), so a walk over all 40 bytes (40 one-byte options) exceeds its budget. A
/// pod's packet with more options than this is refused like a source route (the
/// kernel itself, and the options a program sets, use one or two, padded with
/// no-operations to a word, and the walk stops at the end-of-list option).
const MAX_OPTIONS_WALKED: usize = 6;

/// Beside `mg_egress` (the sockets' marks).
#[cgroup_skb(egress)]
pub fn mg_opts(ctx: SkBuffContext) -> i32 {
    judge_options(&ctx, backstop::marked_netns)
}

/// Beside `mg_egress_netns` (the kernel's netns cookie).
#[cgroup_skb(egress)]
pub fn mg_opts_netns(ctx: SkBuffContext) -> i32 {
    judge_options(&ctx, backstop::helper_netns)
}

#[inline(always)]
fn judge_options(ctx: &SkBuffContext, netns_of: impl Fn(&SkBuffContext, *mut bpf_sock) -> u64) -> i32 {
    // Almost every packet: one byte read straight from the packet.
    if !packet::has_ipv4_options::<0>(&ctx.skb) {
        return PASS;
    }
    match find_source_route(ctx) {
        Some(found) => refuse_source_route(ctx, netns_of, found),
        None => PASS,
    }
}

/// What the walk found that refuses the packet: a source route, with its last
/// address where it names one, or options it could not read through.
struct Found {
    /// The address's bytes as in the packet (`to_ne_bytes` gives them back); 0 where
    /// none was read. A plain integer, not an `Option`: LLVM reads an `Option`'s
    /// payload on paths that never wrote it, and 5.10 refuses reading unset stack.
    last: u32,
}

const UNREAD: Found = Found { last: NO_ADDRESS };
const NO_ADDRESS: u32 = 0;

/// Walks the options as the kernel's `ip_options_compile` does, for at most
/// [`MAX_OPTIONS_WALKED`] options; what it cannot read through is refused.
#[inline(always)]
fn find_source_route(ctx: &SkBuffContext) -> Option<Found> {
    let Ok(first) = ctx.load::<u8>(0) else { return Some(UNREAD) };
    let header_len = packet::ipv4_header_len(first);
    let mut at = packet::IPV4_HEADER_LEN;
    for _ in 0..MAX_OPTIONS_WALKED {
        if at >= header_len {
            return None;
        }
        let Ok(kind) = ctx.load::<u8>(at) else { return Some(UNREAD) };
        match kind {
            IPOPT_END => return None,
            IPOPT_NOOP => at += 1,
            _ => {
                let Ok(len) = ctx.load::<u8>(at + 1) else { return Some(UNREAD) };
                let len = len as usize;
                if len < OPTION_MIN_LEN || at + len > header_len {
                    return Some(UNREAD);
                }
                if kind == IPOPT_LSRR || kind == IPOPT_SSRR {
                    return Some(Found { last: last_address(ctx, at, len) });
                }
                at += len;
            }
        }
    }
    if at >= header_len {
        None
    } else {
        Some(UNREAD)
    }
}

/// The last address of the route at `at`, `len` bytes long: where the sender means
/// the packet to go ([`Found::last`]).
#[inline(always)]
fn last_address(ctx: &SkBuffContext, at: usize, len: usize) -> u32 {
    if len < ROUTE_FIRST_ADDR + IPV4_ADDR_LEN {
        return NO_ADDRESS;
    }
    ctx.load::<u32>(at + len - IPV4_ADDR_LEN).unwrap_or(NO_ADDRESS)
}

/// Refuses the packet unless its socket is the host's (or an allowlisted pod's, or
/// audit mode: `settle`); reported with the route's last address as the destination.
#[inline(always)]
fn refuse_source_route(
    ctx: &SkBuffContext,
    netns_of: impl Fn(&SkBuffContext, *mut bpf_sock) -> u64,
    found: Found,
) -> i32 {
    let Some(settings) = settings() else { return DROP };
    let Some(netns_cookie) = backstop::pod_netns(ctx, settings, netns_of) else { return PASS };
    let Some(mut dest) = packet::destination(&ctx.skb, 0) else { return DROP };
    if found.last != NO_ADDRESS {
        dest.addr[..IPV4_ADDR_LEN].copy_from_slice(&found.last.to_ne_bytes());
    }
    backstop::refuse(ctx, settings, &dest, netns_cookie)
}
