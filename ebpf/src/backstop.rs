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
use metadata_guard_common::{Hook, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use crate::verdict::{is_blocked, settings, settle, Destination, Origin};

/// cgroup_skb and sock_create return values.
const PASS: i32 = 1;
const DROP: i32 = 0;

const IPV4_VERSION: u8 = 4;
const IPV6_VERSION: u8 = 6;
const IPV4_PROTOCOL_OFFSET: usize = 9;
const IPV4_DADDR_OFFSET: usize = 16;
const IPV4_FRAG_OFFSET: usize = 6;
/// The fixed part of the IPv4 header (options follow; `ihl` says how many).
const IPV4_HEADER_LEN: usize = 20;
/// Fragment offset bits of the IPv4 flags/fragment field (host order).
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV6_NEXTHDR_OFFSET: usize = 6;
const IPV6_DADDR_OFFSET: usize = 24;
const IPV6_HEADER_LEN: usize = 40;
/// Destination port offset within a TCP or UDP header.
const L4_DPORT_OFFSET: usize = 2;

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
    let Some(dest) = destination(&ctx) else { return PASS };
    let Some(settings) = settings() else { return PASS };
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

/// The packet's destination (and TCP/UDP port), from its IP header: one load for the
/// header, one for the port, as helper calls dominate this program's cost.
#[inline(always)]
fn destination(ctx: &SkBuffContext) -> Option<Destination> {
    let first = ctx.load::<u8>(0).ok()?;
    let mut addr = [0u8; 16];
    if first >> 4 == IPV4_VERSION {
        let header = ctx.load::<[u8; IPV4_HEADER_LEN]>(0).ok()?;
        let ihl = ((first & 0x0f) as usize) * 4;
        let protocol = header[IPV4_PROTOCOL_OFFSET];
        addr[..4].copy_from_slice(&header[IPV4_DADDR_OFFSET..IPV4_DADDR_OFFSET + 4]);
        let frag = u16::from_be_bytes([header[IPV4_FRAG_OFFSET], header[IPV4_FRAG_OFFSET + 1]]) & IPV4_FRAG_OFFSET_MASK;
        // Later fragments carry no L4 header: judged as port 0.
        let port = if frag == 0 { l4_port(ctx, protocol, ihl) } else { 0 };
        Some(Destination { family: AF_INET, addr, port, protocol, mapped: false })
    } else if first >> 4 == IPV6_VERSION {
        let header = ctx.load::<[u8; IPV6_HEADER_LEN]>(0).ok()?;
        let protocol = header[IPV6_NEXTHDR_OFFSET];
        addr.copy_from_slice(&header[IPV6_DADDR_OFFSET..IPV6_DADDR_OFFSET + 16]);
        let port = l4_port(ctx, protocol, IPV6_HEADER_LEN);
        Some(Destination { family: AF_INET6, addr, port, protocol, mapped: false })
    } else {
        None
    }
}

#[inline(always)]
fn l4_port(ctx: &SkBuffContext, protocol: u8, l4_offset: usize) -> u16 {
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return 0;
    }
    ctx.load::<u16>(l4_offset + L4_DPORT_OFFSET).map(u16::from_be).unwrap_or(0)
}
