// SPDX-License-Identifier: Apache-2.0
//! Which role a pod's service account is given, and how the role and the session are
//! named to the metadata clients and to the cloud.

use crate::config::identity::{RoleArn, RoleMapping};

/// The role for `service_account` of `namespace`, if any.
pub(crate) fn role_for<'a>(roles: &'a [RoleMapping], namespace: &str, service_account: &str) -> Option<&'a RoleArn> {
    roles.iter().find(|r| r.namespace == namespace && r.service_account == service_account).map(|r| &r.role_arn)
}

/// STS's limit on `RoleSessionName`.
pub(crate) const MAX_SESSION_NAME: usize = 64;

/// The session name, `<namespace>.<pod>`: CloudTrail then names the pod. STS allows
/// 2-64 of `[\w+=,.@-]`; a longer name keeps its start and ends with the UID's first
/// eight characters, so two long pod names stay apart.
pub(crate) fn session_name(namespace: &str, pod: &str, pod_uid: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' }).collect()
    };
    let full = clean(&format!("{namespace}.{pod}"));
    if full.len() <= MAX_SESSION_NAME {
        return full;
    }
    let tag: String = clean(pod_uid).chars().take(8).collect();
    format!("{}-{tag}", &full[..MAX_SESSION_NAME - 1 - tag.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_goes_to_one_service_account_of_one_namespace() {
        let map = |ns: &str, sa: &str, role: &str| RoleMapping {
            namespace: ns.into(),
            service_account: sa.into(),
            role_arn: format!("arn:aws:iam::111122223333:role/{role}").parse().unwrap(),
        };
        let roles = [map("payments", "api", "pay"), map("shop", "api", "shop")];
        assert_eq!(role_for(&roles, "payments", "api").unwrap().name(), "pay");
        assert!(role_for(&roles, "payments", "default").is_none());
        assert!(role_for(&roles, "other", "api").is_none());
    }

    #[test]
    fn session_names_name_the_pod_within_stss_limits() {
        assert_eq!(session_name("payments", "api-7d9f", "0b3c9a4e-5f7d"), "payments.api-7d9f");
        let long = session_name("namespace-with-a-long-name", &"p".repeat(80), "0b3c9a4e-5f7d");
        assert_eq!(long.len(), MAX_SESSION_NAME);
        assert!(long.starts_with("namespace-with-a-long-name.ppp") && long.ends_with("-0b3c9a4e"), "{long}");
        assert_eq!(session_name("a b", "c/d", "u"), "a-b.c-d");
    }
}
