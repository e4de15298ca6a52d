//! What the host side sees of a pod: the host end of its veth. A pod's network
//! namespace has an id in the host's (`RTM_GETNSID`), and the host end of a veth
//! names its peer's namespace by that id (`IFLA_LINK_NETNSID`); a process of the pod
//! (from its cgroup's `cgroup.procs`) opens the namespace.
//!
//! This needs the node's processes in view (the agent in the host's PID namespace):
//! `cgroup.procs` lists only the PIDs the reader can see.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::{rtnl, NlSocket};

/// A network namespace with a link into the host's, and the cgroups with processes in it.
#[derive(Clone, Debug, Default)]
pub struct PodNets {
    /// nsid (as the host names it) → cgroup ids of the processes in that namespace.
    pub cgroups_by_nsid: BTreeMap<i32, BTreeSet<u64>>,
    /// Host interface index → the nsid of its peer's namespace.
    pub nsid_by_ifindex: BTreeMap<u32, i32>,
}

impl PodNets {
    /// Walks the cgroup tree under `cgroup_root` and the host's links; with `only`,
    /// reads the processes of those cgroups alone (an allowlist update stays cheap).
    pub fn scan(cgroup_root: &Path, route: &mut NlSocket, only: Option<&BTreeSet<u64>>) -> Result<PodNets> {
        let mut nets = PodNets::default();
        for link in rtnl::links(route).context("could not list the host's network interfaces")? {
            if let Some((_, nsid)) = link.peer {
                nets.nsid_by_ifindex.insert(link.index, nsid);
            }
        }
        let mut seen_netns: BTreeMap<u64, Option<i32>> = BTreeMap::new();
        let own_netns = fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
        let mut stack = vec![cgroup_root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else { continue };
            let cgroup_id = meta.ino();
            let wanted = only.is_none_or(|ids| ids.contains(&cgroup_id));
            if let Some(procs) = wanted.then(|| fs::read_to_string(dir.join("cgroup.procs")).ok()).flatten() {
                let mut cgroup_nets = HashSet::new();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    let ns_path = format!("/proc/{pid}/ns/net");
                    let Ok(ns_ino) = fs::metadata(&ns_path).map(|m| m.ino()) else { continue };
                    if Some(ns_ino) == own_netns || !cgroup_nets.insert(ns_ino) {
                        continue;
                    }
                    let nsid = *seen_netns.entry(ns_ino).or_insert_with(|| nsid_of(route, &ns_path));
                    if let Some(nsid) = nsid {
                        nets.cgroups_by_nsid.entry(nsid).or_default().insert(cgroup_id);
                    }
                }
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
        }
        Ok(nets)
    }

    /// Host interfaces whose peer is in the namespace of one of `cgroups`.
    pub fn interfaces_of(&self, cgroups: &BTreeSet<u64>) -> Vec<u32> {
        let nsids: BTreeSet<i32> =
            self.cgroups_by_nsid.iter().filter(|(_, ids)| !ids.is_disjoint(cgroups)).map(|(nsid, _)| *nsid).collect();
        self.nsid_by_ifindex.iter().filter(|(_, nsid)| nsids.contains(nsid)).map(|(i, _)| *i).collect()
    }

    /// The cgroups with processes behind host interface `ifindex`.
    pub fn cgroups_behind(&self, ifindex: u32) -> Option<&BTreeSet<u64>> {
        self.cgroups_by_nsid.get(self.nsid_by_ifindex.get(&ifindex)?)
    }
}

fn nsid_of(route: &mut NlSocket, ns_path: &str) -> Option<i32> {
    let ns = fs::File::open(ns_path).ok()?;
    rtnl::nsid_of_fd(route, ns.as_raw_fd() as u32).ok().flatten()
}
