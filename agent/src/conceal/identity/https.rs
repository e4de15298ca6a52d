// SPDX-License-Identifier: Apache-2.0
//! The agent's own HTTP(S) client for the cloud's token service: hyper over a host
//! socket, TLS by rustls (graviola's cryptography, no C) with the Mozilla roots built
//! in (no CA files needed in the image), plain HTTP only where the endpoint says `http://` (a test's emulator).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    header::{CONTENT_TYPE, HOST, USER_AGENT},
    Request,
};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{conceal::host_sockets::HostSockets, config::identity::Endpoint};

/// STS's answers are a few KiB.
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Connect, TLS and answer, together.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Posts a form to `endpoint` from the host's network namespace; the answer's status
/// and body.
pub(crate) async fn post_form(sockets: &HostSockets, endpoint: &Endpoint, form: String) -> Result<(u16, Bytes)> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange(sockets, endpoint, form))
        .await
        .map_err(|_| anyhow!("{endpoint} did not answer within {EXCHANGE_TIMEOUT:?}"))?
}

async fn exchange(sockets: &HostSockets, endpoint: &Endpoint, form: String) -> Result<(u16, Bytes)> {
    let addr = resolve(endpoint).await?;
    let socket = sockets.tcp(&addr).await?;
    let stream = socket.connect(addr).await.with_context(|| format!("could not connect to {endpoint} ({addr})"))?;
    let host = if endpoint.host.contains(':') { format!("[{}]", endpoint.host) } else { endpoint.host.clone() };
    let request = Request::post(endpoint.path.as_str())
        .header(HOST, host)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded; charset=utf-8")
        .header(USER_AGENT, concat!("metadata-guard/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(form)))?;
    if endpoint.tls {
        let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
            .with_context(|| format!("`{}` is not a TLS server name", endpoint.host))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, stream)
            .await
            .with_context(|| format!("TLS with {endpoint} failed"))?;
        send(tls, request).await
    } else {
        send(stream, request).await
    }
}

async fn send<S>(io: S, request: Request<Full<Bytes>>) -> Result<(u16, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the answer: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// One plain-HTTP request without a body to `addr` from the host's network namespace
/// (the agent's own metadata requests); the answer's status and body.
pub(crate) async fn plain_request(
    sockets: &HostSockets,
    addr: SocketAddr,
    method: hyper::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, Bytes)> {
    let exchange = async {
        let socket = sockets.tcp(&addr).await?;
        let stream = socket.connect(addr).await.with_context(|| format!("could not connect to {addr}"))?;
        let mut request = Request::builder().method(method).uri(path).header(HOST, addr.ip().to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        send(stream, request.body(Full::new(Bytes::new()))?).await
    };
    tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
        .await
        .map_err(|_| anyhow!("{addr} did not answer within {EXCHANGE_TIMEOUT:?}"))?
}

async fn resolve(endpoint: &Endpoint) -> Result<SocketAddr> {
    if let Ok(ip) = endpoint.host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, endpoint.port));
    }
    let mut addrs = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .with_context(|| format!("could not resolve {}", endpoint.host))?;
    match addrs.next() {
        Some(a) => Ok(a),
        None => bail!("{} resolves to no address", endpoint.host),
    }
}

/// Whether this CPU has what graviola's cryptography needs (every x86_64 since about
/// 2014, every Graviton): without it, graviola would panic mid-handshake.
fn cpu_supports_tls() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("aes") && has!("pclmulqdq") && has!("bmi1") && has!("bmi2") && has!("adx") && has!("avx") && has!("avx2")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("sha2")
            && std::arch::is_aarch64_feature_detected!("pmull")
            && std::arch::is_aarch64_feature_detected!("neon")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    if let Some(c) = CONFIG.get() {
        return Ok(c.clone());
    }
    if !cpu_supports_tls() {
        bail!(
            "this CPU lacks the AES, carry-less multiply and (x86_64) AVX2, ADX and BMI instructions the agent's TLS \
             needs; configure an http:// sts_endpoint only for a local emulator"
        );
    }
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls_graviola::default_provider()))
        .with_safe_default_protocol_versions()
        .context("no TLS version in common with the crypto provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_configuration_builds_from_the_built_in_roots() {
        assert!(tls_config().is_ok());
    }
}
