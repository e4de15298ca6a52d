// SPDX-License-Identifier: Apache-2.0
//! Who made an attempt: the kernel names a task by its cgroup v2 id, and this turns
//! the id into a pod (namespace, name, container) or a host cgroup.
//!
//! On cgroup v2 a cgroup's id is the inode number of its directory, so ids are found
//! by walking the hierarchy and indexing its directories by inode. The kubelet's
//! cgroup names give the pod uid, QoS class and container id; the names people know
//! a pod by are not in the cgroup tree, so they come from the kubelet's log
//! directories.

mod cache;
mod cgroup_tree;
pub(crate) mod kubelet_layout;
mod kubelet_logs;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

use self::{cache::BoundedCache, kubelet_layout::parse_kubelet_path, kubelet_logs::KubeletLogs};

/// Misses within this long of a walk are answered from it, so that a storm of ids
/// that are not in the tree cannot make the agent walk it thousands of times.
const REWALK_INTERVAL: Duration = Duration::from_secs(1);
/// How often a pod whose names the kubelet has not written yet is looked up again.
const NAMES_RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Far more cgroups than a node runs, yet a bound: the agent must not grow forever.
const CACHE_CAPACITY: usize = 65_536;

/// Who made an attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    Pod(PodIdentity),
    /// A process outside the kubelet's pods: a host service, the kubelet itself, a
    /// host-network agent.
    Host {
        /// Relative to the cgroup root the guard attaches to, starting with '/':
        /// `/system.slice/kubelet.service`.
        cgroup_path: String,
    },
    /// The cgroup vanished before it could be resolved (a short-lived container).
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodIdentity {
    /// None until the kubelet creates the pod's log directory.
    pub namespace: Option<String>,
    /// None until the kubelet creates the pod's log directory.
    pub pod: Option<String>,
    pub pod_uid: String,
    /// None for the pod-level cgroup, and when the kubelet's logs do not tell which
    /// container the id is.
    pub container: Option<String>,
    /// None for the pod-level cgroup and for runtime helpers in it (CRI-O's conmon).
    pub container_id: Option<String>,
    /// None when the container's cgroup name does not say (cgroupfs driver with
    /// containerd or Docker).
    pub runtime: Option<Runtime>,
    pub qos: Qos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub fn name(self) -> &'static str {
        match self {
            Qos::Guaranteed => "guaranteed",
            Qos::Burstable => "burstable",
            Qos::BestEffort => "besteffort",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

impl Runtime {
    /// The scheme Kubernetes writes in a pod's `containerID` (`cri-o://…`), so audit
    /// records match what `kubectl get pod -o yaml` shows.
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Containerd => "containerd",
            Runtime::CriO => "cri-o",
            Runtime::Docker => "docker",
        }
    }
}

/// Resolves cgroup ids to workloads, remembering the answers.
pub(crate) struct PodResolver {
    cgroup_root: PathBuf,
    logs: KubeletLogs,
    /// Directories of the last walk by cgroup id; a snapshot, so hits are checked
    /// against the live tree before use.
    index: HashMap<u64, PathBuf>,
    walked_at: Option<Instant>,
    /// Whether the last walk could not read the root, so the failure is logged once.
    walk_failing: bool,
    cache: BoundedCache<Resolved>,
}

struct Resolved {
    workload: Workload,
    dir: PathBuf,
    /// Set while the kubelet may still write names the answer lacks.
    names_checked_at: Option<Instant>,
}

impl PodResolver {
    pub(crate) fn new(cgroup_root: PathBuf, pod_logs_dir: PathBuf, container_logs_dir: PathBuf) -> Self {
        PodResolver {
            cgroup_root,
            logs: KubeletLogs::new(pod_logs_dir, container_logs_dir),
            index: HashMap::new(),
            walked_at: None,
            walk_failing: false,
            cache: BoundedCache::new(CACHE_CAPACITY),
        }
    }

    /// The workload of the cgroup with id `cgroup_id`; [`Workload::Unknown`] when no
    /// cgroup below the root has it (any more).
    pub(crate) fn resolve(&mut self, cgroup_id: u64) -> Workload {
        self.resolve_at(cgroup_id, Instant::now())
    }

    /// Drops the answers for cgroups that no longer exist; returns how many.
    pub(crate) fn forget_vanished(&mut self) -> usize {
        self.cache.retain(|id, resolved| cgroup_tree::has_id(&resolved.dir, id))
    }

    pub(crate) fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Every cgroup that belongs to a pod, by id: pod-level cgroups, containers and
    /// the cgroups containers make below themselves. As of the last walk of the
    /// tree, which is at most a second old.
    #[cfg(test)]
    pub(crate) fn scan_pods(&mut self) -> Vec<(u64, PodIdentity)> {
        self.scan_pods_at(Instant::now())
    }

    fn resolve_at(&mut self, id: u64, now: Instant) -> Workload {
        if let Some(resolved) = self.cache.get_mut(id) {
            if let (Workload::Pod(pod), Some(checked_at)) = (&mut resolved.workload, resolved.names_checked_at) {
                if now.duration_since(checked_at) >= NAMES_RECHECK_INTERVAL {
                    self.logs.name(pod);
                    resolved.names_checked_at = (!names_complete(pod)).then_some(now);
                }
            }
            return resolved.workload.clone();
        }
        let Some(dir) = self.find_dir(id, now) else {
            // Not cached: the next walk may find it.
            return Workload::Unknown;
        };
        let cgroup_path = cgroup_tree::relative(&self.cgroup_root, &dir);
        let (workload, names_checked_at) = match parse_kubelet_path(&cgroup_path) {
            Some(cgroup) => {
                let mut pod = PodIdentity {
                    namespace: None,
                    pod: None,
                    pod_uid: cgroup.pod_uid,
                    container: None,
                    container_id: cgroup.container_id,
                    runtime: cgroup.runtime,
                    qos: cgroup.qos,
                };
                self.logs.name(&mut pod);
                let checked_at = (!names_complete(&pod)).then_some(now);
                (Workload::Pod(pod), checked_at)
            }
            None => (Workload::Host { cgroup_path }, None),
        };
        self.cache.insert(id, Resolved { workload: workload.clone(), dir, names_checked_at });
        workload
    }

    /// Every cgroup that belongs to a pod, by id, walking the tree first whatever the
    /// age of the last walk: for a caller that was just told a cgroup appeared.
    pub(crate) fn rescan_pods(&mut self) -> Vec<(u64, PodIdentity)> {
        let now = Instant::now();
        self.walk(now);
        self.scan_pods_at(now)
    }

    fn scan_pods_at(&mut self, now: Instant) -> Vec<(u64, PodIdentity)> {
        if !self.walked_within(now) {
            self.walk(now);
        }
        let mut ids: Vec<u64> = self
            .index
            .iter()
            .filter(|(_, dir)| parse_kubelet_path(&cgroup_tree::relative(&self.cgroup_root, dir)).is_some())
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| match self.resolve_at(id, now) {
                Workload::Pod(pod) => Some((id, pod)),
                Workload::Host { .. } | Workload::Unknown => None,
            })
            .collect()
    }

    /// The directory of cgroup `id`, walking the tree again when the last walk did
    /// not see it and is old enough.
    fn find_dir(&mut self, id: u64, now: Instant) -> Option<PathBuf> {
        let live = |index: &HashMap<u64, PathBuf>| index.get(&id).filter(|dir| cgroup_tree::has_id(dir, id)).cloned();
        if let Some(dir) = live(&self.index) {
            return Some(dir);
        }
        if self.walked_within(now) {
            return None;
        }
        self.walk(now);
        live(&self.index)
    }

    fn walked_within(&self, now: Instant) -> bool {
        self.walked_at.is_some_and(|at| now.duration_since(at) < REWALK_INTERVAL)
    }

    fn walk(&mut self, now: Instant) {
        self.walked_at = Some(now);
        match cgroup_tree::index(&self.cgroup_root) {
            Ok(index) => {
                debug!(
                    cgroups = index.len(),
                    root = %self.cgroup_root.display(),
                    "indexed the cgroup tree"
                );
                self.index = index;
                self.walk_failing = false;
            }
            Err(e) => {
                if !self.walk_failing {
                    warn!(
                        "could not read the cgroup tree at {}: {e}; attempts cannot be attributed \
                         to pods until it is readable (is the host's cgroup2 mount visible to the \
                         agent?)",
                        self.cgroup_root.display()
                    );
                }
                self.walk_failing = true;
            }
        }
    }
}

/// Whether the kubelet's logs have told all they can about `pod`.
fn names_complete(pod: &PodIdentity) -> bool {
    pod.namespace.is_some() && (pod.container_id.is_none() || pod.container.is_some())
}
