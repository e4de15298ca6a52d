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
//!
//! The settings (`conceal.identity`: role mappings, the STS endpoint, durations) are
//! plain data in `config::identity`; what the audit trail notes of a request
//! (`IdentityNote`) is `attempt`'s.

pub(crate) mod aws;
pub(crate) mod cache;
pub(crate) mod https;
pub(crate) mod imds;
pub(crate) mod metrics;
pub(crate) mod roles;
pub(crate) mod sts;
pub(crate) mod token;

use std::{future::Future, pin::Pin};

use bytes::Bytes;

use super::normalise::NormalPath;
use crate::{attempt::IdentityNote, pod_identity::PodIdentity};

/// An answer in the metadata service's own format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// The reply of an [`IdentitySource`] for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Answer the pod with this; `note` goes to the audit trail.
    Answer { answer: Answer, note: IdentityNote },
    /// Not this pod's to have: conceal the path as without identities; `note`, when
    /// set, says why for the audit trail (a token that names another pod).
    Conceal { note: Option<IdentityNote> },
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A cloud's source of pod identities, asked by the conceal proxy for each request it
/// would otherwise conceal as a credential path.
pub(crate) trait IdentitySource: Send + Sync {
    /// Whether `path` (normalised) is among the identity paths this source answers.
    fn answers(&self, path: &NormalPath) -> bool;
    /// The reply for `pod` (as the kernel named it) asking `path` with a read method.
    fn reply<'a>(&'a self, pod: &'a PodIdentity, path: &'a NormalPath) -> BoxFuture<'a, Reply>;
    /// Drops what is kept for pods `alive` says are gone.
    fn forget(&self, alive: &dyn Fn(&str) -> bool);
}
