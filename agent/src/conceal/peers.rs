// SPDX-License-Identifier: Apache-2.0
//! Who is behind a connection the proxy accepted: the kernel's record, looked up by the
//! connection's peer address and port (the pod's end).

use std::{net::SocketAddr, sync::Mutex};

use super::proxy::{Origin, Peers};
use crate::loader::{sock_addr, sock_key, ConcealPeers};

pub(crate) struct KernelPeers(Mutex<ConcealPeers>);

impl KernelPeers {
    pub(crate) fn new(map: ConcealPeers) -> KernelPeers {
        KernelPeers(Mutex::new(map))
    }
}

impl Peers for KernelPeers {
    fn origin(&self, peer: SocketAddr) -> Option<Origin> {
        let map = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let record = map.get(&sock_key(&peer), 0).ok()?;
        Some(Origin {
            cgroup_id: record.cgroup_id,
            netns_cookie: record.netns_cookie,
            destination: sock_addr(&record.destination),
        })
    }
}

/// Metadata HTTP endpoints the proxy knows how to judge; of these, the ones the
/// policy blocks for TCP port 80 are redirected. (Link-local IPv6 such as
/// OpenStack's fe80::a9fe:a9fe needs an interface to reach and stays blocked.)
pub(crate) const METADATA_HTTP: [&str; 4] =
    ["169.254.169.254:80", "[fd00:ec2::254]:80", "100.100.100.200:80", "192.0.0.192:80"];
