// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! Conceal mode's kernel part: send a pod's HTTP connections to a metadata endpoint to
//! the agent's filtering proxy, and tell the proxy who each connection is.
//!
//! `redirect` runs inside connect4/connect6 (called from `verdict::judge`): it remembers
//! the socket (by cookie) with its cgroup and original destination, then rewrites the
//! destination to the proxy. The local port is chosen only after the connect hook, so
//! `mg_conceal_ops` (sockops, `BPF_SOCK_OPS_TCP_CONNECT_CB`, just before the SYN) moves
//! that record to the pod end's address and port, where the proxy looks up its peer,
//! and deletes it when the connection closes. Both record maps are `BPF_F_RDONLY`: user
//! space can read them, only these programs write them. Every helper used is in 5.10
//! (socket cookies in sock_addr and sock_ops programs since 4.19, sock_ops callback
//! flags since 4.16).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_ops, BPF_F_RDONLY, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_get_socket_cookie,
    macros::{map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::SockOpsContext,
};
use metadata_guard_common::{
    conceal_counters, ConcealOrigin, ConcealSettings, Hook, SockKey, AF_INET, AF_INET6, CONCEAL_ENDPOINTS_MAX,
    CONCEAL_MAX_ENTRIES, IPPROTO_TCP,
};

use crate::verdict::Destination;

/// sock_ops programs answer 1 ("handled"); the value only matters for ops that ask.
const SOCK_OPS_OK: u32 = 1;
/// `::ffff:0:0/96`, word 2 of an IPv4-mapped address in network byte order.
const V4_MAPPED_WORD2_BE: u32 = 0x0000_ffffu32.to_be();

#[map]
static MG_CONCEAL: Array<ConcealSettings> = Array::with_max_entries(1, 0);

#[map]
static MG_CONCEAL_EP: HashMap<SockKey, u8> = HashMap::with_max_entries(CONCEAL_ENDPOINTS_MAX, 0);

#[map]
static MG_CONCEAL_PEND: LruHashMap<u64, ConcealOrigin> =
    LruHashMap::with_max_entries(CONCEAL_MAX_ENTRIES, BPF_F_RDONLY);

#[map]
static MG_CONCEAL_PEER: LruHashMap<SockKey, ConcealOrigin> =
    LruHashMap::with_max_entries(CONCEAL_MAX_ENTRIES, BPF_F_RDONLY);

#[map]
static MG_CONCEAL_CNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(conceal_counters::SLOTS, 0);

/// For a pod's TCP connect to a metadata HTTP endpoint in conceal mode: point it at
/// the proxy and remember it. Returns whether it was redirected (the caller then lets
/// the connect proceed); false leaves the caller's verdict (refuse) in force.
#[inline(always)]
pub fn redirect(ctx: *mut c_void, hook: Hook, dest: &Destination, cgroup_id: u64, netns_cookie: u64) -> bool {
    if dest.protocol != IPPROTO_TCP || !(hook == Hook::Connect4 || hook == Hook::Connect6) {
        return false;
    }
    let key = SockKey { addr: dest.addr, port: dest.port, family: dest.family, _pad: 0 };
    if MG_CONCEAL_EP.get_ptr(key).is_none() {
        return false;
    }
    let Some(proxy) = MG_CONCEAL.get(0) else { return false };
    if proxy.enabled == 0 || (hook == Hook::Connect4 && proxy.family != AF_INET as u32) {
        return false;
    }
    // SAFETY: a sock_addr program's own context, handed through `judge`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx) };
    let origin = ConcealOrigin { cgroup_id, netns_cookie, destination: key, _pad: 0 };
    if MG_CONCEAL_PEND.insert(cookie, origin, 0).is_err() {
        bump(conceal_counters::RECORD_FAILED);
        return false;
    }
    let sa = ctx.cast::<bpf_sock_addr>();
    // SAFETY: connect4 may write user_ip4 and connect6 user_ip6, each as 4-byte stores,
    // and both user_port; `hook` is a constant per program, so each program keeps
    // only its own branch.
    unsafe {
        if hook == Hook::Connect4 {
            (*sa).user_ip4 = proxy.addr[0];
        } else if proxy.family == AF_INET as u32 {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = V4_MAPPED_WORD2_BE;
            (*sa).user_ip6[3] = proxy.addr[0];
        } else {
            (*sa).user_ip6[0] = proxy.addr[0];
            (*sa).user_ip6[1] = proxy.addr[1];
            (*sa).user_ip6[2] = proxy.addr[2];
            (*sa).user_ip6[3] = proxy.addr[3];
        }
        (*sa).user_port = proxy.port;
    }
    bump(conceal_counters::REDIRECTED);
    true
}

#[sock_ops]
pub fn mg_conceal_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        on_connect(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        if let Some(key) = local_key(&ctx) {
            let _ = MG_CONCEAL_PEER.remove(key);
        }
    }
    SOCK_OPS_OK
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    match MG_CONCEAL.get(0) {
        // A redirected connection was sent to the proxy's port: every other connect
        // leaves here, before the socket cookie and the hash lookup (~40 ns a run).
        Some(proxy) if proxy.enabled != 0 && remote_port(ctx) == proxy.port as u16 => {}
        _ => return, // not in conceal mode, or not to the proxy: no cookie, no lookup
    }
    // SAFETY: the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: a value pointer the verifier checked, copied out at once.
    let Some(origin) = (unsafe { MG_CONCEAL_PEND.get(cookie) }).copied() else { return };
    let _ = MG_CONCEAL_PEND.remove(cookie);
    let Some(key) = local_key(ctx) else { return };
    if MG_CONCEAL_PEER.insert(key, origin, 0).is_err() {
        bump(conceal_counters::RECORD_FAILED);
        return;
    }
    // Ask for state changes of this one socket, to forget it when it closes.
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    let _ = ctx.set_cb_flags(flags as i32);
    bump(conceal_counters::RECORDED);
}

/// The connection's remote port as `user_port` holds a port: its two bytes in network
/// order, read as a little-endian integer. The kernel shifts sock_ops' `remote_port`
/// up by 16 bits on little-endian machines (`sock_ops_convert_ctx_access`); the object
/// is built for `bpfel` only.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    const _: () = assert!(cfg!(target_endian = "little"), "sock_ops remote_port is read as on little-endian kernels");
    (ctx.remote_port() >> 16) as u16
}

/// The connection's own end, as the proxy sees its peer: an IPv4-mapped address of a
/// v6 socket is keyed as the IPv4 address.
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> Option<SockKey> {
    let ops: *mut bpf_sock_ops = ctx.ops;
    // SAFETY: 4-byte loads of sock_ops context fields with constant offsets.
    let (family, port, ip4, w0, w1, w2, w3) = unsafe {
        (
            (*ops).family,
            (*ops).local_port,
            (*ops).local_ip4,
            (*ops).local_ip6[0],
            (*ops).local_ip6[1],
            (*ops).local_ip6[2],
            (*ops).local_ip6[3],
        )
    };
    let mut key = SockKey { addr: [0; 16], port: port as u16, family: AF_INET, _pad: 0 };
    if family == AF_INET as u32 {
        key.addr[0..4].copy_from_slice(&ip4.to_ne_bytes());
    } else if family == AF_INET6 as u32 {
        // A v6 socket connecting to an IPv4-mapped address runs tcp_v4_connect, which
        // calls this before the mapped local address is filled in: its IPv4 half is
        // already in local_ip4.
        if w0 == 0 && w1 == 0 && (w2 == V4_MAPPED_WORD2_BE || (w2 == 0 && w3 == 0)) {
            key.addr[0..4].copy_from_slice(&ip4.to_ne_bytes());
        } else {
            key.family = AF_INET6;
            key.addr[0..4].copy_from_slice(&w0.to_ne_bytes());
            key.addr[4..8].copy_from_slice(&w1.to_ne_bytes());
            key.addr[8..12].copy_from_slice(&w2.to_ne_bytes());
            key.addr[12..16].copy_from_slice(&w3.to_ne_bytes());
        }
    } else {
        return None;
    }
    Some(key)
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(c) = MG_CONCEAL_CNT.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot only this CPU writes while the program runs.
        unsafe { *c += 1 };
    }
}
