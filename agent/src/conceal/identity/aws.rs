// SPDX-License-Identifier: Apache-2.0
//! AWS: a mapped pod's IMDS credential paths answered with its own role's credentials,
//! from `AssumeRoleWithWebIdentity` with its own service-account token.
//!
//! The node's credentials are never used: the exchange is unsigned (the pod's token
//! is the credential), and the only request the agent makes of IMDS here is the
//! node's region, when no STS endpoint is configured.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Instant, SystemTime},
};

use hyper::Method;
use tracing::{debug, info, warn};

use super::{
    cache::CredentialCache,
    https,
    imds::{self, IamPath},
    metrics::IdentityMetrics,
    roles,
    sts::{self, AssumeRequest, Issued, StsFailure},
    token, BoxFuture, IdentitySource, Reply,
};
use crate::{
    attempt::{IdentityNote, IdentityResult},
    conceal::{host_sockets::HostSockets, normalise::NormalPath},
    config::identity::{AwsIdentityConfig, Endpoint, RoleArn},
    pod_identity::PodIdentity,
};

/// Where the agent asks IMDS for the node's region.
pub(crate) const IMDS_ADDR: &str = "169.254.169.254:80";
/// TTL of the agent's own IMDSv2 session for that one question.
const REGION_TOKEN_TTL: &str = "60";

pub(crate) type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

pub(crate) struct AwsSource {
    settings: RwLock<(PathBuf, AwsIdentityConfig)>,
    cache: CredentialCache,
    sockets: HostSockets,
    /// The node's regional endpoint, once learned (only when none is configured).
    learned: tokio::sync::Mutex<Option<Endpoint>>,
    metrics: Arc<IdentityMetrics>,
    clock: Clock,
    /// Where the node's region is asked ([`IMDS_ADDR`]; a test's stand-in).
    imds: SocketAddr,
}

impl AwsSource {
    pub(crate) fn new(
        kubelet_dir: PathBuf,
        config: AwsIdentityConfig,
        sockets: HostSockets,
        metrics: Arc<IdentityMetrics>,
        clock: Clock,
    ) -> AwsSource {
        AwsSource {
            settings: RwLock::new((kubelet_dir, config)),
            cache: CredentialCache::default(),
            sockets,
            learned: tokio::sync::Mutex::new(None),
            metrics,
            clock,
            imds: IMDS_ADDR.parse().expect("a socket address"),
        }
    }

    /// A reload: new roles apply to the next request; a pod whose role changed or
    /// went starts afresh (its kept credentials are for the old role).
    pub(crate) fn set(&self, kubelet_dir: PathBuf, config: AwsIdentityConfig) {
        *self.settings.write().unwrap_or_else(std::sync::PoisonError::into_inner) = (kubelet_dir, config);
    }

    /// Whether any pod's credentials are kept (else nothing needs forgetting).
    pub(crate) fn keeps_any(&self) -> bool {
        !self.cache.is_empty()
    }

    /// The pod has no role any more: its kept credentials go.
    fn forget_pod(&self, pod_uid: &str) {
        self.cache.remove(pod_uid);
        self.metrics.pods(self.cache.pods());
    }

    fn settings(&self) -> (PathBuf, AwsIdentityConfig) {
        self.settings.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    async fn reply_for(&self, pod: &PodIdentity, path: &NormalPath) -> Reply {
        let Some(iam) = imds::iam_path(path) else { return Reply::Conceal { note: None } };
        let (kubelet_dir, config) = self.settings();
        let (Some(namespace), Some(name)) = (pod.namespace.as_deref(), pod.pod.as_deref()) else {
            // Not named by the kubelet yet: nothing to check a token against.
            return Reply::Conceal { note: None };
        };
        if !config.roles.iter().any(|r| r.namespace == namespace) {
            self.forget_pod(&pod.pod_uid);
            return Reply::Conceal { note: None };
        }
        let expected = token::ExpectedPod { namespace, name, uid: &pod.pod_uid };
        let checked = token::read(&kubelet_dir, &pod.pod_uid, config.token_volume.as_deref()).and_then(|text| {
            let claims = token::decode_claims(&text)?;
            token::check(&claims, expected, (self.clock)()).map(|account| (text, account))
        });
        let (jwt, account) = match checked {
            Ok(c) => c,
            Err(e) => {
                warn!(namespace, pod = name, "identity: the pod's token cannot be used: {e}");
                self.metrics.request(IdentityResult::TokenRefused.name(), "", namespace);
                let note =
                    IdentityNote { role: None, result: IdentityResult::TokenRefused, reason: Some(e.to_string()) };
                return Reply::Conceal { note: Some(note) };
            }
        };
        let Some(role) = roles::role_for(&config.roles, namespace, &account).cloned() else {
            self.forget_pod(&pod.pod_uid);
            return Reply::Conceal { note: None };
        };
        let served = |answer| {
            self.metrics.request(IdentityResult::Served.name(), role.as_str(), namespace);
            Reply::Answer {
                answer,
                note: IdentityNote { role: Some(role.to_string()), result: IdentityResult::Served, reason: None },
            }
        };
        let needs_credentials = match &iam {
            IamPath::Directory => return served(imds::text("info\nsecurity-credentials/")),
            IamPath::RoleList => return served(imds::text(role.name())),
            IamPath::Credentials(asked) if asked != role.name() => return Reply::Conceal { note: None },
            IamPath::Credentials(_) | IamPath::Info => iam,
        };
        let session = roles::session_name(namespace, name, &pod.pod_uid);
        let issued = self
            .cache
            .get(
                &pod.pod_uid,
                role.as_str(),
                || (self.clock)(),
                config.refresh_before,
                || self.exchange(&config, &role, &session, &jwt),
            )
            .await;
        self.metrics.pods(self.cache.pods());
        match issued {
            Ok(issued) => served(match needs_credentials {
                IamPath::Info => imds::info(&role, &issued),
                _ => imds::credentials(&issued),
            }),
            Err(failure) => {
                self.metrics.request(IdentityResult::StsError.name(), role.as_str(), namespace);
                let answer = imds::failure(&failure.code, &failure.message, (self.clock)());
                let note = IdentityNote {
                    role: Some(role.to_string()),
                    result: IdentityResult::StsError,
                    reason: Some(failure.to_string()),
                };
                Reply::Answer { answer, note }
            }
        }
    }

    async fn exchange(
        &self,
        config: &AwsIdentityConfig,
        role: &RoleArn,
        session: &str,
        jwt: &str,
    ) -> Result<Issued, StsFailure> {
        let endpoint = match &config.sts_endpoint {
            Some(e) => e.clone(),
            None => self.regional_endpoint().await?,
        };
        let form = AssumeRequest {
            role_arn: role.as_str(),
            session_name: session,
            token: jwt,
            duration: config.session_duration,
        }
        .form();
        let started = Instant::now();
        let answer = https::post_form(&self.sockets, &endpoint, form).await;
        let took = started.elapsed();
        let result = match answer {
            Err(e) => Err(StsFailure::new("STSUnreachable", format!("{e:#}"))),
            Ok((status, body)) => sts::parse_response(status, &String::from_utf8_lossy(&body), (self.clock)()),
        };
        let class = match &result {
            Ok(_) => "ok",
            Err(f) if f.code == "STSUnreachable" => "unreachable",
            Err(_) => "refused",
        };
        self.metrics.sts_call(class, took);
        match &result {
            Ok(issued) => debug!(role = %role, session, ?issued, ?took, "identity: STS issued credentials"),
            Err(f) => warn!(role = %role, session, %endpoint, "identity: STS gave no credentials: {f}"),
        }
        result
    }

    /// `https://sts.<region>.amazonaws.com`, the region asked of IMDS once with the
    /// agent's own session.
    async fn regional_endpoint(&self) -> Result<Endpoint, StsFailure> {
        let mut learned = self.learned.lock().await;
        if let Some(e) = learned.as_ref() {
            return Ok(e.clone());
        }
        let region = self.node_region().await.map_err(|e| {
            StsFailure::new(
                "RegionUnknown",
                format!("no sts_endpoint is configured and the node's region is unknown: {e:#}"),
            )
        })?;
        let endpoint = Endpoint::regional_sts(&region).map_err(|e| StsFailure::new("RegionUnknown", e))?;
        info!(%endpoint, "identity: STS endpoint of the node's region");
        *learned = Some(endpoint.clone());
        Ok(endpoint)
    }

    async fn node_region(&self) -> anyhow::Result<String> {
        let imds = self.imds;
        let (status, token) = https::plain_request(
            &self.sockets,
            imds,
            Method::PUT,
            "/latest/api/token",
            &[("x-aws-ec2-metadata-token-ttl-seconds", REGION_TOKEN_TTL)],
        )
        .await?;
        let token = String::from_utf8_lossy(&token).trim().to_owned();
        let header: Vec<(&str, &str)> =
            if status == 200 { vec![("x-aws-ec2-metadata-token", token.as_str())] } else { Vec::new() };
        let (status, body) =
            https::plain_request(&self.sockets, imds, Method::GET, "/latest/meta-data/placement/region", &header)
                .await?;
        anyhow::ensure!(status == 200, "IMDS answered {status} for placement/region");
        Ok(String::from_utf8_lossy(&body).trim().to_owned())
    }
}

impl IdentitySource for AwsSource {
    fn answers(&self, path: &NormalPath) -> bool {
        imds::iam_path(path).is_some()
    }

    fn reply<'a>(&'a self, pod: &'a PodIdentity, path: &'a NormalPath) -> BoxFuture<'a, Reply> {
        Box::pin(self.reply_for(pod, path))
    }

    fn forget(&self, alive: &dyn Fn(&str) -> bool) {
        let dropped = self.cache.retain(alive);
        self.metrics.pods(self.cache.pods());
        if dropped > 0 {
            debug!(dropped, "identity: forgot the credentials of pods that are gone");
        }
    }
}

#[cfg(test)]
#[path = "aws_tests.rs"]
mod tests;
