// SPDX-License-Identifier: Apache-2.0
//! IMDS's IAM paths and answers, in the service's own format, so that every SDK's
//! instance-metadata credential provider reads them unchanged.

use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;

use super::{sts::Issued, Answer};
use crate::{
    conceal::normalise::NormalPath,
    config::{identity::RoleArn, is_aws_date},
};

/// Which IAM path a request names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IamPath {
    /// `meta-data/iam/`: `info` and `security-credentials/`.
    Directory,
    /// `meta-data/iam/info`: the instance profile.
    Info,
    /// `meta-data/iam/security-credentials/`: the role's name.
    RoleList,
    /// `meta-data/iam/security-credentials/<name>`.
    Credentials(String),
}

/// The IAM path `path` names, if any (`latest` or a dated API version).
pub(crate) fn iam_path(path: &NormalPath) -> Option<IamPath> {
    let s: Vec<&str> = path.segments.iter().map(String::as_str).collect();
    let (version, rest) = s.split_first()?;
    if *version != "latest" && !is_aws_date(version) {
        return None;
    }
    match rest {
        ["meta-data", "iam"] => Some(IamPath::Directory),
        ["meta-data", "iam", "info"] => Some(IamPath::Info),
        ["meta-data", "iam", "security-credentials"] => Some(IamPath::RoleList),
        ["meta-data", "iam", "security-credentials", name] => Some(IamPath::Credentials((*name).to_owned())),
        _ => None,
    }
}

const TEXT: &str = "text/plain";

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn json(value: &impl Serialize) -> Answer {
    let body = serde_json::to_vec_pretty(value).expect("plain data serialises");
    Answer { status: 200, content_type: TEXT, body: Bytes::from(body) }
}

pub(crate) fn text(body: &str) -> Answer {
    Answer { status: 200, content_type: TEXT, body: Bytes::from(body.to_owned()) }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Credentials<'a> {
    code: &'a str,
    last_updated: String,
    #[serde(rename = "Type")]
    kind: &'a str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
}

/// `security-credentials/<role>`, as IMDS writes it.
pub(crate) fn credentials(issued: &Issued) -> Answer {
    json(&Credentials {
        code: "Success",
        last_updated: rfc3339(issued.issued_at),
        kind: "AWS-HMAC",
        access_key_id: &issued.access_key_id,
        secret_access_key: &issued.secret_access_key,
        token: &issued.session_token,
        expiration: rfc3339(issued.expiration),
    })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Failure<'a> {
    code: &'a str,
    message: &'a str,
    last_updated: String,
}

/// How IMDS reports that the role's credentials could not be had: status 200, a
/// `Code` other than `Success`, no keys. Every SDK reads it as "no credentials".
pub(crate) fn failure(code: &str, message: &str, now: SystemTime) -> Answer {
    json(&Failure { code, message, last_updated: rfc3339(now) })
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Info<'a> {
    code: &'a str,
    last_updated: String,
    instance_profile_arn: &'a str,
    instance_profile_id: &'a str,
}

/// `iam/info`. A pod has no instance profile: the profile named is the role itself
/// (its ARN, so the account parses as from a real profile's ARN), and the id is the
/// role's unique id (`AROA…`) as STS reported it.
pub(crate) fn info(role: &RoleArn, issued: &Issued) -> Answer {
    json(&Info {
        code: "Success",
        last_updated: rfc3339(issued.issued_at),
        instance_profile_arn: role.as_str(),
        instance_profile_id: issued.role_id.as_deref().unwrap_or(""),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    fn path(p: &str) -> NormalPath {
        NormalPath::parse(p).unwrap()
    }

    #[test]
    fn the_iam_paths_are_recognised_in_every_api_version() {
        assert_eq!(iam_path(&path("/latest/meta-data/iam/")), Some(IamPath::Directory));
        assert_eq!(iam_path(&path("/2021-07-15/meta-data/iam/info")), Some(IamPath::Info));
        assert_eq!(iam_path(&path("/latest/meta-data/iam/security-credentials/")), Some(IamPath::RoleList));
        assert_eq!(
            iam_path(&path("/latest/meta-data/iam/security-credentials/payments-api")),
            Some(IamPath::Credentials("payments-api".into()))
        );
        for other in [
            "/latest/meta-data/iam/security-credentials/a/b",
            "/latest/meta-data/identity-credentials/ec2/info",
            "/x/meta-data/iam/info",
            "/latest/user-data",
        ] {
            assert_eq!(iam_path(&path(other)), None, "{other}");
        }
    }

    #[test]
    fn credentials_are_written_as_imds_writes_them() {
        let issued = Issued {
            access_key_id: "ASIA1".into(),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
            expiration: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            role_id: Some("AROA1".into()),
            assumed_arn: None,
            issued_at: UNIX_EPOCH + Duration::from_secs(1_799_996_400),
        };
        let body: serde_json::Value = serde_json::from_slice(&credentials(&issued).body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"Code": "Success", "LastUpdated": "2027-01-15T07:00:00Z", "Type": "AWS-HMAC",
                "AccessKeyId": "ASIA1", "SecretAccessKey": "secret", "Token": "token", "Expiration": "2027-01-15T08:00:00Z"})
        );
        let role: RoleArn = "arn:aws:iam::111122223333:role/payments-api".parse().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info(&role, &issued).body).unwrap();
        assert_eq!(info["InstanceProfileArn"], role.as_str());
        assert_eq!(info["InstanceProfileId"], "AROA1");
        let failed: serde_json::Value =
            serde_json::from_slice(&failure("AccessDenied", "no", UNIX_EPOCH).body).unwrap();
        assert_eq!(failed["Code"], "AccessDenied");
        assert!(failed.get("AccessKeyId").is_none());
    }
}
