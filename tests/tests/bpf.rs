// SPDX-License-Identifier: Apache-2.0
//! The tests' own bpf(2) calls on the real kernel: a program loaded, attached to a
//! throwaway cgroup both ways, a link swapped to another program, and what the kernel
//! says of each read back.
//!
//! Needs root. Without it the test skips, unless CI=true, where it fails.

use std::{fs::File, os::fd::AsFd};

use metadata_guard_tests::{
    bpf::{self, bpf_attach_type, bpf_prog_type, BPF_F_ALLOW_MULTI},
    cgroups::{find_cgroup2_mount, TestCgroup},
    gate,
};

#[test]
fn programs_attach_both_ways_and_a_link_runs_what_it_was_swapped_to() {
    if !gate::root_or_skip("bpf(2), cgroups") {
        return;
    }
    let cgroup =
        TestCgroup::create(&find_cgroup2_mount().unwrap(), &format!("mg-bpf-test-{}", std::process::id())).unwrap();
    let dir = File::open(cgroup.path()).unwrap();
    let (sock_addr, connect4) =
        (bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpf_attach_type::BPF_CGROUP_INET4_CONNECT);
    let load = |name| bpf::prog_load(sock_addr, connect4, &bpf::RETURN_ONE, name).unwrap();
    let (first, second, third) = (load("mg_test_first"), load("mg_test_second"), load("mg_test_third"));

    let info = bpf::prog_info(first.as_fd()).unwrap();
    assert_eq!(&info.name[..14], b"mg_test_first\0".map(|b| b as libc::c_char), "the name given is the kernel's");
    bpf::prog_attach(first.as_fd(), dir.as_fd(), connect4, BPF_F_ALLOW_MULTI).unwrap();

    let link = bpf::link_create(second.as_fd(), dir.as_fd(), connect4).unwrap();
    let second_id = bpf::prog_info(second.as_fd()).unwrap().id;
    assert_eq!(bpf::link_info(link.as_fd()).unwrap().prog_id, second_id);
    bpf::link_update(link.as_fd(), third.as_fd()).unwrap();
    let third_id = bpf::prog_info(third.as_fd()).unwrap().id;
    assert_ne!(third_id, second_id);
    assert_eq!(bpf::link_info(link.as_fd()).unwrap().prog_id, third_id, "the link runs the program swapped in");
    drop(bpf::enable_stats().unwrap());
    // The cgroup goes last: its removal detaches what is attached to it.
    drop((link, first, second, third, dir));
}
