// SPDX-License-Identifier: Apache-2.0
//! The guest's whole userspace, as one initramfs: busybox, the agent (both eBPF
//! variants), mg-scenarios, the kernel modules the scenarios need, and an init script
//! that prepares the node, runs `check` and the scenarios, and powers off.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::cmd;

/// Printed by the init script; the host parses the console for these.
pub(super) const MARK: &str = "mg-vm:";

/// The scenarios' timing budgets are for real hardware; QEMU's TCG emulates the guest
/// several times slower (a 100 ms budget took 140–390 ms), evenly enough that a
/// uniform factor keeps the budgets meaningful.
pub(super) const TIME_SCALE: u32 = 10;

/// Modules the scenarios need that Debian's cloud kernels build as modules:
/// veth joins the simulated pods to the node; nf_tables and the expressions the
/// host-side table uses (the guest has no modprobe to load them on demand), and NAT
/// for the scenarios' DNAT. Their dependencies (nfnetlink, nf_reject_*, nf_defrag_*,
/// ...) come along.
const MODULES: &[&str] = &[
    "veth",
    "nf_tables",
    "nft_reject_inet",
    "nft_log",
    "nfnetlink_log",
    "nft_limit",
    "nft_objref",
    "nft_chain_nat",
    "nft_nat",
    "nf_nat",
    "nf_conntrack",
    // `notrack`, which keeps conceal mode's proxy connections out of NAT.
    "nft_ct",
    // The transport protocols the protocols scenarios open from a pod.
    "sctp",
    "dccp_ipv4",
    "dccp_ipv6",
    // The bridge topology of the host-side scenarios (pods behind kubenet's cbr0).
    "bridge",
    // kube-proxy's IPVS mode, and its default scheduler.
    "ip_vs",
    "ip_vs_rr",
];
/// Built into some kernels, modules in others (nft_counter: a module on 5.10 only).
/// The uplink scenarios' pods on the uplink (Multus secondary networks, IPVLAN CNIs),
/// and the tc datapath: a clsact qdisc with a direct-action cls_bpf filter; a kernel
/// with none of them fails its scenario, naming what is missing.
const MODULES_IF_MODULAR: &[&str] = &["nft_counter", "macvlan", "ipvlan", "sch_ingress", "cls_bpf"];

/// Init script: mounts what a node has, loads the modules, runs `check` then the
/// scenarios, prints the end marker with their exit code, and powers the VM off
/// (as PID 1 it must never exit: that would panic the guest instead).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
setup_failed=
step() { "$@" || { echo "mg-vm: setup step failed: $*"; setup_failed=1; }; }
step mount -t proc proc /proc
step mount -t sysfs sysfs /sys
step mount -t devtmpfs devtmpfs /dev
step mount -t tmpfs tmpfs /tmp
step mount -t cgroup2 cgroup2 /sys/fs/cgroup
step mount -t bpf bpf /sys/fs/bpf
# A node's own loopback is up; the agent serves /metrics and /readyz there.
step ip link set lo up
for m in $(cat /lib/modules/order); do step insmod /lib/modules/$m.ko; done
echo "mg-vm: kernel $(uname -r)"
# 1: the programs run JIT-compiled (arm64 and amd64 have their own JITs); 0: interpreted.
echo "mg-vm: bpf_jit_enable $(cat /proc/sys/net/core/bpf_jit_enable 2>/dev/null || echo absent)"
echo "mg-vm: check begin"
metadata-guard check
echo "mg-vm: check end"
if [ -n "$setup_failed" ]; then
    echo "mg-vm: end rc=setup-failed"
else
    mg-scenarios --agent /bin/metadata-guard --variant-agent /bin/metadata-guard-variant --without-promtool \
        --python @PYTHON@ --time-scale @TIME_SCALE@ @FILTER@
    echo "mg-vm: end rc=$?"
fi
poweroff -f
"#;

pub(super) struct Inputs<'a> {
    /// A busybox that runs on this machine: its cpio packs the archive.
    pub packer: &'a Path,
    /// The guest's busybox.
    pub busybox: &'a Path,
    pub agent: &'a Path,
    pub variant_agent: &'a Path,
    pub scenarios: &'a Path,
    /// The kernel package's `lib/modules/<release>` directory.
    pub modules_dir: &'a Path,
    /// `mg-scenarios --filter`: None runs every scenario.
    pub filter: Option<&'a str>,
    /// Archives the kernel unpacks after this one (the guest's Python).
    pub extra_archives: &'a [&'a Path],
    /// `mg-scenarios --python`: the interpreter the real-SDK scenarios run.
    pub python: &'a str,
}

/// Builds `<dir>/initramfs.cpio` (uncompressed: the kernel unpacks it without a
/// decompressor, which under TCG saves seconds) from a staging tree in `<dir>/root`.
pub(super) fn pack(dir: &Path, inputs: &Inputs<'_>) -> Result<PathBuf> {
    let stage = dir.join("root");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("could not remove {}", stage.display()))?;
    }
    for d in ["bin", "lib/modules", "proc", "sys", "dev", "tmp"] {
        fs::create_dir_all(stage.join(d))?;
    }
    for (from, name) in [
        (inputs.busybox, "busybox"),
        (inputs.agent, "metadata-guard"),
        (inputs.variant_agent, "metadata-guard-variant"),
        (inputs.scenarios, "mg-scenarios"),
    ] {
        fs::copy(from, stage.join("bin").join(name))
            .with_context(|| format!("could not copy {} into the initramfs", from.display()))?;
    }
    let order = modules_in_load_order(inputs.modules_dir, MODULES)?;
    for (name, bytes) in &order {
        fs::write(stage.join("lib/modules").join(format!("{name}.ko")), bytes)?;
    }
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    fs::write(stage.join("lib/modules/order"), names.join("\n") + "\n")?;
    let init = stage.join("init");
    let filter = inputs.filter.map(|f| format!("--filter '{f}'")).unwrap_or_default();
    fs::write(
        &init,
        INIT.replace("@TIME_SCALE@", &TIME_SCALE.to_string())
            .replace("@FILTER@", &filter)
            .replace("@PYTHON@", inputs.python),
    )?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let out = dir.join("initramfs.cpio");
    write_cpio(inputs.packer, &stage, &out)?;
    // The kernel unpacks concatenated archives one after the other.
    let mut file = fs::OpenOptions::new().append(true).open(&out)?;
    for extra in inputs.extra_archives {
        let mut from = fs::File::open(extra).with_context(|| format!("could not open {}", extra.display()))?;
        std::io::copy(&mut from, &mut file).with_context(|| format!("could not append {}", extra.display()))?;
    }
    Ok(out)
}

/// Packs the tree under `stage` into the newc archive `out` with busybox's cpio.
pub(super) fn write_cpio(packer: &Path, stage: &Path, out: &Path) -> Result<()> {
    let mut entries = Vec::new();
    walk(stage, stage, &mut entries)?;
    let mut cpio = Command::new(packer);
    cpio.args(["cpio", "-o", "-H", "newc"])
        .current_dir(stage)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out).with_context(|| format!("could not create {}", out.display()))?)
        .stderr(Stdio::null()); // it counts blocks there
    let mut child = cpio.spawn().with_context(|| format!("could not start `{}`", cmd::describe(&cpio)))?;
    child.stdin.take().unwrap().write_all((entries.join("\n") + "\n").as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("`{}` failed ({status}) packing {}", cmd::describe(&cpio), stage.display());
    }
    Ok(())
}

/// Paths under `root`, relative, each directory before what it holds (cpio's order).
fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut children: Vec<PathBuf> = fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    children.sort();
    for path in children {
        out.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        if path.is_dir() {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

/// `wanted` and the modules they depend on, dependencies first, each decompressed:
/// busybox's insmod loads plain .ko files only. The package ships no modules.dep
/// (depmod writes it on install), so dependencies come from each module's
/// `.modinfo` `depends=` entry.
fn modules_in_load_order(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    collect_modules(&modules_dir.join("kernel"), &mut files)?;
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(name: &str, files: &[PathBuf], order: &mut Vec<(String, Vec<u8>)>, dir: &Path) -> Result<()> {
        let key = name.replace('-', "_");
        if order.iter().any(|(n, _)| *n == key) {
            return Ok(());
        }
        let file = files
            .iter()
            .find(|f| module_name(f).is_some_and(|n| n.replace('-', "_") == key))
            .with_context(|| format!("kernel module {name} is not in {}", dir.display()))?;
        let bytes = decompressed(file)?;
        for dep in depends(&bytes) {
            visit(&dep, files, order, dir)?;
        }
        order.push((key, bytes));
        Ok(())
    }
    for name in wanted {
        visit(name, &files, &mut order, modules_dir)?;
    }
    for name in MODULES_IF_MODULAR {
        if files.iter().any(|f| module_name(f).as_deref() == Some(*name)) {
            visit(name, &files, &mut order, modules_dir)?;
        }
    }
    Ok(order)
}

fn collect_modules(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("could not list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_modules(&path, out)?;
        } else if module_name(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// `veth` for `veth.ko`, `veth.ko.xz`, `veth.ko.zst`, `veth.ko.gz`.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".xz").or(file.strip_suffix(".zst")).or(file.strip_suffix(".gz")).unwrap_or(file);
    stem.strip_suffix(".ko").map(str::to_string)
}

fn decompressed(path: &Path) -> Result<Vec<u8>> {
    let tool = match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("could not read {}", path.display())),
    };
    let mut c = Command::new(tool);
    c.arg("-dc").arg(path);
    let out =
        c.stderr(Stdio::inherit()).output().with_context(|| format!("could not start `{}`", cmd::describe(&c)))?;
    if !out.status.success() {
        bail!("`{}` failed ({}); install {tool} and retry", cmd::describe(&c), out.status);
    }
    Ok(out.stdout)
}

/// The `depends=a,b` entry of a module's `.modinfo` (NUL-separated key=value strings).
fn depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else { return Vec::new() };
    let value = &module[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}
