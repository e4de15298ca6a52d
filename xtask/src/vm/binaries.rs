//! Static builds of the agent (both eBPF variants) and mg-scenarios: the guest has
//! no libc, only what the initramfs holds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{
    artifacts::{self, Variant},
    cmd, workspace_root,
};

/// musl: its binaries are static by default, and the guest has no libc of its own.
const TARGET: &str = crate::toolchain::STATIC_TARGET;

pub struct Binaries {
    pub agent: PathBuf,
    pub variant_agent: PathBuf,
    pub scenarios: PathBuf,
}

/// Builds the eBPF objects, then the three binaries. Unoptimised without debug info:
/// on two cores that compiles about as fast as anything, and the scenarios' time
/// inside the VM goes to the emulated kernel, not to the agent's own code.
pub fn build() -> Result<Binaries> {
    crate::toolchain::ensure_static_target()?;
    artifacts::build_ebpf(Variant::Default)?;
    artifacts::build_ebpf(Variant::Test)?;
    // Two target directories, like the host builds: the agent's build script embeds
    // the object named in the environment, so one directory would rebuild each time.
    let root = workspace_root();
    let dir = root.join("target/vm/build");
    let variant_dir = root.join("target/vm/build-variant");
    let agent = ("metadata-guard", "metadata-guard");
    cargo(&dir, Variant::Default, &[agent, ("metadata-guard-tests", "mg-scenarios")])
        .context("building the VM's agent and mg-scenarios failed")?;
    cargo(&variant_dir, Variant::Test, &[agent]).context("building the VM's test-variant agent failed")?;
    let out = |d: &Path, name: &str| d.join(TARGET).join("debug").join(name);
    Ok(Binaries {
        agent: out(&dir, "metadata-guard"),
        variant_agent: out(&variant_dir, "metadata-guard"),
        scenarios: out(&dir, "mg-scenarios"),
    })
}

/// Builds each (package, binary) of `bins` with the eBPF object of `variant` embedded.
fn cargo(target_dir: &Path, variant: Variant, bins: &[(&str, &str)]) -> Result<()> {
    cmd::run(
        Command::new("cargo")
            .current_dir(workspace_root())
            .args(["build", "--target", TARGET])
            .args(bins.iter().flat_map(|(package, bin)| ["--package", package, "--bin", bin]))
            .arg("--target-dir")
            .arg(target_dir)
            .env("METADATA_GUARD_EBPF_OBJECT", artifacts::ebpf_object(variant))
            .env("CARGO_PROFILE_DEV_DEBUG", "0")
            .env("CARGO_PROFILE_DEV_STRIP", "debuginfo"),
    )
}
