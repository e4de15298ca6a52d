// SPDX-License-Identifier: Apache-2.0
//! Workload identity behind conceal mode: a redirected pod that asks the metadata
//! service for credentials gets its own role's, never the node's.
//!
//! The pod is known from the kernel (the conceal redirect's record → cgroup → pod UID,
//! namespace and name through `pod_identity`), never from what it sends. Its own
//! projected service-account token is read from the kubelet's volume directory of that
//! pod (`token`), its claims are checked against that same pod, and the cloud
//! exchanges it for credentials (`sts`, over `https`). `roles` maps namespace and
//! service account to a role; `cache` keeps each pod's credentials, refreshed ahead of
//! expiry, one exchange at a time per pod; `imds` writes the answers in the metadata
//! service's own format; `aws` puts these together as the [`IdentitySource`] the
//! conceal proxy asks.
//!
//! A second cloud plugs in as one more module implementing [`IdentitySource`]: it
//! says which of its metadata paths it answers and answers them for a pod; the token,
//! cache and audit parts are shared.

pub mod aws;
pub mod cache;
pub mod https;
pub mod imds;
pub mod metrics;
pub mod roles;
pub mod sts;
pub mod token;

use std::{future::Future, pin::Pin, time::Duration};

use bytes::Bytes;

use crate::{conceal::normalise::NormalPath, pod_identity::PodIdentity};

/// The kubelet's state directory, where each pod's volumes are.
pub const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";
/// Credentials asked for, per exchange: STS's default, and its minimum is 15 minutes.
pub const DEFAULT_SESSION_DURATION: Duration = Duration::from_secs(3600);
/// STS's bounds for `DurationSeconds` (the role's own maximum may be lower).
pub const MIN_SESSION_DURATION: Duration = Duration::from_secs(900);
pub const MAX_SESSION_DURATION: Duration = Duration::from_secs(12 * 3600);
/// Credentials are renewed this long before they expire, and a pod never gets ones
/// with less left: botocore and the Java SDK refresh 15 minutes ahead (the Go SDK 5
/// to 10), so a pod's SDK never finds what it was given already due for refresh.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(15 * 60);

/// `conceal.identity`: which clouds' identities pods get.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityConfig {
    pub aws: Option<AwsIdentityConfig>,
}

/// `conceal.identity.aws`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsIdentityConfig {
    /// None: the regional endpoint of the node's region, learned from IMDS.
    pub sts_endpoint: Option<https::Endpoint>,
    /// The projected volume holding the token; None: the pod's `kube-api-access-*`.
    pub token_volume: Option<String>,
    pub roles: Vec<roles::RoleMapping>,
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

/// What happened to one identity request, for the audit trail and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdentityNote {
    /// The role (its ARN) the pod was given or asked for; None when none applied.
    pub role: Option<String>,
    pub result: IdentityResult,
    /// Why, when the pod got no credentials.
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdentityResult {
    /// Credentials (or the role's name or profile) were served.
    Served,
    /// The pod's token was missing, unreadable, expired or named another pod.
    TokenRefused,
    /// The cloud refused the exchange or could not be reached.
    StsError,
}

impl IdentityResult {
    pub fn name(self) -> &'static str {
        match self {
            IdentityResult::Served => "served",
            IdentityResult::TokenRefused => "token_refused",
            IdentityResult::StsError => "sts_error",
        }
    }
}

/// An answer in the metadata service's own format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// The reply of an [`IdentitySource`] for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answer the pod with this; `note` goes to the audit trail.
    Answer { answer: Answer, note: IdentityNote },
    /// Not this pod's to have: conceal the path as without identities; `note`, when
    /// set, says why for the audit trail (a token that names another pod).
    Conceal { note: Option<IdentityNote> },
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A cloud's source of pod identities, asked by the conceal proxy for each request it
/// would otherwise conceal as a credential path.
pub trait IdentitySource: Send + Sync {
    /// Whether `path` (normalised) is among the identity paths this source answers.
    fn answers(&self, path: &NormalPath) -> bool;
    /// The reply for `pod` (as the kernel named it) asking `path` with a read method.
    fn reply<'a>(&'a self, pod: &'a PodIdentity, path: &'a NormalPath) -> BoxFuture<'a, Reply>;
    /// Drops what is kept for pods `alive` says are gone.
    fn forget(&self, alive: &dyn Fn(&str) -> bool);
}
