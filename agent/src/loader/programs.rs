// SPDX-License-Identifier: Apache-2.0
//! The guard's programs and how each kind attaches to a cgroup.

use std::{
    fs::File,
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use aya::{
    programs::{
        cgroup_skb::CgroupSkbAttachType,
        links::{CgroupAttachMode, FdLink},
        CgroupSkb, CgroupSock, CgroupSockAddr, ProgramInfo, SockOps,
    },
    Ebpf,
};
use metadata_guard_common::{program_names, MODE_CONCEAL};

use super::{Backstop, ObjectRefused};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// connect4/6, sendmsg4/6: refuse at the socket call.
    SockAddr,
    /// sock_create: mark host sockets for the backstop (`Backstop::SocketMarks` only).
    SockCreate,
    /// cgroup_skb egress: the packet backstop.
    Egress,
    /// cgroup_skb egress beside it: refuses pods' IPv4 source routes (LSRR/SSRR), a
    /// walk over the options that does not fit beside the rest of `mg_egress` in the
    /// 5.10 verifier's budget (ebpf/src/source_route.rs).
    Options,
    /// sock_ops: records conceal-mode redirects for the proxy (conceal/).
    SockOps,
}

/// One attachment: its pin name (also how status names it), program and kind.
pub struct Attachment {
    pub pin: &'static str,
    /// The program; egress and options run the ones of the backstop in use
    /// ([`Plan::program`]).
    program: &'static str,
    pub kind: Kind,
}

/// What a guard attaches: its mode and its packet backstop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    /// `MODE_*`.
    pub mode: u32,
    pub backstop: Backstop,
}

impl Plan {
    /// The program `a` runs under this plan.
    pub(crate) fn program(self, a: &Attachment) -> &'static str {
        match a.kind {
            Kind::Egress => self.backstop.egress_program(),
            Kind::Options => self.backstop.options_program(),
            _ => a.program,
        }
    }

    /// Whether a guard under this plan keeps `a` attached: `conceal_ops` only in
    /// conceal mode (the kernel runs sock_ops programs on about five events of every
    /// TCP connection, whatever the program does, and only conceal mode needs it);
    /// `sock_create` only where the backstop reads marks (it runs on every socket
    /// any process creates).
    pub(crate) fn needs(self, a: &Attachment) -> bool {
        match a.kind {
            Kind::SockOps => self.mode == MODE_CONCEAL,
            Kind::SockCreate => self.backstop == Backstop::SocketMarks,
            Kind::SockAddr | Kind::Egress | Kind::Options => true,
        }
    }

    /// The attachments this plan keeps attached, in attach order.
    pub(crate) fn attachments(self) -> impl Iterator<Item = &'static Attachment> {
        ATTACHMENTS.iter().filter(move |a| self.needs(a))
    }

    /// The attachments this plan does not use, whose pins are detached.
    pub(crate) fn unused(self) -> impl Iterator<Item = &'static Attachment> {
        ATTACHMENTS.iter().filter(move |a| !self.needs(a))
    }

    /// The programs loaded (verified) for this plan, in load order: those of every
    /// mode, so that a reload can switch to conceal mode, but only this backstop's
    /// (the other's may not load on this kernel).
    pub(super) fn loaded(self) -> impl Iterator<Item = &'static Attachment> {
        load_order().filter(move |a| a.kind != Kind::SockCreate || self.backstop == Backstop::SocketMarks)
    }
}

impl Attachment {
    /// Whether the program writes verdict events: the only code the test variant
    /// changes (`BUILD_VARIANT`, ebpf/src/verdict.rs). The others are the same in both
    /// builds, so an upgrade to the variant keeps them.
    pub fn reports_verdicts(&self) -> bool {
        match self.kind {
            Kind::SockAddr | Kind::Egress | Kind::Options => true,
            Kind::SockCreate | Kind::SockOps => false,
        }
    }

    /// Whether it is attached in some modes only (see [`Plan::needs`]).
    pub fn depends_on_mode(&self) -> bool {
        self.kind == Kind::SockOps
    }
}

/// In attach (and replace) order: sockets are marked before the backstop reads marks,
/// and the socket hooks come before the backstop so normal clients get EPERM, not a
/// drop. The socket hooks also come before `sock_create`: they mark host TCP/UDP
/// sockets that an older `sock_create` marked at creation, so replacing them first
/// leaves no moment in which neither marks a host socket (and going back to such a
/// version, its `sock_create` marks again before the hooks stop).
pub const ATTACHMENTS: [Attachment; 8] = [
    Attachment { pin: "connect4", program: program_names::CONNECT4, kind: Kind::SockAddr },
    Attachment { pin: "connect6", program: program_names::CONNECT6, kind: Kind::SockAddr },
    Attachment { pin: "sendmsg4", program: program_names::SENDMSG4, kind: Kind::SockAddr },
    Attachment { pin: "sendmsg6", program: program_names::SENDMSG6, kind: Kind::SockAddr },
    Attachment { pin: "sock_create", program: program_names::SOCK_CREATE, kind: Kind::SockCreate },
    Attachment { pin: "egress", program: program_names::EGRESS, kind: Kind::Egress },
    // Reads marks as egress does, so after sock_create too.
    Attachment { pin: "options", program: program_names::OPTIONS, kind: Kind::Options },
    // Attached only in conceal mode (attachments_for): sock_ops runs on every TCP event.
    Attachment { pin: "conceal_ops", program: program_names::CONCEAL_SOCKOPS, kind: Kind::SockOps },
];

/// The order the programs are loaded (JIT-compiled) in: `sock_create` first, then the
/// rest as attached. Measured, not reasoned: on 6.18 the same programs loaded in
/// attach order ran `connect4` 15–25 ns slower per call (kernel BPF statistics,
/// `mg-bench --profile-only`), an effect of where the kernel places the compiled
/// code; the attach order stays as [`ATTACHMENTS`] explains.
fn load_order() -> impl Iterator<Item = &'static Attachment> {
    let sock_create = ATTACHMENTS.iter().filter(|a| a.kind == Kind::SockCreate);
    sock_create.chain(ATTACHMENTS.iter().filter(|a| a.kind != Kind::SockCreate))
}

/// Loads (verifies) the program and returns an fd to it.
pub(super) fn load(ebpf: &mut Ebpf, a: &Attachment, plan: Plan) -> Result<OwnedFd, ObjectRefused> {
    let name = plan.program(a);
    let program = ebpf.program_mut(name).ok_or_else(|| ObjectRefused::missing(name))?;
    let refused = |e| ObjectRefused::program(name, e);
    let dup = |e| ObjectRefused::kernel(format_args!("could not duplicate program {name}'s fd"), e);
    // Loaded already (the agent re-attaching after its links were removed): reuse it.
    if let Ok(fd) = program.fd() {
        return fd.as_fd().try_clone_to_owned().map_err(dup);
    }
    // aya's program types share no trait for `load`: the same three steps for each.
    macro_rules! load_as {
        ($program_type:ty) => {{
            let p: &mut $program_type = program.try_into().map_err(refused)?;
            p.load().map_err(refused)?;
            p.fd().map_err(refused)?.as_fd().try_clone_to_owned().map_err(dup)?
        }};
    }
    let fd = match a.kind {
        Kind::SockAddr => load_as!(CgroupSockAddr),
        Kind::SockCreate => load_as!(CgroupSock),
        Kind::Egress | Kind::Options => load_as!(CgroupSkb),
        Kind::SockOps => load_as!(SockOps),
    };
    Ok(fd)
}

/// What the kernel says about our loaded program of `a` (its tag above all).
pub(super) fn info(ebpf: &Ebpf, a: &Attachment, plan: Plan) -> Result<ProgramInfo> {
    let name = plan.program(a);
    let program = ebpf.program(name).with_context(|| format!("no program {name}"))?;
    program.info().with_context(|| format!("could not read what the kernel has of program {name}"))
}

/// Pins our loaded program of `a` at `path`.
pub(super) fn pin(ebpf: &mut Ebpf, a: &Attachment, plan: Plan, path: &Path) -> Result<()> {
    let name = plan.program(a);
    let program = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?;
    program.pin(path).with_context(|| format!("could not pin program {name} at {}", path.display()))
}

/// Attaches the (loaded) program to `cgroup` with a new bpf_link.
pub(super) fn attach(ebpf: &mut Ebpf, a: &Attachment, plan: Plan, cgroup: &File) -> Result<FdLink> {
    let name = plan.program(a);
    let program = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?;
    let failed = || format!("could not attach program {name} to the cgroup");
    let no_link =
        || format!("program {name} was attached without a bpf_link; the guard needs kernel 5.7+ cgroup links");
    let mode = CgroupAttachMode::Single;
    match a.kind {
        Kind::SockAddr => {
            let p: &mut CgroupSockAddr = program.try_into()?;
            let id = p.attach(cgroup, mode).with_context(failed)?;
            FdLink::try_from(p.take_link(id)?).with_context(no_link)
        }
        Kind::SockCreate => {
            let p: &mut CgroupSock = program.try_into()?;
            let id = p.attach(cgroup, mode).with_context(failed)?;
            FdLink::try_from(p.take_link(id)?).with_context(no_link)
        }
        Kind::Egress | Kind::Options => {
            let p: &mut CgroupSkb = program.try_into()?;
            let id = p.attach(cgroup, CgroupSkbAttachType::Egress, mode).with_context(failed)?;
            FdLink::try_from(p.take_link(id)?).with_context(no_link)
        }
        Kind::SockOps => {
            let p: &mut SockOps = program.try_into()?;
            let id = p.attach(cgroup, mode).with_context(failed)?;
            FdLink::try_from(p.take_link(id)?).with_context(no_link)
        }
    }
}

#[cfg(test)]
mod tests {
    use metadata_guard_common::{program_names, MODE_AUDIT, MODE_CONCEAL, MODE_ENFORCE};

    use super::{Backstop, Plan, ATTACHMENTS};

    fn pins(mode: u32, backstop: Backstop) -> Vec<&'static str> {
        Plan { mode, backstop }.attachments().map(|a| a.pin).collect()
    }

    #[test]
    fn conceal_ops_is_attached_in_conceal_mode_only() {
        for mode in [MODE_ENFORCE, MODE_AUDIT] {
            let marks = pins(mode, Backstop::SocketMarks);
            assert_eq!(marks, ["connect4", "connect6", "sendmsg4", "sendmsg6", "sock_create", "egress", "options"]);
        }
        assert_eq!(pins(MODE_CONCEAL, Backstop::SocketMarks).last(), Some(&"conceal_ops"));
        assert_eq!(pins(MODE_CONCEAL, Backstop::SocketMarks).len(), 8);
    }

    #[test]
    fn sock_create_runs_only_where_the_backstop_reads_marks() {
        let helper = pins(MODE_ENFORCE, Backstop::NetnsHelper);
        assert_eq!(helper, ["connect4", "connect6", "sendmsg4", "sendmsg6", "egress", "options"]);
        let plan = Plan { mode: MODE_ENFORCE, backstop: Backstop::NetnsHelper };
        assert_eq!(plan.unused().map(|a| a.pin).collect::<Vec<_>>(), ["sock_create", "conceal_ops"]);
        assert!(plan.loaded().all(|a| a.pin != "sock_create"));
        let egress = ATTACHMENTS.iter().find(|a| a.pin == "egress").unwrap();
        assert_eq!(plan.program(egress), program_names::EGRESS_NETNS);
        let marks = Plan { backstop: Backstop::SocketMarks, ..plan };
        assert_eq!(marks.program(egress), program_names::EGRESS);
        let options = ATTACHMENTS.iter().find(|a| a.pin == "options").unwrap();
        assert_eq!(plan.program(options), program_names::OPTIONS_NETNS);
        assert_eq!(marks.program(options), program_names::OPTIONS);
        assert_eq!(marks.loaded().next().map(|a| a.pin), Some("sock_create"));
    }
}
