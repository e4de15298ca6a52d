// SPDX-License-Identifier: Apache-2.0
//! Reading a guest console log: the kernel release, `metadata-guard check`'s lines,
//! each scenario's result and the end marker with mg-scenarios' exit code.

use super::initramfs::MARK;

#[derive(Debug, Default)]
pub(super) struct Console {
    /// `uname -r` in the guest.
    pub release: Option<String>,
    /// `/proc/sys/net/core/bpf_jit_enable` in the guest.
    pub jit: Option<String>,
    /// `check`'s lines as (tag, rest): `("ok", "host netns cookie   getsockopt(…)")`.
    pub checks: Vec<(String, String)>,
    pub results: Vec<ScenarioResult>,
    /// What follows `end rc=`: mg-scenarios' exit code, or `setup-failed`.
    pub end: Option<String>,
    /// Init script lines reporting a failed setup step (mount, insmod).
    pub setup_failures: Vec<String>,
    /// The guest kernel's own reports of a fault: soft lockups, BUGs, oopses, panics.
    pub kernel_faults: Vec<String>,
}

/// What the kernel prints, after its timestamp, when it faults.
const KERNEL_FAULTS: &[&str] = &["watchdog: BUG:", "BUG:", "Oops:", "Kernel panic - not syncing:"];

/// `[   44.708990] watchdog: BUG: soft lockup - …` → `watchdog: BUG: soft lockup - …`.
fn kernel_fault(line: &str) -> Option<&str> {
    let text = line.strip_prefix('[')?.split_once("] ")?.1;
    KERNEL_FAULTS.iter().any(|f| text.starts_with(f)).then_some(text)
}

#[derive(Debug, PartialEq)]
pub(super) struct ScenarioResult {
    pub name: String,
    pub passed: bool,
    pub millis: u64,
    pub reason: Option<String>,
}

impl Console {
    pub(super) fn parse(log: &str) -> Console {
        let mut c = Console::default();
        let mut in_check = false;
        for line in log.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(m) = line.strip_prefix(MARK).map(str::trim) {
                if let Some(r) = m.strip_prefix("kernel ") {
                    c.release = Some(r.to_string());
                } else if let Some(j) = m.strip_prefix("bpf_jit_enable ") {
                    c.jit = Some(j.to_string());
                } else if m == "check begin" {
                    in_check = true;
                } else if m == "check end" {
                    in_check = false;
                } else if let Some(rc) = m.strip_prefix("end rc=") {
                    c.end = Some(rc.to_string());
                } else if m.starts_with("setup step failed") {
                    c.setup_failures.push(m.to_string());
                }
            } else if in_check {
                // `[ok  ] name  detail`, `[warn] …`, `[FAIL] …`
                if let Some((tag, rest)) = line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
                    c.checks.push((tag.trim().to_string(), rest.trim().to_string()));
                }
            } else if let Some(r) = scenario_result(line) {
                c.results.push(r);
            } else if let Some(f) = kernel_fault(line) {
                c.kernel_faults.push(f.to_string());
            }
        }
        c
    }

    /// The detail `check` printed for the check called `name`, with its tag.
    pub(super) fn check(&self, name: &str) -> Option<(&str, &str)> {
        self.checks.iter().find_map(|(tag, rest)| Some((tag.as_str(), rest.strip_prefix(name)?.trim())))
    }
}

/// `ok   <name> (N ms)` or `FAIL <name> (N ms): reason`. Names may hold parentheses
/// themselves, so the timing is the first ` (N ms)` that ends the line or precedes `: `.
fn scenario_result(line: &str) -> Option<ScenarioResult> {
    let (passed, rest) =
        if let Some(r) = line.strip_prefix("ok   ") { (true, r) } else { (false, line.strip_prefix("FAIL ")?) };
    let mut from = 0;
    while let Some(i) = rest[from..].find(" (").map(|i| i + from) {
        let after = &rest[i + 2..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if let Some(tail) = after[digits..].strip_prefix(" ms)").filter(|_| digits > 0) {
            let reason = if passed {
                tail.is_empty().then_some(None)
            } else {
                tail.strip_prefix(": ").map(|r| Some(r.to_string()))
            };
            if let Some(reason) = reason {
                let millis = after[..digits].parse().ok()?;
                return Some(ScenarioResult { name: rest[..i].to_string(), passed, millis, reason });
            }
        }
        from = i + 2;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_results_checks_and_markers() {
        let log = "[    0.1] Linux version 6.1\r\n\
            mg-vm: kernel 6.1.0-50-cloud-amd64\r\n\
            mg-vm: bpf_jit_enable 1\r\n\
            mg-vm: check begin\r\n\
            [ok  ] host netns cookie              getsockopt(SO_NETNS_COOKIE) (kernel 5.14+)\r\n\
            [warn] kernel BTF                     no /sys/kernel/btf/vmlinux\r\n\
            mg-vm: check end\r\n\
            ok   block: every pod layout is refused (containerd, CRI-O, cgroupfs) (812 ms)\r\n\
            FAIL block: the probe (kernels before 5.14) judges (3 ms): expected EPERM (got 0)\r\n\
            scenarios: 1 passed, 1 failed\r\n\
            mg-vm: end rc=1\r\n";
        let c = Console::parse(log);
        assert_eq!(c.release.as_deref(), Some("6.1.0-50-cloud-amd64"));
        assert_eq!(c.jit.as_deref(), Some("1"));
        assert_eq!(c.end.as_deref(), Some("1"));
        assert_eq!(c.check("host netns cookie"), Some(("ok", "getsockopt(SO_NETNS_COOKIE) (kernel 5.14+)")));
        assert_eq!(c.check("kernel BTF").map(|c| c.0), Some("warn"));
        assert_eq!(
            c.results,
            vec![
                ScenarioResult {
                    name: "block: every pod layout is refused (containerd, CRI-O, cgroupfs)".into(),
                    passed: true,
                    millis: 812,
                    reason: None
                },
                ScenarioResult {
                    name: "block: the probe (kernels before 5.14) judges".into(),
                    passed: false,
                    millis: 3,
                    reason: Some("expected EPERM (got 0)".into())
                },
            ]
        );
    }

    #[test]
    fn a_soft_lockup_and_the_panic_it_ends_in_are_kernel_faults() {
        let log = "ok   lifecycle: check names a missing bpffs (40 ms)\r\n\
            [   44.708990] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [metadata-guard:542]\r\n\
            [   44.711690] RIP: 0010:inet_release+0x1c/0x80\r\n\
            [   44.720000] Kernel panic - not syncing: softlockup: hung tasks\r\n\
            [    2.603901] bridge: filtering via arp/ip/ip6tables is no longer available\r\n";
        let c = Console::parse(log);
        assert_eq!(
            c.kernel_faults,
            [
                "watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [metadata-guard:542]",
                "Kernel panic - not syncing: softlockup: hung tasks"
            ]
        );
        assert_eq!(c.results.len(), 1);
    }

    #[test]
    fn ignores_lines_that_only_look_like_results() {
        assert_eq!(scenario_result("ok   half a line"), None);
        assert_eq!(scenario_result("okay (12 ms)"), None);
    }
}
