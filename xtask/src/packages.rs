// SPDX-License-Identifier: Apache-2.0
//! Debian packages the developer commands need, installed on demand: a fresh machine
//! has none of what a developer once installed by hand.

use std::{path::Path, process::Command, sync::Once};

use anyhow::{Context, Result};

use crate::cmd;

/// A program and the Debian package that provides it.
pub(crate) struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub(crate) const BPFTOOL: Tool = Tool { program: "bpftool", package: "bpftool" };
pub(crate) const PROMTOOL: Tool = Tool { program: "promtool", package: "prometheus" };
pub(crate) const NFT: Tool = Tool { program: "nft", package: "nftables" };
/// The conceal NAT scenario writes kube-proxy's iptables rules with it.
pub(crate) const IPTABLES: Tool = Tool { program: "iptables", package: "iptables" };
/// The node recipes' test verifies the boot unit with it (tests/tests/node.rs).
pub(crate) const SYSTEMD_ANALYZE: Tool = Tool { program: "systemd-analyze", package: "systemd" };

/// A Python module and the PyPI package that provides it.
pub(crate) struct PythonModule {
    pub module: &'static str,
    pub package: &'static str,
}

/// The manifests' test validates them against Kubernetes' schemas with it (tests/tests/deploy.rs).
pub(crate) const KUBERNETES_VALIDATE: PythonModule =
    PythonModule { module: "kubernetes_validate", package: "kubernetes-validate" };

/// Installs, with `python3 -m pip`, the packages of the modules `python3` cannot import.
pub(crate) fn ensure_python(modules: &[PythonModule]) -> Result<()> {
    let imports = |m: &PythonModule| {
        Command::new("python3").args(["-c", &format!("import {}", m.module)]).output().is_ok_and(|o| o.status.success())
    };
    let missing: Vec<&str> = modules.iter().filter(|m| !imports(m)).map(|m| m.package).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Python packages with pip: {}", missing.join(" "));
    cmd::run(Command::new("python3").args(["-m", "pip", "install", "--quiet"]).args(&missing)).with_context(|| {
        format!("could not install {} with `python3 -m pip`; install them and retry", missing.join(" "))
    })
}

pub(crate) fn find(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Installs the packages of the tools not found on this machine.
pub(crate) fn ensure(tools: &[Tool]) -> Result<()> {
    let missing: Vec<&str> = tools.iter().filter(|t| find(t.program).is_none()).map(|t| t.package).collect();
    if missing.is_empty() {
        return Ok(());
    }
    static UPDATE: Once = Once::new();
    let mut update_result = Ok(());
    UPDATE.call_once(|| {
        eprintln!("xtask: apt-get update (to install {})", missing.join(", "));
        update_result = cmd::run(Command::new("apt-get").args(["update", "-qq"]));
    });
    update_result.context("apt-get update failed; the Debian package lists are needed to install test tools")?;
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install {}; install them with apt-get and retry", missing.join(" ")))
}
