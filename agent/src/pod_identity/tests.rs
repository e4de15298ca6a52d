// SPDX-License-Identifier: Apache-2.0
//! Scenarios on a node imitated in a temporary directory: a plain directory tree
//! stands in for cgroupfs, since a cgroup's id is just its directory's inode number.

use std::{
    fs,
    os::unix::fs::{symlink, MetadataExt},
    path::PathBuf,
    time::{Duration, Instant},
};

use tempfile::TempDir;

use super::*;

const UID: &str = "0b3c9a4e-5f7d-4c1e-9d2a-1f6e8b7c5a40";
const UID_: &str = "0b3c9a4e_5f7d_4c1e_9d2a_1f6e8b7c5a40";
const APP_ID: &str = "3f1c2d9e0a";
const SIDECAR_ID: &str = "77aa01";

struct Node {
    _dir: TempDir,
    cgroup_root: PathBuf,
    pods_dir: PathBuf,
    containers_dir: PathBuf,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let node = Node {
            cgroup_root: dir.path().join("cgroup"),
            pods_dir: dir.path().join("log/pods"),
            containers_dir: dir.path().join("log/containers"),
            _dir: dir,
        };
        for d in [&node.cgroup_root, &node.pods_dir, &node.containers_dir] {
            fs::create_dir_all(d).unwrap();
        }
        node
    }

    fn resolver(&self) -> PodResolver {
        PodResolver::new(self.cgroup_root.clone(), self.pods_dir.clone(), self.containers_dir.clone())
    }

    /// Creates the cgroup at `path` (relative to the root) and returns its id.
    fn cgroup(&self, path: &str) -> u64 {
        let dir = self.cgroup_root.join(path.trim_start_matches('/'));
        fs::create_dir_all(&dir).unwrap();
        // Control files, as in a real cgroup: the walk must step over them.
        fs::write(dir.join("cgroup.procs"), "").unwrap();
        fs::metadata(&dir).unwrap().ino()
    }

    fn remove_cgroup(&self, path: &str) {
        fs::remove_dir_all(self.cgroup_root.join(path.trim_start_matches('/'))).unwrap();
    }

    /// The kubelet's log directory of a pod, with one directory per container.
    fn pod_logs(&self, namespace: &str, pod: &str, containers: &[&str]) {
        for container in containers {
            let dir = self.pods_dir.join(format!("{namespace}_{pod}_{UID}")).join(container);
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("0.log"), "").unwrap();
        }
    }

    fn container_log_link(&self, namespace: &str, pod: &str, container: &str, id: &str) {
        let target = self.pods_dir.join(format!("{namespace}_{pod}_{UID}/{container}/0.log"));
        symlink(target, self.containers_dir.join(format!("{pod}_{namespace}_{container}-{id}.log"))).unwrap();
    }
}

fn pod(container: Option<&str>, container_id: Option<&str>, runtime: Option<Runtime>, qos: Qos) -> Workload {
    Workload::Pod(PodIdentity {
        namespace: Some("shop".into()),
        pod: Some("cart-7d9f".into()),
        pod_uid: UID.into(),
        container: container.map(Into::into),
        container_id: container_id.map(Into::into),
        runtime,
        qos,
    })
}

/// `workload` as it is before the kubelet writes the pod's logs.
fn unnamed(mut workload: Workload) -> Workload {
    if let Workload::Pod(pod) = &mut workload {
        pod.namespace = None;
        pod.pod = None;
        pod.container = None;
    }
    workload
}

fn host(path: &str) -> Workload {
    Workload::Host { cgroup_path: path.into() }
}

#[test]
fn containerd_container_is_named_by_its_log_symlink() {
    let node = Node::new();
    let pod_slice = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
    let app = node.cgroup(&format!("{pod_slice}/cri-containerd-{APP_ID}.scope"));
    let sidecar = node.cgroup(&format!("{pod_slice}/cri-containerd-{SIDECAR_ID}.scope"));
    node.pod_logs("shop", "cart-7d9f", &["app", "proxy"]);
    node.container_log_link("shop", "cart-7d9f", "app", APP_ID);
    node.container_log_link("shop", "cart-7d9f", "proxy", SIDECAR_ID);

    let mut resolver = node.resolver();
    assert_eq!(resolver.resolve(app), pod(Some("app"), Some(APP_ID), Some(Runtime::Containerd), Qos::Burstable));
    assert_eq!(
        resolver.resolve(sidecar),
        pod(Some("proxy"), Some(SIDECAR_ID), Some(Runtime::Containerd), Qos::Burstable)
    );
}

#[test]
fn crio_guaranteed_pod_and_its_conmon_which_is_no_container() {
    let node = Node::new();
    let pod_slice = format!("kubepods.slice/kubepods-pod{UID_}.slice");
    let app = node.cgroup(&format!("{pod_slice}/crio-{APP_ID}.scope"));
    let conmon = node.cgroup(&format!("{pod_slice}/crio-conmon-{APP_ID}.scope"));
    node.pod_logs("shop", "cart-7d9f", &["app"]);

    let mut resolver = node.resolver();
    assert_eq!(resolver.resolve(app), pod(Some("app"), Some(APP_ID), Some(Runtime::CriO), Qos::Guaranteed));
    assert_eq!(resolver.resolve(conmon), pod(None, None, None, Qos::Guaranteed));
}

#[test]
fn docker_besteffort_container_in_a_test_tree_below_the_real_root() {
    let node = Node::new();
    let app = node.cgroup(&format!(
        "metadata-guard-test-123/kubepods.slice/kubepods-besteffort.slice/\
         kubepods-besteffort-pod{UID_}.slice/docker-{APP_ID}.scope"
    ));
    node.pod_logs("shop", "cart-7d9f", &["app"]);

    assert_eq!(node.resolver().resolve(app), pod(Some("app"), Some(APP_ID), Some(Runtime::Docker), Qos::BestEffort));
}

#[test]
fn cgroupfs_driver_burstable_and_guaranteed_pods() {
    let node = Node::new();
    let burstable = node.cgroup(&format!("kubepods/burstable/pod{UID}/{APP_ID}"));
    let guaranteed = node.cgroup(&format!("kubepods/pod{UID}/{SIDECAR_ID}"));
    node.pod_logs("shop", "cart-7d9f", &["app"]);

    let mut resolver = node.resolver();
    assert_eq!(resolver.resolve(burstable), pod(Some("app"), Some(APP_ID), None, Qos::Burstable));
    assert_eq!(resolver.resolve(guaranteed), pod(Some("app"), Some(SIDECAR_ID), None, Qos::Guaranteed));
}

#[test]
fn a_multi_container_pod_without_symlinks_leaves_the_container_unnamed() {
    let node = Node::new();
    let app = node.cgroup(&format!("kubepods/pod{UID}/{APP_ID}"));
    node.pod_logs("shop", "cart-7d9f", &["app", "proxy"]);

    assert_eq!(node.resolver().resolve(app), pod(None, Some(APP_ID), None, Qos::Guaranteed));
}

#[test]
fn the_pod_level_cgroup_and_cgroups_nested_in_a_container() {
    let node = Node::new();
    let pod_level = node.cgroup(&format!("kubepods/besteffort/pod{UID}"));
    let nested = node.cgroup(&format!("kubepods/besteffort/pod{UID}/{APP_ID}/init.scope"));
    node.pod_logs("shop", "cart-7d9f", &["app"]);

    let mut resolver = node.resolver();
    assert_eq!(resolver.resolve(pod_level), pod(None, None, None, Qos::BestEffort));
    assert_eq!(resolver.resolve(nested), pod(Some("app"), Some(APP_ID), None, Qos::BestEffort));
}

#[test]
fn host_processes_are_named_by_cgroup_path_and_symlinks_are_not_followed() {
    let node = Node::new();
    let kubelet = node.cgroup("system.slice/kubelet.service");
    let app = node.cgroup(&format!("kubepods/pod{UID}/{APP_ID}"));
    // A link into the pods and a loop: neither may be walked into.
    symlink(node.cgroup_root.join("kubepods"), node.cgroup_root.join("system.slice/pods-link")).unwrap();
    symlink(&node.cgroup_root, node.cgroup_root.join("system.slice/loop")).unwrap();
    let root = fs::metadata(&node.cgroup_root).unwrap().ino();

    let mut resolver = node.resolver();
    assert_eq!(resolver.resolve(kubelet), host("/system.slice/kubelet.service"));
    assert_eq!(resolver.resolve(root), host("/"));
    assert_eq!(resolver.resolve(app), unnamed(pod(None, Some(APP_ID), None, Qos::Guaranteed)));
}

#[test]
fn names_written_after_the_cgroup_are_picked_up_at_most_once_a_second() {
    let node = Node::new();
    let app = node.cgroup(&format!("kubepods/pod{UID}/{APP_ID}"));
    let t0 = Instant::now();
    let mut resolver = node.resolver();
    let named = pod(Some("app"), Some(APP_ID), None, Qos::Guaranteed);
    assert_eq!(resolver.resolve_at(app, t0), unnamed(named.clone()));

    node.pod_logs("shop", "cart-7d9f", &["app", "proxy"]);
    assert_eq!(
        resolver.resolve_at(app, t0 + Duration::from_millis(500)),
        unnamed(named.clone()),
        "looked again within a second"
    );
    let one_second = t0 + Duration::from_secs(1);
    assert_eq!(resolver.resolve_at(app, one_second), pod(None, Some(APP_ID), None, Qos::Guaranteed));

    node.container_log_link("shop", "cart-7d9f", "app", APP_ID);
    assert_eq!(resolver.resolve_at(app, one_second + Duration::from_secs(1)), named);
    assert_eq!(resolver.cache_len(), 1);
}

#[test]
fn vanished_cgroups_are_forgotten() {
    let node = Node::new();
    let gone = node.cgroup(&format!("kubepods/pod{UID}/{APP_ID}"));
    let kept = node.cgroup("system.slice/kubelet.service");
    let mut resolver = node.resolver();
    let t0 = Instant::now();
    resolver.resolve_at(gone, t0);
    resolver.resolve_at(kept, t0);
    assert_eq!(resolver.cache_len(), 2);

    node.remove_cgroup("kubepods");
    assert_eq!(resolver.forget_vanished(), 1);
    assert_eq!(resolver.cache_len(), 1);
    assert_eq!(resolver.resolve_at(gone, t0 + Duration::from_secs(1)), Workload::Unknown);
    assert_eq!(resolver.resolve_at(kept, t0 + Duration::from_secs(1)), host("/system.slice/kubelet.service"));
}

#[test]
fn a_storm_of_misses_walks_the_tree_at_most_once_a_second() {
    let node = Node::new();
    node.cgroup("system.slice/kubelet.service");
    let mut resolver = node.resolver();
    let t0 = Instant::now();
    assert_eq!(resolver.resolve_at(u64::MAX, t0), Workload::Unknown);

    // A cgroup made after the walk stays unknown until the next one is due.
    let late = node.cgroup("system.slice/late.service");
    for (i, id) in (1_000_000_000..1_000_001_000).enumerate() {
        let now = t0 + Duration::from_micros(999_000 * i as u64 / 1000);
        assert_eq!(resolver.resolve_at(id, now), Workload::Unknown);
    }
    assert_eq!(resolver.resolve_at(late, t0 + Duration::from_millis(999)), Workload::Unknown);
    assert_eq!(resolver.cache_len(), 0, "unknown ids are not cached");

    assert_eq!(resolver.resolve_at(late, t0 + Duration::from_secs(1)), host("/system.slice/late.service"));
}

#[test]
fn the_cache_is_bounded_and_forgets_the_oldest_first() {
    let node = Node::new();
    let mut resolver = node.resolver();
    resolver.cache = BoundedCache::new(3);
    let ids: Vec<u64> = (0..5).map(|i| node.cgroup(&format!("system.slice/unit-{i}.service"))).collect();
    for &id in &ids {
        resolver.resolve(id);
    }
    assert_eq!(resolver.cache_len(), 3);
    assert!(!resolver.cache.contains(ids[0]) && !resolver.cache.contains(ids[1]));
    assert!(ids[2..].iter().all(|&id| resolver.cache.contains(id)));
    assert_eq!(resolver.resolve(ids[0]), host("/system.slice/unit-0.service"), "an evicted id resolves again");
}

#[test]
fn scan_lists_every_pod_cgroup_and_no_host_one() {
    let node = Node::new();
    node.cgroup("system.slice/kubelet.service");
    node.cgroup("kubepods/burstable");
    let pod_level = node.cgroup(&format!("kubepods/burstable/pod{UID}"));
    let app = node.cgroup(&format!("kubepods/burstable/pod{UID}/{APP_ID}"));
    node.pod_logs("shop", "cart-7d9f", &["app"]);

    let mut expected = vec![
        (pod_level, pod(None, None, None, Qos::Burstable)),
        (app, pod(Some("app"), Some(APP_ID), None, Qos::Burstable)),
    ];
    expected.sort_by_key(|(id, _)| *id);
    let scanned: Vec<(u64, Workload)> =
        node.resolver().scan_pods().into_iter().map(|(id, identity)| (id, Workload::Pod(identity))).collect();
    assert_eq!(scanned, expected);
}
