// SPDX-License-Identifier: Apache-2.0
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::supervise::Supervisor;

struct TestServer {
    addr: SocketAddr,
    readiness: Arc<Readiness>,
    supervisor: Supervisor,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Arc::new(Readiness::default());
        let supervisor = Supervisor::new();
        let server = Server { listener, metrics: Arc::new(Metrics::new()), readiness: readiness.clone() };
        let task = tokio::spawn(server.run(supervisor.shutdown()));
        TestServer { addr, readiness, supervisor, task }
    }

    async fn stop(self) {
        drop(self.supervisor);
        self.task.await.unwrap().unwrap();
    }

    /// Sends `request` as is and returns the whole response.
    async fn exchange(&self, request: &str) -> String {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let out = self.exchange(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")).await;
        (out[9..12].parse().unwrap(), out.split_once("\r\n\r\n").unwrap().1.to_string())
    }
}

#[tokio::test]
async fn ready_only_when_every_condition_holds_and_it_says_what_is_missing() {
    let server = TestServer::start().await;
    assert_eq!(server.get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(server.get("/readyz").await, (200, "ready\n".into()), "no conditions registered: ready");
    let attached = server.readiness.condition("enforcement", "programs not attached");
    let events = server.readiness.condition("event reader", "not started");
    assert_eq!(
        server.get("/readyz").await,
        (503, "not ready: enforcement: programs not attached; event reader: not started\n".into())
    );
    attached.ready();
    assert_eq!(server.get("/readyz").await, (503, "not ready: event reader: not started\n".into()));
    events.ready();
    assert_eq!(server.get("/readyz").await, (200, "ready\n".into()));
    attached.missing("pin of link connect4 removed");
    assert_eq!(server.get("/readyz").await, (503, "not ready: enforcement: pin of link connect4 removed\n".into()));
    server.stop().await;
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text_and_other_paths_are_not_found() {
    let server = TestServer::start().await;
    let out = server.exchange("GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{head}");
    assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{head}");
    assert!(head.contains("\r\nConnection: close"), "{head}");
    let version = env!("CARGO_PKG_VERSION");
    assert!(body.contains(&format!("metadata_guard_build_info{{version=\"{version}\"}} 1\n")), "{body}");
    assert_eq!(server.get("/metricsz").await.0, 404);
    assert_eq!(server.get("/").await.0, 404);
    server.stop().await;
}

#[tokio::test]
async fn head_gets_the_length_without_the_body_and_other_methods_are_refused() {
    let server = TestServer::start().await;
    let out = server.exchange("HEAD /healthz HTTP/1.1\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\n"), "{out:?}");
    assert!(out.contains("\r\nContent-Length: 3\r\n"), "{out:?}");
    let out = server.exchange("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n") && out.contains("\r\nAllow: GET, HEAD\r\n"),
        "{out}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let server = TestServer::start().await;
    let padding = "a".repeat(MAX_HEAD);
    let out = server.exchange(&format!("GET /healthz HTTP/1.1\r\nX-Padding: {padding}\r\n\r\n")).await;
    assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    server.stop().await;
}

#[tokio::test]
async fn a_request_with_bare_line_feeds_is_answered_at_once() {
    let server = TestServer::start().await;
    let started = Instant::now();
    let out = server.exchange("GET /healthz HTTP/1.1\nHost: x\n\n").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_beyond_the_limits_cannot_starve_the_liveness_probe() {
    let server = TestServer::start().await;
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS * 2 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(1), server.get("/healthz")).await.unwrap();
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    // The oldest idle connections were closed to make room: they read EOF.
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(1), idle[0].read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(n, 0, "the oldest idle connection is closed");
    drop(idle);
    server.stop().await;
}

#[test]
fn busy_connections_are_never_evicted() {
    let slots = Arc::new(Slots::default());
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let held: Vec<Slot> = (0..MAX_PER_CLIENT).map(|_| slots.take(ip).unwrap()).collect();
    for slot in &held {
        slot.busy.store(true, Ordering::SeqCst);
    }
    assert!(slots.take(ip).is_none(), "every slot of this client is serving: the newcomer is refused");
    let other: IpAddr = "10.0.0.2".parse().unwrap();
    assert!(slots.take(other).is_some(), "another client still has room");
    held[0].busy.store(false, Ordering::SeqCst);
    assert!(slots.take(ip).is_some(), "an idle slot is given up for the newcomer");
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_dropped_after_the_header_timeout() {
    let server = TestServer::start().await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let mut out = Vec::new();
    let read = tokio::time::timeout(HEADER_TIMEOUT + Duration::from_secs(2), slow.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the connection was still open after {:?}", started.elapsed());
    assert!(started.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(100), "closed too early");
    server.stop().await;
}
