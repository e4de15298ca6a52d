// SPDX-License-Identifier: Apache-2.0
//! What the host side sees of a pod: the host end of its veth, or — behind a bridge,
//! where every pod enters the host's stack through the same device — the bridge and
//! the pod's source addresses. A pod's network namespace has an id in the host's
//! (`RTM_GETNSID`), and the host end of a veth names its peer's namespace by that id
//! (`IFLA_LINK_NETNSID`); a process of the pod (from its cgroup's `cgroup.procs`)
//! opens the namespace, where its addresses are read.
//!
//! This needs the node's processes in view (the agent in the host's PID namespace):
//! `cgroup.procs` lists only the PIDs the reader can see.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::{rtnl, NlSocket};

/// Masters above masters (a bridge in a VRF) followed at most this far.
const MAX_MASTER_DEPTH: usize = 8;
/// How long a scan of pods' namespaces is trusted when naming a packet's pod.
pub(crate) const PODS_RESCAN: Duration = Duration::from_secs(2);

/// A host interface whose peer is in another network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Peer {
    /// The peer's namespace, by the id the host gives it.
    pub nsid: i32,
    /// The peer's interface index in that namespace.
    pub index: u32,
    /// Where the peer's packets enter the host's IP stack, the `iif` the table sees:
    /// the interface itself, or the device it is enslaved to (a bridge's port
    /// delivers through the bridge).
    pub entry: u32,
}

/// A network namespace with a link into the host's, and the cgroups with processes in it.
#[derive(Clone, Debug, Default)]
pub(crate) struct PodNets {
    /// nsid (as the host names it) → cgroup ids of the processes in that namespace.
    pub cgroups_by_nsid: BTreeMap<i32, BTreeSet<u64>>,
    /// Host interface index → its peer.
    pub peers: BTreeMap<u32, Peer>,
    /// nsid → a process in that namespace and the namespace's inode, to open it by
    /// (`/proc/PID/ns/net`, checked to be the same namespace still).
    pid_by_nsid: BTreeMap<i32, (u32, u64)>,
}

/// What the table lets through for allowlisted pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Allowed {
    /// Host interfaces that carry one pod alone (a veth's host end): matched by
    /// interface, which nothing in another pod can forge.
    pub interfaces: Vec<u32>,
    /// (shared entry interface, source address) of pods behind a bridge: matched by
    /// address, and only on the interface the pod's packets enter through.
    pub v4: Vec<(u32, Ipv4Addr)>,
    pub v6: Vec<(u32, Ipv6Addr)>,
}

impl PodNets {
    /// Walks the cgroup tree under `cgroup_root` and the host's links; with `only`,
    /// reads the processes of those cgroups alone (an allowlist update stays cheap).
    pub(crate) fn scan(cgroup_root: &Path, route: &mut NlSocket, only: Option<&BTreeSet<u64>>) -> Result<PodNets> {
        let mut nets = PodNets::default();
        let links = rtnl::links(route).context("could not list the host's network interfaces")?;
        let master_of: BTreeMap<u32, u32> = links.iter().filter_map(|l| Some((l.index, l.master?))).collect();
        for link in &links {
            if let Some((index, nsid)) = link.peer {
                let mut entry = link.index;
                for _ in 0..MAX_MASTER_DEPTH {
                    match master_of.get(&entry) {
                        Some(master) => entry = *master,
                        None => break,
                    }
                }
                nets.peers.insert(link.index, Peer { nsid, index, entry });
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
                        nets.pid_by_nsid.entry(nsid).or_insert((pid, ns_ino));
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

    /// How the table recognises the pods of `cgroups`: by their own interface, or
    /// by (bridge, source address) behind a bridge. A pod whose addresses cannot be
    /// read (its processes just ended) is left out: it stays refused.
    pub(crate) fn allowed(&self, cgroups: &BTreeSet<u64>) -> Allowed {
        let nsids: BTreeSet<i32> =
            self.cgroups_by_nsid.iter().filter(|(_, ids)| !ids.is_disjoint(cgroups)).map(|(nsid, _)| *nsid).collect();
        let mut out = Allowed::default();
        for (ifindex, peer) in self.peers.iter().filter(|(_, p)| nsids.contains(&p.nsid)) {
            if peer.entry == *ifindex {
                out.interfaces.push(*ifindex);
                continue;
            }
            for addr in self.addresses(peer) {
                match addr {
                    IpAddr::V4(a) => out.v4.push((peer.entry, a)),
                    IpAddr::V6(a) => out.v6.push((peer.entry, a)),
                }
            }
        }
        out.v4.sort_unstable();
        out.v4.dedup();
        out.v6.sort_unstable();
        out.v6.dedup();
        out
    }

    /// The cgroups with processes behind host interface `ifindex` (a pod's own).
    pub(crate) fn cgroups_behind(&self, ifindex: u32) -> Option<&BTreeSet<u64>> {
        self.cgroups_by_nsid.get(&self.peers.get(&ifindex)?.nsid)
    }

    /// Whether packets of some pod enter the host through `ifindex` (its own
    /// interface or a bridge over it).
    pub(crate) fn knows_entry(&self, ifindex: u32) -> bool {
        self.peers.contains_key(&ifindex) || self.peers.values().any(|p| p.entry == ifindex)
    }

    /// The cgroups of the pod that has `source` on an interface entering the host
    /// through `entry` (a bridge): what names a refusal when the interface does not.
    /// A neighbour on the bridge forging that source is named as its owner.
    pub(crate) fn cgroups_with_source(&self, entry: u32, source: IpAddr) -> Option<&BTreeSet<u64>> {
        let peer = self
            .peers
            .iter()
            .filter(|(ifindex, p)| p.entry == entry && **ifindex != entry)
            .map(|(_, p)| p)
            .find(|p| self.addresses(p).contains(&source))?;
        self.cgroups_by_nsid.get(&peer.nsid)
    }

    /// The global addresses on the peer's interface, read inside its namespace.
    fn addresses(&self, peer: &Peer) -> Vec<IpAddr> {
        let Some((pid, ino)) = self.pid_by_nsid.get(&peer.nsid) else { return Vec::new() };
        let ns = format!("/proc/{pid}/ns/net");
        // Opened once and checked: the PID may have ended and been reused since the scan.
        let read = fs::File::open(&ns).and_then(|file| {
            if file.metadata()?.ino() != *ino {
                return Err(std::io::Error::other("the process left, its PID now names another namespace"));
            }
            let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
            let mut sock = NlSocket::open_in(Some(Path::new(&by_fd)), libc::NETLINK_ROUTE)?;
            rtnl::global_addresses(&mut sock, peer.index)
        });
        read.unwrap_or_else(|e| {
            tracing::debug!("could not read the addresses of interface {} in {ns}: {e}", peer.index);
            Vec::new()
        })
    }
}

fn nsid_of(route: &mut NlSocket, ns_path: &str) -> Option<i32> {
    let ns = fs::File::open(ns_path).ok()?;
    rtnl::nsid_of_fd(route, ns.as_raw_fd() as u32).ok().flatten()
}

/// Names the pod behind a packet that carried no socket by where it entered the
/// node: the interface when that is a pod's own, else — behind a bridge — its source
/// address there. Both the host side's refusals and the uplink's use it.
pub(crate) struct EntryPods {
    route: NlSocket,
    cgroup_root: PathBuf,
    /// How soon after a scan an interface no pod had found brings the next one. The
    /// host side rescans at once (its log is rate-limited in the kernel); the uplink
    /// waits [`PODS_RESCAN`], as every packet to a metadata address from the wire
    /// enters through an interface that is no pod's.
    unknown_rescan: Duration,
    pods: Option<(Instant, PodNets)>,
    /// Pods found by (bridge, source address) since the last scan: reading the
    /// addresses means entering each pod's namespace behind the bridge.
    by_source: HashMap<(u32, IpAddr), Option<u64>>,
}

impl EntryPods {
    /// Reads the host's links through a socket opened in `host_netns`.
    pub(crate) fn open(host_netns: Option<&Path>, cgroup_root: &Path, unknown_rescan: Duration) -> Result<EntryPods> {
        let route = NlSocket::open_in(host_netns, libc::NETLINK_ROUTE)
            .context("could not open an rtnetlink socket in the host network namespace")?;
        Ok(EntryPods {
            route,
            cgroup_root: cgroup_root.to_path_buf(),
            unknown_rescan,
            pods: None,
            by_source: HashMap::new(),
        })
    }

    /// A cgroup of the pod whose packet entered through `entry` from `source` (the
    /// lowest id, so that repeated attempts name the same container).
    pub(crate) fn pod_of(&mut self, entry: u32, source: Option<IpAddr>) -> Option<u64> {
        let age = self.pods.as_ref().map(|(at, _)| at.elapsed());
        let known = self.pods.as_ref().is_some_and(|(_, pods)| pods.knows_entry(entry));
        if rescan_due(age, known, self.unknown_rescan) {
            match PodNets::scan(&self.cgroup_root, &mut self.route, None) {
                Ok(p) => {
                    self.pods = Some((Instant::now(), p));
                    self.by_source.clear();
                }
                Err(e) => tracing::warn!("could not map host interfaces to pods: {e:#}"),
            }
        }
        let pods = &self.pods.as_ref()?.1;
        if let Some(own) = pods.cgroups_behind(entry) {
            return own.iter().next().copied();
        }
        let source = source?;
        *self
            .by_source
            .entry((entry, source))
            .or_insert_with(|| pods.cgroups_with_source(entry, source)?.iter().next().copied())
    }
}

/// Whether pods are scanned again: never scanned, a scan older than [`PODS_RESCAN`],
/// or an interface the last scan did not know once `unknown_rescan` has passed.
fn rescan_due(age: Option<Duration>, known: bool, unknown_rescan: Duration) -> bool {
    age.is_none_or(|age| age >= PODS_RESCAN || (!known && age >= unknown_rescan))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uplink_rescans_at_most_every_few_seconds_the_host_side_for_any_new_interface() {
        let (soon, late) = (Duration::from_millis(100), PODS_RESCAN);
        for wait in [Duration::ZERO, PODS_RESCAN] {
            assert!(rescan_due(None, false, wait), "the first packet scans");
            assert!(rescan_due(Some(late), true, wait), "an old scan is not trusted");
            assert!(!rescan_due(Some(soon), true, wait), "a fresh scan that knows the interface is");
        }
        assert!(rescan_due(Some(soon), false, Duration::ZERO));
        assert!(!rescan_due(Some(soon), false, PODS_RESCAN));
    }
}
