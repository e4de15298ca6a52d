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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// connect4/6, sendmsg4/6: refuse at the socket call.
    SockAddr,
    /// sock_create: mark each socket's namespace for the backstop.
    SockCreate,
    /// cgroup_skb egress: the packet backstop.
    Egress,
    /// sock_ops: records conceal-mode redirects for the proxy (conceal/).
    SockOps,
}

/// One attachment: its pin name (also how status names it), program and kind.
pub struct Attachment {
    pub pin: &'static str,
    pub program: &'static str,
    pub kind: Kind,
}

impl Attachment {
    /// Whether the program writes verdict events: the only code the test variant
    /// changes (`BUILD_VARIANT`, ebpf/src/verdict.rs). The others are the same in both
    /// builds, so an upgrade to the variant keeps them.
    pub fn reports_verdicts(&self) -> bool {
        match self.kind {
            Kind::SockAddr | Kind::Egress => true,
            Kind::SockCreate | Kind::SockOps => false,
        }
    }

    /// Whether a guard in `mode` (`MODE_*`) keeps this attached. `conceal_ops` only in
    /// conceal mode: the kernel runs sock_ops programs on about five events of every
    /// TCP connection, whatever the program does, and only conceal mode needs it.
    pub fn needed_in(&self, mode: u32) -> bool {
        !self.depends_on_mode() || mode == MODE_CONCEAL
    }

    /// Whether it is attached in some modes only (see [`Attachment::needed_in`]).
    pub fn depends_on_mode(&self) -> bool {
        self.kind == Kind::SockOps
    }
}

/// The attachments a guard in `mode` keeps attached, in attach order. Every program
/// of [`ATTACHMENTS`] is still loaded (verified) in every mode, so that a reload can
/// switch to conceal mode.
pub fn attachments_for(mode: u32) -> impl Iterator<Item = &'static Attachment> {
    ATTACHMENTS.iter().filter(move |a| a.needed_in(mode))
}

/// In attach (and replace) order: sockets are marked before the backstop reads marks,
/// and the socket hooks come before the backstop so normal clients get EPERM, not a
/// drop. The socket hooks also come before `sock_create`: they mark host TCP/UDP
/// sockets that an older `sock_create` marked at creation, so replacing them first
/// leaves no moment in which neither marks a host socket (and going back to such a
/// version, its `sock_create` marks again before the hooks stop).
pub const ATTACHMENTS: [Attachment; 7] = [
    Attachment { pin: "connect4", program: program_names::CONNECT4, kind: Kind::SockAddr },
    Attachment { pin: "connect6", program: program_names::CONNECT6, kind: Kind::SockAddr },
    Attachment { pin: "sendmsg4", program: program_names::SENDMSG4, kind: Kind::SockAddr },
    Attachment { pin: "sendmsg6", program: program_names::SENDMSG6, kind: Kind::SockAddr },
    Attachment { pin: "sock_create", program: program_names::SOCK_CREATE, kind: Kind::SockCreate },
    Attachment { pin: "egress", program: program_names::EGRESS, kind: Kind::Egress },
    // Attached only in conceal mode (attachments_for): sock_ops runs on every TCP event.
    Attachment { pin: "conceal_ops", program: program_names::CONCEAL_SOCKOPS, kind: Kind::SockOps },
];

/// The order the programs are loaded (JIT-compiled) in: `sock_create` first, then the
/// rest as attached. Measured, not reasoned: on 6.18 the same programs loaded in
/// attach order ran `connect4` 15–25 ns slower per call (kernel BPF statistics,
/// `mg-bench --profile-only`), an effect of where the kernel places the compiled
/// code; the attach order stays as [`ATTACHMENTS`] explains.
pub(super) fn load_order() -> impl Iterator<Item = &'static Attachment> {
    let sock_create = ATTACHMENTS.iter().filter(|a| a.kind == Kind::SockCreate);
    sock_create.chain(ATTACHMENTS.iter().filter(|a| a.kind != Kind::SockCreate))
}

/// Loads (verifies) the program and returns an fd to it.
pub(super) fn load(ebpf: &mut Ebpf, a: &Attachment) -> Result<OwnedFd> {
    let program =
        ebpf.program_mut(a.program).with_context(|| format!("the kernel object has no program {}", a.program))?;
    // Loaded already (the agent re-attaching after its links were removed): reuse it.
    if let Ok(fd) = program.fd() {
        return Ok(fd.as_fd().try_clone_to_owned()?);
    }
    let refused = || format!("the kernel's verifier refused program {}", a.program);
    let fd = match a.kind {
        Kind::SockAddr => {
            let p: &mut CgroupSockAddr = program.try_into()?;
            p.load().with_context(refused)?;
            p.fd()?.as_fd().try_clone_to_owned()?
        }
        Kind::SockCreate => {
            let p: &mut CgroupSock = program.try_into()?;
            p.load().with_context(refused)?;
            p.fd()?.as_fd().try_clone_to_owned()?
        }
        Kind::Egress => {
            let p: &mut CgroupSkb = program.try_into()?;
            p.load().with_context(refused)?;
            p.fd()?.as_fd().try_clone_to_owned()?
        }
        Kind::SockOps => {
            let p: &mut SockOps = program.try_into()?;
            p.load().with_context(refused)?;
            p.fd()?.as_fd().try_clone_to_owned()?
        }
    };
    Ok(fd)
}

/// What the kernel says about our loaded program of `a` (its tag above all).
pub(super) fn info(ebpf: &Ebpf, a: &Attachment) -> Result<ProgramInfo> {
    let program = ebpf.program(a.program).with_context(|| format!("no program {}", a.program))?;
    program.info().with_context(|| format!("could not read what the kernel has of program {}", a.program))
}

/// Pins our loaded program of `a` at `path`.
pub(super) fn pin(ebpf: &mut Ebpf, a: &Attachment, path: &Path) -> Result<()> {
    let program = ebpf.program_mut(a.program).with_context(|| format!("no program {}", a.program))?;
    program.pin(path).with_context(|| format!("could not pin program {} at {}", a.program, path.display()))
}

/// Attaches the (loaded) program to `cgroup` with a new bpf_link.
pub(super) fn attach(ebpf: &mut Ebpf, a: &Attachment, cgroup: &File) -> Result<FdLink> {
    let program = ebpf.program_mut(a.program).with_context(|| format!("no program {}", a.program))?;
    let failed = || format!("could not attach program {} to the cgroup", a.program);
    let no_link =
        || format!("program {} was attached without a bpf_link; the guard needs kernel 5.7+ cgroup links", a.program);
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
        Kind::Egress => {
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
    use metadata_guard_common::{MODE_AUDIT, MODE_CONCEAL, MODE_ENFORCE};

    use super::attachments_for;

    #[test]
    fn conceal_ops_is_attached_in_conceal_mode_only() {
        let pins = |mode| attachments_for(mode).map(|a| a.pin).collect::<Vec<_>>();
        for mode in [MODE_ENFORCE, MODE_AUDIT] {
            assert_eq!(pins(mode), ["connect4", "connect6", "sendmsg4", "sendmsg6", "sock_create", "egress"]);
        }
        assert_eq!(pins(MODE_CONCEAL).last(), Some(&"conceal_ops"));
        assert_eq!(pins(MODE_CONCEAL).len(), 7);
    }
}
