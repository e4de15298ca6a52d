// SPDX-License-Identifier: Apache-2.0
//! The uplink's own layouts: what entered the node through an allowlisted pod's
//! interface, and the capacity of its maps.

/// Key of `MG_UPLINK_ALLOW`: a packet to a blocked destination that entered the node
/// (`skb->skb_iif`) through `ifindex` leaves through an uplink if this key is present
/// with `family == 0` (the interface carries one pod alone: a veth's host end), or
/// with its own family and source address (an interface many pods share, a bridge:
/// the pairs the host side computes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct UplinkAllowKey {
    pub ifindex: u32,
    /// 0 (the whole interface), `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub _pad: [u8; 3],
    /// Network order; IPv4 in the first four bytes; zero with `family == 0`.
    pub addr: [u8; 16],
}

/// Capacity of `MG_UPLINK_ALLOW`.
pub const UPLINK_ALLOW_MAX_ENTRIES: u32 = 16_384;
/// Capacity of each `MG_UPLINK{4,6}_{A,B}` trie (rules from presets only).
pub const UPLINK_EXTRA_MAX_ENTRIES: u32 = 256;
