//! Conceal mode: pods keep the harmless metadata (region, zone, instance id) and never
//! get what makes them the node (credentials, identity tokens, user data).
//!
//! The kernel's connect hooks send a pod's HTTP connections to a metadata endpoint to
//! the proxy here instead (ebpf/src/conceal.rs), and a sockops program records, for
//! each such connection, the pod's cgroup and the original destination by the pod
//! end's address and port (`peers`). The proxy judges each request by the rules of
//! `clouds` (data) through `decide` (logic) on a path in `normalise`d form.

pub mod clouds;
pub mod decide;
pub mod host_sockets;
pub mod metrics;
pub mod normalise;
pub mod peers;
pub mod proxy;
pub mod service;

use std::net::SocketAddr;

use metadata_guard_common::PROTO_TCP;
use serde::Deserialize;

use crate::policy::{BlockRule, Pattern, PortMatch};

/// Conceal mode's settings, beside the mode itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConcealConfig {
    /// Where the proxy listens, in the host's network namespace; required in conceal mode.
    pub addr: Option<SocketAddr>,
    pub extra_paths: Vec<ExtraPaths>,
}

/// The metadata HTTP endpoints to redirect: those of [`peers::METADATA_HTTP`] that the
/// policy blocks for TCP port 80.
pub fn endpoints(block: &[BlockRule]) -> Vec<SocketAddr> {
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

/// Extra paths some pods may read, beyond the built-in rules: `namespace` and `pod`
/// are globs as in `allow_pods`; `paths` use the rule syntax of [`clouds`] (literal
/// segments, `*` for one segment, a final `**` for a whole tree), GET and HEAD only.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraPaths {
    pub namespace: Pattern,
    pub pod: Pattern,
    pub paths: Vec<String>,
}

impl ExtraPaths {
    pub fn applies_to(&self, namespace: &str, pod: &str) -> bool {
        self.namespace.matches(namespace) && self.pod.matches(pod)
    }

    /// How refusals, audit records and metrics name this rule.
    pub fn rule_name(&self) -> String {
        format!("extra:{}/{}", self.namespace, self.pod)
    }

    /// Each path must be absolute and hold only segments the proxy can ever match.
    pub fn validate(&self) -> Result<(), String> {
        for path in &self.paths {
            if !path.starts_with('/') {
                return Err(format!("path `{path}` must start with `/`"));
            }
            let segments: Vec<&str> = path[1..].split('/').filter(|s| !s.is_empty()).collect();
            if segments.is_empty() {
                return Err(format!("path `{path}` names no metadata path"));
            }
            for (i, s) in segments.iter().enumerate() {
                if *s == "**" && i + 1 != segments.len() {
                    return Err(format!("path `{path}`: `**` may only be the last segment"));
                }
                if *s == "." || *s == ".." || s.contains('%') {
                    return Err(format!(
                        "path `{path}`: write the path in its plain form, without `.`, `..` or escapes"
                    ));
                }
            }
            if clouds::route(segments[0]).is_none() {
                return Err(format!(
                    "path `{path}` is in no known metadata tree (AWS /latest/ or /<date>/, GCP /computeMetadata/, \
                     Azure /metadata/)"
                ));
            }
        }
        Ok(())
    }
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
    fn extra_paths_must_be_plain_paths_in_a_known_tree() {
        let extra = |paths: &[&str]| ExtraPaths {
            namespace: "*".parse().unwrap(),
            pod: "*".parse().unwrap(),
            paths: paths.iter().map(std::string::ToString::to_string).collect(),
        };
        assert!(extra(&["/latest/meta-data/iam/info", "/computeMetadata/v1/instance/attributes/**"])
            .validate()
            .is_ok());
        assert!(extra(&["latest/meta-data"]).validate().unwrap_err().contains("must start with `/`"));
        assert!(extra(&["/latest/**/iam"]).validate().unwrap_err().contains("last segment"));
        assert!(extra(&["/latest/meta-data/../iam"]).validate().unwrap_err().contains("plain form"));
        assert!(extra(&["/openstack/latest"]).validate().unwrap_err().contains("no known metadata tree"));
    }
}
