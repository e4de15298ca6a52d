// SPDX-License-Identifier: Apache-2.0
//! `cargo xtask bench [--quick]`: release builds of the agent and of mg-bench, the
//! tools it drives (nft, iptables-nft, bpftool), then the bench itself (root).

use std::process::Command;

use anyhow::{Context, Result};

use crate::{
    artifacts::{self, Profile, Variant},
    cmd, packages, workspace_root,
};

/// `iptables-nft-restore` comes with Debian's iptables package.
const IPTABLES: packages::Tool = packages::Tool { program: "iptables-nft-restore", package: "iptables" };

pub(crate) fn run(quick: bool, only: Option<&str>) -> Result<()> {
    artifacts::build_ebpf(Variant::Default)?;
    let agent = artifacts::build_agent(Profile::Release, Variant::Default)?;
    packages::ensure(&[packages::BPFTOOL, packages::NFT, IPTABLES])?;
    let root = workspace_root();
    let mg_bench = artifacts::build_test_program("mg-bench", Profile::Release)?;
    // A quick run (CI) checks that every measurement works; only a full run
    // rewrites the published results.
    let out = match (quick, only) {
        (_, Some(_)) => root.join("target/bench-only"),
        (true, None) => root.join("target/bench-quick"),
        (false, None) => root.join("docs/benchmarks"),
    };
    let mut bench = Command::new(mg_bench);
    bench.arg("--agent").arg(&agent).arg("--out").arg(&out).current_dir(&root);
    if quick {
        bench.arg("--quick");
    }
    if let Some(figures) = only {
        bench.arg("--only").arg(figures);
    }
    cmd::run(&mut bench).context("the bench failed (a broken measurement, not a slow one; see above)")
}
