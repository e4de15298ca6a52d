// SPDX-License-Identifier: Apache-2.0
//! A Python for the guests. The real-SDK conceal scenario (mg-scenarios'
//! conceal_moto.rs: moto's IMDS emulator as the metadata service, botocore and boto3
//! as the clients) needs one, and the initramfs holds only busybox and static binaries.
//!
//! Assembled here for the guest's architecture, without running any of it there:
//! Debian bookworm's CPython with the shared libraries it and its extension modules
//! load (unpacked with dpkg-deb; glibc's loader finds them in the multiarch directories
//! without an ld.so.cache), and moto, boto3 and moto's server from PyPI as that
//! architecture's wheels (`pip install --platform --only-binary`), trimmed to what
//! moto's server imports to serve IMDS. Everything is compiled to bytecode on this
//! machine (unchecked-hash .pyc, which the guest uses without comparing sources), so
//! the emulated guest never compiles. Packed as a second cpio that the kernel unpacks
//! over the first. Cached under target/vm/cache/python-<arch>/ and rebuilt only when
//! [`recipe`] changes.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::{debian, initramfs};
use crate::{cmd, toolchain::Arch};

/// The Debian release whose CPython the guests run (3.11).
const SUITE: &str = "bookworm";
const VERSION: &str = "3.11";
/// Where the interpreter is in the guest: `mg-scenarios --python`.
pub(super) const INTERPRETER: &str = "/usr/bin/python3.11";

/// The interpreter, its standard library, and the libraries they load. Named one by
/// one (dependencies are not followed): the stdlib's full dependency list pulls in
/// curses, readline, sqlite, Berkeley DB and with them half a base system, none of
/// which moto or botocore import.
const DEBIAN_PACKAGES: &[&str] = &[
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libcrypt1",
    // /etc/mime.types, which Python's mimetypes (imported by werkzeug) reads.
    "media-types",
];

/// Pinned: the trimming below names moto's modules, which move between releases.
/// Flask, flask-cors and PyYAML are the part of `moto[server]` its server imports.
const PIP_PACKAGES: &[&str] = &["moto==5.2.5", "boto3==1.44.8", "flask", "flask-cors", "pyyaml"];

/// moto's server loads a service's module on its first request for it: serving IMDS,
/// it imports these; serving STS for the identity scenarios (identity*.rs), also `sts`,
/// `iam` (STS's roles), `s3` (whose errors IAM's access control raises), `cloudwatch`
/// and `events` (its request dispatch). The ~250 other services (35 MB) are left out.
const MOTO_KEEP: &[&str] = &[
    "__init__.py",
    "backend_index.py",
    "backends.py",
    "settings.py",
    "server.py",
    "py.typed",
    "core",
    "instance_metadata",
    "moto_api",
    "moto_server",
    "utilities",
    "sts",
    "iam",
    "s3",
    "cloudwatch",
    "events",
];

/// pip's console scripts: the guest runs moto's server as `python -c`. (cryptography
/// and cffi stay: moto's IAM, behind its STS, imports them.)
const SITE_DROP: &[&str] = &["bin"];

/// Parts of the standard library nothing here imports.
const STDLIB_DROP: &[&str] = &["pydoc_data", "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip"];

/// Debian's documentation and data no guest reads.
const SHARE_DROP: &[&str] =
    &["usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/locale", "usr/share/gdb"];

/// Wheels name the oldest glibc they need; bookworm's 2.36 runs any of these.
const WHEEL_PLATFORMS: &[&str] = &["manylinux2014", "manylinux_2_28", "manylinux_2_34"];

/// Everything the cached tree depends on: a change to any of it rebuilds the tree.
struct Recipe<'a> {
    suite: &'a str,
    version: &'a str,
    debian_packages: &'a [&'a str],
    pip_packages: &'a [&'a str],
    wheel_platforms: &'a [&'a str],
    moto_keep: &'a [&'a str],
    site_drop: &'a [&'a str],
    stdlib_drop: &'a [&'a str],
    share_drop: &'a [&'a str],
}

const RECIPE: Recipe<'static> = Recipe {
    suite: SUITE,
    version: VERSION,
    debian_packages: DEBIAN_PACKAGES,
    pip_packages: PIP_PACKAGES,
    wheel_platforms: WHEEL_PLATFORMS,
    moto_keep: MOTO_KEEP,
    site_drop: SITE_DROP,
    stdlib_drop: STDLIB_DROP,
    share_drop: SHARE_DROP,
};

impl Recipe<'_> {
    /// The stamp kept beside the cached tree. Destructured without `..`, so a field
    /// added to [`Recipe`] and left out of the stamp is an unused variable (an error
    /// under the lints) instead of a cache that never rebuilds.
    fn stamp(&self, arch: Arch) -> String {
        let Recipe {
            suite,
            version,
            debian_packages,
            pip_packages,
            wheel_platforms,
            moto_keep,
            site_drop,
            stdlib_drop,
            share_drop,
        } = self;
        format!(
            "python {version} from Debian {suite} {}: {}\npip: {} for {}\nmoto: {}\ndropped: {} / {} / {}\n",
            arch.name(),
            debian_packages.join(" "),
            pip_packages.join(" "),
            wheel_platforms.join(" "),
            moto_keep.join(" "),
            site_drop.join(" "),
            stdlib_drop.join(" "),
            share_drop.join(" ")
        )
    }
}

fn recipe(arch: Arch) -> String {
    RECIPE.stamp(arch)
}

/// The guest's Python as a cpio archive, built on first use.
pub(super) fn archive(cache: &Path, packer: &Path, arch: Arch) -> Result<PathBuf> {
    let dir = cache.join(format!("python-{}", arch.name()));
    let out = dir.join("python.cpio");
    let stamp = dir.join("recipe");
    if out.is_file() && fs::read_to_string(&stamp).is_ok_and(|r| r == recipe(arch)) {
        return Ok(out);
    }
    let root = tree(cache, arch)?;
    let compiler = if arch == Arch::host() { root.clone() } else { tree(cache, Arch::host())? };
    compile(&root, &compiler, Arch::host())?;
    initramfs::write_cpio(packer, &root, &out)?;
    fs::write(&stamp, recipe(arch))?;
    Ok(out)
}

/// The unpacked tree for `arch` (without bytecode), built when its recipe changed.
fn tree(cache: &Path, arch: Arch) -> Result<PathBuf> {
    let dir = cache.join(format!("python-{}", arch.name()));
    let root = dir.join("root");
    let stamp = dir.join("tree-recipe");
    if root.is_dir() && fs::read_to_string(&stamp).is_ok_and(|r| r == recipe(arch)) {
        return Ok(root);
    }
    eprintln!("xtask: assembling Python {VERSION} with moto and boto3 for the {} guests", arch.name());
    let _ = fs::remove_file(&stamp);
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("could not remove {}", root.display()))?;
    }
    let debs = dir.join("debs");
    debian::download_all(cache, SUITE, arch, DEBIAN_PACKAGES, &debs)?;
    for deb in fs::read_dir(&debs)? {
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(deb?.path()).arg(&root))?;
    }
    for d in SHARE_DROP {
        remove(&root.join(d))?;
    }
    // glibc's character set converters (8 MB): Python's codecs are its own.
    remove(&root.join(format!("usr/lib/{}/gconv", triple(arch))))?;
    for d in STDLIB_DROP {
        remove(&root.join(format!("usr/lib/python{VERSION}")).join(d))?;
    }

    let site = dir.join("site");
    remove(&site)?;
    let mut pip = Command::new(pip(cache)?);
    pip.args(["install", "--quiet", "--disable-pip-version-check", "--target"])
        .arg(&site)
        .args(["--only-binary=:all:", "--implementation", "cp", "--python-version", VERSION])
        .args(["--abi", &format!("cp{}", VERSION.replace('.', ""))]);
    for tag in WHEEL_PLATFORMS {
        pip.arg("--platform").arg(format!("{tag}_{}", wheel_arch(arch)));
    }
    cmd::run(pip.args(PIP_PACKAGES))
        .with_context(|| format!("could not fetch the {} wheels of {}", arch.name(), PIP_PACKAGES.join(" ")))?;
    for entry in fs::read_dir(&site)? {
        let path = entry?.path();
        if dropped(&path.file_name().unwrap().to_string_lossy()) {
            remove(&path)?;
        }
    }
    for entry in fs::read_dir(site.join("moto"))? {
        let path = entry?.path();
        if !MOTO_KEEP.iter().any(|k| path.file_name().is_some_and(|n| n == *k)) {
            remove(&path)?;
        }
    }
    // botocore's service models (28 MB): the region fetcher and the credential chain
    // use none, the identity scenarios' GetCallerIdentity uses STS's; the top-level
    // files (endpoints, partitions, retry rules) stay.
    for entry in fs::read_dir(site.join("botocore/data"))? {
        let path = entry?.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "sts") {
            remove(&path)?;
        }
    }
    // Debian's Python adds this directory to sys.path when it exists.
    let dist = root.join("usr/lib/python3/dist-packages");
    fs::create_dir_all(dist.parent().unwrap())?;
    fs::rename(&site, &dist).with_context(|| format!("could not move {} to {}", site.display(), dist.display()))?;
    fs::write(&stamp, recipe(arch))?;
    Ok(root)
}

/// Whether an entry of pip's target directory belongs to a package of [`SITE_DROP`]:
/// the package itself, its `-<version>.dist-info`, or a `.so` module of that name.
fn dropped(entry: &str) -> bool {
    SITE_DROP.iter().any(|d| entry == *d || entry.starts_with(&format!("{d}-")) || entry.starts_with(&format!("{d}.")))
}

/// Compiles `root`'s Python sources with the interpreter of `compiler` (a tree for
/// this machine's architecture, run through its own loader: no chroot, no root).
fn compile(root: &Path, compiler: &Path, compiler_arch: Arch) -> Result<()> {
    let triple = triple(compiler_arch);
    let lib = format!("{0}/lib/{triple}:{0}/usr/lib/{triple}", compiler.display());
    let mut c = Command::new(compiler.join(format!("lib/{triple}/{}", loader(compiler_arch))));
    c.env_clear()
        .env("PYTHONHOME", compiler.join("usr"))
        .arg("--library-path")
        .arg(lib)
        .arg(compiler.join(format!("usr/bin/python{VERSION}")))
        .args(["-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash", "-s"])
        .arg(root)
        .args(["-p", "/"])
        .arg(root.join(format!("usr/lib/python{VERSION}")))
        .arg(root.join("usr/lib/python3/dist-packages"));
    cmd::run(&mut c).context("could not compile the guests' Python modules")
}

/// A pip of this machine's, in a virtualenv of its own under the cache.
fn pip(cache: &Path) -> Result<PathBuf> {
    let venv = cache.join("pip-venv");
    let pip = venv.join("bin/pip");
    if pip.is_file() {
        return Ok(pip);
    }
    let make = || cmd::run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv));
    if make().is_err() {
        // Debian splits venv (and ensurepip) out of python3.
        eprintln!("xtask: installing python3-venv (a pip to fetch the guests' wheels)");
        cmd::run(Command::new("apt-get").args(["update", "-qq"]))?;
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "python3", "python3-venv"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("could not install python3-venv; install it with apt-get and retry")?;
        make()?;
    }
    if !pip.is_file() {
        bail!("python3 -m venv made no {}", pip.display());
    }
    Ok(pip)
}

fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("could not remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Debian's multiarch directory name.
fn triple(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "x86_64-linux-gnu",
        Arch::Arm64 => "aarch64-linux-gnu",
    }
}

fn loader(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "ld-linux-x86-64.so.2",
        Arch::Arm64 => "ld-linux-aarch64.so.1",
    }
}

/// The architecture in wheel platform tags.
fn wheel_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "x86_64",
        Arch::Arm64 => "aarch64",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_whole_packages_and_nothing_that_only_shares_a_prefix() {
        assert!(dropped("bin"));
        // moto's IAM (behind its STS) imports cryptography, through it cffi.
        for kept in [
            "certifi",
            "binascii",
            "binary_helpers",
            "boto3",
            "cryptography",
            "cffi",
            "_cffi_backend.cpython-311-x86_64-linux-gnu.so",
        ] {
            assert!(!dropped(kept), "{kept}");
        }
    }

    #[test]
    fn every_ingredient_of_the_tree_changes_its_stamp() {
        let base = RECIPE.stamp(Arch::Amd64);
        let other: &[&str] = &["something-else"];
        let changed = [
            ("suite", Recipe { suite: "trixie", ..RECIPE }),
            ("version", Recipe { version: "3.12", ..RECIPE }),
            ("debian packages", Recipe { debian_packages: other, ..RECIPE }),
            ("pip packages", Recipe { pip_packages: other, ..RECIPE }),
            ("wheel platforms", Recipe { wheel_platforms: other, ..RECIPE }),
            ("moto's kept modules", Recipe { moto_keep: other, ..RECIPE }),
            ("dropped site packages", Recipe { site_drop: other, ..RECIPE }),
            ("dropped stdlib", Recipe { stdlib_drop: other, ..RECIPE }),
            ("dropped share", Recipe { share_drop: other, ..RECIPE }),
        ];
        let mut seen = std::collections::BTreeSet::from([base.clone()]);
        for (what, recipe) in changed {
            let stamp = recipe.stamp(Arch::Amd64);
            assert!(seen.insert(stamp.clone()), "changing the {what} left the stamp as another recipe's:\n{stamp}");
        }
        assert_ne!(RECIPE.stamp(Arch::Arm64), base, "each architecture's tree has a stamp of its own");
    }

    #[test]
    fn an_entry_moved_between_lists_changes_the_stamp() {
        let (last, kept) = SITE_DROP.split_last().unwrap();
        let stdlib: Vec<&str> = std::iter::once(*last).chain(STDLIB_DROP.iter().copied()).collect();
        let moved = Recipe { site_drop: kept, stdlib_drop: &stdlib, ..RECIPE };
        assert_ne!(moved.stamp(Arch::Amd64), RECIPE.stamp(Arch::Amd64));
    }
}
