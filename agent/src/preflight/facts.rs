// SPDX-License-Identifier: Apache-2.0
//! What `check` finds on this node: every program type, map type and helper the
//! embedded kernel object uses, probed with this process's privileges; the object
//! itself loaded (maps created, programs verified) and thrown away; the pins a
//! restart would adopt, opened the way `run` opens them. Plain data for `judge`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use aya_obj::{
    generated::{bpf_func_id, bpf_map_type, BPF_CALL, BPF_JMP, BPF_PSEUDO_CALL},
    obj::ProgramSection,
};

use super::Inputs;
use crate::{cgroup, loader};

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Found {
    Yes,
    /// The kernel does not know it.
    No,
    /// The kernel refused to say: errno (EPERM: privileges, a seccomp filter or an LSM).
    Denied(i32),
    /// Something else failed.
    Failed(String),
}

/// One probed feature of the kernel object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Feature {
    Program(ProgramKind),
    Map(String),
    /// A helper, for one program kind.
    Helper(String, ProgramKind),
    /// Something about the object itself (it does not parse, an unexpected program).
    Object(String),
}

/// The program types the guard uses, named as `check` prints them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ProgramKind {
    SockAddr,
    Sock,
    Skb,
    /// Conceal mode's recorder of redirected connections.
    SockOps,
    /// The uplink's tc egress program.
    Tc,
}

impl ProgramKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ProgramKind::SockAddr => "cgroup sock_addr",
            ProgramKind::Sock => "cgroup sock (sock_create)",
            ProgramKind::Skb => "cgroup_skb",
            ProgramKind::SockOps => "sock_ops",
            ProgramKind::Tc => "tc (sched_cls)",
        }
    }

    fn program_type(self) -> ProgramType {
        match self {
            ProgramKind::SockAddr => ProgramType::CgroupSockAddr,
            ProgramKind::Sock => ProgramType::CgroupSock,
            ProgramKind::Skb => ProgramType::CgroupSkb,
            ProgramKind::SockOps => ProgramType::SockOps,
            ProgramKind::Tc => ProgramType::SchedClassifier,
        }
    }
}

/// The pins a starting agent adopts, as `run` opens them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Pins {
    /// No link pinned: `run` attaches fresh ones.
    None,
    /// Hooks with links: (hook, cgroup id, whether the program beside the link is the one it runs).
    Readable(Vec<(&'static str, u64, bool)>),
    Unreadable(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    pub kernel_release: String,
    pub kernel: (u32, u32),
    /// Effective capability bits.
    pub caps: u64,
    /// A seccomp filter applies to this process (`Seccomp: 2`).
    pub seccomp_filter: bool,
    pub cgroup: Result<PathBuf, String>,
    pub cgroup_id: Option<u64>,
    pub bpffs_root: PathBuf,
    pub bpffs_parent: PathBuf,
    pub on_bpffs: bool,
    pub bpffs_parent_exists: bool,
    /// `run --mount-bpffs`: whether `run` would mount a missing bpffs itself.
    pub mount_bpffs: bool,
    pub btf: bool,
    /// RLIMIT_MEMLOCK soft limit in bytes; None when unlimited.
    pub memlock: Option<u64>,
    pub probes: Vec<(Feature, Found)>,
    /// Loading the embedded object: Ok, or why not (with errno when the kernel said).
    /// None when the checks did not load it: `run` and `apply` load it for real after
    /// them, and explain a refusal with [`super::object_refused`].
    pub object: Option<Result<(), (Option<i32>, String)>>,
    pub pins: Pins,
    /// SO_NETNS_COOKIE: Ok(true) present, Ok(false) absent (probe program), Err why.
    pub netns_sockopt: Result<bool, String>,
    /// How the packet backstop would know a host socket here.
    pub backstop: loader::Backstop,
}

/// What the node offers; with `load_object`, the embedded object loaded too.
pub(super) fn gather(inputs: &Inputs<'_>, load_object: bool) -> Facts {
    let cgroup = cgroup::resolve(inputs.cgroup).map_err(|e| format!("{e:#}"));
    let cgroup_id = cgroup.as_ref().ok().and_then(|p| cgroup::id(p).ok());
    let parent = inputs.bpffs.parent().map_or_else(|| PathBuf::from("/"), PathBuf::from);
    Facts {
        kernel_release: super::kernel_release(),
        kernel: super::kernel_version(),
        caps: status_field("CapEff:").and_then(|hex| u64::from_str_radix(&hex, 16).ok()).unwrap_or(0),
        seccomp_filter: status_field("Seccomp:").is_some_and(|v| v == "2"),
        cgroup,
        cgroup_id,
        on_bpffs: loader::pins::is_bpffs(inputs.bpffs) || loader::pins::is_bpffs(&parent),
        bpffs_parent_exists: parent.exists(),
        bpffs_root: inputs.bpffs.to_path_buf(),
        bpffs_parent: parent,
        mount_bpffs: inputs.mount_bpffs,
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        memlock: memlock(),
        probes: probes(),
        object: load_object.then(|| loader::verify_object().map_err(|e| refusal(&e))),
        pins: pins(inputs.bpffs),
        netns_sockopt: loader::netns_cookie::via_sockopt(None).map(|c| c.is_some()).map_err(|e| format!("{e:#}")),
        backstop: loader::Backstop::detect(),
    }
}

fn status_field(name: &str) -> Option<String> {
    // The calling thread's own: capabilities are per thread.
    let status = std::fs::read_to_string("/proc/thread-self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
}

fn memlock() -> Option<u64> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK).ok()?;
    (soft != nix::sys::resource::RLIM_INFINITY).then_some(soft)
}

/// Why loading the object failed: errno (when the kernel said) and the whole error.
pub(super) fn refusal(e: &loader::ObjectRefused) -> (Option<i32>, String) {
    (e.errno, e.to_string())
}

fn pins(root: &Path) -> Pins {
    let layout = loader::pins::PinLayout::new(root);
    let mut found = Vec::new();
    for a in &loader::ATTACHMENTS {
        match loader::pinned_hook(&layout, a.pin) {
            Ok(None) => {}
            Ok(Some(hook)) => found.push((a.pin, hook.cgroup_id, hook.program.is_some())),
            Err(e) => return Pins::Unreadable(format!("{e:#}")),
        }
    }
    if found.is_empty() {
        Pins::None
    } else {
        Pins::Readable(found)
    }
}

/// Program types, map types and (per program type) helpers of the embedded object.
fn probes() -> Vec<(Feature, Found)> {
    let object = match aya_obj::Object::parse(loader::OBJECT) {
        Ok(o) => o,
        Err(e) => return vec![(Feature::Object("parsing".into()), Found::Failed(e.to_string()))],
    };
    let mut out = Vec::new();
    let mut kinds = BTreeSet::new();
    let mut helpers: BTreeSet<(ProgramKind, u32)> = BTreeSet::new();
    // Helpers called from functions that are not a program's entry (bpf-to-bpf calls)
    // count for every program that makes such calls.
    let entries: BTreeSet<(usize, u64)> = object.programs.values().map(aya_obj::Program::function_key).collect();
    let shared: BTreeSet<u32> = object
        .functions
        .iter()
        .filter(|(key, _)| !entries.contains(key))
        .flat_map(|(_, f)| helper_calls(&f.instructions).0)
        .collect();
    let backstop = loader::Backstop::detect();
    for (name, program) in &object.programs {
        // The other backstop's egress program is neither loaded nor needed here.
        let helper_only = [
            metadata_guard_common::program_names::EGRESS_NETNS,
            metadata_guard_common::program_names::OPTIONS_NETNS,
            metadata_guard_common::program_names::UPLINK,
        ];
        if helper_only.contains(&name.as_str()) && backstop == loader::Backstop::SocketMarks {
            continue;
        }
        let kind = match program.section {
            ProgramSection::CgroupSockAddr { .. } => ProgramKind::SockAddr,
            ProgramSection::CgroupSock { .. } => ProgramKind::Sock,
            ProgramSection::CgroupSkb { .. } => ProgramKind::Skb,
            ProgramSection::SockOps => ProgramKind::SockOps,
            ProgramSection::SchedClassifier => ProgramKind::Tc,
            ref other => {
                let what = Feature::Object(program.section_index.to_string());
                out.push((what, Found::Failed(format!("a program of a type `check` does not know: {other:?}"))));
                continue;
            }
        };
        kinds.insert(kind);
        let Some(function) = object.functions.get(&program.function_key()) else { continue };
        let (own, calls_functions) = helper_calls(&function.instructions);
        helpers.extend(own.into_iter().map(|h| (kind, h)));
        if calls_functions {
            helpers.extend(shared.iter().map(|&h| (kind, h)));
        }
    }
    for kind in &kinds {
        out.push((Feature::Program(*kind), found(is_program_supported(kind.program_type()))));
    }
    let map_types: BTreeSet<u32> = object.maps.values().map(aya_obj::Map::map_type).collect();
    for raw in map_types {
        let probed = bpf_map_type::try_from(raw).ok().and_then(|t| MapType::try_from(t).ok());
        let name = probed.map_or_else(|| format!("type {raw}"), |t| format!("{t:?}"));
        let result = match probed {
            Some(t) => match is_map_supported(t) {
                Ok(true) => Found::Yes,
                Ok(false) => Found::No,
                Err(e) => denied_or_failed(e.io_error.raw_os_error(), e.to_string()),
            },
            None => Found::Failed(format!("map type {raw} is unknown to aya")),
        };
        out.push((Feature::Map(name), result));
    }
    for (kind, id) in helpers {
        let Some(helper) = helper(id) else { continue };
        let name = format!("{helper:?}").trim_start_matches("BPF_FUNC_").to_string();
        out.push((Feature::Helper(name, kind), found(is_helper_supported(kind.program_type(), helper))));
    }
    out
}

/// Helper ids a function calls, and whether it calls other functions.
fn helper_calls(insns: &[aya_obj::generated::bpf_insn]) -> (BTreeSet<u32>, bool) {
    let call = (BPF_JMP | BPF_CALL) as u8;
    let mut helpers = BTreeSet::new();
    let mut calls_functions = false;
    for insn in insns.iter().filter(|i| i.code == call) {
        if u32::from(insn.src_reg()) == BPF_PSEUDO_CALL {
            calls_functions = true;
        } else if insn.src_reg() == 0 && insn.imm > 0 {
            helpers.insert(insn.imm as u32);
        }
    }
    (helpers, calls_functions)
}

fn helper(id: u32) -> Option<BpfHelper> {
    if id == 0 || id >= bpf_func_id::__BPF_FUNC_MAX_ID as u32 {
        return None;
    }
    // SAFETY: bpf_func_id is a fieldless repr(u32) enum whose variants are every value
    // from 0 to __BPF_FUNC_MAX_ID, and `id` lies in that range.
    Some(unsafe { std::mem::transmute::<u32, bpf_func_id>(id) })
}

fn found(result: Result<bool, aya::programs::ProgramError>) -> Found {
    match result {
        Ok(true) => Found::Yes,
        Ok(false) => Found::No,
        Err(aya::programs::ProgramError::SyscallError(e)) => denied_or_failed(e.io_error.raw_os_error(), e.to_string()),
        Err(e) => Found::Failed(e.to_string()),
    }
}

fn denied_or_failed(errno: Option<i32>, text: String) -> Found {
    match errno {
        Some(e @ (libc::EPERM | libc::EACCES)) => Found::Denied(e),
        _ => Found::Failed(text),
    }
}
