// SPDX-License-Identifier: Apache-2.0
//! One attempt a kernel hook reported, decoded into plain data.
//!
//! The event reader turns raw ring-buffer records into [`Attempt`]s; everything after
//! it (pod identity, audit records, metrics) works on this type and knows nothing of
//! BPF.

use std::{net::IpAddr, time::SystemTime};

pub(crate) use metadata_guard_common::{Hook, Verdict};

/// Transport protocol of an attempt, as reported in audit records and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Other(u8),
}

impl Protocol {
    pub fn from_ip_protocol(n: u8) -> Protocol {
        match n {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            1 => Protocol::Icmp,
            58 => Protocol::Icmpv6,
            other => Protocol::Other(other),
        }
    }

    pub fn name(self) -> String {
        match self {
            Protocol::Tcp => "tcp".into(),
            Protocol::Udp => "udp".into(),
            Protocol::Icmp => "icmp".into(),
            Protocol::Icmpv6 => "icmpv6".into(),
            Protocol::Other(n) => format!("ip-proto-{n}"),
        }
    }
}

/// An attempt to reach a blocked destination that was refused or audited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// Wall-clock time of the attempt (converted from the kernel's monotonic clock).
    pub time: SystemTime,
    /// Cgroup v2 id of the task (or, on egress, of the socket).
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// Process id in the initial pid namespace; 0 when the kernel knew no task.
    pub pid: u32,
    /// Thread id in the initial pid namespace; 0 when unknown.
    pub tid: u32,
    pub comm: String,
    /// The destination as judged: an IPv4-mapped IPv6 address appears as IPv4.
    pub destination: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub hook: Hook,
    pub verdict: Verdict,
    /// A v6 socket used the IPv4-mapped form of the destination.
    pub mapped: bool,
    /// The packet's source address, for attempts the host side judged (its packets
    /// may come from no socket, task or cgroup the agent can name).
    pub source: Option<IpAddr>,
    /// The uplink only: the interface the packet entered the node through (0: the node
    /// made it, or another hook), to name the pod when its socket did not survive.
    pub ingress_ifindex: u32,
    /// Conceal mode: the HTTP request the proxy refused (the connection itself was
    /// redirected, not refused). None for every kernel verdict.
    pub request: Option<ConcealedRequest>,
}

/// A request the conceal proxy refused: what was asked, and the rule that refused it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConcealedRequest {
    pub method: String,
    /// The normalised path (the raw target when it had no normal form).
    pub path: String,
    pub rule: String,
    /// Set when a pod's own identity answered (or its token was refused).
    pub identity: Option<IdentityNote>,
}

/// What happened to one identity request, for the audit trail and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdentityNote {
    /// The role (its ARN) the pod was given or asked for; None when none applied.
    pub role: Option<String>,
    pub result: IdentityResult,
    /// Why, when the pod got no credentials.
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityResult {
    /// Credentials (or the role's name or profile) were served.
    Served,
    /// The pod's token was missing, unreadable, expired or named another pod.
    TokenRefused,
    /// The cloud refused the exchange or could not be reached.
    StsError,
}

impl IdentityResult {
    pub fn name(self) -> &'static str {
        match self {
            IdentityResult::Served => "served",
            IdentityResult::TokenRefused => "token_refused",
            IdentityResult::StsError => "sts_error",
        }
    }
}

impl Attempt {
    /// The verdict as records and metrics name it: `concealed` for a refused request.
    pub fn verdict_name(&self) -> &'static str {
        if self.request.as_ref().is_some_and(|r| r.identity.is_some()) {
            "identity"
        } else if self.request.is_some() {
            "concealed"
        } else {
            self.verdict.name()
        }
    }

    pub fn family(&self) -> &'static str {
        match self.destination {
            IpAddr::V4(_) => "ipv4",
            IpAddr::V6(_) => "ipv6",
        }
    }
}

#[cfg(test)]
impl Attempt {
    /// For tests: `curl` (pid 4242) in cgroup 12345 connecting over TCP to
    /// `destination:port`, refused at connect4.
    pub(crate) fn sample(time: SystemTime, destination: IpAddr, port: u16) -> Attempt {
        Attempt {
            time,
            cgroup_id: 12345,
            netns_cookie: 7,
            pid: 4242,
            tid: 4243,
            comm: "curl".into(),
            destination,
            port,
            protocol: Protocol::Tcp,
            hook: Hook::Connect4,
            verdict: Verdict::Blocked,
            mapped: false,
            request: None,
            source: None,
            ingress_ifindex: 0,
        }
    }
}
