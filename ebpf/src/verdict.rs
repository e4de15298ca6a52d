// SPDX-License-Identifier: MIT OR GPL-2.0-only
//! The one decision every hook shares, and the maps it reads and writes.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_ktime_get_ns},
    },
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    programs::SockAddrContext,
    EbpfContext,
};
use metadata_guard_common::{
    counters, prefilter_index, protocol_bit, DestRules, Event, Hook, Ipv4Key, Ipv6Key, Prefilter, Settings, Verdict,
    AF_INET, ALLOWED_CGROUPS_MAX_ENTRIES, EVENTS_RING_BYTES, MODE_AUDIT, MODE_CONCEAL, POLICY_MAX_ENTRIES,
    PREFILTER_ENTRIES, PROTO_ALL, UPLINK_EXTRA_MAX_ENTRIES,
};

/// `bpf_sock_addr` return values: 1 lets the call proceed, 0 fails it with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const IPV4_BITS: u32 = 32;
const IPV6_BITS: u32 = 128;

#[map]
static MG_SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// One [`Prefilter`] per family over an address's first 16 bits, and one over its next
/// 16, covering the policy in force (see its doc for how the agent keeps them so while
/// it changes the policy).
#[map]
static MG_PREFILTER: Array<Prefilter> = Array::with_max_entries(PREFILTER_ENTRIES, 0);
#[map]
static MG_PREFILTER2: Array<Prefilter> = Array::with_max_entries(PREFILTER_ENTRIES, 0);

#[map]
static MG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::SLOTS, 0);

#[map]
static MG_POLICY4_A: LpmTrie<Ipv4Key, DestRules> = LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);
#[map]
static MG_POLICY4_B: LpmTrie<Ipv4Key, DestRules> = LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);
#[map]
static MG_POLICY6_A: LpmTrie<Ipv6Key, DestRules> = LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);
#[map]
static MG_POLICY6_B: LpmTrie<Ipv6Key, DestRules> = LpmTrie::with_max_entries(POLICY_MAX_ENTRIES, 0);

/// Rules only the node's own checks apply (the uplink here; the host-side table in
/// nf_tables), flipped with the policy pair: see `map_names::UPLINK4_A`.
#[map]
static MG_UPLINK4_A: LpmTrie<Ipv4Key, DestRules> = LpmTrie::with_max_entries(UPLINK_EXTRA_MAX_ENTRIES, 0);
#[map]
static MG_UPLINK4_B: LpmTrie<Ipv4Key, DestRules> = LpmTrie::with_max_entries(UPLINK_EXTRA_MAX_ENTRIES, 0);
#[map]
static MG_UPLINK6_A: LpmTrie<Ipv6Key, DestRules> = LpmTrie::with_max_entries(UPLINK_EXTRA_MAX_ENTRIES, 0);
#[map]
static MG_UPLINK6_B: LpmTrie<Ipv6Key, DestRules> = LpmTrie::with_max_entries(UPLINK_EXTRA_MAX_ENTRIES, 0);

/// Cgroup ids of allowlisted pods' containers (value unused).
#[map]
static MG_ALLOW_CG: HashMap<u64, u8> = HashMap::with_max_entries(ALLOWED_CGROUPS_MAX_ENTRIES, 0);

#[map]
static MG_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

/// What a hook is asked to let through.
pub struct Destination {
    pub family: u8,
    /// Network byte order; IPv4 in the first four bytes.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// False where the packet hides its port (see `DestRules::blocks_some`).
    pub port_known: bool,
    pub protocol: u8,
    /// An IPv4 destination reached through its IPv4-mapped IPv6 form.
    pub mapped: bool,
}

/// The settings, when an address of `family` whose first two bytes are `lead` and
/// next two `next` (both big-endian) may be in the policy; `None` when it surely is
/// not — the answer for almost every connect and packet on a node, reached with one
/// inlined array lookup (two for a destination that shares a lead with a blocked one)
/// and no helper call.
#[inline(always)]
pub fn may_be_blocked(family: u8, lead: u16, next: u16) -> Option<&'static Settings> {
    // The lookups always find their element (array maps); `None` would be a bug.
    let filter = MG_PREFILTER.get(prefilter_index(family))?;
    if !filter.covers(lead) {
        return None;
    }
    let second = MG_PREFILTER2.get(prefilter_index(family))?;
    if !second.covers(next) {
        return None;
    }
    MG_SETTINGS.get(0)
}

/// Refuse if the destination is blocked and the socket lives outside the host's
/// network namespace (and is not an allowlisted pod's); count every verdict on a
/// blocked destination. The caller has checked [`may_be_blocked`].
#[inline(always)]
pub fn judge(ctx: &SockAddrContext, settings: &Settings, hook: Hook, dest: &Destination) -> i32 {
    let Some(rules) = policy_rules(settings, dest) else { return ALLOW };
    // SAFETY: the context pointer is the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns_cookie == settings.host_netns_cookie {
        // Any address the policy covers, blocked port or not: the packet backstop
        // judges a later fragment of any port as blocked (see `rules_block`).
        crate::backstop::mark_host_socket(ctx, netns_cookie);
        if rules_block(rules, dest) {
            count(hook, Verdict::Allowed);
        }
        return ALLOW;
    }
    if !rules_block(rules, dest) {
        return ALLOW;
    }
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // Conceal mode: a (not allowlisted) pod's TCP connect to a metadata HTTP endpoint
    // goes to the agent's filtering proxy instead; counted in conceal.rs. Everything
    // else is judged as in enforce mode.
    if settings.mode == MODE_CONCEAL
        && MG_ALLOW_CG.get_ptr(cgroup_id).is_none()
        && crate::conceal::redirect(ctx.as_ptr(), hook, dest, cgroup_id, netns_cookie)
    {
        return ALLOW;
    }
    let origin = Origin { netns_cookie, cgroup_id, task: true, ..Origin::NONE };
    if settle(settings, hook, dest, &origin) {
        ALLOW
    } else {
        REFUSE
    }
}

/// Where an attempt to reach a blocked destination came from.
pub struct Origin {
    pub netns_cookie: u64,
    pub cgroup_id: u64,
    /// The current task made the attempt (false in the packet backstop, which may run
    /// in another task's or in softirq context).
    pub task: bool,
    /// The uplink only: where the packet entered the node (0: the node made it).
    pub ingress_ifindex: u32,
    /// The uplink only: the device it was leaving through.
    pub uplink_ifindex: u32,
    /// The uplink only: the packet's source address (network order).
    pub src_addr: [u8; 16],
}

impl Origin {
    pub const NONE: Origin =
        Origin { netns_cookie: 0, cgroup_id: 0, task: false, ingress_ifindex: 0, uplink_ifindex: 0, src_addr: [0; 16] };
}

/// A blocked destination from outside the host's namespace: exempt, audited or
/// refused; counted and reported. Returns whether to let it through.
#[inline(always)]
pub fn settle(settings: &Settings, hook: Hook, dest: &Destination, origin: &Origin) -> bool {
    let verdict = if MG_ALLOW_CG.get_ptr(origin.cgroup_id).is_some() {
        Verdict::Exempt
    } else if settings.mode == MODE_AUDIT {
        Verdict::Audited
    } else {
        Verdict::Blocked
    };
    count(hook, verdict);
    if verdict != Verdict::Exempt {
        report(hook, verdict, dest, origin);
    }
    verdict != Verdict::Blocked
}

#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    MG_SETTINGS.get(0)
}

/// The settings to judge a packet by, from the lead of its destination as read from the
/// packet: `None` when the prefilters pass it. A packet whose lead could not be read
/// (a short or odd header) is judged in full rather than passed.
#[inline(always)]
pub fn prefiltered(lead: Option<crate::packet::Lead>) -> Option<&'static Settings> {
    match lead {
        Some((family, lead, next)) => may_be_blocked(family, lead, next),
        None => settings(),
    }
}

/// Whether the policy blocks the destination (address, protocol and port).
#[inline(always)]
pub fn is_blocked(settings: &Settings, dest: &Destination) -> bool {
    match policy_rules(settings, dest) {
        Some(rules) => rules_block(rules, dest),
        None => false,
    }
}

/// Whether the node's own checks block the destination: the policy, or the rules only
/// they apply (`MG_UPLINK*`; a blocked rule is a blocked rule in either, so the union
/// of two compiled rule sets answers as the compiled union would).
#[inline(always)]
pub fn is_blocked_at_node(settings: &Settings, dest: &Destination) -> bool {
    if is_blocked(settings, dest) {
        return true;
    }
    match node_rules(settings, dest) {
        Some(rules) => rules_block(rules, dest),
        None => false,
    }
}

#[inline(always)]
fn node_rules(settings: &Settings, dest: &Destination) -> Option<&'static DestRules> {
    if dest.family == AF_INET {
        let key = Key::new(IPV4_BITS, [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]]);
        if settings.active_policy == 0 {
            MG_UPLINK4_A.get(&key)
        } else {
            MG_UPLINK4_B.get(&key)
        }
    } else {
        let key = Key::new(IPV6_BITS, dest.addr);
        if settings.active_policy == 0 {
            MG_UPLINK6_A.get(&key)
        } else {
            MG_UPLINK6_B.get(&key)
        }
    }
}

/// The policy's rules for the destination's address; `None` when no prefix of the
/// policy covers it.
#[inline(always)]
fn policy_rules(settings: &Settings, dest: &Destination) -> Option<&'static DestRules> {
    if dest.family == AF_INET {
        let key = Key::new(IPV4_BITS, [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]]);
        if settings.active_policy == 0 {
            MG_POLICY4_A.get(&key)
        } else {
            MG_POLICY4_B.get(&key)
        }
    } else {
        let key = Key::new(IPV6_BITS, dest.addr);
        if settings.active_policy == 0 {
            MG_POLICY6_A.get(&key)
        } else {
            MG_POLICY6_B.get(&key)
        }
    }
}

/// Whether the address's rules block this protocol and port.
#[inline(always)]
fn rules_block(rules: &DestRules, dest: &Destination) -> bool {
    if dest.port_known {
        rules.blocks(protocol_bit(dest.protocol), dest.port)
    } else {
        // A later fragment may be of any protocol: whatever its header said.
        rules.blocks_some(PROTO_ALL)
    }
}

#[inline(always)]
pub fn count(hook: Hook, verdict: Verdict) {
    bump(counters::slot(hook, verdict));
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(c) = MG_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot only this CPU writes while the program runs.
        unsafe { *c += 1 };
    }
}

/// Send one event to the agent; a full ring buffer is counted, never silent.
#[inline(always)]
fn report(hook: Hook, verdict: Verdict, dest: &Destination, origin: &Origin) {
    let Some(mut entry) = MG_EVENTS.reserve::<Event>(0) else {
        bump(counters::EVENTS_LOST);
        return;
    };
    let (pid_tgid, comm) = if origin.task {
        (bpf_get_current_pid_tgid(), bpf_get_current_comm().unwrap_or([0u8; 16]))
    } else {
        (0, [0u8; 16])
    };
    entry.write(Event {
        // SAFETY: helper without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: origin.cgroup_id,
        netns_cookie: origin.netns_cookie,
        pid_tgid,
        addr: dest.addr,
        port: dest.port,
        family: dest.family,
        protocol: dest.protocol,
        hook: hook as u8,
        verdict: verdict as u8,
        mapped: dest.mapped as u8,
        _pad: BUILD_VARIANT,
        comm,
        ingress_ifindex: origin.ingress_ifindex,
        uplink_ifindex: origin.uplink_ifindex,
        src_addr: origin.src_addr,
    });
    entry.submit(0);
}

/// Lets a test build differ from the default one (see the `test-variant` feature).
#[cfg(feature = "test-variant")]
const BUILD_VARIANT: u8 = 1;
#[cfg(not(feature = "test-variant"))]
const BUILD_VARIANT: u8 = 0;
