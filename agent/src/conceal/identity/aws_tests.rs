// SPDX-License-Identifier: Apache-2.0
//! The AWS source over a fake kubelet directory and a fake STS on loopback: which pod
//! gets what, and how many exchanges STS saw.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::*;
use crate::{config::identity::RoleMapping, metrics::Metrics, pod_identity::Qos};

const UID_A: &str = "0b3c9a4e-5f7d-4c1e-9d2a-1f6e8b7c5a40";
const UID_B: &str = "1b3c9a4e-5f7d-4c1e-9d2a-1f6e8b7c5a41";
const ROLE: &str = "arn:aws:iam::111122223333:role/payments-api";

/// A fake STS: counts the exchanges, answers with credentials naming the session, or
/// with an STS error when `fail` is set.
async fn fake_sts(fail: bool) -> (SocketAddr, Arc<AtomicU32>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut seen = Vec::new();
                while !String::from_utf8_lossy(&seen).contains("DurationSeconds=") {
                    let Ok(k) = s.read(&mut buf).await else { return };
                    if k == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..k]);
                }
                let text = String::from_utf8_lossy(&seen);
                let session = text.split("RoleSessionName=").nth(1).unwrap_or("").split('&').next().unwrap_or("");
                tokio::time::sleep(Duration::from_millis(20)).await;
                let body = if fail {
                    "<ErrorResponse><Error><Code>InvalidIdentityToken</Code><Message>Incorrect token audience</Message></Error></ErrorResponse>".to_owned()
                } else {
                    format!(
                        "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
                         <AccessKeyId>ASIA{n}</AccessKeyId><SecretAccessKey>secret-{session}</SecretAccessKey>\
                         <SessionToken>token-{session}</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration>\
                         </Credentials><AssumedRoleUser><AssumedRoleId>AROAEXAMPLE:{session}</AssumedRoleId>\
                         <Arn>arn:aws:sts::111122223333:assumed-role/payments-api/{session}</Arn></AssumedRoleUser>\
                         </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
                    )
                };
                let status = if fail { "400 Bad Request" } else { "200 OK" };
                let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body.as_bytes()).await;
            });
        }
    });
    (addr, calls)
}

fn jwt(ns: &str, pod: &str, uid: &str, sa: &str) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let claims = serde_json::json!({
        "aud": ["sts.amazonaws.com"], "exp": 4_000_000_000u64, "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "pod": {"name": pod, "uid": uid}, "serviceaccount": {"name": sa}}
    });
    format!("{}.{}.{}", b64(b"{}"), b64(claims.to_string().as_bytes()), b64(b"sig"))
}

fn put_token(kubelet: &std::path::Path, uid: &str, token: &str) {
    let dir = kubelet.join("pods").join(uid).join("volumes/kubernetes.io~projected/kube-api-access-x2b9");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), token).unwrap();
}

fn pod(ns: &str, name: &str, uid: &str) -> PodIdentity {
    PodIdentity {
        namespace: Some(ns.into()),
        pod: Some(name.into()),
        pod_uid: uid.into(),
        container: None,
        container_id: None,
        runtime: None,
        qos: Qos::BestEffort,
    }
}

fn source(kubelet: &std::path::Path, sts: SocketAddr) -> Arc<AwsSource> {
    let config = AwsIdentityConfig {
        sts_endpoint: Some(format!("http://{sts}").parse().unwrap()),
        roles: vec![RoleMapping {
            namespace: "payments".into(),
            service_account: "api".into(),
            role_arn: ROLE.parse().unwrap(),
        }],
        ..AwsIdentityConfig::default()
    };
    let metrics = Arc::new(IdentityMetrics::register(&Metrics::new()));
    Arc::new(AwsSource::new(
        kubelet.to_path_buf(),
        config,
        HostSockets::new(None).unwrap(),
        metrics,
        Arc::new(SystemTime::now),
    ))
}

fn path(p: &str) -> NormalPath {
    NormalPath::parse(p).unwrap()
}

fn answer(reply: Reply) -> (serde_json::Value, IdentityNote) {
    match reply {
        Reply::Answer { answer, note } => {
            let text = String::from_utf8_lossy(&answer.body).into_owned();
            (serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)), note)
        }
        Reply::Conceal { note } => panic!("concealed: {note:?}"),
    }
}

#[tokio::test]
async fn a_mapped_pod_gets_its_own_roles_credentials_once_per_refresh() {
    let kubelet = tempfile::tempdir().unwrap();
    let (sts, calls) = fake_sts(false).await;
    let src = source(kubelet.path(), sts);
    let api = pod("payments", "api-1", UID_A);
    put_token(kubelet.path(), UID_A, &jwt("payments", "api-1", UID_A, "api"));
    let (list, _) = answer(src.reply(&api, &path("/latest/meta-data/iam/security-credentials/")).await);
    assert_eq!(list, "payments-api");
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (src, api) = (src.clone(), api.clone());
        tasks.push(tokio::spawn(async move {
            answer(src.reply(&api, &path("/latest/meta-data/iam/security-credentials/payments-api")).await)
        }));
    }
    for t in tasks {
        let (creds, note) = t.await.unwrap();
        assert_eq!((creds["Code"].as_str(), creds["Type"].as_str()), (Some("Success"), Some("AWS-HMAC")));
        assert_eq!(creds["SecretAccessKey"], "secret-payments.api-1", "the session names the pod");
        assert_eq!((note.result, note.role.as_deref()), (IdentityResult::Served, Some(ROLE)));
    }
    let (info, _) = answer(src.reply(&api, &path("/latest/meta-data/iam/info")).await);
    assert_eq!(
        (info["InstanceProfileArn"].as_str(), info["InstanceProfileId"].as_str()),
        (Some(ROLE), Some("AROAEXAMPLE"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one exchange for the pod, whatever the number of requests");

    // Another pod of the same service account: its own exchange, its own session.
    put_token(kubelet.path(), UID_B, &jwt("payments", "api-2", UID_B, "api"));
    let (other, _) = answer(
        src.reply(&pod("payments", "api-2", UID_B), &path("/latest/meta-data/iam/security-credentials/payments-api"))
            .await,
    );
    assert_eq!(other["SecretAccessKey"], "secret-payments.api-2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unmapped_pods_and_tokens_naming_another_pod_get_nothing() {
    let kubelet = tempfile::tempdir().unwrap();
    let (sts, calls) = fake_sts(false).await;
    let src = source(kubelet.path(), sts);
    let creds = path("/latest/meta-data/iam/security-credentials/payments-api");
    // Another service account of the mapped namespace.
    put_token(kubelet.path(), UID_A, &jwt("payments", "batch-1", UID_A, "batch"));
    assert_eq!(src.reply(&pod("payments", "batch-1", UID_A), &creds).await, Reply::Conceal { note: None });
    // Another namespace: not even its token is read.
    assert_eq!(src.reply(&pod("shop", "api-1", UID_B), &creds).await, Reply::Conceal { note: None });
    // A token that names another pod: refused, and said so.
    put_token(kubelet.path(), UID_B, &jwt("payments", "api-1", UID_A, "api"));
    let Reply::Conceal { note: Some(note) } = src.reply(&pod("payments", "api-2", UID_B), &creds).await else {
        panic!("a token naming another pod must be refused");
    };
    assert_eq!(note.result, IdentityResult::TokenRefused);
    assert!(note.reason.unwrap().contains("kubernetes.io.pod.name"));
    // A role name that is not the pod's.
    put_token(kubelet.path(), UID_A, &jwt("payments", "api-1", UID_A, "api"));
    let wrong = path("/latest/meta-data/iam/security-credentials/node-role");
    assert_eq!(src.reply(&pod("payments", "api-1", UID_A), &wrong).await, Reply::Conceal { note: None });
    assert_eq!(calls.load(Ordering::SeqCst), 0, "STS is never asked for any of these");
}

#[tokio::test]
async fn sts_errors_reach_the_pod_as_imds_failures_and_a_reload_removes_the_role() {
    let kubelet = tempfile::tempdir().unwrap();
    let (sts, calls) = fake_sts(true).await;
    let src = source(kubelet.path(), sts);
    let api = pod("payments", "api-1", UID_A);
    put_token(kubelet.path(), UID_A, &jwt("payments", "api-1", UID_A, "api"));
    let creds = path("/latest/meta-data/iam/security-credentials/payments-api");
    let (failed, note) = answer(src.reply(&api, &creds).await);
    assert_eq!(failed["Code"], "InvalidIdentityToken");
    assert!(failed.get("AccessKeyId").is_none());
    assert_eq!(note.result, IdentityResult::StsError);
    let _ = src.reply(&api, &creds).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a failure is held, not retried at once");
    // Unreachable: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let unreachable = source(kubelet.path(), closed);
    let (failed, _) = answer(unreachable.reply(&api, &creds).await);
    assert_eq!(failed["Code"], "STSUnreachable");
    // A reload that removes the mapping conceals the path again.
    src.set(kubelet.path().to_path_buf(), AwsIdentityConfig::default());
    assert_eq!(src.reply(&api, &creds).await, Reply::Conceal { note: None });
}

#[tokio::test]
async fn without_an_endpoint_the_nodes_region_names_it() {
    // A stand-in IMDS that requires IMDSv2, as a hardened instance does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let imds = listener.local_addr().unwrap();
    let asked = Arc::new(AtomicU32::new(0));
    let count = asked.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
            let body = if head.starts_with("put /latest/api/token") {
                "agent-token"
            } else if head.contains("x-aws-ec2-metadata-token: agent-token") {
                "eu-west-1"
            } else {
                ""
            };
            let status = if body.is_empty() { "401 Unauthorized" } else { "200 OK" };
            let answer =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let kubelet = tempfile::tempdir().unwrap();
    let metrics = Arc::new(IdentityMetrics::register(&Metrics::new()));
    let mut src = AwsSource::new(
        kubelet.path().to_path_buf(),
        AwsIdentityConfig::default(),
        HostSockets::new(None).unwrap(),
        metrics,
        Arc::new(SystemTime::now),
    );
    src.imds = imds;
    assert_eq!(src.regional_endpoint().await.unwrap().to_string(), "https://sts.eu-west-1.amazonaws.com/");
    assert_eq!(src.regional_endpoint().await.unwrap().host, "sts.eu-west-1.amazonaws.com");
    assert_eq!(asked.load(Ordering::SeqCst), 2, "asked once (a token, then the region), then remembered");
}
