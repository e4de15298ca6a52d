// SPDX-License-Identifier: Apache-2.0
//! Names the cgroup tree does not hold, from the kubelet's log directories:
//! `<pods>/<namespace>_<pod>_<uid>/<container>/` and the symlinks
//! `<containers>/<pod>_<namespace>_<container>-<container id>.log`.
//!
//! Namespace, pod and container names cannot contain '_', so splitting on it is
//! unambiguous.

use std::{
    fs,
    path::{Path, PathBuf},
};

use super::PodIdentity;

pub(super) struct KubeletLogs {
    pods_dir: PathBuf,
    containers_dir: PathBuf,
}

/// A pod's log directory and the names in its name.
struct PodLogDir {
    path: PathBuf,
    namespace: String,
    pod: String,
}

impl KubeletLogs {
    pub(super) fn new(pods_dir: PathBuf, containers_dir: PathBuf) -> Self {
        KubeletLogs { pods_dir, containers_dir }
    }

    /// Fills in the names of `pod` as far as the kubelet has written them.
    pub(super) fn name(&self, pod: &mut PodIdentity) {
        let Some(dir) = self.pod_dir(&pod.pod_uid) else {
            return;
        };
        if let Some(container_id) = &pod.container_id {
            pod.container = self.container_from_symlink(&dir, container_id).or_else(|| only_container(&dir.path));
        }
        pod.namespace = Some(dir.namespace);
        pod.pod = Some(dir.pod);
    }

    fn pod_dir(&self, uid: &str) -> Option<PodLogDir> {
        let suffix = format!("_{uid}");
        fs::read_dir(&self.pods_dir).ok()?.flatten().find_map(|entry| {
            let file_name = entry.file_name();
            let (namespace, pod) = file_name.to_str()?.strip_suffix(&suffix)?.split_once('_')?;
            let valid = !namespace.is_empty() && !pod.is_empty() && !pod.contains('_');
            valid.then(|| PodLogDir { path: entry.path(), namespace: namespace.to_owned(), pod: pod.to_owned() })
        })
    }

    /// The kubelet links each container's log under a name that pairs the container's
    /// name with its id, the one place the two meet on disk.
    fn container_from_symlink(&self, dir: &PodLogDir, container_id: &str) -> Option<String> {
        let prefix = format!("{}_{}_", dir.pod, dir.namespace);
        let suffix = format!("-{container_id}.log");
        fs::read_dir(&self.containers_dir).ok()?.flatten().find_map(|entry| {
            let file_name = entry.file_name();
            let container = file_name.to_str()?.strip_prefix(&prefix)?.strip_suffix(&suffix)?;
            (!container.is_empty() && !container.contains('_')).then(|| container.to_owned())
        })
    }
}

/// The name of the pod's container when it has exactly one.
fn only_container(pod_dir: &Path) -> Option<String> {
    let mut containers = fs::read_dir(pod_dir)
        .ok()?
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.file_name());
    let only = containers.next()?.into_string().ok()?;
    containers.next().is_none().then_some(only)
}
