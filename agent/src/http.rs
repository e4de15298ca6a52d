//! The agent's HTTP endpoint: `/metrics`, `/healthz` (the process answers) and
//! `/readyz` (programs attached and policy loaded).
//!
//! A few lines of HTTP/1.1 rather than a web framework: three GET routes do not
//! justify the dependency tree, and the limits below keep it from becoming a way to
//! exhaust the node.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::metrics::Metrics;

/// Largest request head read; anything longer is refused.
const MAX_HEAD: usize = 8 * 1024;
/// A connection is dropped after this long, whatever it is doing, so slow clients
/// can hold a slot for no longer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept: failures such as EMFILE repeat at once, and retrying
/// them in a tight loop would spin a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 16;

#[derive(Default)]
pub struct Readiness {
    attached: AtomicBool,
    policy_loaded: AtomicBool,
}

impl Readiness {
    pub fn set_attached(&self, v: bool) {
        self.attached.store(v, Ordering::SeqCst);
    }

    pub fn set_policy_loaded(&self, v: bool) {
        self.policy_loaded.store(v, Ordering::SeqCst);
    }

    /// None when ready, else what is missing.
    fn missing(&self) -> Option<&'static str> {
        match (self.attached.load(Ordering::SeqCst), self.policy_loaded.load(Ordering::SeqCst)) {
            (true, true) => None,
            (false, true) => Some("programs not attached"),
            (true, false) => Some("policy not loaded"),
            (false, false) => Some("programs not attached, policy not loaded"),
        }
    }
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("could not listen on {addr} for /metrics, /healthz and /readyz; is it in use? choose another with --metrics-addr")
    })
}

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!("accept failed on the metrics listener: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, &metrics, &readiness)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics, readiness: &Readiness) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return Reply::text(Status::HeaderTooLarge, "request header too large\n").send(&mut stream).await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    route(&String::from_utf8_lossy(line), metrics, readiness).send(&mut stream).await
}

/// The response to a request line such as `GET /metrics HTTP/1.1`.
fn route(request_line: &str, metrics: &Metrics, readiness: &Readiness) -> Reply {
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return Reply::text(Status::MethodNotAllowed, "only GET and HEAD\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    let reply = match path {
        "/metrics" => Reply {
            status: Status::Ok,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics.encode(),
            head_only: false,
        },
        "/healthz" => Reply::text(Status::Ok, "ok\n"),
        "/readyz" => match readiness.missing() {
            None => Reply::text(Status::Ok, "ready\n"),
            Some(what) => Reply::text(Status::Unavailable, format!("not ready: {what}\n")),
        },
        _ => Reply::text(Status::NotFound, "not found; try /metrics, /healthz or /readyz\n"),
    };
    // HEAD announces the body's length but must not carry it.
    Reply { head_only: method == "HEAD", ..reply }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    NotFound,
    MethodNotAllowed,
    HeaderTooLarge,
    Unavailable,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeaderTooLarge => "431 Request Header Fields Too Large",
            Status::Unavailable => "503 Service Unavailable",
        }
    }
}

struct Reply {
    status: Status,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

impl Reply {
    fn text(status: Status, body: impl Into<String>) -> Reply {
        Reply { status, content_type: "text/plain; charset=utf-8", body: body.into(), head_only: false }
    }

    async fn send(self, stream: &mut TcpStream) -> std::io::Result<()> {
        // RFC 9110 requires a 405 to say which methods would work.
        let allow = if self.status == Status::MethodNotAllowed { "Allow: GET, HEAD\r\n" } else { "" };
        let head = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status.line(),
            self.content_type,
            self.body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        if !self.head_only {
            stream.write_all(self.body.as_bytes()).await?;
        }
        stream.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    struct Server {
        addr: SocketAddr,
        readiness: Arc<Readiness>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Server {
        async fn start() -> Server {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let readiness = Arc::new(Readiness::default());
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, Arc::new(Metrics::new()), readiness.clone(), async {
                let _ = stopped.await;
            }));
            Server { addr, readiness, stop, task }
        }

        async fn stop(self) {
            self.stop.send(()).unwrap();
            self.task.await.unwrap();
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
    async fn ready_only_once_attached_with_a_policy() {
        let server = Server::start().await;
        assert_eq!(server.get("/healthz").await, (200, "ok\n".into()));
        assert_eq!(server.get("/readyz").await, (503, "not ready: programs not attached, policy not loaded\n".into()));
        server.readiness.set_policy_loaded(true);
        assert_eq!(server.get("/readyz").await, (503, "not ready: programs not attached\n".into()));
        server.readiness.set_attached(true);
        assert_eq!(server.get("/readyz").await, (200, "ready\n".into()));
        server.readiness.set_attached(false);
        assert_eq!(server.get("/readyz").await.0, 503, "detaching on shutdown makes it unready again");
        server.stop().await;
    }

    #[tokio::test]
    async fn metrics_are_served_as_prometheus_text_and_other_paths_are_not_found() {
        let server = Server::start().await;
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
        let server = Server::start().await;
        let out = server.exchange("HEAD /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{out:?}"
        );
        let out = server.exchange("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(
            out.starts_with("HTTP/1.1 405 Method Not Allowed\r\n") && out.contains("\r\nAllow: GET, HEAD\r\n"),
            "{out}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let server = Server::start().await;
        let padding = "a".repeat(MAX_HEAD);
        let out = server.exchange(&format!("GET /healthz HTTP/1.1\r\nX-Padding: {padding}\r\n\r\n")).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        server.stop().await;
    }

    #[tokio::test]
    async fn clients_beyond_the_connection_limit_wait_for_a_free_slot() {
        let server = Server::start().await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(server.addr).await.unwrap());
        }
        let waiting = tokio::spawn({
            let addr = server.addr;
            async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "a 17th connection was served while 16 were open");
        drop(idle.pop());
        let out = tokio::time::timeout(Duration::from_secs(2), waiting).await.unwrap().unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        drop(idle);
        server.stop().await;
    }
}
