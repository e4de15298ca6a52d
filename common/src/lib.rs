// SPDX-License-Identifier: Apache-2.0
//! The one ABI between metadata-guard's kernel programs and its agent.
//!
//! Every map name, map key and value layout, event record and counter slot that both
//! sides touch is defined here and nowhere else. The layouts are `#[repr(C)]`, padded
//! by hand so that no implicit padding differs between the BPF and host targets.
//!
//! Changing any layout here is a breaking change for pinned state: bump
//! [`ABI_VERSION`], which names the pin directory, so an agent of a new layout never
//! reuses maps pinned by an old one.
#![no_std]

mod conceal;
mod events;
mod policy;
#[cfg(test)]
mod tests;
mod uplink;

pub use conceal::{
    conceal_counters, ConcealOrigin, ConcealSettings, SockKey, CONCEAL_ENDPOINTS_MAX, CONCEAL_MAX_ENTRIES,
};
pub use events::{counters, Event, Hook, Verdict, EVENTS_RING_BYTES, HOOK_COUNT, PROGRAM_HOOK_COUNT, VERDICT_COUNT};
pub use policy::{
    prefilter_index, protocol_bit, DestRules, Ipv4Key, Ipv6Key, PortRule, Prefilter, Settings,
    ALLOWED_CGROUPS_MAX_ENTRIES, IPPROTO_TCP, IPPROTO_UDP, MAX_PORTS, MAX_RULES, MODE_AUDIT, MODE_CONCEAL,
    MODE_ENFORCE, POLICY_MAX_ENTRIES, PORTS_ANY, PORTS_EXCEPT, PORTS_ONLY, PREFILTER_BITS, PREFILTER_ENTRIES,
    PREFILTER_WORDS, PROTO_ALL, PROTO_OTHER, PROTO_TCP, PROTO_UDP,
};
pub use uplink::{UplinkAllowKey, UPLINK_ALLOW_MAX_ENTRIES, UPLINK_EXTRA_MAX_ENTRIES};

/// Version of every layout in this crate. Pinned maps live under `v<ABI_VERSION>`.
/// 3: `Hook::Uplink` (more counter slots), the event's uplink fields, the uplink's maps.
pub const ABI_VERSION: u32 = 3;

/// Names of the maps, as declared in the kernel object. At most 15 bytes each
/// (the kernel's `BPF_OBJ_NAME_LEN` minus the NUL).
pub mod map_names {
    pub const SETTINGS: &str = "MG_SETTINGS";
    pub const COUNTERS: &str = "MG_COUNTERS";
    pub const POLICY4_A: &str = "MG_POLICY4_A";
    pub const POLICY4_B: &str = "MG_POLICY4_B";
    pub const POLICY6_A: &str = "MG_POLICY6_A";
    pub const POLICY6_B: &str = "MG_POLICY6_B";
    pub const EVENTS: &str = "MG_EVENTS";
    pub const ALLOWED_CGROUPS: &str = "MG_ALLOW_CG";
    pub const NETNS_PROBE: &str = "MG_NETNS_PROBE";
    /// Socket-local storage: each socket's netns cookie, recorded at creation.
    pub const SOCK_MARK: &str = "MG_SOCK_MARK";
    /// Which 16-bit leading parts of an address any policy prefix covers.
    pub const PREFILTER: &str = "MG_PREFILTER";
    /// Which values of an address's next 16 bits (16 to 31) any policy prefix covers.
    pub const PREFILTER2: &str = "MG_PREFILTER2";
    /// Conceal mode: the proxy's address ([`ConcealSettings`](super::ConcealSettings)).
    pub const CONCEAL: &str = "MG_CONCEAL";
    /// Conceal mode: the metadata HTTP endpoints redirected to the proxy.
    pub const CONCEAL_ENDPOINTS: &str = "MG_CONCEAL_EP";
    /// Conceal mode: redirected sockets by cookie, from connect to sockops (kernel-written).
    pub const CONCEAL_PENDING: &str = "MG_CONCEAL_PEND";
    /// Conceal mode: redirected connections by the pod end's address (kernel-written).
    pub const CONCEAL_PEERS: &str = "MG_CONCEAL_PEER";
    /// Conceal mode: per-CPU counters ([`conceal_counters`](super::conceal_counters)).
    pub const CONCEAL_COUNTERS: &str = "MG_CONCEAL_CNT";
    /// The uplink: what entered the node through an allowlisted pod's interface
    /// ([`UplinkAllowKey`](super::UplinkAllowKey) → unused u8).
    pub const UPLINK_ALLOW: &str = "MG_UPLINK_ALLOW";
    /// The uplink: rules only the node's own checks apply, on top of the policy (the
    /// host side's extra rules, e.g. gke-workload-identity's TCP 80), in two pairs
    /// flipped with the policy's (`Settings::active_policy`).
    pub const UPLINK4_A: &str = "MG_UPLINK4_A";
    pub const UPLINK4_B: &str = "MG_UPLINK4_B";
    pub const UPLINK6_A: &str = "MG_UPLINK6_A";
    pub const UPLINK6_B: &str = "MG_UPLINK6_B";
}

/// Names of the programs in the kernel object, one per hook.
pub mod program_names {
    pub const CONNECT4: &str = "mg_connect4";
    pub const CONNECT6: &str = "mg_connect6";
    pub const SENDMSG4: &str = "mg_sendmsg4";
    pub const SENDMSG6: &str = "mg_sendmsg6";
    /// Records each new socket's netns cookie for the packet backstop.
    pub const SOCK_CREATE: &str = "mg_sock_create";
    /// The packet backstop on cgroup egress.
    pub const EGRESS: &str = "mg_egress";
    /// The packet backstop on kernels whose cgroup_skb programs can ask a socket's
    /// netns cookie (`bpf_get_netns_cookie`, from 2025): no `sock_create` needed.
    pub const EGRESS_NETNS: &str = "mg_egress_netns";
    /// The packet backstop's second egress program: refuses a pod's IPv4 packets
    /// with a source route (LSRR/SSRR); reads the host sockets' marks as `mg_egress`.
    pub const OPTIONS: &str = "mg_opts";
    /// The same, asking the kernel for the netns cookie as `mg_egress_netns`.
    pub const OPTIONS_NETNS: &str = "mg_opts_netns";
    /// Only loaded for a moment, on kernels without `SO_NETNS_COOKIE`, to learn the
    /// host network namespace's cookie.
    pub const NETNS_PROBE: &str = "mg_netns_probe";
    /// Conceal mode: records each redirected connection's pod end (sockops).
    pub const CONCEAL_SOCKOPS: &str = "mg_conceal_ops";
    /// The uplink (tc egress) on kernels whose tc programs can ask a socket's netns
    /// cookie (`bpf_get_netns_cookie`, from 2025).
    pub const UPLINK: &str = "mg_uplink";
    /// The uplink on older kernels: reads the host sockets' marks (`mg_sock_create`).
    pub const UPLINK_MARKS: &str = "mg_uplink_marks";
}

/// Address families as in `struct sockaddr`.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// The single element of `MG_NETNS_PROBE`: user space writes the token address, the
/// probe program writes the cookie of the namespace that connected to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsProbe {
    /// IPv4 address in network byte order, as `bpf_sock_addr.user_ip4` holds it.
    pub token_ip4: u32,
    /// Port in network byte order in the low 16 bits, as `bpf_sock_addr.user_port`.
    pub token_port: u32,
    pub cookie: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::PortRule {}
    unsafe impl aya::Pod for super::DestRules {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::NetnsProbe {}
    unsafe impl aya::Pod for super::Prefilter {}
    unsafe impl aya::Pod for super::ConcealSettings {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::ConcealOrigin {}
    unsafe impl aya::Pod for super::UplinkAllowKey {}
}
