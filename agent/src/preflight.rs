// SPDX-License-Identifier: Apache-2.0
//! `metadata-guard check`: can the guard enforce on this node? Each check says what it
//! found and, when it fails, how to fix it. `run` and `apply` perform the same checks
//! and refuse to start half-working; the kernel object they verify by their own load
//! (`before_load`, then `object_refused` to explain a refusal as `check` would).
//!
//! Two halves: `facts` probes the node with this process's privileges (every program
//! type, map type and helper of the embedded object, the object itself loaded, the
//! pins a restart adopts); `judge` turns those facts into checks, as plain data
//! logic that unit tests cover set-up by set-up.

mod capabilities;
mod facts;
#[cfg(test)]
mod tests;

use std::path::Path;

pub(crate) use facts::{Facts, Feature, Found, Pins};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    Pass,
    /// Works, with a caveat worth knowing.
    Warn,
    /// Enforcement cannot work until this is fixed.
    Fail,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check { name: name.into(), outcome: Outcome::Pass, detail: detail.into(), fix: None }
    }
    fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.into(), outcome: Outcome::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name: name.into(), outcome: Outcome::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// The host-side table's probe (see `hostside::check`).
    /// The uplink program: `detail` says how it would sit on the uplinks and which
    /// devices those are; `ok` false when none could get it.
    pub(crate) fn uplink((ok, detail): (bool, String)) -> Check {
        if ok {
            Check::pass("uplink (tc egress)", detail)
        } else {
            Check::fail(
                "uplink (tc egress)",
                detail,
                "load sch_clsact (sch_ingress on older kernels) and cls_bpf (modprobe), give the agent CAP_NET_ADMIN \
                 in the host network namespace (--host-netns), or pass --uplinks none to run without this point",
            )
        }
    }

    pub(crate) fn host_side((ok, detail): (bool, String)) -> Check {
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

pub(crate) struct Inputs<'a> {
    pub cgroup: Option<&'a Path>,
    pub bpffs: &'a Path,
    /// `run --mount-bpffs`: whether `run` mounts a missing bpffs itself.
    pub mount_bpffs: bool,
}

/// Capability bits (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The kernel that brought CAP_BPF, CAP_PERFMON, bpf_link for cgroups and ring buffers.
const KERNEL_BPF_CAPS: (u32, u32) = (5, 8);
/// The oldest kernel the scenarios run on.
const KERNEL_TESTED: (u32, u32) = (5, 10);
/// From this kernel on BPF memory is charged to the memory cgroup, not RLIMIT_MEMLOCK.
const KERNEL_MEMCG_ACCOUNTING: (u32, u32) = (5, 11);

/// The seccomp note every bpf(2) refusal under a filter gets.
const SECCOMP_FIX: &str = "a seccomp filter refuses bpf(2): runtimes' default profiles allow it to a CAP_BPF holder \
     only from containerd 1.6.9/1.7, CRI-O 1.31, Docker 23 and podman with containers-common 0.60 on (before: only to \
     CAP_SYS_ADMIN holders). Upgrade the runtime, or give the pod a Localhost seccomp profile that allows bpf";

/// `check`: every check, the kernel object loaded (and thrown away) among them.
pub(crate) fn run(inputs: &Inputs<'_>) -> Vec<Check> {
    checks(&facts::gather(inputs, true), inputs.bpffs)
}

/// `run` and `apply`: every check but the kernel object's, which their own load
/// proves right after; a refusal there is explained by [`object_refused`].
pub(crate) fn before_load(inputs: &Inputs<'_>) -> (Facts, Vec<Check>) {
    let facts = facts::gather(inputs, false);
    let checks = checks(&facts, inputs.bpffs);
    (facts, checks)
}

/// The checks of [`before_load`] with the kernel object refused as `e` says: a failed
/// load of `run` or `apply`, in the words (and with the fix) `check` would give.
pub(crate) fn object_refused(mut facts: Facts, bpffs: &Path, e: &crate::loader::ObjectRefused) -> Vec<Check> {
    facts.object = Some(Err(facts::refusal(e)));
    checks(&facts, bpffs)
}

fn checks(facts: &Facts, bpffs: &Path) -> Vec<Check> {
    let mut checks = judge(facts);
    checks.push(installed(bpffs));
    checks
}

/// The checks, from what was found. Pure: no kernel, no files.
pub(crate) fn judge(f: &Facts) -> Vec<Check> {
    let has = |bit: u32| f.caps & (1u64 << bit) != 0;
    let mut checks = vec![kernel_check(f)];
    checks.push(match &f.cgroup {
        Ok(path) => Check::pass("cgroup v2", format!("attaching to {}", path.display())),
        Err(e) => Check::fail("cgroup v2", e, "mount cgroup2 or pass --cgroup with the host's cgroup2 root"),
    });
    checks.push(bpffs_check(f));
    checks.push(if f.btf {
        Check::pass("kernel BTF", "/sys/kernel/btf/vmlinux present")
    } else {
        Check::warn(
            "kernel BTF",
            "no /sys/kernel/btf/vmlinux",
            "not needed by the guard; bpftool shows less without it",
        )
    });
    checks.extend(capabilities::checks(f, &has));
    let denied_under_seccomp = |found: &Found| matches!(found, Found::Denied(_)) && f.seccomp_filter && has(CAP_BPF);
    let all_denied = f.probes.iter().all(|(_, found)| matches!(found, Found::Denied(_)));
    match f.probes.first() {
        // One refusal says it all when bpf(2) itself is refused.
        Some((_, found)) if all_denied => {
            let mut check = probe_check(f, &has, &Feature::Map("any".into()), found, denied_under_seccomp(found));
            check.name = "bpf(2)".into();
            check.detail = format!("{} for every probe", check.detail);
            checks.push(check);
        }
        _ => {
            for (feature, found) in &f.probes {
                checks.push(probe_check(f, &has, feature, found, denied_under_seccomp(found)));
            }
        }
    }
    checks.extend(f.object.as_ref().map(|object| match object {
        Ok(()) => Check::pass("kernel object", "every map created and every program verified with these privileges"),
        Err((errno, e)) => {
            let e = &verifier_reason(e);
            let fix = if *errno == Some(libc::EPERM) && f.seccomp_filter {
                SECCOMP_FIX.to_string()
            } else {
                "see the failed checks above; `metadata-guard check --json` has the kernel's words".to_string()
            };
            Check::fail("kernel object", e.as_str(), fix)
        }
    }));
    checks.push(pins_check(f));
    checks.push(match &f.netns_sockopt {
        Ok(true) => Check::pass("host netns cookie", crate::loader::Mechanism::SoNetnsCookie.describe()),
        Ok(false) => Check::warn(
            "host netns cookie",
            crate::loader::Mechanism::ProbeProgram.describe(),
            "no SO_NETNS_COOKIE (5.14+): the agent must run inside the cgroup it attaches to (a DaemonSet pod does)",
        ),
        Err(e) => Check::fail("host netns cookie", e, "run the agent in the host network namespace"),
    });
    // Both are complete; the marks cost a program run on every socket any process creates.
    checks.push(Check::pass("packet backstop", f.backstop.describe()));
    checks
}

/// A verifier refusal without its whole log: what was refused, and the verifier's
/// last word (the line before its statistics).
fn verifier_reason(e: &str) -> String {
    let Some((head, log)) = e.split_once("Verifier output:") else { return e.to_string() };
    let lines: Vec<&str> = log.lines().collect();
    let stats = lines.iter().position(|l| l.starts_with("verification time")).unwrap_or(lines.len());
    let reason = stats.checked_sub(1).and_then(|i| lines.get(i)).copied().unwrap_or("").trim();
    format!("{}: {reason}", head.trim().trim_end_matches('.'))
}

fn kernel_check(f: &Facts) -> Check {
    let release = f.kernel_release.clone();
    if f.kernel >= KERNEL_TESTED {
        Check::pass("kernel version", release)
    } else if f.kernel >= KERNEL_BPF_CAPS {
        Check::warn("kernel version", release, "5.10 is the oldest kernel the guard is tested on")
    } else {
        Check::fail(
            "kernel version",
            release,
            "the guard needs cgroup bpf links, netns cookies and ring buffers: kernel 5.8+ (5.10+ tested)",
        )
    }
}

fn bpffs_check(f: &Facts) -> Check {
    let parent = f.bpffs_parent.display();
    if f.on_bpffs {
        return Check::pass("bpffs", format!("{} is on bpffs", f.bpffs_root.display()));
    }
    if !f.bpffs_parent_exists {
        return Check::fail(
            "bpffs",
            format!("{parent} does not exist"),
            format!("create and mount it (mount -t bpf bpf {parent}) or pass --bpffs"),
        );
    }
    if f.mount_bpffs && f.caps & (1 << CAP_SYS_ADMIN) == 0 {
        Check::fail(
            "bpffs",
            format!("{parent} is not on bpffs, and mounting it (--mount-bpffs=true) needs CAP_SYS_ADMIN, not held"),
            format!("mount bpffs on the host (mount -t bpf bpf {parent}, or systemd's sys-fs-bpf.mount)"),
        )
    } else if f.mount_bpffs {
        Check::warn(
            "bpffs",
            format!("{parent} is not on bpffs"),
            format!(
                "`run` mounts bpffs on {parent} (--mount-bpffs=true); in a container that mount dies with it, and the \
                 pins with it: mount it on the host instead (mount -t bpf bpf {parent})"
            ),
        )
    } else {
        Check::fail(
            "bpffs",
            format!("{parent} is not on bpffs, and with --mount-bpffs=false `run` will not mount it"),
            format!(
                "mount bpffs on the host (mount -t bpf bpf {parent}, or systemd's sys-fs-bpf.mount), so that the pins \
                 outlive the agent's container"
            ),
        )
    }
}

fn probe_check(f: &Facts, has: &dyn Fn(u32) -> bool, feature: &Feature, found: &Found, seccomp: bool) -> Check {
    let (name, newer) = match feature {
        Feature::Program(kind) => (format!("{} programs", kind.name()), "use kernel 5.10+ with CONFIG_CGROUP_BPF"),
        Feature::Map(map) => (format!("{map} map"), "use kernel 5.10+"),
        Feature::Helper(helper, kind) => (format!("helper {helper} ({})", kind.name()), "use kernel 5.10+"),
        Feature::Object(what) => (format!("kernel object ({what})"), "use kernel 5.10+"),
    };
    let is_comm = matches!(feature, Feature::Helper(h, _) if h == "get_current_comm");
    match found {
        Found::Yes => Check::pass(name, "supported"),
        // Helpers the kernel hides from processes without CAP_PERFMON look unknown.
        Found::No if is_comm && !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) => Check::fail(
            name,
            "not offered to this process",
            "grant CAP_PERFMON: the kernel offers bpf_get_current_comm only to CAP_PERFMON holders",
        ),
        Found::No if f.kernel < KERNEL_TESTED => Check::fail(name, "not supported by this kernel", newer),
        Found::No => {
            Check::fail(name, "not supported by this kernel", "a kernel built with BPF and cgroup BPF (5.10+)")
        }
        Found::Denied(errno) => {
            let detail = format!("the kernel refused the probe: {}", std::io::Error::from_raw_os_error(*errno));
            let fix = if seccomp {
                SECCOMP_FIX.to_string()
            } else if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
                "grant CAP_BPF".to_string()
            } else {
                "an LSM (SELinux, AppArmor) or kernel.unprivileged_bpf_disabled may refuse bpf(2); see the audit log"
                    .to_string()
            };
            Check::fail(name, detail, fix)
        }
        Found::Failed(e) => Check::fail(name, format!("probe failed: {e}"), "report this with `check --json`"),
    }
}

fn pins_check(f: &Facts) -> Check {
    const NAME: &str = "pinned links";
    match &f.pins {
        Pins::None => Check::pass(NAME, "none yet: `run` attaches and pins its own"),
        Pins::Unreadable(e) => Check::fail(
            NAME,
            e,
            "give the agent read-write access to its --bpffs directory (root-owned pins: runAsUser 0)",
        ),
        Pins::Readable(hooks) => {
            let elsewhere: Vec<&str> =
                hooks.iter().filter(|(_, id, _)| Some(*id) != f.cgroup_id).map(|(h, _, _)| *h).collect();
            let unknown = hooks.iter().filter(|(_, _, known)| !known).count();
            if !elsewhere.is_empty() {
                Check::warn(
                    NAME,
                    format!("{} attached to another cgroup than this one", elsewhere.join(", ")),
                    "`run` attaches to this cgroup first, then removes those links (no gap)",
                )
            } else if unknown > 0 {
                Check::warn(
                    NAME,
                    format!("{unknown} of {} links have no program pinned beside them (an older agent)", hooks.len()),
                    "`run` swaps their programs in place (BPF_LINK_UPDATE) and pins them",
                )
            } else {
                Check::pass(
                    NAME,
                    format!("{} links readable: `run` adopts them (same tag: kept; else swapped)", hooks.len()),
                )
            }
        }
    }
}

pub(crate) fn has_failure(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.outcome == Outcome::Fail)
}

fn kernel_release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// (major, minor) of the running kernel; (0, 0) when unreadable.
pub(crate) fn kernel_version() -> (u32, u32) {
    let release = kernel_release();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

pub(crate) fn print_human(checks: &[Check]) {
    for c in checks {
        let tag = match c.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        println!("[{tag}] {:<44} {}", c.name, c.detail);
        if let (Some(fix), Outcome::Fail | Outcome::Warn) = (&c.fix, c.outcome) {
            println!("       {:<44} fix: {fix}", "");
        }
    }
}

/// Whether enforcement is already in the kernel (e.g. put there at boot by `apply`),
/// and by which command and version: informational, never a failure.
fn installed(root: &Path) -> Check {
    use crate::loader::{origin, pins::PinLayout};
    let layout = PinLayout::new(root);
    let (installed_by, updated_by) =
        (origin::read(&layout, origin::INSTALLED_BY), origin::read(&layout, origin::UPDATED_BY));
    match (layout.links_dir().exists(), installed_by) {
        (false, _) => Check::pass("installed", format!("nothing pinned under {} yet", root.display())),
        (true, Some(by)) => {
            let at_boot = if by.command == "apply" { " at boot" } else { "" };
            let updated = updated_by.filter(|u| *u != by).map(|u| format!(", last updated by {u}")).unwrap_or_default();
            Check::pass("installed", format!("enforcement is pinned: installed{at_boot} by {by}{updated}"))
        }
        (true, None) => Check::pass("installed", "enforcement is pinned (by a version that does not record itself)"),
    }
}
