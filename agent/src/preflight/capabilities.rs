// SPDX-License-Identifier: Apache-2.0
//! The capability checks: what the agent holds, against what loading and attaching
//! cgroup programs take on this kernel.

use super::{
    facts::Feature, Check, Facts, Found, CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_RESOURCE,
    KERNEL_BPF_CAPS, KERNEL_MEMCG_ACCOUNTING,
};

pub(super) fn checks(f: &Facts, has: &dyn Fn(u32) -> bool) -> Vec<Check> {
    let mut checks = Vec::new();
    let old_kernel = f.kernel < KERNEL_BPF_CAPS;
    checks.push(match (has(CAP_BPF), has(CAP_SYS_ADMIN)) {
        (true, _) if !old_kernel => Check::pass("CAP_BPF", "held"),
        (_, true) => Check::pass("CAP_BPF", "CAP_SYS_ADMIN held (covers it)"),
        (true, false) => Check::fail(
            "CAP_BPF",
            "held, but this kernel predates CAP_BPF (5.8) and asks for CAP_SYS_ADMIN",
            "use kernel 5.10+",
        ),
        (false, false) => Check::fail("CAP_BPF", "neither CAP_BPF nor CAP_SYS_ADMIN held", "grant CAP_BPF"),
    });
    checks.push(if has(CAP_NET_ADMIN) {
        Check::pass("CAP_NET_ADMIN", "held (loading and attaching cgroup socket programs)")
    } else {
        Check::fail(
            "CAP_NET_ADMIN",
            "not held",
            "grant CAP_NET_ADMIN: loading and attaching cgroup socket programs needs it",
        )
    });
    let comm_offered = f.probes.iter().any(|(feature, found)| {
        matches!(feature, Feature::Helper(h, _) if h == "get_current_comm") && *found == Found::Yes
    });
    checks.push(if has(CAP_PERFMON) || has(CAP_SYS_ADMIN) {
        Check::pass("CAP_PERFMON", if has(CAP_PERFMON) { "held" } else { "CAP_SYS_ADMIN held (covers it)" })
    } else if comm_offered {
        Check::pass("CAP_PERFMON", "not held; this kernel offers bpf_get_current_comm without it")
    } else {
        Check::fail(
            "CAP_PERFMON",
            "not held",
            "grant CAP_PERFMON: without it the verifier refuses the programs' pointer arithmetic on map values \
             (its Spectre hardening for loaders without CAP_PERFMON), and this kernel hides bpf_get_current_comm \
             (the audit trail's `comm`)",
        )
    });
    checks.push(if has(CAP_SYS_RESOURCE) {
        Check::pass("CAP_SYS_RESOURCE", "held (raises RLIMIT_MEMLOCK on kernels before 5.11)")
    } else if f.kernel >= KERNEL_MEMCG_ACCOUNTING {
        Check::pass(
            "CAP_SYS_RESOURCE",
            "not held; not needed from 5.11 on (BPF memory is charged to the memory cgroup)",
        )
    } else if f.memlock.is_none() {
        Check::pass("CAP_SYS_RESOURCE", "not held; RLIMIT_MEMLOCK is unlimited here")
    } else {
        Check::fail(
            "CAP_SYS_RESOURCE",
            format!("not held, and RLIMIT_MEMLOCK is {} KiB", f.memlock.unwrap_or(0) / 1024),
            "kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK: grant CAP_SYS_RESOURCE (the agent raises it)",
        )
    });
    if has(CAP_SYS_ADMIN) {
        checks.push(Check::pass("CAP_SYS_ADMIN", "held, and not needed: the DaemonSet does not grant it"));
    }
    checks
}
