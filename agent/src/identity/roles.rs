// SPDX-License-Identifier: Apache-2.0
//! Which role a pod's service account is given, and how the role and the session are
//! named to the metadata clients and to the cloud.

use std::{fmt, str::FromStr};

/// One `conceal.identity.aws.roles` entry: a service account of a namespace, and its role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleMapping {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: RoleArn,
}

/// An IAM role's ARN, `arn:<partition>:iam::<account>:role/<path/>name`, checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoleArn {
    text: String,
    name: String,
}

impl RoleArn {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The role's name: what `iam/security-credentials/` lists.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for RoleArn {
    type Err = String;

    fn from_str(text: &str) -> Result<RoleArn, String> {
        let bad =
            |why: &str| format!("`{text}` is not an IAM role ARN ({why}); write arn:aws:iam::111122223333:role/NAME");
        let parts: Vec<&str> = text.splitn(6, ':').collect();
        let [arn, partition, service, region, account, resource] = parts.as_slice() else {
            return Err(bad("too few `:`-separated parts"));
        };
        if *arn != "arn" || !partition.starts_with("aws") || *service != "iam" || !region.is_empty() {
            return Err(bad("it must start with arn:aws…:iam::"));
        }
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("the account is not 12 digits"));
        }
        let Some(path_and_name) = resource.strip_prefix("role/") else {
            return Err(bad("the resource is not `role/…`"));
        };
        let name = path_and_name.rsplit('/').next().unwrap_or_default();
        let name_ok = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
        };
        if !name_ok(name) {
            return Err(bad("the role name must be 1-64 of [A-Za-z0-9+=,.@_-]"));
        }
        Ok(RoleArn { text: text.to_owned(), name: name.to_owned() })
    }
}

/// The role for `service_account` of `namespace`, if any.
pub fn role_for<'a>(roles: &'a [RoleMapping], namespace: &str, service_account: &str) -> Option<&'a RoleArn> {
    roles.iter().find(|r| r.namespace == namespace && r.service_account == service_account).map(|r| &r.role_arn)
}

/// The first entry that repeats an earlier one's namespace and service account: each
/// service account gets one role, so a second would be ambiguous.
pub fn first_duplicate(roles: &[RoleMapping]) -> Option<usize> {
    (1..roles.len()).find(|&i| {
        roles[..i].iter().any(|r| r.namespace == roles[i].namespace && r.service_account == roles[i].service_account)
    })
}

/// STS's limit on `RoleSessionName`.
pub const MAX_SESSION_NAME: usize = 64;

/// The session name, `<namespace>.<pod>`: CloudTrail then names the pod. STS allows
/// 2-64 of `[\w+=,.@-]`; a longer name keeps its start and ends with the UID's first
/// eight characters, so two long pod names stay apart.
pub fn session_name(namespace: &str, pod: &str, pod_uid: &str) -> String {
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
    fn role_arns_are_checked_and_named() {
        let arn: RoleArn = "arn:aws:iam::111122223333:role/team/payments-api".parse().unwrap();
        assert_eq!(arn.name(), "payments-api");
        let cn: RoleArn = "arn:aws-cn:iam::111122223333:role/r".parse().unwrap();
        assert_eq!(cn.as_str(), "arn:aws-cn:iam::111122223333:role/r");
        for bad in [
            "payments-api",
            "arn:aws:iam::1111:role/x",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::111122223333:user/x",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam:us-east-1:111122223333:role/x",
        ] {
            assert!(bad.parse::<RoleArn>().unwrap_err().contains("not an IAM role ARN"), "{bad}");
        }
    }

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
        assert_eq!(first_duplicate(&roles), None);
        assert_eq!(first_duplicate(&[map("a", "b", "x"), map("c", "d", "y"), map("a", "b", "z")]), Some(2));
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
