// SPDX-License-Identifier: Apache-2.0
//! What the guests run: the agent copied out of the image's instance for the guest's
//! architecture, and static builds of the test-variant agent and mg-scenarios (the
//! guest has no libc, only what the initramfs holds).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{
    artifacts::{self, Profile, Variant},
    cmd, image,
    toolchain::{self, Arch},
    workspace_root,
};

pub(super) struct Binaries {
    /// The release agent, as extracted from the image.
    pub agent: PathBuf,
    /// Its sha256, printed in the report: the same as the image's file.
    pub agent_sha256: String,
    pub variant_agent: PathBuf,
    pub scenarios: PathBuf,
}

/// Copies the agent out of its image (built beforehand by [`image::build`]) and
/// builds the test binaries for `arch`. The test binaries are unoptimised without
/// debug info: on two cores that compiles about as fast as anything, and their time
/// inside the VM goes to the emulated kernel, not to their own code.
pub(super) fn build(image: &image::Instance) -> Result<Binaries> {
    let arch = image.arch;
    toolchain::ensure_static_target(arch)?;
    artifacts::build_ebpf(Variant::Test)?;
    let root = workspace_root();
    let dir = root.join("target/vm/build");
    let agent = image::extract_agent(image, &dir.join(format!("metadata-guard-{}", arch.name())))?;
    let agent_sha256 = sha256(&agent)?;
    let built = image::staged_agent(arch);
    let built_sha256 = sha256(&built)?;
    anyhow::ensure!(
        agent_sha256 == built_sha256,
        "the {} agent in the image (sha256 {agent_sha256}) is not the file it was built from, {} (sha256 \
         {built_sha256}); run `cargo xtask image` again",
        arch.name(),
        built.display()
    );
    eprintln!("xtask: {} agent from the image {} ({}): sha256 {agent_sha256}", arch.name(), image.id, image.digest);

    // Two target directories, like the host builds: the agent's build script embeds
    // the object named in the environment, so one directory would rebuild each time.
    let variant_dir = root.join("target/vm/build-variant");
    cargo(&dir, arch, Variant::Default, &[("metadata-guard-tests", "mg-scenarios")])
        .with_context(|| format!("building the {} mg-scenarios failed", arch.name()))?;
    cargo(&variant_dir, arch, Variant::Test, &[("metadata-guard", "metadata-guard")])
        .with_context(|| format!("building the {} test-variant agent failed", arch.name()))?;
    let out = |d: &Path, name: &str| d.join(arch.static_target()).join("debug").join(name);
    Ok(Binaries {
        agent,
        agent_sha256,
        variant_agent: out(&variant_dir, "metadata-guard"),
        scenarios: out(&dir, "mg-scenarios"),
    })
}

/// mg-scenarios for this machine, which lists the scenarios every guest should report.
pub(super) fn host_scenarios() -> Result<PathBuf> {
    artifacts::build_test_program("mg-scenarios", Profile::Debug)
}

/// Builds each (package, binary) of `bins` with the eBPF object of `variant` embedded.
fn cargo(target_dir: &Path, arch: Arch, variant: Variant, bins: &[(&str, &str)]) -> Result<()> {
    let mut build = Command::new("cargo");
    build
        .current_dir(workspace_root())
        .args(["build", "--target", arch.static_target()])
        .args(bins.iter().flat_map(|(package, bin)| ["--package", package, "--bin", bin]))
        .arg("--target-dir")
        .arg(target_dir)
        .env("METADATA_GUARD_EBPF_OBJECT", artifacts::ebpf_object(variant))
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .env("CARGO_PROFILE_DEV_STRIP", "debuginfo");
    arch.configure_linker(&mut build);
    cmd::run(&mut build)
}

pub(super) fn sha256(file: &Path) -> Result<String> {
    let out = cmd::output(Command::new("sha256sum").arg(file))?;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("sha256sum printed nothing for {}", file.display()))
}
