// SPDX-License-Identifier: Apache-2.0
//! Naming the pod behind an uplink refusal whose packet carried no socket (forwarded,
//! redirected from a pod's veth, written by AF_PACKET through a bridge): by the
//! interface it entered the node through when that is a pod's own, else — behind a
//! bridge — by its source address on that bridge. The packet's socket, when it
//! survived, names the pod already (its cgroup id, from the kernel).

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use metadata_guard_netfilter::NlSocket;

use crate::{attempt::Attempt, hostside::PodNets};

/// Pods are rescanned at most this often (when an interface is not known yet).
const PODS_RESCAN: Duration = Duration::from_secs(2);

pub struct UplinkPods {
    route: NlSocket,
    cgroup_root: PathBuf,
    pods: Option<(Instant, PodNets)>,
    by_source: HashMap<(u32, IpAddr), Option<u64>>,
}

impl UplinkPods {
    /// Reads the host's links through a socket opened in `host_netns`.
    pub fn open(host_netns: Option<&Path>, cgroup_root: &Path) -> Result<UplinkPods> {
        let route = NlSocket::open_in(host_netns, libc::NETLINK_ROUTE)
            .context("could not open a netlink socket in the host network namespace")?;
        Ok(UplinkPods { route, cgroup_root: cgroup_root.to_path_buf(), pods: None, by_source: HashMap::new() })
    }

    /// Names the pod (a cgroup of it, the lowest id, so that repeated attempts name
    /// the same container) of an uplink attempt whose packet entered the node through
    /// a pod's interface. That names it even where the packet kept its socket: the
    /// socket's cgroup can be the root one (the kernel stops telling sockets' cgroup v2
    /// apart once net_cls or net_prio of cgroup v1 is used), while where a packet entered
    /// is the kernel's own record that no pod can forge. A packet the node made (a
    /// macvlan or ipvlan child's) keeps the socket's cgroup.
    pub fn attribute(&mut self, attempt: &mut Attempt) {
        if attempt.hook != crate::attempt::Hook::Uplink || attempt.ingress_ifindex == 0 {
            return;
        }
        if let Some(cgroup) = self.pod_of(attempt.ingress_ifindex, attempt.source) {
            attempt.cgroup_id = cgroup;
        }
    }

    fn pod_of(&mut self, ifindex: u32, source: Option<IpAddr>) -> Option<u64> {
        let fresh =
            self.pods.as_ref().is_some_and(|(at, pods)| at.elapsed() < PODS_RESCAN && pods.knows_entry(ifindex));
        if !fresh && self.pods.as_ref().is_none_or(|(at, _)| at.elapsed() >= PODS_RESCAN) {
            match PodNets::scan(&self.cgroup_root, &mut self.route, None) {
                Ok(p) => {
                    self.pods = Some((Instant::now(), p));
                    self.by_source.clear();
                }
                Err(e) => tracing::warn!("could not map host interfaces to pods: {e:#}"),
            }
        }
        let pods = &self.pods.as_ref()?.1;
        if let Some(own) = pods.cgroups_behind(ifindex) {
            return own.iter().next().copied();
        }
        let source = source?;
        *self
            .by_source
            .entry((ifindex, source))
            .or_insert_with(|| pods.cgroups_with_source(ifindex, source)?.iter().next().copied())
    }
}
