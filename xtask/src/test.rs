//! `cargo xtask test`: every test, in the order that fails fastest.

use std::process::Command;

use anyhow::{Context, Result};

use crate::{
    artifacts::{self, Profile, Variant},
    cmd, packages, workspace_root,
};

pub fn run() -> Result<()> {
    artifacts::build_ebpf(Variant::Default)?;
    artifacts::build_ebpf(Variant::Test)?;
    let agent = artifacts::build_agent(Profile::Debug, Variant::Default)?;
    let variant_agent = artifacts::build_agent(Profile::Debug, Variant::Test)?;
    packages::ensure(&[packages::BPFTOOL, packages::PROMTOOL])?;

    cmd::run(Command::new("cargo").current_dir(workspace_root()).args(["test", "--workspace"]))
        .context("unit tests failed")?;

    let scenarios = artifacts::build_test_program("mg-scenarios")?;
    cmd::run(Command::new(&scenarios).arg("--agent").arg(&agent).arg("--variant-agent").arg(&variant_agent))
        .context("real-kernel scenarios failed")?;
    crate::image::smoke().context("the image smoke test (cargo xtask smoke) failed")?;
    crate::bench::run(true).context("the quick benchmark (cargo xtask bench --quick) failed")?;
    crate::vm::run(&crate::vm::select("all", "all")?).context("the kernel matrix (cargo xtask vm-test) failed")?;
    Ok(())
}
