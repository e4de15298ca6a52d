// SPDX-License-Identifier: Apache-2.0
//! `cargo xtask vm-test [--kernel 5.10|6.1|all]`: the real-kernel scenarios on other
//! kernels than this machine's. Each kernel is a Debian cloud kernel package booted
//! under QEMU with an initramfs of busybox, static builds of the agent and
//! mg-scenarios, and an init script that runs `check` and every scenario. The host
//! reads the console, reports each scenario per kernel, and writes docs/kernels.md.

mod binaries;
mod console;
mod debian;
mod initramfs;
mod python;
mod qemu;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{artifacts, cmd, image, packages, toolchain::Arch, workspace_root};

/// A kernel of the matrix: the current cloud kernel of a Debian release, on one
/// architecture.
pub(crate) struct Kernel {
    /// What `--kernel` takes.
    pub version: &'static str,
    suite: &'static str,
    pub arch: Arch,
    /// The scenarios this guest runs (`mg-scenarios --filter`); None: every one.
    filter: Option<&'static str>,
}

impl Kernel {
    /// `5.10 amd64`: the kernel's name in reports and on the terminal.
    pub(crate) fn name(&self) -> String {
        format!("{} {}", self.version, self.arch.name())
    }

    /// `amd64-5.10`: its directory under target/vm/ and in the package cache.
    fn dir(&self) -> String {
        format!("{}-{}", self.arch.name(), self.version)
    }
}

pub(crate) const KERNELS: &[Kernel] = &[
    Kernel { version: "5.10", suite: "bullseye", arch: Arch::Amd64, filter: None },
    Kernel { version: "6.1", suite: "bookworm", arch: Arch::Amd64, filter: None },
    Kernel { version: "5.10", suite: "bullseye", arch: Arch::Arm64, filter: ARM64_FILTER },
    Kernel { version: "6.1", suite: "bookworm", arch: Arch::Arm64, filter: ARM64_FILTER },
];

/// The arm64 guests run every scenario as well: about 13–14 minutes each on two shared
/// cores (emulating another instruction set), as long as the amd64 guests take.
const ARM64_FILTER: Option<&str> = None;

/// The busybox-static package comes from this suite, whatever the kernel.
const BUSYBOX_SUITE: &str = "bookworm";

/// How long one kernel's VM may run. Boot plus the whole suite under TCG took 12–14
/// minutes per guest, amd64 and arm64 alike, on two cores (CI, December 2026: 103
/// scenarios; the uplink scenarios' wait-for-nothing windows, the Python-client ones
/// and the 100 000-attempt storm are most of it). Half as much again on top, so that
/// only a hung guest meets it.
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The kernels named by `--kernel` (`all` or a version of [`KERNELS`]) and `--arch`
/// (`all`, `amd64` or `arm64`).
pub(crate) fn select(version: &str, arch: &str) -> Result<Vec<&'static Kernel>> {
    let arch = if arch == "all" { None } else { Some(Arch::parse(arch)?) };
    if version != "all" && !KERNELS.iter().any(|k| k.version == version) {
        let mut names: Vec<&str> = KERNELS.iter().map(|k| k.version).collect();
        names.dedup();
        bail!("no kernel {version} in the matrix; use one of {} or all", names.join(", "));
    }
    Ok(KERNELS
        .iter()
        .filter(|k| version == "all" || k.version == version)
        .filter(|k| arch.is_none_or(|a| k.arch == a))
        .collect())
}

/// Runs `kernels`' guests; `filter` narrows every guest to the scenarios whose name
/// contains it (a trial run: the matrix document is then not written).
pub(crate) fn run(kernels: &[&Kernel], filter: Option<&str>) -> Result<()> {
    // Kernel runs and their reports hold the filter for the whole program.
    let filter: Option<&'static str> = filter.map(|f| &*Box::leak(f.to_string().into_boxed_str()));
    let arches: Vec<Arch> = Arch::ALL.into_iter().filter(|a| kernels.iter().any(|k| k.arch == *a)).collect();
    packages::ensure(&arches.iter().map(|a| qemu::tool(*a)).collect::<Vec<_>>())?;
    let root = workspace_root();
    let cache = root.join("target/vm/cache");
    // The agent every guest runs is the one the image ships, copied out of the image
    // (its per-architecture instance): what is tested is what nodes pull.
    let images = image::build()?;
    // busybox's cpio packs the initramfs, so one busybox must run on this machine.
    let packer = busybox(&cache, Arch::host())?;
    let mut bins = Vec::new();
    for arch in &arches {
        let image = images.iter().find(|i| i.arch == *arch).expect("the image has every architecture");
        let guest = Guest {
            busybox: busybox(&cache, *arch)?,
            bins: binaries::build(image)?,
            python: python::archive(&cache, &packer, *arch)?,
        };
        bins.push((*arch, guest));
    }
    // Every scenario, the real-SDK ones too: the guests carry a Python (python.rs).
    let scenarios: Vec<String> =
        cmd::output(Command::new(&binaries::host_scenarios()?).arg("--list"))?.lines().map(str::to_string).collect();

    let mut runs = Vec::new();
    for kernel in kernels {
        let (_, guest) = bins.iter().find(|(a, _)| *a == kernel.arch).unwrap();
        runs.push(run_kernel(kernel, &cache, &packer, guest, filter.or(kernel.filter))?);
    }

    eprintln!("\n{}", report::markdown(&runs, &scenarios));
    eprint!("{}", report::summary(&runs, &scenarios));
    if kernels.len() == KERNELS.len() && filter.is_none() {
        let date = cmd::output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
        let doc = root.join("docs/kernels.md");
        fs::write(&doc, report::document(&runs, &scenarios, date.trim()))
            .with_context(|| format!("could not write {}", doc.display()))?;
        eprintln!("xtask: wrote {}", artifacts::relative(&doc));
    }
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| !r.problems(&scenarios).is_empty())
        .map(|r| format!("{} (see {})", r.name, r.console_log))
        .collect();
    if !failed.is_empty() {
        bail!("the kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// busybox-static for `arch`, from Debian.
fn busybox(cache: &Path, arch: Arch) -> Result<PathBuf> {
    let dir = format!("busybox-static-{}", arch.name());
    Ok(debian::unpacked(cache, &dir, BUSYBOX_SUITE, arch, "busybox-static", false)?.root.join("bin/busybox"))
}

/// What one architecture's guests run.
struct Guest {
    busybox: PathBuf,
    bins: binaries::Binaries,
    /// The guest's Python, as a second initramfs archive.
    python: PathBuf,
}

fn run_kernel(
    kernel: &Kernel,
    cache: &Path,
    packer: &Path,
    guest: &Guest,
    filter: Option<&'static str>,
) -> Result<report::KernelRun> {
    let bins = &guest.bins;
    let package = debian::unpacked(
        cache,
        &format!("linux-{}", kernel.dir()),
        kernel.suite,
        kernel.arch,
        &format!("linux-image-cloud-{}", kernel.arch.name()),
        true,
    )?;
    let vmlinuz = only_entry(&package.root.join("boot"), "vmlinuz-")?;
    let modules_dir = only_entry(&package.root.join("lib/modules"), "")?;

    let dir = workspace_root().join("target/vm").join(kernel.dir());
    fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let initrd = initramfs::pack(
        &dir,
        &initramfs::Inputs {
            packer,
            busybox: &guest.busybox,
            agent: &bins.agent,
            variant_agent: &bins.variant_agent,
            scenarios: &bins.scenarios,
            modules_dir: &modules_dir,
            filter,
            extra_archives: &[&guest.python],
            python: python::INTERPRETER,
        },
    )?;
    let console_log = dir.join("console.log");
    let name = kernel.name();
    eprintln!("xtask: booting {name} ({} {}) under QEMU", package.name, package.version);
    let boot = qemu::boot(kernel.arch, &vmlinuz, &initrd, &console_log, VM_TIMEOUT, &name)?;
    let text = fs::read(&console_log).with_context(|| format!("could not read {}", console_log.display()))?;
    Ok(report::KernelRun {
        name,
        package: format!("{} {}", package.name, package.version),
        agent_sha256: bins.agent_sha256.clone(),
        filter,
        console: console::Console::parse(&String::from_utf8_lossy(&text)),
        console_log: artifacts::relative(&console_log),
        elapsed: boot.elapsed,
        timed_out: boot.timed_out,
        qemu_failed: boot.qemu_failed,
    })
}
/// The one entry of `dir` whose name starts with `prefix` (a package holds one kernel).
fn only_entry(dir: &Path, prefix: &str) -> Result<std::path::PathBuf> {
    let found: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("could not list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one {prefix}* in {}, found {}", dir.display(), found.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(kernels: &[&Kernel]) -> Vec<String> {
        kernels.iter().map(|k| k.name()).collect()
    }

    #[test]
    fn selects_by_version_and_architecture() {
        assert_eq!(names(&select("all", "all").unwrap()), ["5.10 amd64", "6.1 amd64", "5.10 arm64", "6.1 arm64"]);
        assert_eq!(names(&select("all", "aarch64").unwrap()), ["5.10 arm64", "6.1 arm64"]);
        assert_eq!(names(&select("6.1", "amd64").unwrap()), ["6.1 amd64"]);
        assert!(select("4.19", "all").is_err());
        assert!(select("all", "riscv64").is_err());
    }
}
