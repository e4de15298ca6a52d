// SPDX-License-Identifier: Apache-2.0
//! `cargo xtask test`: every test, in the order that fails fastest.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{
    artifacts::{self, Profile, Variant},
    cmd, packages, workspace_root,
};

/// Where a guard installed on this machine pins itself (the agent's default --bpffs).
const MACHINE_PINS: &str = "/sys/fs/bpf/metadata-guard";

pub(crate) fn run() -> Result<()> {
    refuse_when_installed(std::path::Path::new(MACHINE_PINS))?;
    artifacts::build_ebpf(Variant::Default)?;
    artifacts::build_ebpf(Variant::Test)?;
    let agent = artifacts::build_agent(Profile::Debug, Variant::Default)?;
    let variant_agent = artifacts::build_agent(Profile::Debug, Variant::Test)?;
    // What the tests need but cannot install themselves (`cargo test` installs nothing).
    packages::ensure(&[packages::BPFTOOL, packages::PROMTOOL, packages::IPTABLES, packages::SYSTEMD_ANALYZE])?;
    packages::ensure_python(&[packages::KUBERNETES_VALIDATE])?;

    lint()?;
    cmd::run(Command::new("cargo").current_dir(workspace_root()).args(["test", "--workspace"]))
        .context("unit tests failed")?;

    let scenarios = artifacts::build_test_program("mg-scenarios", Profile::Debug)?;
    let mut run_scenarios = Command::new(&scenarios);
    run_scenarios.arg("--agent").arg(&agent).arg("--variant-agent").arg(&variant_agent);
    if !kernel_has_ipvs() {
        eprintln!(
            "xtask: this kernel has no IPVS ({PROC_IPVS} is missing after `modprobe ip_vs`); its scenario runs \
             in the VM matrix below"
        );
        run_scenarios.arg("--without-ipvs");
    }
    if !kernel_has_ipvlan() {
        eprintln!(
            "xtask: this kernel has no ipvlan (no /sys/module/ipvlan after `modprobe ipvlan`, no CONFIG_IPVLAN=y); \
             the ipvlan uplink scenario runs in the VM matrix below (Debian 5.10 and 6.1)"
        );
        run_scenarios.arg("--without-ipvlan");
    }
    cmd::run(&mut run_scenarios).context("real-kernel scenarios failed")?;
    crate::image::smoke().context("the image smoke test (cargo xtask smoke) failed")?;
    crate::bench::run(true, None).context("the quick benchmark (cargo xtask bench --quick) failed")?;
    crate::vm::run(&crate::vm::select("all", "all")?, None)
        .context("the kernel matrix (cargo xtask vm-test) failed")?;
    Ok(())
}

/// `cargo xtask lint`: the workspace's lints (`[workspace.lints]` in Cargo.toml) as
/// errors, rustfmt's layout, clippy on the eBPF crate (outside the workspace: its own
/// target and `core`), and cargo-deny's license and duplicate checks (deny.toml),
/// offline, on both lock files.
pub(crate) fn lint() -> Result<()> {
    crate::toolchain::ensure_lint_tools()?;
    cmd::run(Command::new("cargo").current_dir(workspace_root()).args(["fmt", "--all", "--check"]))
        .context("rustfmt would change the layout shown above; run `cargo fmt --all` and commit the result")?;
    cmd::run(Command::new("cargo").current_dir(workspace_root()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy found the problems shown above; fix them (or `cargo clippy --fix`) and run again")?;
    artifacts::clippy_ebpf()?;
    deny()
}

/// `cargo deny check licenses bans` without the network: the licenses are those deny.toml
/// allows, and a crate in two versions is reported (as a warning).
fn deny() -> Result<()> {
    let deny = crate::toolchain::ensure_cargo_deny()?;
    let root = workspace_root();
    for manifest in [root.join("Cargo.toml"), root.join("ebpf/Cargo.toml")] {
        cmd::run(
            Command::new(&deny)
                .current_dir(&root)
                .args(["deny", "--offline", "--locked", "--manifest-path"])
                .arg(&manifest)
                .arg("--config")
                .arg(root.join("deny.toml"))
                .args(["check", "licenses", "bans"]),
        )
        .with_context(|| {
            format!(
                "cargo deny found the problems shown above in {}'s dependencies; allow a license in deny.toml \
                 only when it suits the crate's own license",
                artifacts::relative(&manifest)
            )
        })?;
    }
    Ok(())
}

const PROC_IPVS: &str = "/proc/net/ip_vs";

/// Loads IPVS where it is a module; kernels built without it (CONFIG_IP_VS unset) have
/// none to load, and the VM guests' Debian kernels run the IPVS scenario instead.
fn kernel_has_ipvs() -> bool {
    if !std::path::Path::new(PROC_IPVS).exists() {
        let _ = Command::new("modprobe").args(["-q", "ip_vs"]).status();
    }
    std::path::Path::new(PROC_IPVS).exists()
}

/// Loads ipvlan where it is a module; a built-in one shows in the kernel's config.
fn kernel_has_ipvlan() -> bool {
    let _ = Command::new("modprobe").args(["-q", "ipvlan"]).status();
    if std::path::Path::new("/sys/module/ipvlan").exists() {
        return true;
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    std::fs::read_to_string(format!("/boot/config-{}", release.trim()))
        .is_ok_and(|config| config.lines().any(|l| l == "CONFIG_IPVLAN=y"))
}

/// A guard on this machine's own cgroup root refuses the scenarios' "pods" too, and
/// every scenario would fail with EPERM far from the cause: stop at once instead.
fn refuse_when_installed(pins: &std::path::Path) -> Result<()> {
    let versions: Vec<String> = std::fs::read_dir(pins)
        .map(|entries| {
            entries
                .filter_map(std::result::Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('v'))
                .collect()
        })
        .unwrap_or_default();
    if !versions.is_empty() {
        anyhow::bail!(
            "a metadata-guard is installed on this machine ({} holds {}), and it would refuse the tests' own \
             simulated pods; remove it first with `metadata-guard uninstall` (e.g. `target/debug/metadata-guard \
             uninstall`, after stopping any agent), then run the tests again",
            pins.display(),
            versions.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_installed_guard_stops_the_tests_naming_uninstall() {
        let dir = std::env::temp_dir().join(format!("xtask-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(super::refuse_when_installed(&dir).is_ok(), "an empty pin directory is no guard");
        assert!(super::refuse_when_installed(&dir.join("missing")).is_ok());
        std::fs::create_dir(dir.join("v1")).unwrap();
        let e = super::refuse_when_installed(&dir).unwrap_err().to_string();
        assert!(e.contains("metadata-guard uninstall") && e.contains("v1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
