// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's maps: where redirected connections go, the endpoints redirected, who
//! connected, and the counters.

#[cfg(doc)]
use crate::{AF_INET, AF_INET6, MODE_CONCEAL};

/// The single element of `MG_CONCEAL`: where redirected connections go. Written by
/// the agent before it switches the mode to [`MODE_CONCEAL`]; `enabled == 0` keeps
/// every metadata connection blocked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConcealSettings {
    pub enabled: u32,
    /// [`AF_INET`] or [`AF_INET6`]: the proxy's family. An IPv4 proxy also takes IPv6
    /// sockets' connections (through the IPv4-mapped form); an IPv6 proxy only those.
    pub family: u32,
    /// The proxy's address in network byte order, as `bpf_sock_addr.user_ip4`/`user_ip6`
    /// hold it (IPv4 in word 0).
    pub addr: [u32; 4],
    /// The proxy's port in network byte order in the low 16 bits, as `user_port`.
    pub port: u32,
    pub _pad: u32,
}

/// Key of `MG_CONCEAL_EP` and `MG_CONCEAL_PEER`: an address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network byte order; IPv4 (also reached through its mapped form) in bytes 0..4.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    pub _pad: u8,
}

/// Value of `MG_CONCEAL_PEND` and `MG_CONCEAL_PEER`: who connected, and to what.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConcealOrigin {
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// The metadata endpoint the pod asked for, before the redirect.
    pub destination: SockKey,
    pub _pad: u32,
}

/// Capacity of the kernel-written conceal maps (LRU: the oldest records go first).
pub const CONCEAL_MAX_ENTRIES: u32 = 16_384;
/// Capacity of `MG_CONCEAL_EP`.
pub const CONCEAL_ENDPOINTS_MAX: u32 = 64;

/// Slots of the per-CPU `MG_CONCEAL_CNT` array.
pub mod conceal_counters {
    /// Connections redirected to the proxy.
    pub const REDIRECTED: u32 = 0;
    /// Redirected connections whose pod end was recorded for the proxy.
    pub const RECORDED: u32 = 1;
    /// A redirect could not be remembered (map update failed): the connect was refused.
    pub const RECORD_FAILED: u32 = 2;
    pub const SLOTS: u32 = 3;
}
