// SPDX-License-Identifier: Apache-2.0
//! The agent's HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process
//! answers) and `/readyz` (every readiness condition holds; 503 naming what is
//! missing otherwise). HTTP/1.1 by hyper; one request per connection.
//!
//! The port is reachable from pods, so no client may starve the kubelet's liveness
//! probe: a request head must arrive within [`HEADER_TIMEOUT`], a whole exchange
//! within [`CONNECTION_TIMEOUT`], and when a client address holds
//! [`MAX_PER_CLIENT`] connections or all hold [`MAX_CONNECTIONS`], a new connection
//! does not wait: it takes the slot of the oldest connection that is not in the
//! middle of a request (an idle one). Only when every slot is serving a request is
//! a newcomer refused, and serving takes milliseconds.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

use crate::{
    metrics::Metrics,
    supervise::{Readiness, Shutdown},
};

/// How long a client may take to send its request head.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it is doing.
pub(crate) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once from one client address.
pub(crate) const MAX_PER_CLIENT: usize = 16;
/// Connections open at once in total.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// Largest request head read (hyper's smallest buffer); longer heads get 431.
const MAX_HEAD: usize = 8 * 1024;
/// Pause after a failed accept: failures such as EMFILE repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("could not listen on {addr} for /metrics, /healthz and /readyz; is it in use? choose another with --metrics-addr")
    })
}

/// The HTTP subsystem: serves until shutdown; fails only when the listener does.
pub(crate) struct Server {
    pub listener: TcpListener,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
}

impl Server {
    pub(crate) async fn run(self, mut shutdown: Shutdown) -> Result<()> {
        let slots = Arc::new(Slots::default());
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.wait() => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::debug!("accept failed on the metrics listener: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let Some(slot) = slots.take(peer.ip()) else { continue };
            let (metrics, readiness) = (self.metrics.clone(), self.readiness.clone());
            tokio::spawn(serve_connection(stream, slot, metrics, readiness));
        }
    }
}

async fn serve_connection(stream: TcpStream, mut slot: Slot, metrics: Arc<Metrics>, readiness: Arc<Readiness>) {
    let busy = slot.busy.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        busy.store(true, Ordering::SeqCst);
        let reply = route(req.method(), req.uri().path(), &metrics, &readiness);
        async move { Ok::<_, Infallible>(reply) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(false)
        .title_case_headers(true)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service);
    let evicted = slot.evicted.take().expect("set when the slot is taken");
    tokio::select! {
        _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn) => {}
        _ = evicted => {}
    }
}

/// The response to `method path`.
fn route(method: &Method, path: &str, metrics: &Metrics, readiness: &Readiness) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        // RFC 9110 requires a 405 to say which methods would work.
        reply.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return reply;
    }
    match path {
        "/metrics" => {
            let mut reply = text(StatusCode::OK, metrics.encode());
            reply.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            reply
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let missing = readiness.missing();
            if missing.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", missing.join("; ")))
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /healthz or /readyz\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    reply.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    reply
}

/// The open connections, oldest first, and which of them are serving a request.
#[derive(Default)]
struct Slots {
    next_id: AtomicU64,
    open: Mutex<BTreeMap<u64, Open>>,
}

struct Open {
    ip: IpAddr,
    busy: Arc<AtomicBool>,
    evict: Option<oneshot::Sender<()>>,
}

/// A connection's place; freed when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    busy: Arc<AtomicBool>,
    evicted: Option<oneshot::Receiver<()>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.open.lock().unwrap().remove(&self.id);
    }
}

impl Slots {
    /// A slot for a new connection from `ip`, evicting the oldest idle connection (of
    /// that client first) when a limit is reached; `None` when every candidate is busy.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap();
        let from_client: BTreeSet<u64> = open.iter().filter(|(_, o)| o.ip == ip).map(|(id, _)| *id).collect();
        let over_client = from_client.len() >= MAX_PER_CLIENT;
        if over_client || open.len() >= MAX_CONNECTIONS {
            let victim = open
                .iter()
                .filter(|(id, o)| (!over_client || from_client.contains(id)) && !o.busy.load(Ordering::SeqCst))
                .map(|(id, _)| *id)
                .next()?;
            if let Some(mut gone) = open.remove(&victim) {
                if let Some(evict) = gone.evict.take() {
                    let _ = evict.send(());
                }
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let busy = Arc::new(AtomicBool::new(false));
        let (evict, evicted) = oneshot::channel();
        open.insert(id, Open { ip, busy: busy.clone(), evict: Some(evict) });
        Some(Slot { slots: self.clone(), id, busy, evicted: Some(evicted) })
    }
}

#[cfg(test)]
mod tests;
