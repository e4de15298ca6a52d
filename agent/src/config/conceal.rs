// SPDX-License-Identifier: Apache-2.0
//! The `conceal` section: conceal mode's settings, beside the mode itself.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::policy::Pattern;

/// Conceal mode's settings, beside the mode itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ConcealConfig {
    /// Where the proxy listens, in the host's network namespace; required in conceal mode.
    pub addr: Option<SocketAddr>,
    pub extra_paths: Vec<ExtraPaths>,
    /// Pods' own identities on their credential paths (`crate::conceal::identity`).
    pub identity: super::identity::IdentityConfig,
}

/// Extra paths some pods may read, beyond the built-in rules: `namespace` and `pod`
/// are globs as in `allow_pods`; `paths` use the rule syntax of the conceal proxy's
/// rules (`conceal::clouds`: literal segments, `*` for one segment, a final `**` for
/// a whole tree), GET and HEAD only.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExtraPaths {
    pub namespace: Pattern,
    pub pod: Pattern,
    pub paths: Vec<String>,
}

impl ExtraPaths {
    pub(crate) fn applies_to(&self, namespace: &str, pod: &str) -> bool {
        self.namespace.matches(namespace) && self.pod.matches(pod)
    }

    /// How refusals, audit records and metrics name this rule.
    pub(crate) fn rule_name(&self) -> String {
        format!("extra:{}/{}", self.namespace, self.pod)
    }

    /// Each path must be absolute and hold only segments the proxy can ever match.
    pub(crate) fn validate(&self) -> Result<(), String> {
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
            if !known_metadata_tree(segments[0]) {
                return Err(format!(
                    "path `{path}` is in no known metadata tree (AWS /latest/ or /<date>/, GCP /computeMetadata/, \
                     Azure /metadata/)"
                ));
            }
        }
        Ok(())
    }
}

/// Whether a path's first segment opens one of the metadata services' trees: AWS
/// (`latest` or a dated version), GCP (`computeMetadata`) or Azure (`metadata`). The
/// trees do not overlap; the conceal proxy's `clouds::route` picks the cloud's rules
/// by the same segment (a test there keeps the two in step).
pub(crate) fn known_metadata_tree(first_segment: &str) -> bool {
    first_segment == "latest"
        || is_aws_date(first_segment)
        || first_segment == "computeMetadata"
        || first_segment.eq_ignore_ascii_case("metadata")
}

/// `2021-07-15`: the dated API versions IMDS serves beside `latest`.
pub(crate) fn is_aws_date(segment: &str) -> bool {
    let b = segment.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

#[cfg(test)]
mod tests {
    use super::*;

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
