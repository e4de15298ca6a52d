// SPDX-License-Identifier: Apache-2.0
//! A pod's own service-account token: where the kubelet keeps it, and whether its
//! claims name that same pod.
//!
//! The signature is not checked here: the cloud's STS checks it against the cluster's
//! OIDC issuer. What is checked is that the token in pod A's volume directory is pod
//! A's (a token naming another pod or namespace is refused), and that it has not
//! expired. The token's text is never logged.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use base64::Engine as _;
use serde::Deserialize;

/// Where the kubelet mounts projected volumes in a pod's directory.
pub(crate) const PROJECTED_DIR: &str = "volumes/kubernetes.io~projected";
/// The default service-account volume's name prefix (`kube-api-access-<random>`).
pub(crate) const DEFAULT_VOLUME_PREFIX: &str = "kube-api-access-";
/// A Kubernetes token is about 1 KiB; anything past this is not one.
pub(crate) const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Why a pod's token cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    #[error("the pod UID `{0}` is not a UID")]
    BadUid(String),
    #[error("the pod has no `{DEFAULT_VOLUME_PREFIX}*` projected volume (found: {0}); set token_volume")]
    NoDefaultVolume(String),
    #[error("the pod has several `{DEFAULT_VOLUME_PREFIX}*` projected volumes ({0}); set token_volume")]
    SeveralDefaultVolumes(String),
    #[error("could not read the token {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("the token is not a JWT: {0}")]
    Malformed(String),
    #[error("the token's claim {claim} is {found:?}, but the pod's is {expected:?}")]
    Mismatch { claim: &'static str, found: Option<String>, expected: String },
    #[error("the token expired at {0} (unix seconds)")]
    Expired(u64),
}

/// The pod's projected-volume directory: `<kubelet_dir>/pods/<uid>/volumes/kubernetes.io~projected`.
pub(crate) fn projected_dir(kubelet_dir: &Path, pod_uid: &str) -> Result<PathBuf, TokenError> {
    // The UID comes from a cgroup name, not from the pod; still, it becomes a path.
    let plain =
        !pod_uid.is_empty() && pod_uid.len() <= 64 && pod_uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if !plain {
        return Err(TokenError::BadUid(pod_uid.to_owned()));
    }
    Ok(kubelet_dir.join("pods").join(pod_uid).join(PROJECTED_DIR))
}

/// Which projected volume holds the token: the configured one, or the only
/// `kube-api-access-*` among `entries` (the names in the pod's projected directory).
pub(crate) fn pick_volume(configured: Option<&str>, entries: &[String]) -> Result<String, TokenError> {
    if let Some(name) = configured {
        return Ok(name.to_owned());
    }
    let mut defaults: Vec<&String> = entries.iter().filter(|e| e.starts_with(DEFAULT_VOLUME_PREFIX)).collect();
    defaults.sort();
    match defaults.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(TokenError::NoDefaultVolume(if entries.is_empty() { "none".into() } else { entries.join(", ") })),
        many => Err(TokenError::SeveralDefaultVolumes(many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))),
    }
}

/// Reads the token of pod `pod_uid` from its volume (`configured`, or the default).
pub(crate) fn read(kubelet_dir: &Path, pod_uid: &str, configured: Option<&str>) -> Result<String, TokenError> {
    use std::io::Read as _;
    let dir = projected_dir(kubelet_dir, pod_uid)?;
    let unreadable = |path: &Path, e: std::io::Error| TokenError::Unreadable {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let entries = match configured {
        Some(_) => Vec::new(),
        None => std::fs::read_dir(&dir)
            .map_err(|e| unreadable(&dir, e))?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
    };
    let volume = pick_volume(configured, &entries)?;
    let path = dir.join(volume).join("token");
    let file = std::fs::File::open(&path).map_err(|e| unreadable(&path, e))?;
    let mut text = String::new();
    file.take(MAX_TOKEN_BYTES).read_to_string(&mut text).map_err(|e| unreadable(&path, e))?;
    Ok(text.trim().to_owned())
}

/// The claims of a Kubernetes service-account token this needs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct Claims {
    pub exp: Option<u64>,
    pub sub: Option<String>,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: Option<KubernetesClaims>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct KubernetesClaims {
    pub namespace: Option<String>,
    pub pod: Option<NamedRef>,
    pub serviceaccount: Option<NamedRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct NamedRef {
    pub name: Option<String>,
    pub uid: Option<String>,
}

/// The payload of a JWT (`header.payload.signature`), unverified.
pub(crate) fn decode_claims(token: &str) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed("not three dot-separated parts".into()));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| TokenError::Malformed(format!("payload is not base64url: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| TokenError::Malformed(format!("payload is not the expected JSON: {e}")))
}

/// The pod a token must name: as the kernel and the kubelet name it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExpectedPod<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
}

/// The token's service account, once its claims name `pod` and it has not expired.
pub(crate) fn check(claims: &Claims, pod: ExpectedPod<'_>, now: SystemTime) -> Result<String, TokenError> {
    let k8s = claims.kubernetes.clone().unwrap_or_default();
    let pod_ref = k8s.pod.unwrap_or_default();
    let same = |claim: &'static str, found: Option<String>, expected: &str| {
        if found.as_deref() == Some(expected) {
            Ok(())
        } else {
            Err(TokenError::Mismatch { claim, found, expected: expected.to_owned() })
        }
    };
    same("kubernetes.io.namespace", k8s.namespace, pod.namespace)?;
    same("kubernetes.io.pod.name", pod_ref.name, pod.name)?;
    same("kubernetes.io.pod.uid", pod_ref.uid, pod.uid)?;
    let Some(account) = k8s.serviceaccount.and_then(|s| s.name).filter(|n| !n.is_empty()) else {
        return Err(TokenError::Mismatch {
            claim: "kubernetes.io.serviceaccount.name",
            found: None,
            expected: "a service account".into(),
        });
    };
    if let Some(sub) = &claims.sub {
        same("sub", Some(sub.clone()), &format!("system:serviceaccount:{}:{account}", pod.namespace))?;
    }
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match claims.exp {
        Some(exp) if exp > now_secs => Ok(account),
        Some(exp) => Err(TokenError::Expired(exp)),
        None => Err(TokenError::Malformed("no `exp` claim".into())),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    pub(crate) fn jwt(payload: &serde_json::Value) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!("{}.{}.{}", b64(br#"{"alg":"RS256"}"#), b64(payload.to_string().as_bytes()), b64(b"sig"))
    }

    fn claims(ns: &str, pod: &str, uid: &str, sa: &str, exp: u64) -> serde_json::Value {
        serde_json::json!({
            "aud": ["sts.amazonaws.com"], "exp": exp, "iat": 1, "iss": "https://oidc.example",
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "kubernetes.io": {"namespace": ns, "pod": {"name": pod, "uid": uid}, "serviceaccount": {"name": sa, "uid": "x"}}
        })
    }

    const UID: &str = "0b3c9a4e-5f7d-4c1e-9d2a-1f6e8b7c5a40";
    const POD: ExpectedPod<'static> = ExpectedPod { namespace: "payments", name: "api-1", uid: UID };

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_token_naming_its_own_pod_gives_the_service_account() {
        let c = decode_claims(&jwt(&claims("payments", "api-1", UID, "api", 2000))).unwrap();
        assert_eq!(check(&c, POD, at(1000)), Ok("api".into()));
    }

    #[test]
    fn a_token_naming_another_pod_namespace_or_uid_is_refused() {
        for (ns, pod, uid, claim) in [
            ("shop", "api-1", UID, "kubernetes.io.namespace"),
            ("payments", "api-2", UID, "kubernetes.io.pod.name"),
            ("payments", "api-1", "11111111-5f7d-4c1e-9d2a-1f6e8b7c5a40", "kubernetes.io.pod.uid"),
        ] {
            let c = decode_claims(&jwt(&claims(ns, pod, uid, "api", 2000))).unwrap();
            match check(&c, POD, at(1000)) {
                Err(TokenError::Mismatch { claim: c, .. }) => assert_eq!(c, claim),
                other => panic!("{ns}/{pod}/{uid}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_expired_token_or_one_without_claims_is_refused() {
        let c = decode_claims(&jwt(&claims("payments", "api-1", UID, "api", 1000))).unwrap();
        assert_eq!(check(&c, POD, at(1000)), Err(TokenError::Expired(1000)));
        let bare = decode_claims(&jwt(&serde_json::json!({"exp": 5000}))).unwrap();
        assert!(matches!(check(&bare, POD, at(1)), Err(TokenError::Mismatch { .. })));
        let mut sub = claims("payments", "api-1", UID, "api", 2000);
        sub["sub"] = "system:serviceaccount:payments:admin".into();
        let c = decode_claims(&jwt(&sub)).unwrap();
        assert!(matches!(check(&c, POD, at(1)), Err(TokenError::Mismatch { claim: "sub", .. })));
    }

    #[test]
    fn what_is_no_jwt_is_malformed() {
        for text in ["", "a.b", "a.b.c.d", "a.!!!.c", "a.bm90IGpzb24.c"] {
            assert!(matches!(decode_claims(text), Err(TokenError::Malformed(_))), "{text}");
        }
    }

    #[test]
    fn the_default_volume_is_the_one_kube_api_access() {
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            pick_volume(None, &names(&["kube-api-access-7xk2p", "aws-iam-token"])).unwrap(),
            "kube-api-access-7xk2p"
        );
        assert_eq!(pick_volume(Some("aws-iam-token"), &[]).unwrap(), "aws-iam-token");
        assert!(matches!(pick_volume(None, &names(&["aws-iam-token"])), Err(TokenError::NoDefaultVolume(_))));
        let two = names(&["kube-api-access-a", "kube-api-access-b"]);
        assert!(matches!(pick_volume(None, &two), Err(TokenError::SeveralDefaultVolumes(_))));
    }

    #[test]
    fn the_token_is_read_from_the_pods_own_volume_directory() {
        let dir = tempfile::tempdir().unwrap();
        let vol = projected_dir(dir.path(), UID).unwrap().join("kube-api-access-x");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::write(vol.join("token"), "a.b.c\n").unwrap();
        assert_eq!(read(dir.path(), UID, None).unwrap(), "a.b.c");
        assert!(matches!(read(dir.path(), UID, Some("aws-iam-token")), Err(TokenError::Unreadable { .. })));
        assert!(matches!(projected_dir(dir.path(), "../etc"), Err(TokenError::BadUid(_))));
    }
}
