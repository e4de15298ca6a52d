// SPDX-License-Identifier: Apache-2.0
//! The proxy over real sockets on loopback, with a fake kernel record and a recording
//! upstream: what a pod gets back, and what reached the "metadata service".

use std::sync::Mutex as StdMutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Every request head the upstream received.
type Seen = Arc<StdMutex<Vec<String>>>;

/// The kernel's record for every connection: one origin, switchable mid-test (as if
/// another pod connected).
struct AnyPeer(StdMutex<Option<Origin>>);

impl Peers for AnyPeer {
    fn origin(&self, _peer: SocketAddr) -> Option<Origin> {
        *self.0.lock().unwrap()
    }
}

async fn upstream() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let sink = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let answer: &[u8] = if head.starts_with("PUT /latest/api/token ") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nagent-token-42"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nKeep-Alive: x\r\nX-Up: 1\r\n\r\nupstream"
                };
                sink.lock().unwrap().push(head);
                let _ = s.write_all(answer).await;
            });
        }
    });
    (addr, seen)
}

struct Harness {
    proxy_addr: SocketAddr,
    peer: Arc<AnyPeer>,
    seen: Seen,
    outcomes: Arc<StdMutex<Vec<Outcome>>>,
}

async fn harness(record: bool) -> Harness {
    let (up, seen) = upstream().await;
    let outcomes: Arc<StdMutex<Vec<Outcome>>> = Arc::default();
    let sink = outcomes.clone();
    let origin = record.then_some(Origin { cgroup_id: 7, netns_cookie: 70, destination: up });
    let peer = Arc::new(AnyPeer(StdMutex::new(origin)));
    let proxy = Arc::new(Proxy::new(
        peer.clone(),
        Arc::new(|_| Workload::Unknown),
        Arc::new(move |o| sink.lock().unwrap().push(o)),
        vec![up],
        Vec::new(),
        HostSockets::new(None).unwrap(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let (keep_open, rx) = watch::channel(false);
    tokio::spawn(async move {
        let _keep = keep_open;
        proxy.serve(listener, rx).await;
    });
    Harness { proxy_addr, peer, seen, outcomes }
}

impl Harness {
    /// Sends raw bytes, returns everything the proxy answered until it closed or 2 s.
    async fn raw(&self, request: &str) -> String {
        let mut s = TcpStream::connect(self.proxy_addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get(&self, target: &str, headers: &str) -> String {
        self.raw(&format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Connection: close\r\n\r\n")).await
    }

    fn upstream_heads(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn status(response: &str) -> u16 {
    response.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_passed_request_is_rebuilt_for_the_metadata_service() {
    let h = harness(true).await;
    let r = h
        .get(
            "/latest//meta-data/placement/availability-zone/",
            "X-Forwarded-For: 1.2.3.4\r\nX-aws-ec2-metadata-token-ttl-seconds: 5\r\nProxy-Authorization: x\r\nX-Custom: y\r\n",
        )
        .await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.ends_with("upstream"), "{r}");
    assert!(r.to_ascii_lowercase().contains("x-up: 1"), "end-to-end response headers pass: {r}");
    assert!(!r.to_ascii_lowercase().contains("keep-alive: x"), "hop-by-hop response headers are dropped: {r}");
    let heads = h.upstream_heads();
    assert_eq!(heads.len(), 1);
    let head = heads[0].to_ascii_lowercase();
    assert!(head.starts_with("get /latest/meta-data/placement/availability-zone/ http/1.1\r\n"), "{head}");
    for dropped in ["x-forwarded-for", "proxy-authorization", "x-custom", "host: 169.254.169.254", "x-aws-ec2"] {
        assert!(!head.contains(dropped), "{dropped} reached upstream: {head}");
    }
    let outcomes = h.outcomes.lock().unwrap();
    assert!(matches!(&outcomes[0].decision, Decision::Pass { class: "placement", .. }));
}

#[tokio::test]
async fn credentials_are_refused_at_once_and_nothing_reaches_upstream() {
    let h = harness(true).await;
    for target in [
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/placement/%2e%2e/iam/security-credentials/x",
        "/latest/meta-data/placement/../../user-data",
    ] {
        let r = h.get(target, "").await;
        assert_eq!(status(&r), 404, "{target}: {r}");
        assert!(r.contains("concealed by rule aws-") || r.contains("concealed by rule bad-path"), "{target}: {r}");
    }
    assert!(h.upstream_heads().is_empty(), "{:?}", h.upstream_heads());
    let outcomes = h.outcomes.lock().unwrap();
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[0].decision.rule(), "aws-iam-credentials");
    assert_eq!(outcomes[1].path, "/latest/meta-data/placement/%2e%2e/iam/security-credentials/x");
    assert_eq!(outcomes[1].decision.rule(), "bad-path");
}

#[tokio::test]
async fn smuggling_forms_and_bodies_are_refused_and_close_the_connection() {
    let h = harness(true).await;
    let both = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
                Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /latest/meta-data/iam/info HTTP/1.1\r\nHost: x\r\n\r\n";
    let r = h.raw(both).await;
    assert!(status(&r) == 400 || r.is_empty(), "{r}");
    assert!(!r.contains("upstream"), "{r}");
    let body = "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(status(&h.raw(body).await), 400);
    let absolute = h.get("http://169.254.169.254/latest/meta-data/iam/info", "").await;
    assert_eq!(status(&absolute), 400, "{absolute}");
    let huge = h.get("/latest/meta-data/instance-id", &format!("X-Big: {}\r\n", "a".repeat(MAX_HEAD_BYTES))).await;
    assert!(status(&huge) == 431 || huge.is_empty(), "{huge}");
    assert!(h.upstream_heads().is_empty(), "{:?}", h.upstream_heads());
}

fn body(response: &str) -> &str {
    response.split("\r\n\r\n").nth(1).unwrap_or("")
}

impl Harness {
    async fn put_token(&self, headers: &str) -> String {
        self.raw(&format!(
            "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        ))
        .await
    }
}

#[tokio::test]
async fn the_proxy_answers_the_token_put_itself_and_checks_its_tokens() {
    let h = harness(true).await;
    let r = h.put_token("X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n").await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.to_ascii_lowercase().contains("x-aws-ec2-metadata-token-ttl-seconds: 21600"), "{r}");
    let token = body(&r).to_owned();
    assert_eq!(token.len(), 64, "{r}");
    assert!(h.upstream_heads().is_empty(), "the pod's PUT went upstream: {:?}", h.upstream_heads());

    // The pod's own token: served, upstream with the agent's token and never the pod's.
    let zone = "/latest/meta-data/placement/availability-zone";
    let r = h.get(zone, &format!("X-aws-ec2-metadata-token: {token}\r\n")).await;
    assert_eq!(status(&r), 200, "{r}");
    let heads = h.upstream_heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].starts_with("PUT /latest/api/token "), "the agent fetched its own token: {heads:?}");
    assert!(heads[0].to_ascii_lowercase().contains("x-aws-ec2-metadata-token-ttl-seconds: 21600"));
    assert!(heads[1].contains("agent-token-42") && !heads[1].contains(&token), "{heads:?}");
    // The agent's token is kept: one PUT upstream for many requests.
    let _ = h.get(zone, &format!("X-aws-ec2-metadata-token: {token}\r\n")).await;
    assert_eq!(h.upstream_heads().len(), 3);

    // A wrong token, or this pod's token from another pod: 401, nothing upstream.
    let r = h.get(zone, &format!("X-aws-ec2-metadata-token: {}\r\n", "0".repeat(64))).await;
    assert_eq!(status(&r), 401, "{r}");
    let other = Origin { netns_cookie: 71, ..h.peer.0.lock().unwrap().unwrap() };
    *h.peer.0.lock().unwrap() = Some(other);
    let r = h.get(zone, &format!("X-aws-ec2-metadata-token: {token}\r\n")).await;
    assert_eq!(status(&r), 401, "another pod replayed it: {r}");
    assert_eq!(h.upstream_heads().len(), 3);
    assert_eq!(h.outcomes.lock().unwrap().last().unwrap().decision.rule(), "aws-token");
    // No token: IMDSv1, sent upstream without one (the service answers as it would).
    let r = h.get(zone, "").await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(!h.upstream_heads()[3].to_ascii_lowercase().contains("x-aws-ec2-metadata-token"));
}

#[tokio::test]
async fn a_token_put_is_refused_as_imds_refuses_it() {
    let h = harness(true).await;
    assert_eq!(status(&h.put_token("").await), 400, "no TTL");
    assert_eq!(status(&h.put_token("X-aws-ec2-metadata-token-ttl-seconds: 21601\r\n").await), 400);
    assert_eq!(status(&h.put_token("X-aws-ec2-metadata-token-ttl-seconds: 0\r\n").await), 400);
    let xff = "X-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\n";
    assert_eq!(status(&h.put_token(xff).await), 403);
    assert!(h.upstream_heads().is_empty());
}

#[tokio::test]
async fn a_token_expires_after_its_ttl() {
    let h = harness(true).await;
    let r = h.put_token("X-aws-ec2-metadata-token-ttl-seconds: 1\r\n").await;
    let token = body(&r).to_owned();
    let header = format!("X-aws-ec2-metadata-token: {token}\r\n");
    assert_eq!(status(&h.get("/latest/meta-data/instance-id", &header).await), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(status(&h.get("/latest/meta-data/instance-id", &header).await), 401);
}

#[tokio::test]
async fn a_connection_the_kernel_did_not_redirect_gets_nothing() {
    let h = harness(false).await;
    let r = h.get("/latest/meta-data/instance-id", "").await;
    assert!(r.is_empty(), "{r}");
    assert!(h.upstream_heads().is_empty());
}

#[tokio::test]
async fn a_head_request_keeps_the_services_length_and_has_no_body() {
    let h = harness(true).await;
    let r = h.raw("HEAD /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(r.to_ascii_lowercase().contains("content-length: 8"), "{r}");
    assert!(!r.ends_with("upstream"), "{r}");
    assert!(h.upstream_heads()[0].starts_with("HEAD /latest/meta-data/instance-id"));
}
