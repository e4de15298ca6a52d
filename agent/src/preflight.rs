//! `metadata-guard check`: can the guard enforce on this node? Each check says what it
//! found and, when it fails, how to fix it. `run` performs the same checks and refuses
//! to start half-working.

use std::path::{Path, PathBuf};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

use crate::{cgroup, loader::pins};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Works, with a caveat worth knowing.
    Warn,
    /// Enforcement cannot work until this is fixed.
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Pass, detail: detail.into(), fix: None }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// The host-side table's probe (see `hostside::check`).
    pub fn host_side((ok, detail): (bool, String)) -> Check {
        if ok {
            Check::pass("host-side nf_tables", detail)
        } else {
            Check::fail(
                "host-side nf_tables",
                detail,
                "load nf_tables, nft_reject_inet, nft_log, nfnetlink_log, nft_limit (modprobe), or use a kernel with them",
            )
        }
    }
}

pub struct Inputs<'a> {
    pub cgroup: Option<&'a Path>,
    pub bpffs: &'a Path,
}

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_BPF: u32 = 39;

pub fn run(inputs: &Inputs<'_>) -> Vec<Check> {
    let mut checks = vec![kernel_version_check()];
    checks.push(match cgroup::resolve(inputs.cgroup) {
        Ok(path) => Check::pass("cgroup v2", format!("attaching to {}", path.display())),
        Err(e) => {
            Check::fail("cgroup v2", format!("{e:#}"), "mount cgroup2 or pass --cgroup with the host's cgroup2 root")
        }
    });
    checks.push(bpffs(inputs.bpffs));
    checks.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::pass("kernel BTF", "/sys/kernel/btf/vmlinux present")
    } else {
        Check::warn(
            "kernel BTF",
            "no /sys/kernel/btf/vmlinux",
            "not needed by the guard; bpftool shows less without it",
        )
    });
    checks.extend(capabilities());
    checks.push(program_support());
    for (name, map) in [("ring buffer map", MapType::RingBuf), ("LPM trie map", MapType::LpmTrie)] {
        checks.push(match is_map_supported(map) {
            Ok(true) => Check::pass(name, "supported"),
            Ok(false) => Check::fail(name, "not supported by this kernel", "use kernel 5.8 or newer"),
            Err(e) => Check::fail(name, format!("probe failed: {e}"), "run as root or with CAP_BPF"),
        });
    }
    for (name, helper) in [
        ("helper get_netns_cookie", BpfHelper::BPF_FUNC_get_netns_cookie),
        ("helper get_current_cgroup_id", BpfHelper::BPF_FUNC_get_current_cgroup_id),
        ("helper get_current_pid_tgid", BpfHelper::BPF_FUNC_get_current_pid_tgid),
        ("helper get_current_comm", BpfHelper::BPF_FUNC_get_current_comm),
        ("helper ringbuf_reserve", BpfHelper::BPF_FUNC_ringbuf_reserve),
    ] {
        checks.push(match is_helper_supported(ProgramType::CgroupSockAddr, helper) {
            Ok(true) => Check::pass(name, "available to cgroup sock_addr programs"),
            Ok(false) => Check::fail(name, "not available to cgroup sock_addr programs", "use kernel 5.8 or newer"),
            Err(e) => Check::fail(name, format!("probe failed: {e}"), "run as root or with CAP_BPF"),
        });
    }
    checks.push(netns_cookie());
    checks
}

pub fn has_failure(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.outcome == Outcome::Fail)
}

fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// (major, minor) of the running kernel; (0, 0) when unreadable.
pub fn kernel_version() -> (u32, u32) {
    let release = kernel_release();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn kernel_version_check() -> Check {
    let release = kernel_release();
    let version = kernel_version();
    if version >= (5, 10) {
        Check::pass("kernel version", release)
    } else if version >= (5, 8) {
        Check::warn("kernel version", release, "5.10 is the oldest kernel the guard is tested on")
    } else {
        Check::fail(
            "kernel version",
            release,
            "the guard needs cgroup bpf links, netns cookies and ring buffers: kernel 5.8+ (5.10+ tested)",
        )
    }
}

fn bpffs(root: &Path) -> Check {
    let parent = root.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
    if pins::is_bpffs(root) || pins::is_bpffs(&parent) {
        Check::pass("bpffs", format!("{} is on bpffs", root.display()))
    } else if parent.exists() {
        Check::warn(
            "bpffs",
            format!("{} is not on bpffs", parent.display()),
            format!("`run` mounts it; to do it yourself: mount -t bpf bpf {}", parent.display()),
        )
    } else {
        Check::fail(
            "bpffs",
            format!("{} does not exist", parent.display()),
            format!("create and mount it (mount -t bpf bpf {}) or pass --bpffs", parent.display()),
        )
    }
}

fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_string())))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .unwrap_or(0)
}

fn capabilities() -> Vec<Check> {
    let caps = effective_caps();
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    let mut checks = Vec::new();
    checks.push(if has(CAP_BPF) || has(CAP_SYS_ADMIN) {
        Check::pass("CAP_BPF", if has(CAP_BPF) { "held" } else { "CAP_SYS_ADMIN held (covers it)" })
    } else {
        Check::fail("CAP_BPF", "neither CAP_BPF nor CAP_SYS_ADMIN held", "grant CAP_BPF (kernel 5.8+) or run as root")
    });
    checks.push(if has(CAP_NET_ADMIN) {
        Check::pass("CAP_NET_ADMIN", "held (attaching cgroup socket programs needs it)")
    } else {
        Check::fail("CAP_NET_ADMIN", "not held", "grant CAP_NET_ADMIN: attaching cgroup socket programs needs it")
    });
    checks.push(if has(CAP_SYS_RESOURCE) {
        Check::pass("CAP_SYS_RESOURCE", "held (raises RLIMIT_MEMLOCK on kernels before 5.11)")
    } else {
        Check::warn(
            "CAP_SYS_RESOURCE",
            "not held",
            "kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK: grant it there",
        )
    });
    checks
}

fn program_support() -> Check {
    match is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => Check::pass("cgroup sock_addr programs", "supported"),
        Ok(false) => {
            Check::fail("cgroup sock_addr programs", "not supported", "use a kernel with CONFIG_CGROUP_BPF (5.10+)")
        }
        Err(e) => Check::fail("cgroup sock_addr programs", format!("probe failed: {e}"), "run as root or with CAP_BPF"),
    }
}

fn netns_cookie() -> Check {
    match crate::loader::netns_cookie::via_sockopt(None) {
        Ok(Some(_)) => Check::pass("host netns cookie", crate::loader::Mechanism::SoNetnsCookie.describe()),
        Ok(None) => Check::warn(
            "host netns cookie",
            crate::loader::Mechanism::ProbeProgram.describe(),
            "no SO_NETNS_COOKIE (5.14+): the agent must run inside the cgroup it attaches to (a DaemonSet pod does)",
        ),
        Err(e) => Check::fail("host netns cookie", format!("{e:#}"), "run the agent in the host network namespace"),
    }
}

pub fn print_human(checks: &[Check]) {
    for c in checks {
        let tag = match c.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        println!("[{tag}] {:<30} {}", c.name, c.detail);
        if let (Some(fix), Outcome::Fail | Outcome::Warn) = (&c.fix, c.outcome) {
            println!("       {:<30} fix: {fix}", "");
        }
    }
}
