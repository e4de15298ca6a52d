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

/// Version of every layout in this crate. Pinned maps live under `v<ABI_VERSION>`.
pub const ABI_VERSION: u32 = 1;

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
    /// Only loaded for a moment, on kernels without `SO_NETNS_COOKIE`, to learn the
    /// host network namespace's cookie.
    pub const NETNS_PROBE: &str = "mg_netns_probe";
}

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
    /// The host-side nf_tables table (no kernel program: never in [`Hook::ALL`], which
    /// lists the slots of the programs' counters).
    Host = 5,
}

pub const HOOK_COUNT: u32 = 5;

impl Hook {
    pub const ALL: [Hook; HOOK_COUNT as usize] =
        [Hook::Connect4, Hook::Connect6, Hook::Sendmsg4, Hook::Sendmsg6, Hook::Egress];

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
        }
    }
}

/// What a hook decided about one attempt.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Checked and let through: not a blocked destination, or from the host's netns.
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
    use super::{Hook, Verdict, HOOK_COUNT, VERDICT_COUNT};

    /// Events that could not be reserved in the ring buffer (it was full).
    pub const EVENTS_LOST: u32 = HOOK_COUNT * VERDICT_COUNT;
    pub const SLOTS: u32 = EVENTS_LOST + 1;

    #[inline(always)]
    pub const fn slot(hook: Hook, verdict: Verdict) -> u32 {
        hook as u32 * VERDICT_COUNT + verdict as u32
    }
}

/// How the guard acts on a pod's attempt to reach a blocked destination.
pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// The single element of `MG_SETTINGS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Cookie of the host's network namespace: sockets in it are never refused.
    pub host_netns_cookie: u64,
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u32,
    /// Which policy map pair is in force: 0 → `*_A`, 1 → `*_B`. User space fills the
    /// idle pair and then flips this, so a new policy applies all at once.
    pub active_policy: u32,
}

/// Protocol bits of a [`PortRule`].
pub const PROTO_TCP: u8 = 1 << 0;
pub const PROTO_UDP: u8 = 1 << 1;
/// Anything that is neither TCP nor UDP (ICMP, raw IP), seen by the packet backstop.
pub const PROTO_OTHER: u8 = 1 << 2;
pub const PROTO_ALL: u8 = PROTO_TCP | PROTO_UDP | PROTO_OTHER;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Maps an IP protocol number to its [`PortRule`] bit.
#[inline(always)]
pub const fn protocol_bit(ip_protocol: u8) -> u8 {
    match ip_protocol {
        IPPROTO_TCP => PROTO_TCP,
        IPPROTO_UDP => PROTO_UDP,
        _ => PROTO_OTHER,
    }
}

/// How a [`PortRule`] reads its port list.
pub const PORTS_ANY: u8 = 0;
pub const PORTS_ONLY: u8 = 1;
pub const PORTS_EXCEPT: u8 = 2;

pub const MAX_PORTS: usize = 8;
pub const MAX_RULES: usize = 4;

/// One way a destination prefix is blocked: for these protocols, on these ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    pub protocols: u8,
    /// [`PORTS_ANY`], [`PORTS_ONLY`] or [`PORTS_EXCEPT`].
    pub port_match: u8,
    pub port_count: u8,
    pub _pad: u8,
    /// Host byte order; only the first `port_count` are meaningful.
    pub ports: [u16; MAX_PORTS],
}

impl PortRule {
    #[inline(always)]
    fn lists(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_PORTS {
            if i >= self.port_count as usize {
                return false;
            }
            if self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }

    #[inline(always)]
    pub fn blocks(&self, proto_bit: u8, port: u16) -> bool {
        if self.protocols & proto_bit == 0 {
            return false;
        }
        match self.port_match {
            PORTS_ONLY => self.lists(port),
            PORTS_EXCEPT => !self.lists(port),
            _ => true,
        }
    }
}

/// Value of the policy LPM tries: every rule whose CIDR contains the key's prefix,
/// so that the longest-prefix match alone answers for an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestRules {
    pub rule_count: u32,
    pub rules: [PortRule; MAX_RULES],
}

impl DestRules {
    /// Whether an attempt with this protocol bit (see [`protocol_bit`]) and destination
    /// port (host byte order) is to a blocked destination.
    #[inline(always)]
    pub fn blocks(&self, proto_bit: u8, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_RULES {
            if i >= self.rule_count as usize {
                return false;
            }
            if self.rules[i].blocks(proto_bit, port) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Key data of `MG_POLICY4_*` (the address in network byte order, as in the packet).
pub type Ipv4Key = [u8; 4];
/// Key data of `MG_POLICY6_*`.
pub type Ipv6Key = [u8; 16];

/// Capacity of each policy trie.
pub const POLICY_MAX_ENTRIES: u32 = 16_384;
/// Capacity of the allowlisted-cgroup map.
pub const ALLOWED_CGROUPS_MAX_ENTRIES: u32 = 16_384;
/// Size of the event ring buffer in bytes (a power of two, page aligned).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;

/// Address families as in `struct sockaddr`.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

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
}

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
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn rule(protocols: u8, port_match: u8, ports: &[u16]) -> PortRule {
        let mut r = PortRule { protocols, port_match, port_count: ports.len() as u8, ..Default::default() };
        r.ports[..ports.len()].copy_from_slice(ports);
        r
    }

    #[test]
    fn every_port_but_dns_is_blocked() {
        let mut rules = DestRules { rule_count: 1, ..Default::default() };
        rules.rules[0] = rule(PROTO_ALL, PORTS_EXCEPT, &[53]);
        assert!(rules.blocks(PROTO_TCP, 80));
        assert!(rules.blocks(PROTO_UDP, 80));
        assert!(rules.blocks(PROTO_OTHER, 0));
        assert!(!rules.blocks(PROTO_UDP, 53));
        assert!(!rules.blocks(PROTO_TCP, 53));
    }

    #[test]
    fn only_listed_ports_and_protocols_are_blocked() {
        let mut rules = DestRules { rule_count: 1, ..Default::default() };
        rules.rules[0] = rule(PROTO_TCP, PORTS_ONLY, &[80, 32526]);
        assert!(rules.blocks(PROTO_TCP, 80));
        assert!(rules.blocks(PROTO_TCP, 32526));
        assert!(!rules.blocks(PROTO_TCP, 443));
        assert!(!rules.blocks(PROTO_UDP, 80));
    }

    #[test]
    fn any_rule_blocking_is_enough_and_unused_slots_are_ignored() {
        let mut rules = DestRules { rule_count: 2, ..Default::default() };
        rules.rules[0] = rule(PROTO_TCP, PORTS_ONLY, &[80]);
        rules.rules[1] = rule(PROTO_UDP, PORTS_ANY, &[]);
        rules.rules[2] = rule(PROTO_ALL, PORTS_ANY, &[]);
        assert!(rules.blocks(PROTO_TCP, 80));
        assert!(rules.blocks(PROTO_UDP, 9));
        assert!(!rules.blocks(PROTO_TCP, 81), "slot 2 is beyond rule_count");
    }

    #[test]
    fn counter_slots_are_distinct_and_in_range() {
        let mut seen = std::collections::BTreeSet::new();
        for h in Hook::ALL {
            for v in Verdict::ALL {
                let s = counters::slot(h, v);
                assert!(s < counters::EVENTS_LOST);
                assert!(seen.insert(s));
            }
        }
        assert_eq!(core::mem::size_of::<Event>(), 72);
        assert_eq!(core::mem::size_of::<DestRules>(), 4 + MAX_RULES * 20);
    }
}
