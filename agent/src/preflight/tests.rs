// SPDX-License-Identifier: Apache-2.0
//! `judge`, set-up by set-up: what a node reports decides pass, warn or fail, and the
//! fix names the real cause.

use std::path::PathBuf;

use super::{facts::ProgramKind, judge, Check, Facts, Feature, Found, Outcome, Pins};

const CAPS_DAEMONSET: u64 = (1 << super::CAP_BPF) | (1 << super::CAP_NET_ADMIN) | (1 << super::CAP_PERFMON);

/// A 6.1 node running the agent as the DaemonSet does, where everything works.
fn daemonset_node() -> Facts {
    Facts {
        kernel_release: "6.1.0-cloud-amd64".into(),
        kernel: (6, 1),
        caps: CAPS_DAEMONSET | (1 << super::CAP_SYS_RESOURCE),
        seccomp_filter: true,
        cgroup: Ok(PathBuf::from("/host/sys/fs/cgroup")),
        cgroup_id: Some(1),
        bpffs_root: PathBuf::from("/sys/fs/bpf/metadata-guard"),
        bpffs_parent: PathBuf::from("/sys/fs/bpf"),
        on_bpffs: true,
        bpffs_parent_exists: true,
        mount_bpffs: false,
        btf: true,
        memlock: Some(8 << 20),
        probes: vec![
            (Feature::Program(ProgramKind::SockAddr), Found::Yes),
            (Feature::Program(ProgramKind::Sock), Found::Yes),
            (Feature::Program(ProgramKind::Skb), Found::Yes),
            (Feature::Map("RingBuf".into()), Found::Yes),
            (Feature::Map("SkStorage".into()), Found::Yes),
            (Feature::Helper("get_current_comm".into(), ProgramKind::SockAddr), Found::Yes),
            (Feature::Helper("sk_storage_get".into(), ProgramKind::Skb), Found::Yes),
        ],
        object: Some(Ok(())),
        pins: Pins::Readable(vec![("connect4", 1, true), ("egress", 1, true)]),
        netns_sockopt: Ok(true),
        backstop: crate::loader::Backstop::SocketMarks,
    }
}

fn get<'a>(checks: &'a [Check], name: &str) -> &'a Check {
    checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name} in {checks:#?}"))
}

fn failures(checks: &[Check]) -> Vec<&str> {
    checks.iter().filter(|c| c.outcome == Outcome::Fail).map(|c| c.name.as_str()).collect()
}

#[test]
fn the_daemonset_set_up_passes_without_cap_sys_admin() {
    let checks = judge(&daemonset_node());
    assert!(failures(&checks).is_empty(), "{checks:#?}");
    assert!(checks.iter().all(|c| c.name != "CAP_SYS_ADMIN"), "CAP_SYS_ADMIN is neither needed nor held");
    assert_eq!(get(&checks, "pinned links").outcome, Outcome::Pass);
}

#[test]
fn a_seccomp_filter_refusing_bpf_to_cap_bpf_fails_naming_the_runtimes() {
    let mut f = daemonset_node();
    for (_, found) in &mut f.probes {
        *found = Found::Denied(libc::EPERM);
    }
    f.object = Some(Err((Some(libc::EPERM), "could not create the guard's maps: Operation not permitted".into())));
    let checks = judge(&f);
    assert!(checks.iter().all(|c| !c.name.ends_with(" map")), "one check for the refused bpf(2), not one per probe");
    let c = get(&checks, "bpf(2)");
    assert_eq!(c.outcome, Outcome::Fail);
    let fix = c.fix.as_deref().unwrap();
    assert!(fix.contains("seccomp") && fix.contains("containerd 1.6.9") && fix.contains("CRI-O 1.31"), "{fix}");
    let object = get(&checks, "kernel object");
    assert!(object.outcome == Outcome::Fail && object.fix.as_deref().unwrap().contains("seccomp"));
}

#[test]
fn without_cap_perfmon_the_fix_is_cap_perfmon_not_a_newer_kernel() {
    let mut f = daemonset_node();
    f.caps &= !(1 << super::CAP_PERFMON);
    f.probes[5].1 = Found::No;
    f.object = Some(Err((Some(libc::EACCES), "the kernel's verifier refused program mg_connect4".into())));
    let checks = judge(&f);
    for name in ["CAP_PERFMON", "helper get_current_comm (cgroup sock_addr)"] {
        let c = get(&checks, name);
        assert_eq!(c.outcome, Outcome::Fail, "{c:?}");
        let fix = c.fix.as_deref().unwrap();
        assert!(fix.contains("CAP_PERFMON") && !fix.contains("kernel 5."), "{fix}");
    }
}

#[test]
fn a_kernel_that_offers_comm_without_cap_perfmon_needs_no_cap_perfmon() {
    let mut f = daemonset_node();
    f.caps &= !(1 << super::CAP_PERFMON);
    assert_eq!(get(&judge(&f), "CAP_PERFMON").outcome, Outcome::Pass);
}

#[test]
fn cap_bpf_alone_does_not_pass_without_cap_net_admin() {
    let mut f = daemonset_node();
    f.caps = 1 << super::CAP_BPF | 1 << super::CAP_PERFMON;
    let checks = judge(&f);
    assert_eq!(failures(&checks), ["CAP_NET_ADMIN"]);
}

#[test]
fn a_missing_bpffs_with_mount_bpffs_false_fails_and_never_promises_a_mount() {
    let mut f = daemonset_node();
    f.on_bpffs = false;
    let c = get(&judge(&f), "bpffs").clone();
    assert_eq!(c.outcome, Outcome::Fail);
    assert!(c.detail.contains("--mount-bpffs=false") && !c.fix.as_deref().unwrap().contains("`run` mounts"), "{c:?}");
    // `run` would try to mount it, which takes CAP_SYS_ADMIN.
    f.mount_bpffs = true;
    let c = get(&judge(&f), "bpffs").clone();
    assert!(c.outcome == Outcome::Fail && c.detail.contains("CAP_SYS_ADMIN"), "{c:?}");
    f.caps |= 1 << super::CAP_SYS_ADMIN;
    let c = get(&judge(&f), "bpffs").clone();
    assert_eq!(c.outcome, Outcome::Warn);
    assert!(c.fix.unwrap().contains("--mount-bpffs=true"));
}

#[test]
fn old_kernels_need_cap_sys_resource_unless_memlock_is_unlimited() {
    let mut f = daemonset_node();
    (f.kernel, f.kernel_release) = ((5, 10), "5.10.0-32-cloud-amd64".into());
    f.caps &= !(1 << super::CAP_SYS_RESOURCE);
    assert_eq!(get(&judge(&f), "CAP_SYS_RESOURCE").outcome, Outcome::Fail);
    f.memlock = None;
    assert_eq!(get(&judge(&f), "CAP_SYS_RESOURCE").outcome, Outcome::Pass);
    (f.kernel, f.memlock) = ((5, 15), Some(64 << 10));
    assert_eq!(get(&judge(&f), "CAP_SYS_RESOURCE").outcome, Outcome::Pass);
}

#[test]
fn kernels_before_cap_bpf_need_cap_sys_admin() {
    let mut f = daemonset_node();
    (f.kernel, f.kernel_release) = ((5, 4), "5.4.0".into());
    let checks = judge(&f);
    assert_eq!(get(&checks, "CAP_BPF").outcome, Outcome::Fail);
    assert_eq!(get(&checks, "kernel version").outcome, Outcome::Fail);
}

#[test]
fn pins_an_agent_cannot_read_fail_and_pins_of_an_older_agent_warn() {
    let mut f = daemonset_node();
    f.pins = Pins::Unreadable("could not open the pinned link: Permission denied".into());
    let c = get(&judge(&f), "pinned links").clone();
    assert!(c.outcome == Outcome::Fail && c.fix.unwrap().contains("read-write access"));
    f.pins = Pins::Readable(vec![("connect4", 1, false)]);
    let c = get(&judge(&f), "pinned links").clone();
    assert!(c.outcome == Outcome::Warn && c.fix.unwrap().contains("BPF_LINK_UPDATE"));
    f.pins = Pins::Readable(vec![("connect4", 7, true)]);
    assert_eq!(get(&judge(&f), "pinned links").outcome, Outcome::Warn);
}

#[test]
fn a_verifier_refusal_is_reported_by_its_last_word() {
    let mut f = daemonset_node();
    f.object = Some(Err((
        Some(libc::EACCES),
        "the kernel's verifier refused program mg_connect4: the BPF_PROG_LOAD syscall returned Permission denied. \
         Verifier output: 0: R1=ctx()\n85: (0f) r0 += r1\nR0 pointer arithmetic prohibited for !root\nverification \
         time 232 usec\nprocessed 88 insns"
            .into(),
    )));
    let c = get(&judge(&f), "kernel object").clone();
    assert!(c.detail.ends_with("R0 pointer arithmetic prohibited for !root") && !c.detail.contains("85:"), "{c:?}");
}

/// Whether the kernel probes can run: as root. Elsewhere they skip loudly, unless
/// CI=true, where they fail.
fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: the kernel probes need root");
    eprintln!("\n!!!!! SKIPPED: the kernel probes need root !!!!!\n");
    false
}

/// The real probes on this machine's kernel: as root everything the agent needs is
/// there; the same probes in a thread without CAP_PERFMON (nor CAP_SYS_ADMIN) name
/// CAP_PERFMON.
#[test]
fn this_kernel_as_root_passes_and_without_cap_perfmon_fails_on_it() {
    if !root_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bpffs = dir.path().join("metadata-guard");
    let inputs = super::Inputs { cgroup: None, bpffs: &bpffs, mount_bpffs: true };
    let checks = super::run(&inputs);
    assert!(failures(&checks).is_empty(), "{checks:#?}");
    assert!(checks.iter().filter(|c| c.name.starts_with("helper ")).count() >= 10, "{checks:#?}");

    let checks = std::thread::spawn(move || {
        // CAP_SYS_ADMIN covers CAP_PERFMON: both go, as in the DaemonSet without PERFMON.
        drop_effective(super::CAP_PERFMON);
        drop_effective(super::CAP_SYS_ADMIN);
        super::run(&super::Inputs { cgroup: None, bpffs: &bpffs, mount_bpffs: true })
    })
    .join()
    .unwrap();
    let failed = failures(&checks);
    assert!(failed.contains(&"CAP_PERFMON") && failed.contains(&"kernel object"), "{checks:#?}");
}

/// `run` and `apply` verify the object by their real load, not in their checks; when
/// the kernel refuses it, they show the check `check` shows.
#[test]
fn a_refused_load_of_run_reads_as_the_kernel_object_check() {
    if !root_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bpffs = dir.path().join("metadata-guard");
    let (check, run) = std::thread::spawn(move || {
        drop_effective(super::CAP_PERFMON);
        drop_effective(super::CAP_SYS_ADMIN);
        let inputs = super::Inputs { cgroup: None, bpffs: &bpffs, mount_bpffs: true };
        let (facts, before) = super::before_load(&inputs);
        assert!(before.iter().all(|c| c.name != "kernel object"), "{before:#?}");
        let refused = crate::loader::load(None, crate::loader::Backstop::detect())
            .err()
            .expect("the object loaded without CAP_PERFMON");
        (super::run(&inputs), super::object_refused(facts, &bpffs, &refused))
    })
    .join()
    .unwrap();
    let (check, run) = (get(&check, "kernel object"), get(&run, "kernel object"));
    assert_eq!((run.outcome, &run.detail, &run.fix), (check.outcome, &check.detail, &check.fix));
}

/// Clears one capability from the calling thread's effective set.
fn drop_effective(cap: u32) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a version-3 header and the two data words it expects.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()), 0);
        data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
        assert_eq!(libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()), 0);
    }
}
