// SPDX-License-Identifier: Apache-2.0
//! The filtering proxy pods are redirected to (hyper, HTTP/1.1).
//!
//! Who asks comes from the kernel (the peer table), never from the request. Each
//! request must fit the strict grammar (`grammar`, `normalise`) and is judged
//! (`decide`); a refusal is answered at once; a pass is re-built from scratch for the
//! original metadata address — method, normalised path, the query rebuilt from its
//! parsed parameters and an allowlist of headers — and sent on a fresh host-namespace
//! connection, so nothing the client sends beyond that (`X-Forwarded-For`, hop-by-hop
//! headers, `Host`, a body) reaches the service.
//!
//! IMDSv2 (`tokens`): the proxy answers `PUT /latest/api/token` itself and checks the
//! tokens it minted; a request with a good token goes upstream with the agent's own
//! token. IMDSv1 mirrors the node: a request with no token goes upstream with no token,
//! so a pod gets what a token-less GET gets on this node (served where the instance
//! allows IMDSv1, 401 where it requires IMDSv2), and never more.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::{
    body::Incoming,
    header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TRANSFER_ENCODING},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{watch, OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, warn};

use super::{
    clouds::{self, Cloud},
    decide::{decide, Decision, Request as Judged, UNKNOWN_STATUS},
    grammar::{raw_target_problem, Query},
    host_sockets::HostSockets,
    normalise::NormalPath,
    tokens::{requested_ttl, Holder, PodTokens, UpstreamToken, TOKEN_HEADER, TTL_HEADER, UPSTREAM_TTL},
    ExtraPaths,
};
use crate::pod_identity::Workload;

/// Request head limit; hyper's smallest buffer, far above any metadata client's head.
pub(crate) const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Headers in one request.
pub(crate) const MAX_HEADERS: usize = 32;
/// Largest answer relayed (GCP's recursive network listing is a few KiB).
pub(crate) const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// A client must send its request head within this.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it is doing.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect plus answer from the metadata service.
pub(crate) const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one pod holds at once; more are answered 503 at once.
pub(crate) const PER_POD_CONNECTIONS: usize = 16;
/// Connections served at once by the whole proxy; more wait in the accept queue.
pub(crate) const MAX_CONNECTIONS: usize = 512;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What the kernel recorded about a redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Origin {
    pub cgroup_id: u64,
    /// The pod's network namespace (0 where the kernel could not tell).
    pub netns_cookie: u64,
    /// The metadata address and port the pod connected to.
    pub destination: SocketAddr,
}

/// The kernel's record of redirected connections, by the pod end's address and port.
pub(crate) trait Peers: Send + Sync + 'static {
    fn origin(&self, peer: SocketAddr) -> Option<Origin>;
}

/// One judged request, for the audit trail and metrics.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    pub cgroup_id: u64,
    pub workload: Workload,
    pub destination: SocketAddr,
    pub method: String,
    /// The normalised path (or the raw target when it had no normal form).
    pub path: String,
    pub decision: Decision,
    /// Status the pod got.
    pub status: u16,
    pub elapsed: Duration,
    /// Set when a pod's own identity answered (or was refused) on a credential path.
    pub identity: Option<crate::attempt::IdentityNote>,
}

pub(crate) type Identify = Arc<dyn Fn(u64) -> Workload + Send + Sync>;
pub(crate) type Report = Arc<dyn Fn(Outcome) + Send + Sync>;

pub(crate) struct Proxy {
    pub peers: Arc<dyn Peers>,
    pub identify: Identify,
    pub report: Report,
    /// The metadata endpoints the proxy may connect to; nothing else. Follows reloads.
    endpoints: RwLock<Vec<SocketAddr>>,
    pub extras: RwLock<Vec<ExtraPaths>>,
    pub sockets: HostSockets,
    per_pod: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// The IMDSv2 tokens minted for pods.
    pub tokens: PodTokens,
    /// The agent's own IMDSv2 token, per metadata endpoint.
    upstream_tokens: tokio::sync::Mutex<HashMap<SocketAddr, UpstreamToken>>,
    /// Pods' own identities on the credential paths; None: those stay concealed.
    identity: RwLock<Option<Arc<dyn super::identity::IdentitySource>>>,
}

impl Proxy {
    pub(crate) fn new(
        peers: Arc<dyn Peers>,
        identify: Identify,
        report: Report,
        endpoints: Vec<SocketAddr>,
        extras: Vec<ExtraPaths>,
        sockets: HostSockets,
    ) -> Proxy {
        Proxy {
            peers,
            identify,
            report,
            endpoints: RwLock::new(endpoints),
            extras: RwLock::new(extras),
            sockets,
            per_pod: Mutex::default(),
            tokens: PodTokens::default(),
            upstream_tokens: tokio::sync::Mutex::default(),
            identity: RwLock::default(),
        }
    }

    pub(crate) fn set_endpoints(&self, endpoints: Vec<SocketAddr>) {
        *self.endpoints.write().unwrap_or_else(std::sync::PoisonError::into_inner) = endpoints;
    }

    pub(crate) fn set_extras(&self, extras: Vec<ExtraPaths>) {
        *self.extras.write().unwrap_or_else(std::sync::PoisonError::into_inner) = extras;
    }

    /// Accepts and serves connections until `shutdown` turns true.
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let proxy = self.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, proxy.connection(stream, peer)).await;
                    });
                }
                Err(e) => {
                    warn!("the conceal proxy could not accept a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let known = |o: &Origin| {
            self.endpoints.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&o.destination)
        };
        let Some(origin) = self.peers.origin(peer).filter(known) else {
            // Not redirected by the kernel (a direct connection, or the record is gone):
            // nobody to answer for, nothing to forward to.
            debug!(%peer, "conceal proxy: no kernel record for this connection; closing it");
            return;
        };
        let workload = (self.identify)(origin.cgroup_id);
        let Some(_permit) = self.pod_permit(&workload, origin.cgroup_id) else {
            let _ =
                serve_one_refusal(stream, StatusCode::SERVICE_UNAVAILABLE, "too many connections from this pod").await;
            return;
        };
        let conn = ConnCtx { proxy: self.clone(), origin, workload: Arc::new(workload) };
        let service = service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(conn.handle(req).await) }
        });
        let served = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .serve_connection(TokioIo::new(stream), service)
            .await;
        if let Err(e) = served {
            debug!(%peer, "conceal proxy connection ended: {e}");
        }
    }

    fn pod_permit(&self, workload: &Workload, cgroup_id: u64) -> Option<OwnedSemaphorePermit> {
        let key = match workload {
            Workload::Pod(p) => p.pod_uid.clone(),
            _ => format!("cgroup:{cgroup_id}"),
        };
        let mut map = self.per_pod.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget pods with nothing open, so the map follows the pods that are active.
        map.retain(|_, s| s.available_permits() < PER_POD_CONNECTIONS);
        let sem = map.entry(key).or_insert_with(|| Arc::new(Semaphore::new(PER_POD_CONNECTIONS))).clone();
        sem.try_acquire_owned().ok()
    }
}

#[derive(Clone)]
struct ConnCtx {
    proxy: Arc<Proxy>,
    origin: Origin,
    workload: Arc<Workload>,
}

type Body = Full<Bytes>;

impl ConnCtx {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().as_str().to_owned();
        let target = req.uri().to_string();
        let (mut decision, path) = self.judge(&req);
        let aws = path.as_ref().and_then(|p| p.segments.first()).and_then(|s| clouds::route(s));
        let aws = aws.is_some_and(|rules| rules.cloud == Cloud::Aws);
        // As IMDS: a token that is not good is answered 401 whatever the path.
        let token = req.headers().get(TOKEN_HEADER).map(|v| v.to_str().unwrap_or(""));
        let holder = Holder::of(self.origin.netns_cookie, self.origin.cgroup_id);
        if let (true, Some(token), false) = (aws, token, req.method() == hyper::Method::PUT) {
            if !self.proxy.tokens.valid(holder, token, Instant::now()) {
                let reason = "the IMDSv2 token is not one this proxy gave this pod, or it expired".into();
                decision = Decision::Refuse { status: 401, rule: "aws-token".into(), reason };
            }
        }
        let (answered, identity) = self.own_identity(&mut decision, path.as_ref(), &req, token.is_some()).await;
        let response = match (answered, &decision) {
            (Some(r), _) => r,
            (None, Decision::Refuse { status, rule, reason }) => refusal(*status, rule, reason, &req),
            (None, Decision::Pass { class: "token", .. }) => self.mint(&req, holder),
            (None, Decision::Pass { query, .. }) => {
                let path = path.as_ref().expect("a passed request has a normal path");
                match self.forward(&req, path, query, aws && token.is_some()).await {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(destination = %self.origin.destination, "conceal proxy: upstream failed: {e:#}");
                        text(StatusCode::BAD_GATEWAY, "metadata-guard: the metadata service did not answer\n")
                    }
                }
            }
        };
        (self.proxy.report)(Outcome {
            cgroup_id: self.origin.cgroup_id,
            workload: (*self.workload).clone(),
            destination: self.origin.destination,
            method,
            path: path.map_or(target, |p| p.to_upstream()),
            decision,
            status: response.status().as_u16(),
            elapsed: started.elapsed(),
            identity,
        });
        response
    }

    /// Answers an IMDSv2 token PUT as IMDS does, with a token of the proxy's own.
    fn mint(&self, req: &Request<Incoming>, holder: Holder) -> Response<Body> {
        // IMDS refuses a token PUT that went through a proxy.
        if req.headers().contains_key("x-forwarded-for") {
            return text(StatusCode::FORBIDDEN, "metadata-guard: a token PUT with X-Forwarded-For is refused\n");
        }
        let ttl_header = req.headers().get(TTL_HEADER).map(|v| v.to_str().unwrap_or(""));
        let ttl = match requested_ttl(ttl_header) {
            Ok(ttl) => ttl,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("metadata-guard: {e}\n")),
        };
        match self.proxy.tokens.mint(holder, ttl, Instant::now()) {
            Ok(token) => {
                let mut r = Response::new(Full::new(Bytes::from(token)));
                r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                r.headers_mut().insert(TTL_HEADER, HeaderValue::from(ttl.as_secs()));
                r
            }
            Err(e) => {
                warn!("conceal proxy: could not draw random bytes for a token: {e}");
                text(StatusCode::INTERNAL_SERVER_ERROR, "metadata-guard: could not make a token\n")
            }
        }
    }

    fn judge(&self, req: &Request<Incoming>) -> (Decision, Option<NormalPath>) {
        let refuse = |status: u16, rule: &str, reason: String| Decision::Refuse { status, rule: rule.into(), reason };
        // No metadata request has a body (the token PUT included); refusing every body
        // also leaves no room for a smuggled second request.
        let has_body = req.headers().contains_key(TRANSFER_ENCODING)
            || req.headers().get_all(CONTENT_LENGTH).iter().any(|v| v.as_bytes() != b"0");
        if has_body {
            return (refuse(400, "request-body", "metadata requests carry no body".into()), None);
        }
        let uri = req.uri();
        if uri.scheme().is_some() || uri.authority().is_some() {
            return (refuse(400, "request-form", "absolute-form and authority-form targets are refused".into()), None);
        }
        if let Some(problem) = raw_target_problem(uri.path_and_query().map_or("", |p| p.as_str())) {
            return (refuse(UNKNOWN_STATUS, "bad-target", problem.into()), None);
        }
        let path = match NormalPath::parse(uri.path()) {
            Ok(p) => p,
            Err(e) => return (refuse(UNKNOWN_STATUS, "bad-path", e.to_string()), None),
        };
        let headers = req.headers();
        let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let extras = self.proxy.extras.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine: Vec<&ExtraPaths> = match &*self.workload {
            Workload::Pod(p) => match (&p.namespace, &p.pod) {
                (Some(ns), Some(pod)) => extras.iter().filter(|e| e.applies_to(ns, pod)).collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        let decision =
            decide(&Judged { method: req.method().as_str(), path: &path, query: uri.query(), header: &lookup }, &mine);
        (decision, Some(path))
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

/// The refusal a pod sees: the cloud's "not available" status at once, a body naming
/// the rule. A refused request that might frame the next one badly closes the connection.
fn refusal(status: u16, rule: &str, reason: &str, req: &Request<Incoming>) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::NOT_FOUND);
    let mut r = text(status, &format!("metadata-guard: concealed by rule {rule}: {reason}\n"));
    r.headers_mut()
        .insert("x-metadata-guard-rule", HeaderValue::from_str(rule).unwrap_or(HeaderValue::from_static("?")));
    if matches!(rule, "request-body" | "request-form") || req.version() == hyper::Version::HTTP_10 {
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

async fn serve_one_refusal(mut stream: TcpStream, status: StatusCode, why: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let body = format!("metadata-guard: {why}\n");
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
#[path = "proxy_tests.rs"]
mod tests;

#[path = "upstream.rs"]
mod upstream;

#[path = "own_identity.rs"]
mod own_identity;
