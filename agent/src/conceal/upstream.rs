// SPDX-License-Identifier: Apache-2.0
//! The proxy's side towards the metadata service: the rebuilt request, sent on a
//! fresh host-namespace connection, with the agent's own IMDSv2 token when the pod
//! proved IMDSv2 with one of the proxy's.

use super::*;

impl ConnCtx {
    /// Sends the rebuilt request upstream. `with_token`: the pod proved IMDSv2 with a
    /// token of the proxy's; the request goes with the agent's own token (renewed once
    /// should the service refuse it).
    pub(super) async fn forward(
        &self,
        req: &Request<Incoming>,
        path: &NormalPath,
        query: &Query,
        with_token: bool,
    ) -> anyhow::Result<Response<Body>> {
        let destination = self.origin.destination;
        let mut target = path.to_upstream();
        if !query.is_empty() {
            target.push('?');
            target.push_str(&query.to_string());
        }
        let build = |token: Option<&str>| -> anyhow::Result<Request<Empty<Bytes>>> {
            let mut upstream =
                Request::builder().method(req.method().clone()).uri(target.as_str()).header(HOST, host_of(destination));
            let forwarded = clouds::ALL.iter().flat_map(|c| c.forward_headers.iter()).collect::<Vec<_>>();
            for (name, value) in req.headers() {
                if forwarded.iter().any(|f| **f == name.as_str()) {
                    upstream = upstream.header(name, value);
                }
            }
            if let Some(token) = token {
                upstream = upstream.header(TOKEN_HEADER, token);
            }
            Ok(upstream.body(Empty::<Bytes>::new())?)
        };
        let mut attempt = 0;
        let (parts, body) = loop {
            let token = if with_token { self.upstream_token(attempt > 0).await } else { None };
            let (parts, body) = self.proxy.exchange(destination, build(token.as_deref())?).await?;
            attempt += 1;
            if parts.status == StatusCode::UNAUTHORIZED && token.is_some() && attempt == 1 {
                continue; // the service forgot the agent's token (restarted, or the instance stopped)
            }
            break (parts, body);
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = parts.status;
        // The body is re-framed here, except that a HEAD answer keeps the service's length.
        let head = req.method() == hyper::Method::HEAD;
        for (name, value) in &parts.headers {
            if !is_hop_by_hop(name) && (name != CONTENT_LENGTH || head) {
                response.headers_mut().append(name, value.clone());
            }
        }
        Ok(response)
    }

    /// The agent's own token for this connection's endpoint: the one held, or a new one
    /// (`renew`: the service refused the one held). None when the service gives none;
    /// the request then goes without, and the service answers as it answers that.
    async fn upstream_token(&self, renew: bool) -> Option<String> {
        let destination = self.origin.destination;
        let mut all = self.proxy.upstream_tokens.lock().await;
        let held = all.entry(destination).or_default();
        let now = Instant::now();
        if renew {
            held.forget();
        }
        if let Some(token) = held.current(now) {
            return Some(token.to_owned());
        }
        if !held.may_fetch(now) {
            return None;
        }
        let put = Request::builder()
            .method(hyper::Method::PUT)
            .uri("/latest/api/token")
            .header(HOST, host_of(destination))
            .header(TTL_HEADER, UPSTREAM_TTL.as_secs())
            .header(CONTENT_LENGTH, 0)
            .body(Empty::<Bytes>::new())
            .ok()?;
        match self.proxy.exchange(destination, put).await {
            Ok((parts, body)) if parts.status == StatusCode::OK && is_token(&body) => {
                let token = String::from_utf8_lossy(&body).trim().to_owned();
                held.fetched(token.clone(), now);
                Some(token)
            }
            Ok((parts, _)) => {
                warn!(%destination, status = %parts.status, "conceal proxy: the metadata service gave the agent no IMDSv2 token; requests go without one");
                held.failed(now);
                None
            }
            Err(e) => {
                warn!(%destination, "conceal proxy: could not get the agent's IMDSv2 token: {e:#}");
                held.failed(now);
                None
            }
        }
    }
}

impl Proxy {
    /// One request on a fresh host-namespace connection to `destination`, its answer
    /// read whole (within the size and time limits).
    pub(super) async fn exchange(
        &self,
        destination: SocketAddr,
        request: Request<Empty<Bytes>>,
    ) -> anyhow::Result<(hyper::http::response::Parts, Bytes)> {
        let exchange = async {
            let socket = self.sockets.tcp(&destination).await?;
            let stream = socket.connect(destination).await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let response = sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?
                .to_bytes();
            anyhow::Ok((parts, body))
        };
        tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {UPSTREAM_TIMEOUT:?}"))?
    }
}

/// The Host header for a metadata endpoint.
fn host_of(destination: SocketAddr) -> String {
    match destination {
        SocketAddr::V4(a) if a.port() == 80 => a.ip().to_string(),
        SocketAddr::V6(a) if a.port() == 80 => format!("[{}]", a.ip()),
        other => other.to_string(),
    }
}

/// A token as a service sends it: printable ASCII, not absurdly long.
fn is_token(body: &[u8]) -> bool {
    let t = body.trim_ascii();
    !t.is_empty() && t.len() <= 1024 && t.iter().all(u8::is_ascii_graphic)
}
