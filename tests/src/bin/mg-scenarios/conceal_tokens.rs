// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's IMDSv2 tokens against a stand-in that requires IMDSv2 (as an
//! instance with `HttpTokens: required`) and logs every request: a pod's token is the
//! proxy's, good for that pod only and for its TTL; it never reaches the service, and
//! the service refuses it when a host process replays it.

use std::{net::IpAddr, time::Duration};

use anyhow::{ensure, Result};

use crate::{
    conceal::{arrivals, conceal_agent, exchange, expect, get, metadata, Answer},
    harness::{Ctx, Who, METADATA_V4, METADATA_V6},
};

pub(crate) const SCENARIOS: [crate::Scenario; 4] = [
    (
        "conceal tokens: a pod's IMDSv2 token is the proxy's and works for that pod only; another pod replaying it gets 401",
        own_token_only,
    ),
    ("conceal tokens: a token expires after its TTL; a wrong or missing TTL is refused as IMDS does", expiry_and_ttl),
    (
        "conceal tokens: a pod's token replayed from the host network with a plain GET is refused by the service",
        replay_from_the_host,
    ),
    (
        "conceal tokens: IMDSv1 mirrors the node (401 where the service requires IMDSv2), and no pod token goes upstream",
        imdsv1_mirrors_the_node,
    ),
];

/// A token PUT with this TTL header line (or none), as the SDKs send it.
pub(crate) fn token_put(ttl: Option<&str>) -> String {
    let ttl = ttl.map_or(String::new(), |t| format!("X-aws-ec2-metadata-token-ttl-seconds: {t}\r\n"));
    format!("PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n{ttl}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

/// The body of an answer.
pub(crate) fn body(a: &Answer) -> &str {
    a.text.split("\r\n\r\n").nth(1).unwrap_or("")
}

/// A pod's IMDSv2 token, from the proxy (which answers the PUT itself: nothing arrives).
pub(crate) fn pod_token(ctx: &Ctx, pod: Who, ttl: &str) -> Result<String> {
    let a = expect(ctx, pod, metadata(METADATA_V4), &token_put(Some(ttl)), 200, 0)?;
    let token = body(&a).to_owned();
    ensure!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()), "not a token of the proxy's: {a:?}");
    Ok(token)
}

const ZONE: &str = "/latest/meta-data/placement/availability-zone";
const CREDENTIALS: &str = "/latest/meta-data/iam/security-credentials/";

fn with_token(token: &str) -> String {
    format!("X-aws-ec2-metadata-token: {token}\r\n")
}

fn own_token_only(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    ctx.node.standin.require_imdsv2(true);
    let imds = metadata(METADATA_V4);
    let mine = pod_token(ctx, Who::Pod(0), "21600")?;
    expect(ctx, Who::Pod(0), imds, &get(ZONE, &with_token(&mine)), 200, 1)?;
    // The same token through the IPv6 endpoint: the pod is the same.
    expect(ctx, Who::Pod(0), metadata(METADATA_V6), &get(ZONE, &with_token(&mine)), 200, 1)?;
    // Another pod with it: 401 at once, nothing reaches the service.
    let a = expect(ctx, Who::Pod(1), imds, &get(ZONE, &with_token(&mine)), 401, 0)?;
    ensure!(a.text.contains("aws-token"), "{a:?}");
    // A token of its own works for the other pod; a made-up one for nobody.
    let theirs = pod_token(ctx, Who::Pod(1), "60")?;
    ensure!(theirs != mine, "two pods got the same token");
    expect(ctx, Who::Pod(1), imds, &get(ZONE, &with_token(&theirs)), 200, 1)?;
    expect(ctx, Who::Pod(0), imds, &get(ZONE, &with_token(&theirs)), 401, 0)?;
    expect(ctx, Who::Pod(0), imds, &get(ZONE, &with_token(&"0".repeat(64))), 401, 0)?;
    expect(ctx, Who::Pod(0), imds, &get(ZONE, &with_token("standin-1-abc")), 401, 0)?;
    // A good token opens no concealed path.
    expect(ctx, Who::Pod(0), imds, &get(CREDENTIALS, &with_token(&mine)), 404, 0)?;
    Ok(())
}

fn expiry_and_ttl(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    ctx.node.standin.require_imdsv2(true);
    let imds = metadata(METADATA_V4);
    let short = pod_token(ctx, Who::Pod(0), "1")?;
    expect(ctx, Who::Pod(0), imds, &get(ZONE, &with_token(&short)), 200, 1)?;
    std::thread::sleep(Duration::from_millis(1100));
    expect(ctx, Who::Pod(0), imds, &get(ZONE, &with_token(&short)), 401, 0)?;
    for ttl in [None, Some("0"), Some("21601"), Some("-5"), Some("ten")] {
        expect(ctx, Who::Pod(0), imds, &token_put(ttl), 400, 0)?;
    }
    let xff = token_put(Some("60")).replace("Content-Length", "X-Forwarded-For: 10.1.2.3\r\nContent-Length");
    expect(ctx, Who::Pod(0), imds, &xff, 403, 0)?;
    Ok(())
}

fn replay_from_the_host(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    ctx.node.standin.require_imdsv2(true);
    let imds = metadata(METADATA_V4);
    let token = pod_token(ctx, Who::Pod(0), "21600")?;
    expect(ctx, Who::Pod(0), imds, &get(ZONE, &with_token(&token)), 200, 1)?;
    // A host-network process (not filtered: it reaches the service directly) with the
    // pod's token: the service never issued it.
    let host = Who::HostInPodCgroup(0);
    let a = exchange(ctx, host, imds, &get(CREDENTIALS, &with_token(&token)))?;
    ensure!(a.status == 401, "the service accepted a pod's token from the host: {a:?}");
    let a = exchange(ctx, host, imds, &get(CREDENTIALS, ""))?;
    ensure!(a.status == 401, "the stand-in does not require IMDSv2: {a:?}");
    // The host's own token works (the stand-in is not refusing everything).
    let put = exchange(ctx, host, imds, &token_put(Some("60")))?;
    ensure!(put.status == 200, "{put:?}");
    let a = exchange(ctx, host, imds, &get(CREDENTIALS, &with_token(body(&put))))?;
    ensure!(a.status == 200, "{a:?}");
    let log = ctx.node.standin.arrivals().requests;
    let replayed = log.iter().filter(|r| r.header("x-aws-ec2-metadata-token") == Some(token.as_str())).count();
    ensure!(replayed == 1, "the pod's token reached the service {replayed} times, expected once (the host's replay)");
    Ok(())
}

fn imdsv1_mirrors_the_node(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let imds = metadata(METADATA_V4);
    let start = ctx.node.standin.arrivals().requests.len();
    ctx.node.standin.require_imdsv2(true);
    expect(ctx, Who::Pod(0), imds, &get(ZONE, ""), 401, 1)?;
    ctx.node.standin.require_imdsv2(false);
    expect(ctx, Who::Pod(0), imds, &get(ZONE, ""), 200, 1)?;
    ctx.node.standin.require_imdsv2(true);
    // Whatever a pod sends, what reaches the service from the proxy carries either no
    // token or one the service itself issued to the agent.
    let token = pod_token(ctx, Who::Pod(2), "300")?;
    let before = arrivals(ctx, Who::Pod(2));
    for _ in 0..3 {
        expect(ctx, Who::Pod(2), imds, &get(ZONE, &with_token(&token)), 200, 1)?;
    }
    ensure!(arrivals(ctx, Who::Pod(2)) == before + 3);
    let proxy: IpAddr = METADATA_V4.parse()?;
    let log = ctx.node.standin.arrivals().requests;
    let from_proxy: Vec<_> = log[start.min(log.len())..].iter().filter(|r| r.source == proxy).collect();
    ensure!(!from_proxy.is_empty(), "the stand-in logged nothing from the proxy");
    for r in &from_proxy {
        if let Some(t) = r.header("x-aws-ec2-metadata-token") {
            ensure!(t.starts_with("standin-"), "a token the service did not issue went upstream: {r:?}");
        }
        ensure!(r.header("x-aws-ec2-metadata-token-ttl-seconds").is_none() || r.method == "PUT", "{r:?}");
    }
    Ok(())
}
