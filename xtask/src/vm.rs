//! `cargo xtask vm-test [--kernel 5.10|6.1|all]`: the real-kernel scenarios on other
//! kernels than this machine's. Each kernel is a Debian cloud kernel package booted
//! under QEMU with an initramfs of busybox, static builds of the agent and
//! mg-scenarios, and an init script that runs `check` and every scenario. The host
//! reads the console, reports each scenario per kernel, and writes docs/kernels.md.

mod binaries;
mod console;
mod debian;
mod initramfs;
mod qemu;
mod report;

use std::{fs, path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};

use crate::{artifacts, cmd, packages, workspace_root};

/// A kernel of the matrix: the current cloud kernel of a Debian release.
pub struct Kernel {
    /// What `--kernel` takes.
    pub name: &'static str,
    suite: &'static str,
}

pub const KERNELS: &[Kernel] = &[Kernel { name: "5.10", suite: "bullseye" }, Kernel { name: "6.1", suite: "bookworm" }];

/// The busybox-static package comes from this suite, whatever the kernel.
const BUSYBOX_SUITE: &str = "bookworm";

/// How long one kernel's VM may run: boot plus the whole scenario suite under TCG
/// takes about 70 s on two cores; a VM still running long past that is hung.
const VM_TIMEOUT: Duration = Duration::from_secs(8 * 60);

const QEMU: packages::Tool = packages::Tool { program: "qemu-system-x86_64", package: "qemu-system-x86" };

/// The kernels named by `--kernel` (`all` or a name of [`KERNELS`]).
pub fn select(name: &str) -> Result<Vec<&'static Kernel>> {
    if name == "all" {
        return Ok(KERNELS.iter().collect());
    }
    match KERNELS.iter().find(|k| k.name == name) {
        Some(k) => Ok(vec![k]),
        None => {
            let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
            bail!("no kernel {name} in the matrix; use one of {} or all", names.join(", "))
        }
    }
}

pub fn run(kernels: &[&Kernel]) -> Result<()> {
    packages::ensure(&[QEMU])?;
    let root = workspace_root();
    let cache = root.join("target/vm/cache");
    let busybox =
        debian::unpacked(&cache, "busybox-static", BUSYBOX_SUITE, "busybox-static", false)?.root.join("bin/busybox");
    let bins = binaries::build()?;
    let scenarios: Vec<String> =
        // The guests have no Python: the real-SDK scenarios are host-only.
        cmd::output(Command::new(&bins.scenarios).args(["--list", "--without-python"]))?
            .lines()
            .map(str::to_string)
            .collect();

    let mut runs = Vec::new();
    for kernel in kernels {
        runs.push(run_kernel(kernel, &cache, &busybox, &bins)?);
    }

    eprintln!("\n{}", report::markdown(&runs, &scenarios));
    eprint!("{}", report::summary(&runs, &scenarios));
    if kernels.len() == KERNELS.len() {
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

fn run_kernel(kernel: &Kernel, cache: &Path, busybox: &Path, bins: &binaries::Binaries) -> Result<report::KernelRun> {
    let package =
        debian::unpacked(cache, &format!("linux-{}", kernel.name), kernel.suite, "linux-image-cloud-amd64", true)?;
    let vmlinuz = only_entry(&package.root.join("boot"), "vmlinuz-")?;
    let modules_dir = only_entry(&package.root.join("lib/modules"), "")?;

    let dir = workspace_root().join("target/vm").join(kernel.name);
    fs::create_dir_all(&dir).with_context(|| format!("could not create {}", dir.display()))?;
    let initrd = initramfs::pack(
        &dir,
        &initramfs::Inputs {
            busybox,
            agent: &bins.agent,
            variant_agent: &bins.variant_agent,
            scenarios: &bins.scenarios,
            modules_dir: &modules_dir,
        },
    )?;
    let console_log = dir.join("console.log");
    eprintln!("xtask: booting {} ({} {}) under QEMU", kernel.name, package.name, package.version);
    let boot = qemu::boot(&vmlinuz, &initrd, &console_log, VM_TIMEOUT, kernel.name)?;
    let text = fs::read(&console_log).with_context(|| format!("could not read {}", console_log.display()))?;
    Ok(report::KernelRun {
        name: kernel.name,
        package: format!("{} {}", package.name, package.version),
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
