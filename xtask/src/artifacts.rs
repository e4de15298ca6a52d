// SPDX-License-Identifier: Apache-2.0
//! Building the kernel object and the binaries that embed or exercise it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{cmd, toolchain, workspace_root};

pub(crate) const BPF_TARGET: &str = "bpfel-unknown-none";

/// Which build of the kernel programs: the real one, or the harmless test variant
/// used to prove that an upgrade swaps programs without opening the block.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Default,
    Test,
}

impl Variant {
    fn target_dir(self) -> PathBuf {
        let root = workspace_root();
        match self {
            Variant::Default => root.join("target/ebpf"),
            Variant::Test => root.join("target/ebpf-variant"),
        }
    }
}

pub(crate) fn ebpf_object(variant: Variant) -> PathBuf {
    variant.target_dir().join(BPF_TARGET).join("release/metadata-guard-ebpf")
}

/// `cargo xtask build-ebpf`: bootstrap the toolchain pieces, then build the object.
pub(crate) fn build_ebpf(variant: Variant) -> Result<PathBuf> {
    let rustc = toolchain::Rustc::detect()?;
    toolchain::ensure_rust_src(&rustc)?;
    let linker_dir = toolchain::ensure_bpf_linker(&rustc)?;
    let path = std::env::join_paths(
        std::iter::once(linker_dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )?;
    let mut build = ebpf_cargo("build", variant);
    build.env("PATH", path);
    cmd::run(&mut build).context("building the eBPF programs failed (see the compiler output above)")?;
    Ok(ebpf_object(variant))
}

/// `cargo xtask lint`'s clippy on the eBPF crate, with its warnings as errors: it is
/// outside the workspace (its own target and `core`), so the workspace's clippy run
/// does not see it.
pub(crate) fn clippy_ebpf() -> Result<()> {
    toolchain::ensure_rust_src(&toolchain::Rustc::detect()?)?;
    let mut clippy = ebpf_cargo("clippy", Variant::Default);
    clippy.args(["--", "-D", "warnings"]);
    cmd::run(&mut clippy)
        .context("clippy found the problems shown above in the eBPF crate (ebpf/); fix them and run again")
}

/// `cargo <subcommand>` on the eBPF crate for the BPF target, building `core` from
/// source. Build and clippy share the flags, so neither invalidates the other's `core`.
fn ebpf_cargo(subcommand: &str, variant: Variant) -> Command {
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(workspace_root().join("ebpf"))
        .args([subcommand, "--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(variant.target_dir())
        // The stable toolchain builds `core` for BPF only with unstable flags allowed.
        .env("RUSTC_BOOTSTRAP", "1")
        // BTF lets the kernel and bpftool show the maps' and programs' types.
        .env("CARGO_ENCODED_RUSTFLAGS", ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"));
    if variant == Variant::Test {
        cargo.args(["--features", "test-variant"]);
    }
    cargo
}

#[derive(Clone, Copy)]
pub(crate) enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// Selects the profile on a `cargo build`; returns the directory under the target
    /// directory that its binaries land in.
    fn select(self, build: &mut Command) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => {
                build.arg("--release");
                "release"
            }
        }
    }
}

/// Builds the agent embedding the given object; returns the binary's path.
pub(crate) fn build_agent(profile: Profile, variant: Variant) -> Result<PathBuf> {
    let root = workspace_root();
    let object = ebpf_object(variant);
    let target_dir = match variant {
        Variant::Default => root.join("target"),
        Variant::Test => root.join("target/variant"),
    };
    let mut build = Command::new("cargo");
    build
        .current_dir(&root)
        .args(["build", "--package", "metadata-guard"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("METADATA_GUARD_EBPF_OBJECT", &object);
    let dir = profile.select(&mut build);
    cmd::run(&mut build).context("building the agent failed")?;
    Ok(target_dir.join(dir).join("metadata-guard"))
}

pub(crate) use toolchain::Arch;

/// Builds the release agent of `arch` as one static musl binary, the file the image
/// ships and the VM matrix tests; returns its path. Adds the musl target to the
/// toolchain when it is missing.
pub(crate) fn build_agent_static(arch: Arch) -> Result<PathBuf> {
    toolchain::ensure_static_target(arch)?;
    let root = workspace_root();
    let target = arch.static_target();
    let mut build = Command::new("cargo");
    build
        .current_dir(&root)
        .args(["build", "--release", "--package", "metadata-guard", "--target", target])
        .arg("--target-dir")
        .arg(root.join("target"))
        .env("METADATA_GUARD_EBPF_OBJECT", ebpf_object(Variant::Default));
    arch.configure_linker(&mut build);
    cmd::run(&mut build).with_context(|| format!("building the static {} agent failed", arch.name()))?;
    Ok(root.join("target").join(target).join("release/metadata-guard"))
}

/// Builds one program of the `tests` crate (mg-scenarios, mg-smoke, mg-bench);
/// returns its path.
pub(crate) fn build_test_program(name: &str, profile: Profile) -> Result<PathBuf> {
    let root = workspace_root();
    let mut build = Command::new("cargo");
    build.current_dir(&root).args(["build", "--package", "metadata-guard-tests", "--bin", name]);
    let dir = profile.select(&mut build);
    cmd::run(&mut build).with_context(|| format!("building {name} failed"))?;
    Ok(root.join("target").join(dir).join(name))
}

pub(crate) fn relative(p: &Path) -> String {
    p.strip_prefix(workspace_root()).unwrap_or(p).display().to_string()
}
