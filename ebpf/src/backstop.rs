//! The packet-level backstop, for what never passes a socket hook: raw sockets (hand
//! made TCP/UDP, ICMP), ping sockets, and connections opened before the guard.
//!
//! `bpf_get_netns_cookie` is not available to cgroup_skb programs before 2025
//! kernels, so the namespace is learned where it is: at socket creation
//! (`sock_create`), stored in socket-local storage, and read back on egress.
//! Only host sockets are marked: a socket without a mark is a pod's, or was created
//! before the guard was first installed — both treated as not the host's
//! (fail-closed; such a host client reconnects once and its new socket is marked).
//! Marking only the host's keeps pod sockets, the many, free of the storage cost.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_cgroup_id},
    macros::{btf_map, cgroup_skb, cgroup_sock},
    programs::{SkBuffContext, SockContext},
};
use metadata_guard_common::Hook;

use crate::{
    packet,
    verdict::{is_blocked, may_be_blocked, settings, settle, Origin},
};

/// cgroup_skb and sock_create return values.
const PASS: i32 = 1;
const DROP: i32 = 0;

/// Netns cookie of each socket, recorded at creation.
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
        if cookie != settings.host_netns_cookie {
            return PASS;
        }
        let slot =
            bpf_sk_storage_get(sock_mark_map(), ctx.sock.cast(), ptr::null_mut(), BPF_SK_STORAGE_GET_F_CREATE.into())
                .cast::<u64>();
        if !slot.is_null() {
            *slot = cookie;
        }
    }
    // Creating a socket is never refused: the verdict belongs to where it sends.
    PASS
}

#[cgroup_skb(egress)]
pub fn mg_egress(ctx: SkBuffContext) -> i32 {
    // Every packet of every pod passes here: a destination outside the policy leaves
    // after two reads of the packet and the prefilter. That is also how a socket a
    // socket hook already judged goes free: its destination is outside the policy, or
    // it is a host socket (the rare traffic that goes on below).
    let settings = match packet::lead(&ctx) {
        Some((family, lead)) => match may_be_blocked(family, lead) {
            Some(settings) => settings,
            None => return PASS,
        },
        None => match settings() {
            Some(settings) => settings,
            None => return PASS,
        },
    };
    let Some(dest) = packet::destination(&ctx) else { return PASS };
    if !is_blocked(settings, &dest) {
        return PASS;
    }
    // SAFETY: reading the context's socket pointer, null-checked before use.
    let sk: *mut bpf_sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // SAFETY: non-null socket from the context; results are null-checked.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        // Request and time-wait sockets only answer connections others opened.
        return PASS;
    }
    // SAFETY: a full socket; the storage lookup does not create.
    let mark = unsafe { bpf_sk_storage_get(sock_mark_map(), full.cast(), ptr::null_mut(), 0) }.cast::<u64>();
    // SAFETY: null-checked map value.
    let netns_cookie = if mark.is_null() { 0 } else { unsafe { *mark } };
    if netns_cookie != 0 && netns_cookie == settings.host_netns_cookie {
        return PASS;
    }
    // SAFETY: the program's own context.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    let origin = Origin { netns_cookie, cgroup_id, task: false };
    if settle(settings, Hook::Egress, &dest, &origin) {
        PASS
    } else {
        DROP
    }
}
