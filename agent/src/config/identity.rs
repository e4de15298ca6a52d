// SPDX-License-Identifier: Apache-2.0
//! The `conceal.identity` section: which clouds' identities pods get, and the checked
//! values it is made of (role ARNs, the token service's endpoint, session durations).
//! Plain data; the identity feature itself is `conceal::identity`.

use std::{fmt, str::FromStr, time::Duration};

/// The kubelet's state directory, where each pod's volumes are.
pub(crate) const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
/// Credentials asked for, per exchange: STS's default, and its minimum is 15 minutes.
pub(crate) const DEFAULT_SESSION_DURATION: Duration = Duration::from_secs(3600);
/// STS's bounds for `DurationSeconds` (the role's own maximum may be lower).
pub(crate) const MIN_SESSION_DURATION: Duration = Duration::from_secs(900);
pub(crate) const MAX_SESSION_DURATION: Duration = Duration::from_secs(12 * 3600);
/// Credentials are renewed this long before they expire, and a pod never gets ones
/// with less left: botocore and the Java SDK refresh 15 minutes ahead (the Go SDK 5
/// to 10), so a pod's SDK never finds what it was given already due for refresh.
pub(crate) const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(15 * 60);

/// `conceal.identity`: which clouds' identities pods get.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IdentityConfig {
    pub aws: Option<AwsIdentityConfig>,
}

/// `conceal.identity.aws`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AwsIdentityConfig {
    /// None: the regional endpoint of the node's region, learned from IMDS.
    pub sts_endpoint: Option<Endpoint>,
    /// The projected volume holding the token; None: the pod's `kube-api-access-*`.
    pub token_volume: Option<String>,
    pub roles: Vec<RoleMapping>,
    pub session_duration: Duration,
    pub refresh_before: Duration,
}

impl Default for AwsIdentityConfig {
    fn default() -> Self {
        AwsIdentityConfig {
            sts_endpoint: None,
            token_volume: None,
            roles: Vec::new(),
            session_duration: DEFAULT_SESSION_DURATION,
            refresh_before: DEFAULT_REFRESH_BEFORE,
        }
    }
}

/// One `conceal.identity.aws.roles` entry: a service account of a namespace, and its role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RoleMapping {
    pub namespace: String,
    pub service_account: String,
    pub role_arn: RoleArn,
}

/// An IAM role's ARN, `arn:<partition>:iam::<account>:role/<path/>name`, checked.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct RoleArn {
    text: String,
    name: String,
}

impl RoleArn {
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The role's name: what `iam/security-credentials/` lists.
    pub(crate) fn name(&self) -> &str {
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

/// The first entry that repeats an earlier one's namespace and service account: each
/// service account gets one role, so a second would be ambiguous.
pub(crate) fn first_duplicate(roles: &[RoleMapping]) -> Option<usize> {
    (1..roles.len()).find(|&i| {
        roles[..i].iter().any(|r| r.namespace == roles[i].namespace && r.service_account == roles[i].service_account)
    })
}

/// An `http://` or `https://` endpoint: host, port and path, nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Endpoint {
    /// The regional STS endpoint of `region` (`cn-*` regions are in `amazonaws.com.cn`).
    pub(crate) fn regional_sts(region: &str) -> Result<Endpoint, String> {
        let plain = !region.is_empty()
            && region.len() <= 32
            && region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !plain {
            return Err(format!("`{region}` is not an AWS region"));
        }
        let domain = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
        format!("https://sts.{region}.{domain}").parse()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == default {
            write!(f, "{scheme}://{host}{}", self.path)
        } else {
            write!(f, "{scheme}://{host}:{}{}", self.port, self.path)
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Endpoint, String> {
        let bad = |why: &str| {
            format!("`{text}` is not an endpoint URL ({why}); write e.g. https://sts.us-east-1.amazonaws.com")
        };
        let uri: hyper::Uri = text.trim().parse().map_err(|e| bad(&format!("{e}")))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be https:// (or http:// for a local emulator)")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("no user or password may be given"));
        }
        if uri.query().is_some() {
            return Err(bad("no query may be given"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = if uri.path().is_empty() { "/".to_owned() } else { uri.path().to_owned() };
        Ok(Endpoint { tls, host, port, path })
    }
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
    fn a_service_account_of_a_namespace_is_mapped_once() {
        let map = |ns: &str, sa: &str, role: &str| RoleMapping {
            namespace: ns.into(),
            service_account: sa.into(),
            role_arn: format!("arn:aws:iam::111122223333:role/{role}").parse().unwrap(),
        };
        assert_eq!(first_duplicate(&[map("payments", "api", "pay"), map("shop", "api", "shop")]), None);
        assert_eq!(first_duplicate(&[map("a", "b", "x"), map("c", "d", "y"), map("a", "b", "z")]), Some(2));
    }

    #[test]
    fn endpoints_are_http_or_https_urls_with_a_host() {
        let e: Endpoint = "https://sts.us-east-1.amazonaws.com".parse().unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port, e.path.as_str()), (true, "sts.us-east-1.amazonaws.com", 443, "/"));
        assert_eq!(e.to_string(), "https://sts.us-east-1.amazonaws.com/");
        let local: Endpoint = "http://127.0.0.1:5000".parse().unwrap();
        assert_eq!((local.tls, local.port), (false, 5000));
        let v6: Endpoint = "http://[::1]:5000/".parse().unwrap();
        assert_eq!((v6.host.as_str(), v6.to_string().as_str()), ("::1", "http://[::1]:5000/"));
        for bad in ["sts.amazonaws.com", "ftp://x", "https://u:p@x", "https://x/?a=b", "https:///"] {
            assert!(bad.parse::<Endpoint>().unwrap_err().contains("not an endpoint URL"), "{bad}");
        }
    }

    #[test]
    fn the_regional_endpoint_follows_the_partition() {
        assert_eq!(Endpoint::regional_sts("eu-west-1").unwrap().to_string(), "https://sts.eu-west-1.amazonaws.com/");
        assert_eq!(Endpoint::regional_sts("cn-north-1").unwrap().host, "sts.cn-north-1.amazonaws.com.cn");
        assert!(Endpoint::regional_sts("us-east-1/evil").is_err());
    }
}
