// SPDX-License-Identifier: Apache-2.0
//! The events ABI: where and how an attempt was judged, the counters of each, and the
//! event record the kernel sends the agent.

#[cfg(doc)]
use crate::{AF_INET, AF_INET6};

/// Where a verdict was reached.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 0,
    Connect6 = 1,
    Sendmsg4 = 2,
    Sendmsg6 = 3,
    /// The packet-level backstop on cgroup egress.
    Egress = 4,
    /// The host-side nf_tables table (no kernel program: never in [`Hook::PROGRAMS`],
    /// which lists the slots of the programs' counters).
    Host = 5,
    /// The tc egress program on the node's uplinks (`mg_uplink`): every packet that
    /// leaves the node, whatever datapath brought it there.
    Uplink = 6,
}

/// Every hook: the last variant's value plus one (hooks are numbered from 0 without
/// gaps), so that [`Hook::from_u8`] knows each of them.
pub const HOOK_COUNT: u32 = Hook::Uplink as u32 + 1;
/// The hooks that are kernel programs, with counters in `MG_COUNTERS`.
pub const PROGRAM_HOOK_COUNT: u32 = 6;

impl Hook {
    pub const ALL: [Hook; HOOK_COUNT as usize] =
        [Hook::Connect4, Hook::Connect6, Hook::Sendmsg4, Hook::Sendmsg6, Hook::Egress, Hook::Host, Hook::Uplink];
    /// The hooks that are kernel programs: the hooks of [`counters`]' slots, in slot order.
    pub const PROGRAMS: [Hook; PROGRAM_HOOK_COUNT as usize] =
        [Hook::Connect4, Hook::Connect6, Hook::Sendmsg4, Hook::Sendmsg6, Hook::Egress, Hook::Uplink];

    pub fn from_u8(v: u8) -> Option<Hook> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
            Hook::Egress => "egress",
            Hook::Host => "host",
            Hook::Uplink => "uplink",
        }
    }
}

/// What a hook decided about one attempt.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A blocked destination, let through because the attempt came from the host's
    /// netns. (Destinations outside the policy are not counted: the allowed path of
    /// every other connection and packet stays free of counter updates.)
    Allowed = 0,
    /// Refused: a pod tried a blocked destination in enforce mode.
    Blocked = 1,
    /// Would have been refused, but the guard runs in audit mode.
    Audited = 2,
    /// A blocked destination from an allowlisted pod.
    Exempt = 3,
}

pub const VERDICT_COUNT: u32 = 4;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] =
        [Verdict::Allowed, Verdict::Blocked, Verdict::Audited, Verdict::Exempt];

    pub fn from_u8(v: u8) -> Option<Verdict> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Blocked => "blocked",
            Verdict::Audited => "audited",
            Verdict::Exempt => "exempt",
        }
    }
}

/// Slots of the per-CPU `MG_COUNTERS` array: first one per (hook, verdict), then the
/// loss counters.
pub mod counters {
    use super::{Hook, Verdict, PROGRAM_HOOK_COUNT, VERDICT_COUNT};

    /// Events that could not be reserved in the ring buffer (it was full).
    pub const EVENTS_LOST: u32 = PROGRAM_HOOK_COUNT * VERDICT_COUNT;
    pub const SLOTS: u32 = EVENTS_LOST + 1;

    /// The slot of a hook of [`Hook::PROGRAMS`] (the host side counts in nf_tables;
    /// the uplink, numbered after it, takes the program slots' last row).
    #[inline(always)]
    pub const fn slot(hook: Hook, verdict: Verdict) -> u32 {
        let row = match hook {
            Hook::Uplink => PROGRAM_HOOK_COUNT - 1,
            other => other as u32,
        };
        row * VERDICT_COUNT + verdict as u32
    }
}

/// Size of the event ring buffer in bytes (a power of two, page aligned).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// One refused or audited attempt, sent to the agent through `MG_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ktime_ns: u64,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// tgid in the upper 32 bits, pid in the lower, as seen from the initial pid
    /// namespace; 0 where no task is known (the packet backstop).
    pub pid_tgid: u64,
    /// Destination; an IPv4 destination (also one reached through an IPv4-mapped IPv6
    /// address) sits in the first four bytes with `family == AF_INET`.
    pub addr: [u8; 16],
    /// Destination port, host byte order (0 for protocols without ports).
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`], of the address as judged.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// [`Hook`] as u8.
    pub hook: u8,
    /// [`Verdict`] as u8.
    pub verdict: u8,
    /// The socket was an IPv6 socket judging an IPv4-mapped address.
    pub mapped: u8,
    pub _pad: u8,
    pub comm: [u8; 16],
    /// [`Hook::Uplink`]: the interface the packet entered the node through
    /// (`skb->skb_iif`), 0 for a packet the node made; 0 for the other hooks.
    pub ingress_ifindex: u32,
    /// [`Hook::Uplink`]: the uplink the packet was leaving through; 0 for the other hooks.
    pub uplink_ifindex: u32,
    /// [`Hook::Uplink`]: the packet's source address (network order, IPv4 in the first
    /// four bytes, family as `family`); zero for the other hooks.
    pub src_addr: [u8; 16],
}
