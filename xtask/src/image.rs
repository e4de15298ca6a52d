//! `cargo xtask image`: the agent's container image, and `cargo xtask smoke`: that
//! image run on a simulated node exactly as the DaemonSet runs it.

use std::{fs, process::Command};

use anyhow::{bail, Context, Result};

use crate::{
    artifacts::{self, Variant},
    cmd, packages, workspace_root,
};

pub const REPOSITORY: &str = "localhost/metadata-guard";
pub const DEV_TAG: &str = "localhost/metadata-guard:dev";

const PODMAN: packages::Tool = packages::Tool { program: "podman", package: "podman" };
/// Debian's podman defaults to crun; the smoke test (and this machine) use runc.
const RUNC: packages::Tool = packages::Tool { program: "runc", package: "runc" };

/// Builds the static agent and the FROM-scratch image; returns the image id.
pub fn build() -> Result<String> {
    artifacts::build_ebpf(Variant::Default)?;
    let agent = artifacts::build_agent_static()?;
    packages::ensure(&[PODMAN, RUNC])?;

    // The build context holds the binary and nothing else: the repository (with its
    // gigabytes of target/) would be copied to the builder on every build.
    let root = workspace_root();
    let context = root.join("target/image");
    fs::create_dir_all(&context).with_context(|| format!("could not create {}", context.display()))?;
    let staged = context.join("metadata-guard");
    fs::copy(&agent, &staged).with_context(|| format!("could not copy {} to {}", agent.display(), staged.display()))?;

    let version = env!("CARGO_PKG_VERSION");
    let previous = image_id(DEV_TAG);
    let mut build = Command::new("podman");
    build
        // No intermediate images to pile up; a fixed timestamp makes the same
        // binary give the same image id.
        .args(["build", "--pull=never", "--layers=false", "--timestamp", "0", "--build-arg"])
        .arg(format!("VERSION={version}"))
        .args(["--tag", DEV_TAG, "--tag"])
        .arg(format!("{REPOSITORY}:{version}"))
        .arg("--file")
        .arg(root.join("Containerfile"))
        .arg(&context);
    cmd::run(&mut build).context("podman could not build the image (see its output above)")?;

    let id = image_id(DEV_TAG).context("podman built the image but cannot find it by its tag")?;
    // The image a rebuild replaces keeps no tag: remove it rather than pile them up.
    // Failure is fine (a container may still use it).
    if let Some(old) = previous.filter(|old| *old != id) {
        let _ = Command::new("podman").args(["image", "rm", &old]).output();
    }
    let size: u64 = cmd::output(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &id]))?
        .trim()
        .parse()
        .context("podman printed an image size that is not a number")?;
    println!("image {DEV_TAG} ({REPOSITORY}:{version})");
    println!("id    {id}");
    println!("size  {:.1} MiB", size as f64 / (1024.0 * 1024.0));
    Ok(id)
}

/// The full id of a local image, if there is one by that name.
fn image_id(name: &str) -> Option<String> {
    let out = Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}", name]).output().ok()?;
    let id = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !id.is_empty()).then_some(id)
}

/// `cargo xtask smoke`: builds the image, then `mg-smoke` runs it on a simulated
/// node with the DaemonSet's own settings, read from the rendered manifest.
pub fn smoke() -> Result<()> {
    build()?;
    if let Err(e) = podman_can_run() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        eprintln!("\n!!!!! xtask: podman cannot run containers here, so the image smoke test DID NOT RUN !!!!!");
        eprintln!("!!!!! {e:#}\n");
        if ci {
            bail!("CI=true: refusing to skip the image smoke test");
        }
        return Ok(());
    }
    let root = workspace_root();
    let smoke = artifacts::build_test_program("mg-smoke")?;
    cmd::run(
        Command::new(&smoke)
            .arg("--image")
            .arg(DEV_TAG)
            .arg("--manifests")
            .arg(root.join("deploy/overlays/default"))
            .arg("--uninstall")
            .arg(root.join("deploy/uninstall")),
    )
    .context("the image smoke test failed")
}

/// Runs the image's `presets` command: proves podman can start a container here
/// (root, runc, a writable storage) before the smoke test builds a node for it.
fn podman_can_run() -> Result<()> {
    let out = Command::new("podman")
        .args(["run", "--rm", "--pull=never", "--runtime", "runc", "--network", "none"])
        .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", DEV_TAG, "presets"])
        .output()
        .context("could not start podman")?;
    if !out.status.success() {
        bail!(
            "`podman run {DEV_TAG} presets` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
