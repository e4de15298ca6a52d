// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! The uplink: a tc egress program on every device a packet can leave the node
//! through. Whatever datapath brought a packet there — the host's routing, a
//! `bpf_redirect`/`bpf_redirect_neigh` from a pod's veth, a tc `mirred`, a macvlan or
//! ipvlan child writing to its lower device, an AF_PACKET socket — it passes this
//! hook on its way out (`dev_queue_xmit`).
//!
//! The rule: a packet to a blocked destination leaves only if
//! - it still carries its socket and that socket lives in the host's network
//!   namespace (`mg_uplink` asks the kernel, `bpf_get_netns_cookie`; `mg_uplink_marks`
//!   reads the mark `mg_sock_create` put on every host socket), or
//! - it entered the node through an allowlisted pod's interface (`MG_UPLINK_ALLOW`),
//!   or carries an allowlisted pod's socket (`MG_ALLOW_CG`).
//!
//! A packet without a socket is never the host's. Everything the host's stack sends
//! carries one: its TCP resets the control socket (or the time-wait or full socket
//! they answer for), its ICMP errors the ICMP socket, a SYN-ACK its request socket. A
//! packet without one was forwarded (routing drops the socket at `ip_rcv`), bridged,
//! or orphaned on the way: it is a pod's (or a stranger's), and only the allowlist
//! lets it out. Where the marks tell a host socket (before 2025 kernels), the kernel's
//! own control and ICMP sockets have none (they are made without `sock_create`): a
//! reset or ICMP error the node sends on its own to a blocked destination, answering
//! nothing the node asked for, is dropped there.
//!
//! Return values follow tcx and cls_bpf's direct action alike: `TC_ACT_UNSPEC` (tcx's
//! `TCX_NEXT`) hands the packet to the next program on the hook — never `TC_ACT_OK`,
//! which would end the hook and skip the programs after ours (Cilium's `bpf_host`) —
//! and `TC_ACT_SHOT` drops it.

use aya_ebpf::{
    bindings::{bpf_sock, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_fullsock, bpf_skb_cgroup_id},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use metadata_guard_common::{Hook, Settings, UplinkAllowKey, Verdict, AF_INET, AF_INET6, UPLINK_ALLOW_MAX_ENTRIES};

use crate::{
    backstop::socket_mark,
    packet,
    verdict::{count, is_blocked_at_node, prefiltered, settle, Destination, Origin},
};

const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;

const ETH_HLEN: usize = 14;
const ETH_TYPE_OFFSET: usize = 12;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// Interfaces (and, on shared ones, source addresses) of allowlisted pods.
#[map]
static MG_UPLINK_ALLOW: HashMap<UplinkAllowKey, u8> = HashMap::with_max_entries(UPLINK_ALLOW_MAX_ENTRIES, 0);

#[classifier]
pub fn mg_uplink(ctx: TcContext) -> i32 {
    uplink(&ctx, helper_netns)
}

#[classifier]
pub fn mg_uplink_marks(ctx: TcContext) -> i32 {
    uplink(&ctx, marked_netns)
}

/// The netns cookie of the packet's (non-null) socket, from the kernel: request and
/// time-wait sockets answer too (their namespace is in the common part).
#[inline(always)]
fn helper_netns(ctx: &TcContext, _sk: *mut bpf_sock) -> u64 {
    // SAFETY: the program's own context; the caller checked `skb->sk` is set (with
    // no socket the helper answers the initial namespace's cookie).
    unsafe { bpf_get_netns_cookie(ctx.skb.skb.cast()) }
}

/// The mark of the packet's socket. A socket that is not a full one (a request or
/// time-wait socket) has no storage; it only sends the SYN-ACK, ACK or RST of a
/// connection the kernel tracks — no payload of anyone's choosing — so it passes as
/// the packet backstop lets it ([`REPLY_ONLY`]).
#[inline(always)]
fn marked_netns(_ctx: &TcContext, sk: *mut bpf_sock) -> u64 {
    // SAFETY: a non-null socket pointer from the context.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        REPLY_ONLY
    } else {
        socket_mark(full)
    }
}

/// What [`marked_netns`] answers for a request or time-wait socket: no namespace's
/// cookie (cookies count up from 1), let through like the host's.
const REPLY_ONLY: u64 = u64::MAX;

/// Where the IP header starts and the prefilter's view of the destination, for
/// Ethernet frames with up to two VLAN tags in the data (a tag the driver inserts
/// is in the skb's metadata, not here); `None` for anything but IPv4 and IPv6.
#[inline(always)]
fn ip_header(ctx: &TcContext) -> Option<(usize, Option<packet::Lead>)> {
    let mut proto = eth_type(ctx, ETH_TYPE_OFFSET)?;
    let mut l3 = ETH_HLEN;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = eth_type(ctx, ETH_TYPE_OFFSET + VLAN_HLEN)?;
        l3 += VLAN_HLEN;
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            proto = eth_type(ctx, ETH_TYPE_OFFSET + 2 * VLAN_HLEN)?;
            l3 += VLAN_HLEN;
        }
    }
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return None;
    }
    let lead = match l3 {
        ETH_HLEN => packet::lead::<ETH_HLEN>(&ctx.skb),
        18 => packet::lead::<{ ETH_HLEN + VLAN_HLEN }>(&ctx.skb),
        _ => packet::lead::<{ ETH_HLEN + 2 * VLAN_HLEN }>(&ctx.skb),
    };
    Some((l3, lead))
}

/// The 16-bit (big-endian) type at `offset`, straight from the packet when the linear
/// data holds it, else through a helper load.
#[inline(always)]
fn eth_type(ctx: &TcContext, offset: usize) -> Option<u16> {
    // SAFETY: data/data_end of the program's own context, read within the bounds check.
    unsafe {
        let data = (*ctx.skb.skb).data as usize;
        let end = (*ctx.skb.skb).data_end as usize;
        if data + offset + 2 <= end {
            let at = data + offset;
            return Some(u16::from_be_bytes([*(at as *const u8), *((at + 1) as *const u8)]));
        }
    }
    ctx.skb.load::<u16>(offset).ok().map(u16::from_be)
}

#[inline(always)]
fn uplink(ctx: &TcContext, netns_of: impl Fn(&TcContext, *mut bpf_sock) -> u64) -> i32 {
    // Every packet leaving the node passes here: anything that is not IP, and any
    // destination outside the policy, leaves after the Ethernet type and the
    // prefilters, before any other lookup or helper.
    let Some((l3, lead)) = ip_header(ctx) else { return PASS };
    let Some(settings) = prefiltered(lead) else { return PASS };
    let Some(dest) = packet::destination(&ctx.skb, l3) else { return PASS };
    if !is_blocked_at_node(settings, &dest) {
        return PASS;
    }
    judge(ctx, settings, l3, &dest, netns_of)
}

/// A packet to a blocked destination: the host's, an allowlisted pod's, or refused.
#[inline(always)]
fn judge(
    ctx: &TcContext,
    settings: &Settings,
    l3: usize,
    dest: &Destination,
    netns_of: impl Fn(&TcContext, *mut bpf_sock) -> u64,
) -> i32 {
    // SAFETY: reading the context's socket pointer, null-checked before use.
    let sk: *mut bpf_sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    let (netns_cookie, cgroup_id) = if sk.is_null() {
        (0, 0)
    } else {
        let cookie = netns_of(ctx, sk);
        if cookie == REPLY_ONLY || (cookie != 0 && cookie == settings.host_netns_cookie) {
            count(Hook::Uplink, Verdict::Allowed);
            return PASS;
        }
        // SAFETY: the program's own context (0 unless the socket is a full one).
        (cookie, unsafe { bpf_skb_cgroup_id(ctx.skb.skb) })
    };
    // SAFETY: plain reads of the program's own context.
    let (ingress_ifindex, uplink_ifindex) = unsafe { ((*ctx.skb.skb).ingress_ifindex, (*ctx.skb.skb).ifindex) };
    let src_addr = packet::source(&ctx.skb, l3, dest.family);
    if ingress_ifindex != 0 && entered_allowed(ingress_ifindex, dest.family, &src_addr) {
        count(Hook::Uplink, Verdict::Exempt);
        return PASS;
    }
    let origin = Origin { netns_cookie, cgroup_id, ingress_ifindex, uplink_ifindex, src_addr, ..Origin::NONE };
    if settle(settings, Hook::Uplink, dest, &origin) {
        PASS
    } else {
        DROP
    }
}

/// Whether the packet entered through an allowlisted pod's own interface, or through
/// a shared one (a bridge) from an allowlisted pod's address.
#[inline(always)]
fn entered_allowed(ifindex: u32, family: u8, src: &[u8; 16]) -> bool {
    let whole = UplinkAllowKey { ifindex, ..UplinkAllowKey::default() };
    if MG_UPLINK_ALLOW.get_ptr(whole).is_some() {
        return true;
    }
    let family = if family == AF_INET6 { AF_INET6 } else { AF_INET };
    let pair = UplinkAllowKey { ifindex, family, _pad: [0; 3], addr: *src };
    MG_UPLINK_ALLOW.get_ptr(pair).is_some()
}
