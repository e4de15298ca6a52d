// SPDX-License-Identifier: Apache-2.0
//! `cargo xtask <command>`: the developer commands of metadata-guard.

mod artifacts;
mod bench;
mod cmd;
mod image;
mod packages;
mod test;
mod toolchain;
mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::Result;
use artifacts::{Profile, Variant};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Developer commands for metadata-guard")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (installs rust-src and bpf-linker when missing).
    BuildEbpf {
        /// Build the harmless test variant of the programs instead.
        #[arg(long)]
        variant: bool,
    },
    /// Build the kernel object and the agent.
    Build {
        #[arg(long)]
        release: bool,
        /// Build the static (musl) release agent for this architecture instead, as the
        /// image ships it: amd64 (x86_64) or arm64 (aarch64).
        #[arg(long, value_name = "ARCH")]
        target: Option<String>,
    },
    /// Build everything and run the agent on this machine (as root). A development
    /// run: its enforcement is removed when it exits (`--detach-on-exit`).
    Run {
        #[arg(long)]
        release: bool,
        /// Leave the enforcement pinned when the agent exits, as a production agent
        /// does (remove it later with `metadata-guard uninstall`).
        #[arg(long)]
        keep: bool,
        /// Arguments for `metadata-guard run`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test: lints, unit tests, then the real-kernel scenarios (needs root).
    Test,
    /// clippy with the workspace's lints as errors, and rustfmt's check.
    Lint,
    /// Build the static agent for amd64 and arm64 and its FROM-scratch image (podman):
    /// one manifest list tagged localhost/metadata-guard:dev and :<version>.
    Image,
    /// Build the image and run it on a simulated node as the DaemonSet does (root).
    Smoke,
    /// Measure the guard's cost beside no guard and iptables/nftables (needs root);
    /// writes docs/benchmarks/.
    Bench {
        /// Every figure briefly, failing only on broken measurements (for CI).
        #[arg(long)]
        quick: bool,
        /// Only these figures, by the number in their title (e.g. `1,2c`), written to
        /// target/bench-only/ (the published results come from a run of every figure).
        #[arg(long, value_name = "FIGURES")]
        only: Option<String>,
    },
    /// Run the real-kernel scenarios on Debian's 5.10 and 6.1 cloud kernels, amd64 and
    /// arm64, under QEMU; writes docs/kernels.md when every kernel ran.
    VmTest {
        /// 5.10, 6.1 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// amd64, arm64 or all.
        #[arg(long, default_value = "all")]
        arch: String,
        /// Run only the scenarios whose name contains this text (docs/kernels.md is
        /// then not written).
        #[arg(long)]
        filter: Option<String>,
    },
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf { variant } => {
            let object = artifacts::build_ebpf(if variant { Variant::Test } else { Variant::Default })?;
            eprintln!("xtask: eBPF object at {}", artifacts::relative(&object));
        }
        Cmd::Build { release: _, target: Some(arch) } => {
            let arch = artifacts::Arch::parse(&arch)?;
            artifacts::build_ebpf(Variant::Default)?;
            let agent = artifacts::build_agent_static(arch)?;
            eprintln!("xtask: static agent at {}", artifacts::relative(&agent));
        }
        Cmd::Build { release, target: None } => {
            artifacts::build_ebpf(Variant::Default)?;
            let agent = artifacts::build_agent(profile(release), Variant::Default)?;
            eprintln!("xtask: agent at {}", artifacts::relative(&agent));
        }
        Cmd::Run { release, keep, args } => {
            artifacts::build_ebpf(Variant::Default)?;
            let agent = artifacts::build_agent(profile(release), Variant::Default)?;
            let mut run = Command::new(&agent);
            run.arg("run").args(&args);
            if !keep && !args.iter().any(|a| a == "--detach-on-exit") {
                run.arg("--detach-on-exit");
            }
            eprintln!("xtask: {}", cmd::describe(&run));
            cmd::run(&mut run)?;
        }
        Cmd::Test => test::run()?,
        Cmd::Lint => test::lint()?,
        Cmd::Image => drop(image::build()?),
        Cmd::Smoke => image::smoke()?,
        Cmd::Bench { quick, only } => bench::run(quick, only.as_deref())?,
        Cmd::VmTest { kernel, arch, filter } => vm::run(&vm::select(&kernel, &arch)?, filter.as_deref())?,
    }
    Ok(())
}

fn profile(release: bool) -> Profile {
    if release {
        Profile::Release
    } else {
        Profile::Debug
    }
}

/// The workspace root: xtask's manifest lives one level below it.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::Cli;

    /// README.md and the pages under docs/ (not its generated subdirectories).
    fn pages() -> Vec<(String, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut paths = vec![root.join("README.md")];
        for entry in std::fs::read_dir(root.join("docs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "md") {
                paths.push(path);
            }
        }
        paths.into_iter().map(|p| (p.display().to_string(), std::fs::read_to_string(&p).unwrap())).collect()
    }

    /// Every `cargo xtask ...` command line the docs give: in shell blocks, and in
    /// inline code that is not a synopsis (`[--flag]`, `a|b`).
    #[test]
    fn every_documented_xtask_command_line_parses() {
        let mut lines = Vec::new();
        for (page, text) in pages() {
            let mut in_shell = false;
            for line in text.lines() {
                if let Some(info) = line.trim_start().strip_prefix("```") {
                    in_shell = !in_shell && info.trim() == "sh";
                    continue;
                }
                let spans: Vec<&str> = if in_shell {
                    vec![line.split('#').next().unwrap()]
                } else {
                    line.split('`').skip(1).step_by(2).filter(|s| !s.contains(['[', '|', '<'])).collect()
                };
                for span in spans {
                    if let Some(args) = span.trim().strip_prefix("cargo xtask ") {
                        lines.push((page.clone(), args.to_string()));
                    }
                }
            }
        }
        assert!(lines.iter().any(|(_, a)| a.trim() == "run") && lines.iter().any(|(_, a)| a.trim() == "test"));
        for (page, args) in lines {
            let argv = std::iter::once("cargo-xtask").chain(args.split_whitespace());
            if let Err(e) = Cli::try_parse_from(argv) {
                panic!("{page}: `cargo xtask {args}` does not parse:\n{e}");
            }
        }
    }
}
