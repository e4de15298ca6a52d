// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! The packet-level backstop, for what never passes a socket hook: raw sockets (hand
//! made TCP/UDP, ICMP), ping sockets, and connections opened before the guard.
//!
//! `bpf_get_netns_cookie` is not available to cgroup_skb programs before 2025
//! kernels, so the namespace is learned where it is — at socket creation — stored in
//! socket-local storage, and read back on egress. Only host sockets are marked: a
//! socket without a mark is a pod's, or was created before the guard was first
//! installed — both treated as not the host's (fail-closed; such a host client
//! reconnects once and its new socket is marked).
//!
//! On kernels whose cgroup_skb programs have `bpf_get_netns_cookie` (from 2025) the
//! agent attaches `mg_egress_netns` instead, which asks the kernel, and no
//! `sock_create` program at all: what follows is the older kernels' way.
//!
//! Every host socket is marked at creation (`sock_create`). The socket hooks mark too,
//! where they see a host socket reach an address the policy covers; that alone is not
//! enough for TCP and UDP: a host process's connection to a Service that the node
//! rewrites to a metadata address (IPVS, or kube-proxy's DNAT in `nat OUTPUT`) reaches
//! connect4 with the Service address and egress with the metadata one, so its socket
//! must carry the mark from its creation. (Letting TCP/UDP sockets leave `sock_create`
//! early, ~17 ns per pod socket, broke exactly that: the IPVS scenario caught it.)
//! Accepted sockets never have a mark (the storage is not cloned to a listener's
//! children).

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_cgroup_id},
    macros::{btf_map, cgroup_skb, cgroup_sock},
    programs::{SkBuffContext, SockAddrContext, SockContext},
};
use metadata_guard_common::{Hook, Settings};

use crate::{
    packet,
    verdict::{is_blocked, prefiltered, settings, settle, Destination, Origin},
};

/// cgroup_skb and sock_create return values.
pub const PASS: i32 = 1;
pub const DROP: i32 = 0;

/// Netns cookie of each host socket (see the module doc for when it is recorded).
#[btf_map]
static MG_SOCK_MARK: SkStorage<u64> = SkStorage::new();

fn sock_mark_map() -> *mut c_void {
    ptr::from_ref(&MG_SOCK_MARK).cast_mut().cast()
}

#[cgroup_sock(sock_create)]
pub fn mg_sock_create(ctx: SockContext) -> i32 {
    let Some(settings) = settings() else { return PASS };
    // SAFETY: the context is the new socket; the storage pointer is null-checked.
    unsafe {
        let cookie = bpf_get_netns_cookie(ctx.sock.cast());
        if cookie == settings.host_netns_cookie {
            mark(ctx.sock, cookie);
        }
    }
    // Creating a socket is never refused: the verdict belongs to where it sends.
    PASS
}

/// Marks a host socket that a socket hook saw reach an address the policy covers.
#[inline(always)]
pub fn mark_host_socket(ctx: &SockAddrContext, cookie: u64) {
    // SAFETY: `sk` of a sock_addr context is the (full, non-null) socket making the call.
    unsafe { mark((*ctx.sock_addr).__bindgen_anon_1.sk, cookie) }
}

/// Records `cookie` as the socket's netns cookie.
///
/// # Safety
/// `sk` is a socket pointer from the program's context.
#[inline(always)]
unsafe fn mark(sk: *mut bpf_sock, cookie: u64) {
    // SAFETY: per the contract; the storage pointer is null-checked.
    unsafe {
        let slot = bpf_sk_storage_get(sock_mark_map(), sk.cast(), ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE.into())
            .cast::<u64>();
        if !slot.is_null() {
            *slot = cookie;
        }
    }
}

#[cgroup_skb(egress)]
pub fn mg_egress(ctx: SkBuffContext) -> i32 {
    backstop(&ctx, marked_netns)
}

/// The same backstop on kernels whose cgroup_skb programs have `bpf_get_netns_cookie`
/// (from 2025): it reads the socket's namespace itself, so no `sock_create` program
/// runs on any socket, and host sockets created before the guard, or accepted ones,
/// are known as the host's too.
#[cgroup_skb(egress)]
pub fn mg_egress_netns(ctx: SkBuffContext) -> i32 {
    backstop(&ctx, helper_netns)
}

#[inline(always)]
pub fn marked_netns(_ctx: &SkBuffContext, full: *mut bpf_sock) -> u64 {
    socket_mark(full)
}

/// The netns cookie `sock_create` (or a socket hook) recorded for a host socket; 0 for
/// every other socket. `full` is a full socket (`bpf_sk_fullsock`).
#[inline(always)]
pub fn socket_mark(full: *mut bpf_sock) -> u64 {
    // SAFETY: a full socket; the storage lookup does not create.
    let mark = unsafe { bpf_sk_storage_get(sock_mark_map(), full.cast(), ptr::null_mut(), 0) }.cast::<u64>();
    // SAFETY: null-checked map value.
    if mark.is_null() {
        0
    } else {
        unsafe { *mark }
    }
}

/// The namespace cookie of the packet's socket, from the kernel.
#[inline(always)]
pub fn helper_netns(ctx: &SkBuffContext, _full: *mut bpf_sock) -> u64 {
    // SAFETY: the program's own context (the helper reads `skb->sk`'s namespace).
    unsafe { bpf_get_netns_cookie(ctx.skb.skb.cast()) }
}

/// The packet backstop's one decision; `netns_of` tells the namespace of the packet's
/// (full) socket, 0 when it cannot be told (treated as not the host's).
#[inline(always)]
fn backstop(ctx: &SkBuffContext, netns_of: impl Fn(&SkBuffContext, *mut bpf_sock) -> u64) -> i32 {
    // Every packet of every pod passes here: a destination outside the policy leaves
    // after a look at its first four bytes in the packet and the prefilters. That is
    // also how a socket a socket hook already judged goes free: its destination is
    // outside the policy, or it is a host socket (the rare traffic that goes on below).
    let Some(settings) = prefiltered(packet::lead::<0>(&ctx.skb)) else { return PASS };
    let Some(dest) = packet::destination(&ctx.skb, 0) else { return PASS };
    if !is_blocked(settings, &dest) {
        return PASS;
    }
    let Some(netns_cookie) = pod_netns(ctx, settings, netns_of) else { return PASS };
    refuse(ctx, settings, &dest, netns_cookie)
}

/// The namespace cookie of the packet's socket (0: unknown, not the host's), or `None`
/// where the backstop lets the packet go whatever it is: a host socket's, or one
/// without a full socket (request and time-wait sockets only answer connections
/// others opened).
#[inline(always)]
pub fn pod_netns(
    ctx: &SkBuffContext,
    settings: &Settings,
    netns_of: impl Fn(&SkBuffContext, *mut bpf_sock) -> u64,
) -> Option<u64> {
    // SAFETY: reading the context's socket pointer, null-checked before use.
    let sk: *mut bpf_sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: non-null socket from the context; results are null-checked.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return None;
    }
    let netns_cookie = netns_of(ctx, full);
    if netns_cookie != 0 && netns_cookie == settings.host_netns_cookie {
        return None;
    }
    Some(netns_cookie)
}

/// A pod's packet the backstop refuses: exempt (allowlisted), audited or dropped;
/// counted and reported as an egress verdict (`settle`).
#[inline(always)]
pub fn refuse(ctx: &SkBuffContext, settings: &Settings, dest: &Destination, netns_cookie: u64) -> i32 {
    // SAFETY: the program's own context.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let origin = Origin { netns_cookie, cgroup_id, ..Origin::NONE };
    if settle(settings, Hook::Egress, dest, &origin) {
        PASS
    } else {
        DROP
    }
}
