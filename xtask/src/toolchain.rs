// SPDX-License-Identifier: Apache-2.0
//! Brings a machine with only rustup's stable toolchain to where it can build eBPF:
//! the `rust-src` component (for `-Z build-std=core`) and bpf-linker built against
//! rustc's own libLLVM, in a project-local tools directory; and to where it can lint:
//! clippy, rustfmt and cargo-deny (built into the same tools directory).
//!
//! Every check here is cheap when things are present, so `build-ebpf` stays fast.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{cmd, workspace_root};

pub(crate) const BPF_LINKER_VERSION: &str = "0.13.0";
/// The lint step's license and duplicate check; 0.20 builds with rustc 1.88 and newer.
pub(crate) const CARGO_DENY_VERSION: &str = "0.20.2";

/// Facts about the active rustc that decide what bpf-linker must be built against.
pub(crate) struct Rustc {
    pub sysroot: PathBuf,
    pub release: String,
    pub llvm_major: u32,
}

impl Rustc {
    pub(crate) fn detect() -> Result<Rustc> {
        let verbose = cmd::output(Command::new("rustc").arg("-vV"))
            .context("could not run `rustc -vV`; is rustup's stable toolchain installed and on PATH?")?;
        let field = |name: &str| {
            verbose
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .with_context(|| format!("`rustc -vV` printed no `{name}` line:\n{verbose}"))
        };
        let release = field("release:")?;
        let llvm = field("LLVM version:")?;
        let llvm_major = llvm
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("could not read the LLVM major version from `{llvm}`"))?;
        let sysroot = PathBuf::from(cmd::output(Command::new("rustc").args(["--print", "sysroot"]))?.trim());
        Ok(Rustc { sysroot, release, llvm_major })
    }
}

/// `rust-src`, needed to build `core` for bpfel-unknown-none.
pub(crate) fn ensure_rust_src(rustc: &Rustc) -> Result<()> {
    let core_src = rustc.sysroot.join("lib/rustlib/src/rust/library/core");
    if core_src.is_dir() {
        return Ok(());
    }
    eprintln!("xtask: adding the rust-src component (needed to build `core` for BPF)");
    cmd::run(Command::new("rustup").args(["component", "add", "rust-src"])).context(
        "could not add rust-src; run `rustup component add rust-src` yourself and check rustup's network access",
    )?;
    ensure!(core_src.is_dir(), "rustup added rust-src but {} is still missing", core_src.display());
    Ok(())
}

/// clippy and rustfmt, for `cargo xtask lint` (rustup's minimal profile has neither).
pub(crate) fn ensure_lint_tools() -> Result<()> {
    let missing: Vec<&str> = [("clippy", "cargo-clippy"), ("rustfmt", "rustfmt")]
        .into_iter()
        .filter(|(_, bin)| Command::new(bin).arg("--version").output().map_or(true, |o| !o.status.success()))
        .map(|(component, _)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: adding the rustup components {} (for the lint step)", missing.join(", "));
    cmd::run(Command::new("rustup").args(["component", "add"]).args(&missing)).with_context(|| {
        format!(
            "could not add {}; run `rustup component add {}` yourself and check rustup's network access",
            missing.join(", "),
            missing.join(" ")
        )
    })
}

/// The directory holding bpf-linker's `bin/`; keyed by versions so a rustc upgrade
/// (a new libLLVM) gets a fresh build instead of a linker that cannot load.
pub(crate) fn tools_dir(rustc: &Rustc) -> PathBuf {
    tools_base().join(format!("bpf-linker-{BPF_LINKER_VERSION}-rustc-{}", rustc.release))
}

/// Where the tools the project builds for itself live: METADATA_GUARD_TOOLS_DIR, else
/// the user's cache (`$XDG_CACHE_HOME` or `~/.cache`, `metadata-guard/tools`), so that
/// every checkout of one machine shares one build of each (a fresh clone does not spend
/// minutes rebuilding cargo-deny and bpf-linker); target/tools where there is no home.
/// Each tool's directory is keyed by its version (bpf-linker's also by rustc's).
fn tools_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("METADATA_GUARD_TOOLS_DIR") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")));
    cache.map_or_else(|| workspace_root().join("target/tools"), |c| c.join("metadata-guard/tools"))
}

/// cargo-deny, built once into the tools directory; returns the binary.
pub(crate) fn ensure_cargo_deny() -> Result<PathBuf> {
    let root = tools_base().join(format!("cargo-deny-{CARGO_DENY_VERSION}"));
    let deny = root.join("bin/cargo-deny");
    if runs(&deny) {
        return Ok(deny);
    }
    eprintln!("xtask: building cargo-deny {CARGO_DENY_VERSION} into {} (once; takes a few minutes)", root.display());
    let mut install = Command::new("cargo");
    install.args(["install", "cargo-deny", "--locked", "--version", CARGO_DENY_VERSION]).arg("--root").arg(&root);
    cmd::run(&mut install).with_context(|| {
        format!("building cargo-deny {CARGO_DENY_VERSION} failed; check that crates.io is reachable and retry")
    })?;
    ensure!(runs(&deny), "cargo-deny was installed to {} but does not run", deny.display());
    Ok(deny)
}

/// Returns the directory to put first on PATH so rustc finds `bpf-linker`.
pub(crate) fn ensure_bpf_linker(rustc: &Rustc) -> Result<PathBuf> {
    let root = tools_dir(rustc);
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if runs(&linker) {
        return Ok(bin_dir);
    }
    let llvm_prefix = root.join("llvm-prefix");
    link_rustc_llvm(rustc, &llvm_prefix)?;
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {} into {} (once; takes a minute or two)",
        rustc.llvm_major,
        root.display()
    );
    let mut install = Command::new("cargo");
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--no-default-features"])
        .args(["--features", &format!("llvm-{}", rustc.llvm_major)])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &llvm_prefix);
    cmd::run(&mut install).with_context(|| {
        format!(
            "building bpf-linker {BPF_LINKER_VERSION} with feature llvm-{} failed; check that crates.io is reachable \
             and that {} holds rustc's libLLVM",
            rustc.llvm_major,
            llvm_prefix.display()
        )
    })?;
    ensure!(runs(&linker), "bpf-linker was installed to {} but does not run", linker.display());
    Ok(bin_dir)
}

/// Whether a tool the project built answers `--version`.
fn runs(tool: &Path) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// bpf-linker's build finds LLVM through `LLVM_PREFIX/lib`; rustc ships its libLLVM as
/// a versioned file plus a linker script, so point both names (and the plain
/// `libLLVM.so`) at the sysroot's copies.
fn link_rustc_llvm(rustc: &Rustc, prefix: &Path) -> Result<()> {
    let sysroot_lib = rustc.sysroot.join("lib");
    let libs: Vec<PathBuf> = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("could not list {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM")))
        .collect();
    if libs.is_empty() {
        bail!(
            "rustc's sysroot {} has no libLLVM*; bpf-linker must be built against rustc's own LLVM. \
             Reinstall the toolchain with `rustup toolchain install stable --force`",
            sysroot_lib.display()
        );
    }
    let lib_dir = prefix.join("lib");
    if lib_dir.exists() {
        fs::remove_dir_all(&lib_dir).with_context(|| format!("could not clear {}", lib_dir.display()))?;
    }
    fs::create_dir_all(&lib_dir).with_context(|| format!("could not create {}", lib_dir.display()))?;
    for lib in &libs {
        symlink(lib, lib_dir.join(lib.file_name().unwrap()))
            .with_context(|| format!("could not link {} into {}", lib.display(), lib_dir.display()))?;
    }
    // The versioned shared object (not the linker script) is what `libLLVM.so` must be.
    let shared_object = libs
        .iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains(".so.")))
        .unwrap_or(&libs[0]);
    let plain = lib_dir.join("libLLVM.so");
    if !plain.exists() {
        symlink(shared_object, &plain).with_context(|| format!("could not create {}", plain.display()))?;
    }
    Ok(())
}

/// A CPU architecture of the nodes: what the static agent, the image and the VM
/// matrix are built for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub(crate) const ALL: [Arch; 2] = [Arch::Amd64, Arch::Arm64];

    /// The name Debian, OCI and Kubernetes use (`kubernetes.io/arch`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Accepts the Debian/OCI name or the Rust one (`arm64`, `aarch64`).
    pub(crate) fn parse(s: &str) -> Result<Arch> {
        match s {
            "amd64" | "x86_64" => Ok(Arch::Amd64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            _ => bail!("unknown architecture {s}; use amd64 (x86_64) or arm64 (aarch64)"),
        }
    }

    /// The musl target of the static builds: musl binaries are static by default, so
    /// one file runs on any node (and in a FROM-scratch image or an initramfs).
    pub(crate) fn static_target(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-musl",
            Arch::Arm64 => "aarch64-unknown-linux-musl",
        }
    }

    /// Sets how cargo links for this architecture. amd64 links with the host's `cc`.
    /// arm64 links with rustup's own `rust-lld` (which rustc finds in its sysroot) and
    /// the musl C runtime objects the target ships (`self-contained`): no cross gcc,
    /// no downloaded toolchain. The dependency tree has no C code to cross-compile.
    pub(crate) fn configure_linker(self, cargo: &mut Command) {
        if self == Arch::Arm64 {
            cargo
                .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER", "rust-lld")
                .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS", "-Clink-self-contained=yes");
        }
    }

    /// This machine's own architecture.
    pub(crate) fn host() -> Arch {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }
}

/// Adds the musl standard library of `arch` to the toolchain when it is missing.
pub(crate) fn ensure_static_target(arch: Arch) -> Result<()> {
    let target = arch.static_target();
    let installed = cmd::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("could not ask rustup for the installed targets; static builds need rustup")?;
    if installed.lines().any(|t| t.trim() == target) {
        return Ok(());
    }
    eprintln!("xtask: adding the {target} target (static binaries)");
    cmd::run(Command::new("rustup").args(["target", "add", target]))
        .with_context(|| format!("could not add the {target} target; run `rustup target add {target}`"))
}
