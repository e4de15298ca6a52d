// SPDX-License-Identifier: Apache-2.0
//! Conceal mode: pods keep the harmless metadata (region, zone, instance id) and never
//! get what makes them the node (credentials, identity tokens, user data).
//!
//! The kernel's connect hooks send a pod's HTTP connections to a metadata endpoint to
//! the proxy here instead (ebpf/src/conceal.rs), and a sockops program records, for
//! each such connection, the pod's cgroup and the original destination by the pod
//! end's address and port (`peers`). The proxy judges each request by the rules of
//! `clouds` (data) through `decide` (logic) on a path in `normalise`d form; on a
//! credential path, `identity` may answer a pod with its own role's credentials.

pub(crate) mod clouds;
pub(crate) mod decide;
pub(crate) mod grammar;
pub(crate) mod host_sockets;
pub(crate) mod identity;
pub(crate) mod ipvs;
pub(crate) mod metrics;
pub(crate) mod normalise;
pub(crate) mod peers;
pub(crate) mod proxy;
pub(crate) mod service;
pub(crate) mod tokens;

use std::net::SocketAddr;

use metadata_guard_common::PROTO_TCP;

pub(crate) use crate::config::ExtraPaths;
use crate::policy::{BlockRule, PortMatch};

/// The metadata HTTP endpoints to redirect: those of [`peers::METADATA_HTTP`] that the
/// policy blocks for TCP port 80.
pub(crate) fn endpoints(block: &[BlockRule]) -> Vec<SocketAddr> {
    let blocks_http = |rule: &BlockRule, ep: &SocketAddr| {
        rule.cidr.contains(&ep.ip())
            && rule.protocols & PROTO_TCP != 0
            && match &rule.ports {
                PortMatch::Any => true,
                PortMatch::Only(ports) => ports.contains(&ep.port()),
                PortMatch::Except(ports) => !ports.contains(&ep.port()),
            }
    };
    peers::METADATA_HTTP
        .iter()
        .map(|text| text.parse().expect("a valid built-in endpoint"))
        .filter(|ep| block.iter().any(|rule| blocks_http(rule, ep)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Preset;

    #[test]
    fn the_default_preset_redirects_every_known_http_endpoint_but_not_wireserver() {
        let rules: Vec<BlockRule> = Preset::Default.rules();
        let eps: Vec<String> = endpoints(&rules).iter().map(std::string::ToString::to_string).collect();
        assert_eq!(eps, ["169.254.169.254:80", "[fd00:ec2::254]:80", "100.100.100.200:80", "192.0.0.192:80"]);
        let gcp: Vec<String> = endpoints(&Preset::Gcp.rules()).iter().map(std::string::ToString::to_string).collect();
        assert_eq!(gcp, ["169.254.169.254:80"]);
    }

    #[test]
    fn the_config_knows_every_tree_the_proxy_has_rules_for() {
        for segment in ["latest", "2021-07-15", "computeMetadata", "metadata", "METADATA", "openstack", "v1", ""] {
            assert_eq!(clouds::route(segment).is_some(), crate::config::known_metadata_tree(segment), "{segment}");
        }
    }
}
