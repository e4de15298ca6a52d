// SPDX-License-Identifier: Apache-2.0
//! The floor under the guard: its own hooks with nothing to do. For a sample of
//! [`Variant::Empty`](crate::variant::Variant) the guard's pinned links run programs
//! that only `return 1` (swapped in with `BPF_LINK_UPDATE`, so the cgroup, the links
//! and their order stay the guard's), and the host-side table sleeps while a twin of
//! its base chains — same hooks, same priorities, one rule that only accepts — runs in
//! its place. What is left is the kernel's cost of running anything on those hooks;
//! the guard's own work is the difference to the guard's samples.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context, Result};
use metadata_guard_tests::bpf::{self, bpf_attach_type, bpf_prog_type};

use crate::bench::Firewall;

/// The guard's hooks: (its link and program pin name, program type, attach type, the
/// empty program's name). Those in [`ATTACHED_ONLY_SOMETIMES`] are swapped only while
/// attached.
const HOOKS: [(&str, bpf_prog_type, bpf_attach_type, &str); 7] = [
    (
        "sock_create",
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK,
        bpf_attach_type::BPF_CGROUP_INET_SOCK_CREATE,
        "mg_empty_sock",
    ),
    (
        "connect4",
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        "mg_empty_conn4",
    ),
    (
        "connect6",
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
        "mg_empty_conn6",
    ),
    (
        "sendmsg4",
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG,
        "mg_empty_send4",
    ),
    (
        "sendmsg6",
        bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG,
        "mg_empty_send6",
    ),
    ("egress", bpf_prog_type::BPF_PROG_TYPE_CGROUP_SKB, bpf_attach_type::BPF_CGROUP_INET_EGRESS, "mg_empty_egress"),
    ("conceal_ops", bpf_prog_type::BPF_PROG_TYPE_SOCK_OPS, bpf_attach_type::BPF_CGROUP_SOCK_OPS, "mg_empty_ops"),
];
/// `conceal_ops` runs only in conceal mode; `sock_create` only where the packet
/// backstop reads socket marks (kernels whose cgroup_skb programs lack
/// `bpf_get_netns_cookie`).
const ATTACHED_ONLY_SOMETIMES: [&str; 2] = ["conceal_ops", "sock_create"];

/// Programs that only `return 1`, one per guard hook, loaded once; the bench swaps
/// them into the guard's links for the floor's samples.
pub(crate) struct EmptyPrograms {
    /// (name, program id) for the run-time statistics.
    pub ids: Vec<(String, u64)>,
    /// Per hook, in [`HOOKS`] order.
    fds: Vec<OwnedFd>,
}

impl EmptyPrograms {
    pub(crate) fn load() -> Result<EmptyPrograms> {
        let (mut ids, mut fds) = (Vec::new(), Vec::new());
        for (_, prog_type, attach_type, name) in HOOKS {
            let fd = bpf::prog_load(prog_type, attach_type, &bpf::RETURN_ONE, name)
                .with_context(|| format!("could not load the empty program {name}"))?;
            let id = bpf::prog_info(fd.as_fd()).context("could not read a program's info")?.id;
            ids.push((name.to_string(), u64::from(id)));
            fds.push(fd);
        }
        Ok(EmptyPrograms { ids, fds })
    }
}

/// The guard's link and program pins under the agent's layout directory (`v<N>`).
pub(crate) fn pin_dir(bpffs: &Path) -> Result<PathBuf> {
    std::fs::read_dir(bpffs)
        .with_context(|| format!("could not list {}", bpffs.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("links/egress").exists())
        .with_context(|| format!("no pinned guard links under {}; is the agent installed?", bpffs.display()))
}

/// The guard's links running the empty programs, until [`Swapped::restore`].
pub(crate) struct Swapped {
    /// (link, the guard's program it ran).
    links: Vec<(OwnedFd, OwnedFd)>,
}

/// Makes every guard link run its empty program.
pub(crate) fn swap_in(bpffs: &Path, empty: &EmptyPrograms) -> Result<Swapped> {
    let dir = pin_dir(bpffs)?;
    let mut swapped = Swapped { links: Vec::new() };
    for ((pin, ..), empty_fd) in HOOKS.iter().zip(&empty.fds) {
        let (link_pin, prog_pin) = (dir.join("links").join(pin), dir.join("programs").join(pin));
        if ATTACHED_ONLY_SOMETIMES.contains(pin) && !link_pin.exists() {
            continue;
        }
        let link = bpf::obj_get(&link_pin).with_context(|| format!("could not open {}", link_pin.display()))?;
        let guard = bpf::obj_get(&prog_pin).with_context(|| format!("could not open {}", prog_pin.display()))?;
        let running = bpf::link_info(link.as_fd())?.prog_id;
        let pinned = bpf::prog_info(guard.as_fd())?.id;
        ensure!(running == pinned, "link {} runs program {running}, not the pinned {pinned}", link_pin.display());
        bpf::link_update(link.as_fd(), empty_fd.as_fd())
            .with_context(|| format!("could not swap an empty program into {}", link_pin.display()))?;
        swapped.links.push((link, guard));
    }
    Ok(swapped)
}

impl Swapped {
    /// The guard's programs back in their links.
    pub(crate) fn restore(mut self) -> Result<()> {
        for (link, guard) in self.links.drain(..) {
            bpf::link_update(link.as_fd(), guard.as_fd()).context("could not swap the guard's program back")?;
        }
        Ok(())
    }
}

impl Drop for Swapped {
    fn drop(&mut self) {
        for (link, guard) in &self.links {
            let _ = bpf::link_update(link.as_fd(), guard.as_fd());
        }
    }
}

/// Creates `floor` (dormant) in the node namespace: for every base chain of the
/// agent's `host` table, one on the same hook at the same priority whose only rule
/// accepts — nf_tables' counterpart of a program that only returns 1: what any rule
/// costs there (~20 ns a packet on the bench's machine; a chain with no rules at all
/// costs less, but judges nothing).
pub(crate) fn create_floor_table(fw: &Firewall, host: &str, floor: &str) -> Result<()> {
    let listed = fw.nft_json(&["list", "table", "inet", host])?;
    let items = listed["nftables"].as_array().context("`nft -j list table` printed no `nftables` array")?;
    let mut script = format!("table inet {floor} {{\n  flags dormant;\n");
    let mut chains = 0;
    for chain in items.iter().filter_map(|i| i.get("chain")) {
        let (Some(name), Some(hook), Some(prio)) =
            (chain["name"].as_str(), chain["hook"].as_str(), chain["prio"].as_i64())
        else {
            continue; // a regular chain, jumped to
        };
        script.push_str(&format!(
            "  chain {name} {{ type filter hook {hook} priority {prio}; policy accept; accept; }}\n"
        ));
        chains += 1;
    }
    ensure!(chains > 0, "the host-side table `inet {host}` has no base chains to mirror: {listed}");
    script.push_str("}\n");
    // Added first so that the delete cannot fail: one left by an interrupted run goes.
    fw.nft(&format!("add table inet {floor}\ndelete table inet {floor}\n{script}"))
        .with_context(|| format!("could not create the floor's table `inet {floor}`"))
}
