// SPDX-License-Identifier: Apache-2.0
//! The kubelet's cgroup names: which pod, QoS class and container a cgroup path
//! belongs to, under the systemd and the cgroupfs cgroup drivers.

use super::{Qos, Runtime};

/// What a cgroup's path in the kubelet's tree says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct KubeletCgroup {
    pub pod_uid: String,
    pub qos: Qos,
    /// None for the pod-level cgroup and for cgroups in it that are no container
    /// (CRI-O's `crio-conmon-<id>.scope`).
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
}

/// Prefixes the runtimes give a container's cgroup; with no prefix (cgroupfs driver
/// with containerd or Docker) the runtime is not known.
const RUNTIME_PREFIXES: [(&str, Runtime); 3] =
    [("cri-containerd-", Runtime::Containerd), ("crio-", Runtime::CriO), ("docker-", Runtime::Docker)];

/// The pod, and container if any, of the cgroup at `rel_path`; None when the path is
/// not in a pod. `kubepods` may sit anywhere in the path, as it does when the
/// kubelet's cgroup root is not the hierarchy's; the outermost one counts, so a
/// kubelet running inside a container does not hide the pod that container is in.
///
/// ```text
/// systemd:  /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
///           /kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope                  (Guaranteed)
/// cgroupfs: /kubepods/besteffort/pod<uid>/<id>
///           /kubepods/pod<uid>/<id>                                                   (Guaranteed)
/// ```
pub(crate) fn parse_kubelet_path(rel_path: &str) -> Option<KubeletCgroup> {
    let components: Vec<&str> = rel_path.split('/').filter(|c| !c.is_empty()).collect();
    components.iter().enumerate().find_map(|(i, &component)| {
        let below = &components[i + 1..];
        match component {
            "kubepods.slice" => parse_systemd(below),
            "kubepods" => parse_cgroupfs(below),
            _ => None,
        }
    })
}

fn parse_systemd(below: &[&str]) -> Option<KubeletCgroup> {
    let (first, rest) = below.split_first()?;
    let first = systemd_slice(first)?;
    let (qos, pod, rest) = if first.starts_with("pod") {
        (Qos::Guaranteed, first, rest)
    } else {
        let qos = qos_class(first)?;
        let (pod, rest) = rest.split_first()?;
        let pod = systemd_slice(pod)?.strip_prefix(first)?.strip_prefix('-')?;
        (qos, pod, rest)
    };
    // systemd reads '-' in a slice name as nesting, so the kubelet writes the uid's
    // dashes as '_'.
    let uid = pod.strip_prefix("pod")?.replace('_', "-");
    in_pod(&uid, qos, rest)
}

/// `kubepods-<name>.slice` → `<name>`.
fn systemd_slice(component: &str) -> Option<&str> {
    component.strip_prefix("kubepods-")?.strip_suffix(".slice")
}

fn parse_cgroupfs(below: &[&str]) -> Option<KubeletCgroup> {
    let (first, rest) = below.split_first()?;
    let (qos, pod, rest) = match qos_class(first) {
        Some(qos) => {
            let (pod, rest) = rest.split_first()?;
            (qos, *pod, rest)
        }
        None => (Qos::Guaranteed, *first, rest),
    };
    in_pod(pod.strip_prefix("pod")?, qos, rest)
}

/// Guaranteed pods have no QoS level of their own: they sit right below kubepods.
fn qos_class(name: &str) -> Option<Qos> {
    match name {
        "burstable" => Some(Qos::Burstable),
        "besteffort" => Some(Qos::BestEffort),
        _ => None,
    }
}

/// The cgroup `below` the pod-level cgroup of pod `uid`: the first component names
/// the container, and whatever a container nests below itself is still that
/// container.
fn in_pod(uid: &str, qos: Qos, below: &[&str]) -> Option<KubeletCgroup> {
    // Kubernetes uids are UUIDs, and static pods' are hex hashes.
    if uid.is_empty() || !uid.bytes().all(|b| b == b'-' || lower_hex(b)) {
        return None;
    }
    let (container_id, runtime) = match below.first().and_then(|c| container(c)) {
        Some((id, runtime)) => (Some(id.to_owned()), runtime),
        None => (None, None),
    };
    Some(KubeletCgroup { pod_uid: uid.to_owned(), qos, container_id, runtime })
}

/// The id and runtime in a container's cgroup name: `cri-containerd-<id>.scope`,
/// `crio-<id>`, `<id>`. CRI-O's `crio-conmon-<id>.scope` fails the hex check, as it
/// should: conmon is the runtime's monitor, not the container.
fn container(name: &str) -> Option<(&str, Option<Runtime>)> {
    let name = name.strip_suffix(".scope").unwrap_or(name);
    let (id, runtime) = RUNTIME_PREFIXES
        .iter()
        .find_map(|&(prefix, runtime)| Some((name.strip_prefix(prefix)?, Some(runtime))))
        .unwrap_or((name, None));
    let hex = !id.is_empty() && id.bytes().all(lower_hex);
    hex.then_some((id, runtime))
}

fn lower_hex(b: u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f')
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b3c9a4e-5f7d-4c1e-9d2a-1f6e8b7c5a40";
    const UID_: &str = "0b3c9a4e_5f7d_4c1e_9d2a_1f6e8b7c5a40";
    const ID: &str = "3f1c2d9e";

    fn container_of(qos: Qos, runtime: Option<Runtime>) -> Option<KubeletCgroup> {
        Some(KubeletCgroup { pod_uid: UID.into(), qos, container_id: Some(ID.into()), runtime })
    }

    fn pod_level(qos: Qos) -> Option<KubeletCgroup> {
        Some(KubeletCgroup { pod_uid: UID.into(), qos, container_id: None, runtime: None })
    }

    #[test]
    fn systemd_driver_names_the_runtime_in_the_container_scope() {
        let pod = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(
            parse_kubelet_path(&format!("{pod}/cri-containerd-{ID}.scope")),
            container_of(Qos::Burstable, Some(Runtime::Containerd))
        );
        assert_eq!(
            parse_kubelet_path(&format!("{pod}/crio-{ID}.scope")),
            container_of(Qos::Burstable, Some(Runtime::CriO))
        );
        assert_eq!(
            parse_kubelet_path(&format!("{pod}/docker-{ID}.scope")),
            container_of(Qos::Burstable, Some(Runtime::Docker))
        );
    }

    #[test]
    fn systemd_driver_puts_each_qos_class_at_its_own_level() {
        let besteffort = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(parse_kubelet_path(&besteffort), container_of(Qos::BestEffort, Some(Runtime::Containerd)));
        let guaranteed = format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope");
        assert_eq!(parse_kubelet_path(&guaranteed), container_of(Qos::Guaranteed, Some(Runtime::CriO)));
    }

    #[test]
    fn cgroupfs_driver_names_containers_by_bare_id() {
        assert_eq!(
            parse_kubelet_path(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            container_of(Qos::Burstable, None)
        );
        assert_eq!(
            parse_kubelet_path(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
            container_of(Qos::BestEffort, None)
        );
        assert_eq!(parse_kubelet_path(&format!("/kubepods/pod{UID}/{ID}")), container_of(Qos::Guaranteed, None));
        assert_eq!(
            parse_kubelet_path(&format!("/kubepods/pod{UID}/crio-{ID}")),
            container_of(Qos::Guaranteed, Some(Runtime::CriO))
        );
    }

    #[test]
    fn the_pod_level_cgroup_and_conmon_are_the_pod_without_a_container() {
        let pod = format!("/kubepods.slice/kubepods-pod{UID_}.slice");
        assert_eq!(parse_kubelet_path(&pod), pod_level(Qos::Guaranteed));
        assert_eq!(parse_kubelet_path(&format!("{pod}/crio-conmon-{ID}.scope")), pod_level(Qos::Guaranteed));
        assert_eq!(parse_kubelet_path(&format!("/kubepods/burstable/pod{UID}")), pod_level(Qos::Burstable));
    }

    #[test]
    fn cgroups_a_container_nests_below_itself_are_that_container() {
        let nested = format!("/kubepods/burstable/pod{UID}/{ID}/init.scope/worker");
        assert_eq!(parse_kubelet_path(&nested), container_of(Qos::Burstable, None));
    }

    #[test]
    fn kubepods_below_another_root_is_found() {
        let path = format!(
            "/metadata-guard-test-123/kubepods.slice/kubepods-pod{UID_}.slice/\
             cri-containerd-{ID}.scope"
        );
        assert_eq!(parse_kubelet_path(&path), container_of(Qos::Guaranteed, Some(Runtime::Containerd)));
    }

    #[test]
    fn a_kubelet_inside_a_container_does_not_hide_the_outer_pod() {
        let inner = "kubelet.slice/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice";
        let path = format!("/kubepods/burstable/pod{UID}/{ID}/{inner}/crio-abc.scope");
        assert_eq!(parse_kubelet_path(&path), container_of(Qos::Burstable, None));
    }

    #[test]
    fn paths_outside_pods_are_none() {
        for path in [
            "/",
            "/system.slice/kubelet.service",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods",
            "/kubepods/besteffort",
            // The pod slice of another QoS class than its parent's.
            &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{UID_}.slice"),
            "/kubepods/burstable/podnot-a-uid/abc",
            "/kubepods/pod/abc",
            "/user.slice/kubepods-pod1.slice",
        ] {
            assert_eq!(parse_kubelet_path(path), None, "{path}");
        }
    }

    #[test]
    fn names_that_are_not_container_ids_leave_the_container_unknown() {
        let pod = format!("/kubepods/pod{UID}");
        for child in ["crio-", "cri-containerd-XYZ.scope", "ABCDEF", "sandbox", "docker-12g4.scope"] {
            assert_eq!(parse_kubelet_path(&format!("{pod}/{child}")), pod_level(Qos::Guaranteed), "{child}");
        }
    }
}
