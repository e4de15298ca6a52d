//! The proxy over real sockets on loopback, with a fake kernel record and a recording
//! upstream: what a pod gets back, and what reached the "metadata service".

use std::sync::Mutex as StdMutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Every request head the upstream received.
type Seen = Arc<StdMutex<Vec<String>>>;

struct AnyPeer(Option<Origin>);

impl Peers for AnyPeer {
    fn origin(&self, _peer: SocketAddr) -> Option<Origin> {
        self.0
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
                sink.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nKeep-Alive: x\r\nX-Up: 1\r\n\r\nupstream")
                    .await;
            });
        }
    });
    (addr, seen)
}

struct Harness {
    proxy_addr: SocketAddr,
    seen: Seen,
    outcomes: Arc<StdMutex<Vec<Outcome>>>,
}

async fn harness(record: bool) -> Harness {
    let (up, seen) = upstream().await;
    let outcomes: Arc<StdMutex<Vec<Outcome>>> = Arc::default();
    let sink = outcomes.clone();
    let origin = record.then_some(Origin { cgroup_id: 7, destination: up });
    let proxy = Arc::new(Proxy::new(
        Arc::new(AnyPeer(origin)),
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
    Harness { proxy_addr, seen, outcomes }
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
            "/latest//meta-data/placement/./availability-zone/",
            "X-Forwarded-For: 1.2.3.4\r\nX-aws-ec2-metadata-token: tok\r\nProxy-Authorization: x\r\nX-Custom: y\r\n",
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
    assert!(head.contains("x-aws-ec2-metadata-token: tok"), "{head}");
    for dropped in ["x-forwarded-for", "proxy-authorization", "x-custom", "host: 169.254.169.254"] {
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
        assert!(r.contains("concealed by rule aws-"), "{target}: {r}");
    }
    assert!(h.upstream_heads().is_empty(), "{:?}", h.upstream_heads());
    let outcomes = h.outcomes.lock().unwrap();
    assert_eq!(outcomes.len(), 3);
    assert_eq!(outcomes[1].path, "/latest/meta-data/iam/security-credentials/x");
    assert_eq!(outcomes[1].decision.rule(), "aws-iam-credentials");
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

#[tokio::test]
async fn the_token_put_passes_with_its_ttl_header() {
    let h = harness(true).await;
    let r = h
        .raw("PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(status(&r), 200, "{r}");
    let head = h.upstream_heads()[0].to_ascii_lowercase();
    assert!(head.starts_with("put /latest/api/token"), "{head}");
    assert!(head.contains("x-aws-ec2-metadata-token-ttl-seconds: 21600"), "{head}");
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
