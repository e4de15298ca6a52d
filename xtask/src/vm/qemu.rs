// SPDX-License-Identifier: Apache-2.0
//! Boots one kernel with the initramfs under QEMU, saving the guest's serial console
//! to a log, with a deadline after which the VM is killed.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::initramfs::MARK;
use crate::{cmd, packages::Tool, toolchain::Arch};

/// The emulator of each architecture's guests, and its Debian package.
pub(super) fn tool(arch: Arch) -> Tool {
    match arch {
        Arch::Amd64 => Tool { program: "qemu-system-x86_64", package: "qemu-system-x86" },
        Arch::Arm64 => Tool { program: "qemu-system-aarch64", package: "qemu-system-arm" },
    }
}

/// The guest's serial console device.
fn console(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "ttyS0",
        Arch::Arm64 => "ttyAMA0",
    }
}

/// How QEMU runs the guest's vCPUs. x86 guests take one host thread for all vCPUs:
/// with a thread per vCPU (QEMU 7.2), a jump label the kernel patches on one vCPU
/// (text_poke_bp: int3, then the new jump) can stay stale in another vCPU's
/// translated code, which then takes the int3 forever — the kernel's handler sees
/// the new jump in memory and returns to the same address. 5.10 flips one static
/// key for every cgroup-BPF hook whenever the node's first program is attached or
/// its last detached, and every socket close passes one of its sites
/// (inet_release): both vCPUs of 5.10 amd64 guests locked up there, now and then,
/// right after an agent attached or detached. Real CPUs serialise on the IPIs
/// text_poke_bp sends. arm64 patches under stop_machine, so
/// its guests keep a thread per vCPU.
fn accelerator(arch: Arch) -> &'static str {
    match arch {
        Arch::Amd64 => "tcg,thread=single",
        Arch::Arm64 => "tcg",
    }
}

pub(super) struct Boot {
    pub elapsed: Duration,
    /// The deadline passed and the VM was killed.
    pub timed_out: bool,
    /// QEMU's exit status when it failed by itself (it exits 0 on the guest's poweroff).
    pub qemu_failed: Option<ExitStatus>,
}

/// Runs the VM to its end (the init script powers it off) or to `timeout`. Console
/// lines go to `console_log`; progress lines (scenario results and markers) are also
/// shown on the terminal, prefixed with `label`.
pub(super) fn boot(
    arch: Arch,
    kernel: &Path,
    initrd: &Path,
    console_log: &Path,
    timeout: Duration,
    label: &str,
) -> Result<Boot> {
    let mut qemu = Command::new(tool(arch).program);
    match arch {
        Arch::Amd64 => &mut qemu,
        // The generic `virt` board boots a kernel directly (no firmware) from a device
        // tree; its serial port is a PL011, ttyAMA0. Neoverse N1 is the core of AWS
        // Graviton2 and Ampere Altra (Azure, GCP T2A, Oracle A1): ARMv8.2 with LSE
        // atomics, which the BPF JIT uses, and without pointer authentication, whose
        // emulation (in `-cpu max`) QEMU documents as slow under TCG.
        Arch::Arm64 => qemu.args(["-machine", "virt", "-cpu", "neoverse-n1"]),
    };
    // TCG, the emulator, on purpose: a /dev/kvm that opens can still fail at the first
    // instruction (nested virtualisation), and KVM would only change the speed.
    qemu.args(["-accel", accelerator(arch), "-m", "2048", "-smp", "2"])
        // No default devices (NIC, VGA, monitor): the guest needs a serial console only.
        .args(["-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 with -no-reboot: a guest panic ends QEMU at once instead of hanging.
        .arg("-append")
        // softlockup_panic: a CPU stuck for 20 s never recovers under the emulator, so
        // the guest ends then, with the stuck task in the log, not at the deadline.
        .arg(format!("console={} panic=-1 loglevel=4 softlockup_panic=1", console(arch)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = qemu.spawn().with_context(|| format!("could not start `{}`", cmd::describe(&qemu)))?;
    let log = fs::File::create(console_log).with_context(|| format!("could not create {}", console_log.display()))?;
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let label = label.to_string();
    let console = thread::spawn(move || copy_console(stdout, log, &label));
    // QEMU's own complaints (bad options, missing firmware) end up in the log too.
    let errors = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let status = wait_or_kill(&mut child, timeout)?;
    let console_result = console.join().expect("console thread panicked");
    let qemu_errors = errors.join().expect("stderr thread panicked");
    if !qemu_errors.is_empty() {
        let mut log = fs::OpenOptions::new().append(true).open(console_log)?;
        writeln!(log, "--- qemu stderr ---\n{qemu_errors}")?;
    }
    console_result.with_context(|| format!("could not save the console to {}", console_log.display()))?;
    Ok(Boot { elapsed: started.elapsed(), timed_out: status.is_none(), qemu_failed: status.filter(|s| !s.success()) })
}

/// Waits for QEMU and returns its status; past the deadline kills it (by its PID,
/// through the Child handle) and returns None.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("could not wait for qemu")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            eprintln!("xtask: the VM (qemu pid {}) passed its {timeout:?} deadline; killing it", child.id());
            child.kill().context("could not kill qemu")?;
            child.wait().context("could not reap qemu")?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn copy_console(stdout: impl Read, mut log: fs::File, label: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        log.write_all(&line)?;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.starts_with("ok   ")
            || text.starts_with("FAIL ")
            || text.starts_with(MARK)
            || text.starts_with("scenarios:")
        {
            eprintln!("[{label}] {text}");
        }
    }
}
