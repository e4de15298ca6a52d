// SPDX-License-Identifier: Apache-2.0
//! The matrix's results: each scenario per kernel, and what each kernel supports,
//! derived only from which scenarios passed and what `check` said — printed, and
//! written to docs/kernels.md when every kernel ran.

use std::{fmt::Write as _, time::Duration};

use super::console::Console;

/// One kernel's run, as the host saw it.
pub(super) struct KernelRun {
    /// `5.10 amd64`, `6.1 arm64`: the kernel version and the architecture.
    pub name: String,
    /// Debian package and version, e.g. `linux-image-6.1.0-50-cloud-amd64 6.1.176-1`.
    pub package: String,
    /// The sha256 of the agent the guest ran: the image's file for its architecture.
    pub agent_sha256: String,
    /// `mg-scenarios --filter` in the guest; None: every scenario.
    pub filter: Option<&'static str>,
    pub console: Console,
    pub console_log: String,
    pub elapsed: Duration,
    pub timed_out: bool,
    pub qemu_failed: Option<std::process::ExitStatus>,
}

impl KernelRun {
    fn result(&self, scenario: &str) -> Option<&super::console::ScenarioResult> {
        self.console.results.iter().find(|r| r.name == scenario)
    }

    /// Whether this kernel's guest was to run `scenario`.
    fn expects(&self, scenario: &str) -> bool {
        self.filter.is_none_or(|f| scenario.contains(f))
    }

    /// Why this kernel's run failed, if it did.
    pub(super) fn problems(&self, scenarios: &[String]) -> Vec<String> {
        let mut p = Vec::new();
        if self.timed_out {
            p.push(format!("the VM passed its deadline after {:.0?} and was killed", self.elapsed));
        }
        if let Some(status) = self.qemu_failed {
            p.push(format!("qemu failed ({status}); its errors end the console log"));
        }
        p.extend(self.console.setup_failures.iter().cloned());
        // The first fault names the stuck or crashing task; the rest follow from it.
        if let Some(fault) = self.console.kernel_faults.first() {
            p.push(format!("the guest kernel reported `{fault}` (the trace follows it in the console log)"));
        }
        let failed = self.console.results.iter().filter(|r| !r.passed).count();
        if failed > 0 {
            p.push(format!("{failed} scenario(s) failed"));
        }
        let missing = scenarios.iter().filter(|s| self.expects(s) && self.result(s).is_none()).count();
        if missing > 0 {
            p.push(format!("{missing} scenario(s) reported no result"));
        }
        match self.console.end.as_deref() {
            Some("0") => {}
            // A non-zero exit is explained by the failures listed above.
            Some(_) if failed > 0 => {}
            Some(rc) => p.push(format!("mg-scenarios ended with rc={rc}")),
            None => p.push("no end marker: the guest stopped before mg-scenarios finished".to_string()),
        }
        p
    }
}

/// A capability and the scenarios that prove it.
struct Capability {
    title: &'static str,
    proven_by: fn(&str) -> bool,
}

const CAPABILITIES: &[Capability] = &[
    Capability { title: "socket hooks (connect/sendmsg)", proven_by: |s| s.starts_with("block: pod is refused") },
    Capability {
        title: "packet backstop (sock_create + cgroup_skb egress)",
        proven_by: |s| s.starts_with("backstop:"),
    },
    Capability { title: "ring buffer events", proven_by: |s| s.starts_with("trail:") && s.contains("record") },
    Capability {
        title: "pinning, atomic replace (BPF_LINK_UPDATE)",
        proven_by: |s| s.starts_with("lifecycle:") && (s.contains("upgraded") || s.contains("SIGKILL")),
    },
];

/// Scenarios that show the host's sockets are told apart from the pods'.
fn proves_cookie(s: &str) -> bool {
    s.starts_with("block: host-network process") || s.contains("netns cookie")
}

fn capability_cell(run: &KernelRun, proven_by: fn(&str) -> bool) -> String {
    let matched: Vec<_> = run.console.results.iter().filter(|r| proven_by(&r.name)).collect();
    let failed = matched.iter().filter(|r| !r.passed).count();
    match (matched.len(), failed) {
        (0, _) => "not tested".to_string(),
        (n, 0) => format!("yes ({n}/{n} scenarios)"),
        (n, f) => format!("**no** ({f} of {n} scenarios fail)"),
    }
}

fn cookie_cell(run: &KernelRun) -> String {
    let mechanism = match run.console.check("host netns cookie") {
        Some((_, detail)) if detail.contains("SO_NETNS_COOKIE") => "SO_NETNS_COOKIE",
        Some((_, detail)) if detail.contains("probe") => "probe program",
        Some((_, detail)) => detail,
        None => "not reported by check",
    };
    format!("{mechanism}: {}", capability_cell(run, proves_cookie))
}

/// The capability table and the per-scenario table, as Markdown.
pub(super) fn markdown(runs: &[KernelRun], scenarios: &[String]) -> String {
    let mut md = String::new();
    md.push_str("| kernel | Debian package |");
    for c in CAPABILITIES {
        let _ = write!(md, " {} |", c.title);
    }
    md.push_str(" host netns cookie | BPF JIT | scenarios passed |\n|---|---|");
    md.push_str(&"---|".repeat(CAPABILITIES.len() + 3));
    md.push('\n');
    for run in runs {
        let release = run.console.release.as_deref().unwrap_or("did not boot");
        let _ = write!(md, "| {} ({release}) | {} |", run.name, run.package);
        for c in CAPABILITIES {
            let _ = write!(md, " {} |", capability_cell(run, c.proven_by));
        }
        let passed = run.console.results.iter().filter(|r| r.passed).count();
        let expected = scenarios.iter().filter(|s| run.expects(s)).count();
        let jit = match run.console.jit.as_deref() {
            Some("0") => "off (interpreter)",
            Some("1" | "2") => "on",
            Some(other) => other,
            None => "not reported",
        };
        let _ = writeln!(md, " {} | {jit} | {passed}/{expected} |", cookie_cell(run));
    }

    md.push_str("\n| scenario |");
    for run in runs {
        let _ = write!(md, " {} |", run.name);
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(runs.len()));
    md.push('\n');
    for s in scenarios {
        let _ = write!(md, "| {} |", s.replace('|', "\\|"));
        for run in runs {
            let cell = match run.result(s) {
                Some(r) if r.passed => format!("ok ({:.1} s)", r.millis as f64 / 1000.0),
                Some(_) => "**FAIL**".to_string(),
                None if run.expects(s) => "**no result**".to_string(),
                None => "not in subset".to_string(),
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    md
}

/// What the terminal shows after the run: per kernel, its timing, and every failure
/// with its reason and where the console log is.
pub(super) fn summary(runs: &[KernelRun], scenarios: &[String]) -> String {
    let mut s = String::new();
    for run in runs {
        let passed = run.console.results.iter().filter(|r| r.passed).count();
        let expected = scenarios.iter().filter(|s| run.expects(s)).count();
        let _ = writeln!(
            s,
            "{:>10}: {} ({}), {passed}/{expected} scenarios passed, VM ran {:.0?}; console: {}",
            run.name,
            run.console.release.as_deref().unwrap_or("did not boot"),
            run.package,
            run.elapsed,
            run.console_log
        );
        for r in run.console.results.iter().filter(|r| !r.passed) {
            let _ = writeln!(s, "       FAIL {}: {}", r.name, r.reason.as_deref().unwrap_or(""));
        }
        for p in run.problems(scenarios) {
            let _ = writeln!(s, "       problem: {p}");
        }
    }
    s
}

/// docs/kernels.md: the tables, and how they were made.
pub(super) fn document(runs: &[KernelRun], scenarios: &[String], date: &str) -> String {
    let kernels: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    format!(
        "# Supported kernels\n\n\
         Written by `cargo xtask vm-test` ({date}) from its own run; do not edit by hand.\n\n\
         Each kernel is a Debian cloud kernel package ({kernels}) booted under QEMU with an \
         initramfs holding busybox, the agent (and its test variant) and `mg-scenarios`; \
         the guest runs `metadata-guard check` and then the real-kernel scenarios. amd64 \
         guests are `qemu-system-x86_64 -accel tcg,thread=single` (one host thread for \
         both vCPUs: with one each, a jump label the guest kernel patched could stay stale \
         in the other vCPU's translated code), arm64 guests `qemu-system-aarch64 -machine virt \
         -cpu neoverse-n1` (the core of Graviton2 and Ampere Altra). The agent in each guest \
         is the release binary copied out of that architecture's image in the \
         `localhost/metadata-guard:dev` manifest list (its sha256 below). A \
         capability is *yes* when every scenario that exercises it passed on that kernel: \
         socket hooks — the `block: pod is refused …` scenarios; packet backstop — every \
         `backstop:` scenario; ring buffer events — the `trail:` scenarios about records; \
         pinning and atomic replace — the `lifecycle:` scenarios that kill, restart and \
         upgrade the agent. The host netns cookie mechanism is what `check` reported, \
         proven by the host-network and probe-cookie scenarios. QEMU emulates the guest \
         (TCG), so the scenarios' timing budgets are multiplied by {scale} \
         (`mg-scenarios --time-scale {scale}`); times below are the emulated ones.\n\n{}\n{}{}",
        markdown(runs, scenarios),
        runs_table(runs),
        failures(runs),
        kernels = kernels.join(", "),
        scale = super::initramfs::TIME_SCALE,
    )
}

/// Per guest: which scenarios it ran, how long the VM took, and the agent it tested.
fn runs_table(runs: &[KernelRun]) -> String {
    let mut s = String::from(
        "| guest | scenarios | VM time (boot to poweroff) | agent sha256 (from the image) |\n|---|---|---|---|\n",
    );
    for run in runs {
        let subset = run.filter.map_or_else(|| "all".to_string(), |f| format!("those matching `{f}`"));
        let _ =
            writeln!(s, "| {} | {subset} | {:.0} s | `{}` |", run.name, run.elapsed.as_secs_f64(), run.agent_sha256);
    }
    s
}

/// Each failed scenario with the first line of its reason, so the table's FAIL cells
/// explain themselves without the console logs.
fn failures(runs: &[KernelRun]) -> String {
    let mut s = String::new();
    for run in runs {
        for r in run.console.results.iter().filter(|r| !r.passed) {
            let reason = r.reason.as_deref().and_then(|r| r.lines().next()).unwrap_or("");
            let _ = writeln!(s, "- {}: {} — {reason}", run.name, r.name);
        }
    }
    if s.is_empty() {
        return s;
    }
    format!("\nFailures in this run:\n\n{s}")
}
