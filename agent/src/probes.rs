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
/// A client that has not sent its request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
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
                    tracing::debug!("accept failed: {e}");
                    continue;
                }
            },
        };
        let (metrics, readiness) = (metrics.clone(), readiness.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, &metrics, &readiness)).await;
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
            return respond(&mut stream, 431, "text/plain", "request header too large\n").await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or(path);
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => respond(&mut stream, 200, "text/plain; version=0.0.4; charset=utf-8", &metrics.encode()).await,
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/readyz" => match readiness.missing() {
            None => respond(&mut stream, 200, "text/plain", "ready\n").await,
            Some(what) => respond(&mut stream, 503, "text/plain", &format!("not ready: {what}\n")).await,
        },
        _ => respond(&mut stream, 404, "text/plain", "not found; try /metrics, /healthz or /readyz\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        (out[9..12].parse().unwrap(), out.split_once("\r\n\r\n").unwrap().1.to_string())
    }

    #[tokio::test]
    async fn ready_only_once_attached_with_a_policy() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let readiness = Arc::new(Readiness::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(Metrics::new()), readiness.clone(), async {
            let _ = stopped.await;
        }));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!((code, body.as_str()), (503, "not ready: programs not attached, policy not loaded\n"));
        readiness.set_policy_loaded(true);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        readiness.set_attached(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (code, body) = get(addr, "/metrics").await;
        assert!(code == 200 && body.contains("metadata_guard_build_info"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);
        stop.send(()).unwrap();
        server.await.unwrap();
    }
}
