// SPDX-License-Identifier: Apache-2.0
//! The Debian packages the VM matrix boots: cloud kernels and busybox-static, fetched
//! with apt-get through a private apt state under target/vm/cache (the machine's own
//! apt configuration and lists stay untouched) and cached there: a package whose
//! unpacked tree exists is never fetched again, so later runs need no network.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cmd, toolchain::Arch};

/// Where Debian's packages come from when the machine's sources name no Debian mirror.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// A package unpacked under the cache: `root` is what `dpkg -x` wrote.
pub(super) struct Unpacked {
    pub root: PathBuf,
    /// `Package` and `Version` of the .deb, for the report.
    pub name: String,
    pub version: String,
}

/// Returns `package` of Debian `suite` for `arch` unpacked at `cache/<dir>/root`,
/// fetching it only when that tree is missing. `package` may be a metapackage of one
/// dependency (e.g. `linux-image-cloud-amd64`); then that dependency is what gets
/// fetched.
pub(super) fn unpacked(
    cache: &Path,
    dir: &str,
    suite: &str,
    arch: Arch,
    package: &str,
    follow_meta: bool,
) -> Result<Unpacked> {
    let home = cache.join(dir);
    let deb = home.join("package.deb");
    let root = home.join("root");
    if !root.is_dir() {
        if !deb.is_file() {
            download(cache, suite, arch, package, follow_meta, &deb)?;
        }
        // Unpack beside the final place and rename, so an interrupted run never leaves
        // a half tree that a later run would take for complete.
        let partial = home.join("root.partial");
        if partial.exists() {
            fs::remove_dir_all(&partial).with_context(|| format!("could not remove {}", partial.display()))?;
        }
        cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))
            .with_context(|| format!("could not unpack {}; delete it to fetch it again", deb.display()))?;
        fs::rename(&partial, &root).with_context(|| format!("could not rename {}", partial.display()))?;
    }
    let field = |name: &str| -> Result<String> {
        Ok(cmd::output(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name))?.trim().to_string())
    };
    Ok(Unpacked { root, name: field("Package")?, version: field("Version")? })
}

/// Downloads `packages` (exact names, no dependencies followed) of Debian `suite` for
/// `arch` into the directory `to`, which is made empty first.
pub(super) fn download_all(cache: &Path, suite: &str, arch: Arch, packages: &[&str], to: &Path) -> Result<()> {
    let apt = PrivateApt::update(cache, suite, arch)?;
    if to.exists() {
        fs::remove_dir_all(to).with_context(|| format!("could not remove {}", to.display()))?;
    }
    fs::create_dir_all(to).with_context(|| format!("could not create {}", to.display()))?;
    eprintln!("xtask: downloading {} ({suite}, {})", packages.join(" "), arch.name());
    cmd::run(apt.command("apt-get").arg("-qq").arg("download").args(packages).current_dir(to))
        .with_context(|| format!("could not download {} from Debian {suite}", packages.join(" ")))
}

fn download(cache: &Path, suite: &str, arch: Arch, package: &str, follow_meta: bool, to: &Path) -> Result<()> {
    let apt = PrivateApt::update(cache, suite, arch)?;
    let name = if follow_meta { apt.sole_dependency(package)? } else { package.to_string() };
    let incoming = apt.dir.join("incoming");
    if incoming.exists() {
        fs::remove_dir_all(&incoming)?;
    }
    fs::create_dir_all(&incoming)?;
    eprintln!("xtask: downloading {name} ({suite}, {})", arch.name());
    cmd::run(apt.command("apt-get").arg("download").arg(&name).current_dir(&incoming))
        .with_context(|| format!("could not download {name} from Debian {suite}"))?;
    let got = fs::read_dir(&incoming)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {name} left no .deb in {}", incoming.display()))?;
    fs::create_dir_all(to.parent().unwrap())?;
    fs::rename(&got, to).with_context(|| format!("could not move {} to {}", got.display(), to.display()))?;
    Ok(())
}

/// apt-get and apt-cache pointed at one suite and architecture, with sources, lists
/// and cache of their own.
struct PrivateApt {
    dir: PathBuf,
    options: Vec<String>,
}

impl PrivateApt {
    fn update(cache: &Path, suite: &str, arch: Arch) -> Result<PrivateApt> {
        let dir = cache.join("apt").join(format!("{suite}-{}", arch.name()));
        let sources = dir.join("sources");
        for d in [sources.clone(), dir.join("lists/partial"), dir.join("cache/archives/partial")] {
            fs::create_dir_all(&d).with_context(|| format!("could not create {}", d.display()))?;
        }
        let mirror = debian_mirror();
        fs::write(
            sources.join("debian.sources"),
            format!(
                "Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )?;
        let options = [
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={}", sources.display()),
            format!("Dir::State::Lists={}", dir.join("lists").display()),
            format!("Dir::Cache={}", dir.join("cache").display()),
            // The guest's architecture, whatever this machine's: arm64 kernels and
            // busybox for the arm64 guests. (Downloading needs no dpkg foreign arch.)
            format!("APT::Architecture={}", arch.name()),
            format!("APT::Architectures={}", arch.name()),
            // Only the package index is needed: no translations, no AppStream data.
            "Acquire::Languages=none".to_string(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
            // The private directories belong to root; apt's _apt user cannot write them.
            "APT::Sandbox::User=root".to_string(),
        ]
        .iter()
        .flat_map(|o| ["-o".to_string(), o.clone()])
        .collect();
        eprintln!("xtask: apt-get update for Debian {suite} {} (private lists under {})", arch.name(), dir.display());
        let apt = PrivateApt { dir, options };
        cmd::run(apt.command("apt-get").arg("-qq").arg("update"))
            .with_context(|| format!("apt-get update for Debian {suite} {} from {mirror} failed", arch.name()))?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.args(&self.options);
        c
    }

    /// The one package a metapackage depends on (`linux-image-cloud-amd64` →
    /// `linux-image-6.1.0-…-cloud-amd64`): the suite's current kernel.
    fn sole_dependency(&self, meta: &str) -> Result<String> {
        let out = cmd::output(self.command("apt-cache").arg("depends").arg(meta))?;
        let deps: Vec<&str> = out.lines().filter_map(|l| l.trim().strip_prefix("Depends: ")).collect();
        match deps.as_slice() {
            [one] => Ok(one.trim().to_string()),
            _ => bail!("expected {meta} to depend on exactly one package, apt-cache says:\n{out}"),
        }
    }
}

/// The Debian mirror of the machine's own sources (deb822 `URIs:` or one-line `deb`),
/// so the VM packages come from wherever this machine is allowed to fetch.
fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .find(|w| {
            (w.starts_with("http://") || w.starts_with("https://")) && w.trim_end_matches('/').ends_with("/debian")
        })
        .map_or_else(|| DEFAULT_MIRROR.to_string(), |w| w.trim_end_matches('/').to_string())
}
