// SPDX-License-Identifier: Apache-2.0
//! Where the proxy hands a pod its own identity (`conceal::identity`): only on the
//! paths the rules conceal as the node's credentials, only for a pod the kernel
//! named, and only after the IMDSv2 token checks every other path gets.

use super::*;
use crate::{
    attempt::IdentityNote,
    conceal::identity::{IdentitySource, Reply},
};

/// The rule that conceals the node's IAM paths, where a pod's own identity may answer.
const CREDENTIALS_RULE: &str = "aws-iam-credentials";
/// How metrics and logs name a request a pod's own identity answered.
pub(super) const IDENTITY_RULE: &str = "aws-identity";

impl Proxy {
    pub(crate) fn set_identity(&self, source: Option<Arc<dyn IdentitySource>>) {
        *self.identity.write().unwrap_or_else(std::sync::PoisonError::into_inner) = source;
    }
}

impl ConnCtx {
    /// The answer of the pod's own identity, if one applies: it then replaces the
    /// refusal in `decision`. The note, if any, is for the audit trail (also when the
    /// path stays concealed, e.g. for a token that names another pod).
    pub(super) async fn own_identity(
        &self,
        decision: &mut Decision,
        path: Option<&NormalPath>,
        req: &Request<Incoming>,
        imdsv2: bool,
    ) -> (Option<Response<Body>>, Option<IdentityNote>) {
        let (Decision::Refuse { rule, .. }, Workload::Pod(pod), Some(path)) = (&*decision, &*self.workload, path)
        else {
            return (None, None);
        };
        let source = self.proxy.identity.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let Some(source) = source.filter(|s| rule == CREDENTIALS_RULE && s.answers(path)) else {
            return (None, None);
        };
        if !imdsv2 {
            // IMDSv1 only where the node's own service allows it: ask it the listing
            // without a token, and answer its refusal as it would.
            let listing = NormalPath::parse("/latest/meta-data/").expect("a plain path");
            match self.forward(req, &listing, &Query::default(), false).await {
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
                    *decision = Decision::Refuse {
                        status: 401,
                        rule: "aws-token".into(),
                        reason: "the metadata service requires IMDSv2".into(),
                    };
                    return (Some(r), None);
                }
                Ok(_) => {}
                Err(e) => debug!("conceal proxy: could not ask whether IMDSv1 is allowed: {e:#}"),
            }
        }
        match source.reply(pod, path).await {
            Reply::Answer { answer, note } => {
                let mut r = Response::new(Full::new(answer.body));
                *r.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
                r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(answer.content_type));
                *decision = Decision::Pass {
                    cloud: Some(Cloud::Aws),
                    class: "identity",
                    rule: IDENTITY_RULE.into(),
                    query: Query::default(),
                };
                (Some(r), Some(note))
            }
            Reply::Conceal { note } => (None, note),
        }
    }
}
