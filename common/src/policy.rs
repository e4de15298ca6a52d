// SPDX-License-Identifier: Apache-2.0
//! The policy layout: the mode and settings, the rules of a blocked destination as the
//! policy tries hold them, their keys and capacities, and the prefilter before them.

use crate::AF_INET6;

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

/// Bits in a [`Prefilter`]: one per value of an address's first 16 bits.
pub const PREFILTER_BITS: usize = 1 << 16;
pub const PREFILTER_WORDS: usize = PREFILTER_BITS / 64;
/// Entries of `MG_PREFILTER` and `MG_PREFILTER2`: one per family; see [`prefilter_index`].
pub const PREFILTER_ENTRIES: u32 = 2;

/// Index in `MG_PREFILTER` and `MG_PREFILTER2` of the filter for `family`.
#[inline(always)]
pub const fn prefilter_index(family: u8) -> u32 {
    (family == AF_INET6) as u32
}

/// The cheap first questions every hook asks: could any prefix of the policy contain
/// an address whose first 16 bits (its *lead*, in `MG_PREFILTER`) are these, and whose
/// next 16 bits (in `MG_PREFILTER2`) are these? A clear bit in either answers "no" for
/// sure, and the hook returns before any other map lookup, any helper call or counter.
/// The second question spares the destinations that share a lead with a blocked one
/// (NodeLocal DNSCache's 169.254.20.10 beside 169.254.169.254; ULA pod addresses
/// beside `fd00:ec2::254`) the policy's longest-prefix lookup.
///
/// Set bits only mean "look it up", so a superset is always safe: that is how the agent
/// changes them without a gap — old ∪ new before it flips the policy tries, new after,
/// each filter on its own (an address the policy in force covers is marked in both at
/// every moment). Any mix of the bytes of two supersets of the policy in force is one
/// too, so a reader racing a write never sees a mark missing.
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
    /// Whether an address whose 16 bits this filter indexes are `bits` (big-endian)
    /// may be covered.
    #[inline(always)]
    pub fn covers(&self, bits: u16) -> bool {
        let word = self.words[(bits as usize >> 6) & (PREFILTER_WORDS - 1)];
        (word >> (bits & 63)) & 1 != 0
    }

    /// Adds every mark of `other`.
    pub fn union(&mut self, other: &Prefilter) {
        for (w, o) in self.words.iter_mut().zip(other.words.iter()) {
            *w |= o;
        }
    }

    /// Marks every lead (first 16 bits) a prefix of `prefix_len` bits starting with
    /// `address` covers.
    pub fn add(&mut self, address: &[u8], prefix_len: u8) {
        self.mark(address, prefix_len, 0);
    }

    /// Marks every value of the next 16 bits (bits 16 to 31) that addresses in the
    /// prefix can have: all of them for a prefix shorter than 16 bits.
    pub fn add_next(&mut self, address: &[u8], prefix_len: u8) {
        if prefix_len < 16 {
            self.words = [u64::MAX; PREFILTER_WORDS];
            return;
        }
        self.mark(address, prefix_len - 16, 2);
    }

    /// Marks the 16-bit values at byte `offset` of `address` under a prefix of
    /// `prefix_len` bits counted from that offset.
    fn mark(&mut self, address: &[u8], prefix_len: u8, offset: usize) {
        let byte = |i: usize| address.get(offset + i).copied().unwrap_or(0);
        let bits = u16::from_be_bytes([byte(0), byte(1)]);
        let free_bits = 16u32.saturating_sub(u32::from(prefix_len));
        let first = (u32::from(bits) >> free_bits) << free_bits;
        for v in first..first + (1 << free_bits) {
            self.words[v as usize >> 6] |= 1 << (v & 63);
        }
    }
}
