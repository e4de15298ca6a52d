// SPDX-License-Identifier: Apache-2.0
//! How the packet backstop tells a host socket's packet from a pod's: the choice
//! decides which programs are loaded and attached (see `programs::Attachment`).

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
};
use metadata_guard_common::program_names;

/// The packet backstop's way of knowing a packet's socket's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backstop {
    /// `mg_egress_netns` asks the kernel (`bpf_get_netns_cookie` in cgroup_skb
    /// programs, kernels from 2025): no program runs at socket creation.
    NetnsHelper,
    /// `mg_sock_create` marks every host socket at its creation and `mg_egress` reads
    /// the mark back (every kernel from 5.10).
    SocketMarks,
}

impl Backstop {
    /// The best this kernel has. A probe that fails for another reason than the
    /// helper's absence (privileges) picks the marks, which every kernel has: loading
    /// then says what is missing. The uplink (tc) reads the socket's namespace the
    /// same way as the backstop, so the helper is used only where both program types
    /// have it: otherwise the marks must be written, and `sock_create` runs anyway.
    pub(crate) fn detect() -> Backstop {
        let has = |kind| matches!(is_helper_supported(kind, BpfHelper::BPF_FUNC_get_netns_cookie), Ok(true));
        if has(ProgramType::CgroupSkb) && has(ProgramType::SchedClassifier) {
            Backstop::NetnsHelper
        } else {
            Backstop::SocketMarks
        }
    }

    /// The egress program this backstop runs.
    pub(crate) fn egress_program(self) -> &'static str {
        match self {
            Backstop::NetnsHelper => program_names::EGRESS_NETNS,
            Backstop::SocketMarks => program_names::EGRESS,
        }
    }

    /// The program beside the egress one that refuses pods' IPv4 source routes.
    pub(crate) fn options_program(self) -> &'static str {
        match self {
            Backstop::NetnsHelper => program_names::OPTIONS_NETNS,
            Backstop::SocketMarks => program_names::OPTIONS,
        }
    }

    /// Which backstop a pinned egress program belongs to, by its name (the kernel
    /// keeps 15 bytes of a name: both fit).
    pub(crate) fn of_egress_program(name: &str) -> Backstop {
        if name == program_names::EGRESS_NETNS {
            Backstop::NetnsHelper
        } else {
            Backstop::SocketMarks
        }
    }

    /// For logs, `status` and `check`.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Backstop::NetnsHelper => {
                "the kernel's netns cookie of each packet's socket (bpf_get_netns_cookie in cgroup_skb)"
            }
            Backstop::SocketMarks => "host sockets marked at creation (sock_create and socket storage)",
        }
    }

    /// The short name `status --json` shows and `--packet-netns-from` takes.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backstop::NetnsHelper => "helper",
            Backstop::SocketMarks => "marks",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Backstop;

    #[test]
    fn a_pinned_egress_program_names_its_backstop() {
        // Kernel program names are cut to 15 bytes: "mg_egress_netns" fits exactly.
        assert_eq!(metadata_guard_common::program_names::EGRESS_NETNS.len(), 15);
        assert_eq!(Backstop::of_egress_program("mg_egress_netns"), Backstop::NetnsHelper);
        assert_eq!(Backstop::of_egress_program("mg_egress"), Backstop::SocketMarks);
        assert_eq!(Backstop::of_egress_program("unknown"), Backstop::SocketMarks);
    }
}
