// SPDX-License-Identifier: Apache-2.0
//! `cargo xtask image`: the agent's container image, and `cargo xtask smoke`: that
//! image run on a simulated node exactly as the DaemonSet runs it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{
    artifacts::{self, Profile, Variant},
    cmd, packages,
    toolchain::Arch,
    workspace_root,
};

pub(crate) const REPOSITORY: &str = "localhost/metadata-guard";
/// A manifest list: one image per architecture of [`Arch::ALL`].
pub(crate) const DEV_TAG: &str = "localhost/metadata-guard:dev";

const PODMAN: packages::Tool = packages::Tool { program: "podman", package: "podman" };
/// Debian's podman defaults to crun; the smoke test (and this machine) use runc.
const RUNC: packages::Tool = packages::Tool { program: "runc", package: "runc" };

/// Where each architecture's agent is staged for `podman build`: the build context is
/// `target/image/`, and the Containerfile copies `<TARGETARCH>/metadata-guard`.
pub(crate) fn staged_agent(arch: Arch) -> PathBuf {
    workspace_root().join("target/image").join(arch.name()).join("metadata-guard")
}

/// Builds the static agent of every architecture and the multi-architecture image:
/// a manifest list tagged localhost/metadata-guard:dev and :<version>, holding one
/// FROM-scratch image per architecture. podman builds them without emulation (the
/// Containerfile only copies a file). Returns each architecture's image as built,
/// by id: the tags may be moved by another build meanwhile.
pub(crate) fn build() -> Result<Vec<Instance>> {
    artifacts::build_ebpf(Variant::Default)?;
    for arch in Arch::ALL {
        let agent = artifacts::build_agent_static(arch)?;
        let staged = staged_agent(arch);
        fs::create_dir_all(staged.parent().unwrap())?;
        fs::copy(&agent, &staged)
            .with_context(|| format!("could not copy {} to {}", agent.display(), staged.display()))?;
    }
    packages::ensure(&[PODMAN, RUNC])?;

    let version = env!("CARGO_PKG_VERSION");
    let version_tag = format!("{REPOSITORY}:{version}");
    // `podman build --manifest` adds to an existing list: start from none. The images a
    // rebuild replaces keep no tag: remove them rather than pile them up (failure is
    // fine: a container may still use one).
    // The list is built under a name of this build's own, then tagged: podman's
    // storage is the machine's, and another build may move the tags meanwhile.
    let own = format!("{REPOSITORY}:build-{}", std::process::id());
    let previous: Vec<String> = Arch::ALL.iter().filter_map(|a| instance(DEV_TAG, *a).ok()).map(|i| i.id).collect();
    for tag in [DEV_TAG, version_tag.as_str(), own.as_str()] {
        let _ = Command::new("podman").args(["manifest", "rm", tag]).output();
        // A single-architecture image of that name, from before the list.
        let _ = Command::new("podman").args(["image", "rm", tag]).output();
    }
    let platforms: Vec<String> = Arch::ALL.iter().map(|a| format!("linux/{}", a.name())).collect();
    let mut build = Command::new("podman");
    build
        // No intermediate images to pile up; a fixed timestamp makes the same
        // binary give the same image id.
        .args(["build", "--pull=never", "--layers=false", "--timestamp", "0", "--build-arg"])
        .arg(format!("VERSION={version}"))
        .arg("--platform")
        .arg(platforms.join(","))
        .arg("--manifest")
        .arg(&own)
        .arg("--file")
        .arg(workspace_root().join("Containerfile"))
        .arg(workspace_root().join("target/image"));
    cmd::run(&mut build).context("podman could not build the image (see its output above)")?;
    let mut built = Vec::new();
    for arch in Arch::ALL {
        built.push(instance(&own, arch)?);
    }
    cmd::run(Command::new("podman").args(["tag", &own, DEV_TAG, &version_tag]))?;
    // With other names left, this only removes the name.
    cmd::run(Command::new("podman").args(["manifest", "rm", &own]))?;

    println!("image {DEV_TAG} ({version_tag}), a manifest list:");
    for image in &built {
        let size: u64 =
            cmd::output(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &image.id]))?
                .trim()
                .parse()
                .context("podman printed an image size that is not a number")?;
        println!("  {:<6} {}  {:.1} MiB", image.arch.name(), image.digest, size as f64 / (1024.0 * 1024.0));
    }
    for old in previous.iter().filter(|old| !built.iter().any(|i| i.id == **old)) {
        let _ = Command::new("podman").args(["image", "rm", old]).output();
    }
    Ok(built)
}

/// One architecture's image of the [`DEV_TAG`] list.
pub(crate) struct Instance {
    pub arch: Arch,
    /// The manifest digest, as a registry shows it: `sha256:…`.
    pub digest: String,
    /// The local image id.
    pub id: String,
}

/// The `arch` image of the manifest list `list`.
fn instance(list: &str, arch: Arch) -> Result<Instance> {
    let text = cmd::output(Command::new("podman").args(["manifest", "inspect", list]))?;
    let list: serde_json::Value =
        serde_json::from_str(&text).context("`podman manifest inspect` printed something that is not JSON")?;
    let digest = list["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["platform"]["architecture"] == arch.name() && m["platform"]["os"] == "linux")
        .and_then(|m| m["digest"].as_str())
        .with_context(|| format!("{list} has no linux/{} image; run `cargo xtask image`", arch.name()))?
        .to_string();
    let reference = format!("{REPOSITORY}@{digest}");
    let id = cmd::output(Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}", &reference]))?
        .trim()
        .to_string();
    Ok(Instance { arch, digest, id })
}

/// Copies the agent out of one architecture's image to `to`, as a node image's
/// build does (`podman create` + `podman cp`); returns `to`.
pub(crate) fn extract_agent(image: &Instance, to: &Path) -> Result<PathBuf> {
    fs::create_dir_all(to.parent().unwrap())?;
    let container = cmd::output(
        Command::new("podman")
            .args(["create", "--pull=never", "--platform"])
            .arg(format!("linux/{}", image.arch.name()))
            .arg(&image.id),
    )?
    .trim()
    .to_string();
    let copied = cmd::run(Command::new("podman").arg("cp").arg(format!("{container}:/metadata-guard")).arg(to));
    let removed = cmd::output(Command::new("podman").args(["rm", &container]));
    copied.with_context(|| {
        format!("could not copy the agent out of the {} image {} ({})", image.arch.name(), image.id, image.digest)
    })?;
    removed?;
    Ok(to.to_path_buf())
}

/// `cargo xtask smoke`: builds the image, then `mg-smoke` runs this machine's
/// architecture's image of it on a simulated node with the DaemonSet's own
/// settings, read from the rendered manifest.
pub(crate) fn smoke() -> Result<()> {
    let built = build()?;
    // By id: the tag is the machine's, and another build may move it meanwhile.
    let image = &built.iter().find(|i| i.arch == Arch::host()).expect("the image has every architecture").id;
    if let Err(e) = podman_can_run(image) {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        eprintln!("\n!!!!! xtask: podman cannot run containers here, so the image smoke test DID NOT RUN !!!!!");
        eprintln!("!!!!! {e:#}\n");
        if ci {
            bail!("CI=true: refusing to skip the image smoke test");
        }
        return Ok(());
    }
    let root = workspace_root();
    let smoke = artifacts::build_test_program("mg-smoke", Profile::Debug)?;
    cmd::run(
        Command::new(&smoke)
            .arg("--image")
            .arg(image)
            .arg("--manifests")
            .arg(root.join("deploy/overlays/default"))
            .arg("--uninstall")
            .arg(root.join("deploy/uninstall")),
    )
    .context("the image smoke test failed")
}

/// Runs the image's `presets` command: proves podman can start a container here
/// (root, runc, a writable storage) before the smoke test builds a node for it.
fn podman_can_run(image: &str) -> Result<()> {
    let out = Command::new("podman")
        .args(["run", "--rm", "--pull=never", "--runtime", "runc", "--network", "none"])
        .args(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", image, "presets"])
        .output()
        .context("could not start podman")?;
    if !out.status.success() {
        bail!("`podman run {image} presets` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
