// SPDX-License-Identifier: Apache-2.0
//! Naming the pod behind an uplink refusal whose packet carried no socket (forwarded,
//! redirected from a pod's veth, written by AF_PACKET through a bridge): by the
//! interface it entered the node through when that is a pod's own, else — behind a
//! bridge — by its source address on that bridge. The packet's socket, when it
//! survived, names the pod already (its cgroup id, from the kernel).

use std::path::Path;

use anyhow::Result;

use crate::{
    attempt::Attempt,
    hostside::{EntryPods, PODS_RESCAN},
};

pub(crate) struct UplinkPods {
    pods: EntryPods,
}

impl UplinkPods {
    /// Reads the host's links through a socket opened in `host_netns`. Pods are
    /// rescanned at most every [`PODS_RESCAN`]: most packets here come from the wire,
    /// through interfaces that are no pod's.
    pub(crate) fn open(host_netns: Option<&Path>, cgroup_root: &Path) -> Result<UplinkPods> {
        Ok(UplinkPods { pods: EntryPods::open(host_netns, cgroup_root, PODS_RESCAN)? })
    }

    /// Names the pod (a cgroup of it, the lowest id, so that repeated attempts name
    /// the same container) of an uplink attempt whose packet entered the node through
    /// a pod's interface. That names it even where the packet kept its socket: the
    /// socket's cgroup can be the root one (the kernel stops telling sockets' cgroup v2
    /// apart once net_cls or net_prio of cgroup v1 is used), while where a packet entered
    /// is the kernel's own record that no pod can forge. A packet the node made (a
    /// macvlan or ipvlan child's) keeps the socket's cgroup.
    pub(crate) fn attribute(&mut self, attempt: &mut Attempt) {
        if attempt.hook != crate::attempt::Hook::Uplink || attempt.ingress_ifindex == 0 {
            return;
        }
        if let Some(cgroup) = self.pods.pod_of(attempt.ingress_ifindex, attempt.source) {
            attempt.cgroup_id = cgroup;
        }
    }
}
