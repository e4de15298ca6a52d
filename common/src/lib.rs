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
pub const ABI_VERSION: u32 = 2;

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
    /// Conceal mode: records each redirected connection's pod end (sockops).
    pub const CONCEAL_SOCKOPS: &str = "mg_conceal_ops";
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
/// Like enforce, except that a pod's TCP connections to a metadata HTTP endpoint
/// (`MG_CONCEAL_EP`) are redirected to the agent's filtering proxy. Kernel programs
/// that predate it read it as enforce: fail-closed.
pub const MODE_CONCEAL: u32 = 2;

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
    /// Whether some port of these protocols is blocked: the verdict for a packet whose
    /// port cannot be read (a later fragment, a header chain too long or truncated),
    /// so that hiding the port is never a way around a port-limited rule.
    #[inline(always)]
    pub fn blocks_some(&self, proto_bits: u8) -> bool {
        let mut i = 0;
        while i < MAX_RULES {
            if i >= self.rule_count as usize {
                return false;
            }
            let r = &self.rules[i];
            if r.protocols & proto_bits != 0 && !(r.port_match == PORTS_ONLY && r.port_count == 0) {
                return true;
            }
            i += 1;
        }
        false
    }

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

/// Bits in a [`Prefilter`]: one per value of an address's first 16 bits.
pub const PREFILTER_BITS: usize = 1 << 16;
pub const PREFILTER_WORDS: usize = PREFILTER_BITS / 64;
/// Entries of `MG_PREFILTER`: one per family; see [`prefilter_index`].
pub const PREFILTER_ENTRIES: u32 = 2;

/// Index in `MG_PREFILTER` of the filter for `family`.
#[inline(always)]
pub const fn prefilter_index(family: u8) -> u32 {
    (family == AF_INET6) as u32
}

/// The cheap first question every hook asks: could any prefix of the policy contain an
/// address starting with these 16 bits? A clear bit answers "no" for sure, and the hook
/// returns before any other map lookup, any helper call or counter. A set bit only
/// means "look it up", so a superset is always safe: that is how the agent changes it
/// without a gap — old ∪ new before it flips the policy tries, new after. Any mix of
/// the bytes of two supersets of the policy in force is one too, so a reader racing a
/// write never sees a mark missing.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefilter {
    pub words: [u64; PREFILTER_WORDS],
}

impl Default for Prefilter {
    fn default() -> Self {
        Prefilter { words: [0; PREFILTER_WORDS] }
    }
}

impl Prefilter {
    /// Whether an address whose first two bytes are `lead` (big-endian) may be covered.
    #[inline(always)]
    pub fn covers(&self, lead: u16) -> bool {
        let word = self.words[(lead as usize >> 6) & (PREFILTER_WORDS - 1)];
        (word >> (lead & 63)) & 1 != 0
    }

    /// Adds every mark of `other`.
    pub fn union(&mut self, other: &Prefilter) {
        for (w, o) in self.words.iter_mut().zip(other.words.iter()) {
            *w |= o;
        }
    }

    /// Marks every lead a prefix of `prefix_len` bits starting with `address` covers.
    pub fn add(&mut self, address: &[u8], prefix_len: u8) {
        let lead = u16::from_be_bytes([address.first().copied().unwrap_or(0), address.get(1).copied().unwrap_or(0)]);
        let free_bits = 16u32.saturating_sub(u32::from(prefix_len));
        let first = (u32::from(lead) >> free_bits) << free_bits;
        for v in first..first + (1 << free_bits) {
            self.words[v as usize >> 6] |= 1 << (v & 63);
        }
    }
}

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
    fn an_unreadable_port_is_blocked_where_any_port_is() {
        let mut rules = DestRules { rule_count: 1, ..Default::default() };
        rules.rules[0] = rule(PROTO_TCP | PROTO_UDP, PORTS_ONLY, &[80]);
        assert!(rules.blocks_some(PROTO_UDP));
        assert!(rules.blocks_some(PROTO_ALL));
        assert!(!rules.blocks_some(PROTO_OTHER));
        rules.rules[0] = rule(PROTO_ALL, PORTS_ONLY, &[]);
        assert!(!rules.blocks_some(PROTO_ALL), "an empty port list blocks nothing");
    }

    #[test]
    fn prefilter_covers_exactly_the_prefixes_leads() {
        let mut f = Prefilter::default();
        f.add(&[169, 254, 169, 254], 32);
        assert!(f.covers(u16::from_be_bytes([169, 254])));
        assert!(!f.covers(u16::from_be_bytes([169, 253])));
        assert!(!f.covers(u16::from_be_bytes([10, 200])));
        f.add(&[10, 0, 0, 0], 8);
        assert!(f.covers(u16::from_be_bytes([10, 0])) && f.covers(u16::from_be_bytes([10, 255])));
        assert!(!f.covers(u16::from_be_bytes([11, 0])));
        let mut all = Prefilter::default();
        all.add(&[0; 16], 0);
        assert!(all.words.iter().all(|&w| w == u64::MAX));
        assert_eq!(prefilter_index(AF_INET6), 1);
        assert_eq!(prefilter_index(AF_INET), 0);
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
        assert_eq!(core::mem::size_of::<ConcealSettings>(), 32);
        assert_eq!(core::mem::size_of::<SockKey>(), 20);
        assert_eq!(core::mem::size_of::<ConcealOrigin>(), 40);
    }
}
