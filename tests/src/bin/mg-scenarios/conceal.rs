// SPDX-License-Identifier: Apache-2.0
//! Conceal mode: a pod's HTTP requests to the metadata service go through the agent's
//! filtering proxy. Raw HTTP from pod processes (no Python needed, so these also run
//! in the VM guests); what arrives at the stand-in is counted, so a refusal is proven
//! to have stopped at the proxy.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    attempt::Kind,
    harness::{Ctx, Who, METADATA_V4, METADATA_V6},
};

pub(crate) const SCENARIOS: [crate::Scenario; 8] = [
    ("conceal: pod reads region and zone through the proxy, credentials are refused before the service", aws_paths),
    ("conceal: path tricks, absolute-form targets, Host games and bodies never reach a refused path", path_tricks),
    ("conceal: IPv6 and IPv4-mapped metadata connections are filtered the same way", v6_and_mapped),
    ("conceal: other ports and UDP stay refused, host network goes straight to the service", rest_stays_blocked),
    ("conceal: GCP and Azure rules require their headers and hide identities", gcp_and_azure),
    ("conceal: refusals are audit records naming pod, method, path and rule", audit_records),
    ("conceal: allowlisted pods go straight through, extra paths open only for their pods", allow_and_extras),
    (
        "conceal: a reload switches enforce and conceal with no gap; sock_ops is attached only in conceal",
        reload_switches_modes,
    ),
];

/// The proxy listens on the node end of pod 0's veth: a node address every pod routes to.
const PROXY_PORT: u16 = 8775;
/// What the stand-in answers to any request that reaches it.
const STANDIN_BODY: &str = "metadata-standin";

pub(crate) fn proxy_addr(ctx: &Ctx) -> String {
    format!("{}:{PROXY_PORT}", ctx.node.pods[0].net.node_side_ipv4)
}

pub(crate) fn conceal_agent(ctx: &mut Ctx, config: Option<&str>) -> Result<()> {
    let addr = proxy_addr(ctx);
    let mut args = vec!["--mode".to_string(), "conceal".into(), "--conceal-addr".into(), addr];
    if let Some(yaml) = config {
        let path = ctx.node.config_path();
        std::fs::write(&path, yaml)?;
        args.extend(["--config".into(), path.display().to_string()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ctx.ensure_agent(&refs)?;
    Ok(())
}

/// One raw exchange from a pod (or host) process.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Exchange {
    netns: PathBuf,
    cgroup: PathBuf,
    to: SocketAddr,
    request: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Answer {
    /// 0 when no HTTP answer came (closed, refused connect, timeout).
    pub(crate) status: u16,
    pub(crate) text: String,
    pub(crate) error: Option<String>,
    pub(crate) micros: u64,
}

/// The child side: `mg-scenarios conceal-client JSON`. Joins the cgroup and namespace
/// before opening its socket, sends the request as given, reads until close.
pub(crate) fn client_main(json: &str) -> Result<()> {
    use std::io::{Read, Write};
    let ex: Exchange = serde_json::from_str(json).context("bad exchange")?;
    std::fs::write(ex.cgroup.join("cgroup.procs"), "0")?;
    let ns = std::fs::File::open(&ex.netns)?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
    let started = Instant::now();
    let mut answer = Answer::default();
    let result = (|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&ex.to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(ex.request.as_bytes())?;
        let mut out = Vec::new();
        match s.read_to_end(&mut out) {
            Ok(_) => {}
            Err(e) if !out.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => return Err(e),
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    })();
    answer.micros = started.elapsed().as_micros() as u64;
    match result {
        Ok(text) => {
            answer.status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            answer.text = text;
        }
        Err(e) => answer.error = Some(e.to_string()),
    }
    println!("{}", serde_json::to_string(&answer)?);
    Ok(())
}

pub(crate) fn exchange(ctx: &Ctx, who: Who, to: SocketAddr, request: &str) -> Result<Answer> {
    let (netns, cgroup) = match who {
        Who::Pod(n) => (ctx.node.pods[n].net.ns.path(), ctx.node.pods[n].cgroup.path().to_path_buf()),
        Who::HostInPodCgroup(n) => (ctx.node.node_netns(), ctx.node.pods[n].cgroup.path().to_path_buf()),
        Who::SandboxedUnit => (ctx.node.sandboxed_net.path(), ctx.node.sandboxed_unit.path().to_path_buf()),
    };
    let json = serde_json::to_string(&Exchange { netns, cgroup, to, request: request.into() })?;
    let out = std::process::Command::new("/proc/self/exe").args(["conceal-client", &json]).output()?;
    ensure!(out.status.success(), "conceal client failed: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("conceal client printed {line:?}"))
}

pub(crate) fn metadata(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), 80)
}

pub(crate) fn get(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{headers}Connection: close\r\n\r\n")
}

/// Connections at the stand-in's port 80 that `who`'s request can have caused: from
/// the proxy (a node socket, so from a metadata address on the node's `lo`) or from
/// `who` itself. Other sources are other scenarios' business. The agent's own IMDSv2
/// token requests (a PUT before the first request that needs one) are not `who`'s.
pub(crate) fn arrivals(ctx: &Ctx, who: Who) -> u64 {
    let seen = ctx.node.standin.arrivals();
    let tally = seen.tcp(80);
    let proxy: Vec<IpAddr> = vec![METADATA_V4.parse().unwrap(), METADATA_V6.parse().unwrap()];
    let mut sources = proxy.clone();
    if let Who::Pod(n) = who {
        sources.extend([IpAddr::from(ctx.node.pods[n].net.ipv4), IpAddr::from(ctx.node.pods[n].net.ipv6)]);
    }
    let agent_tokens = seen
        .requests
        .iter()
        .filter(|r| proxy.contains(&r.source) && r.method == "PUT" && r.target == "/latest/api/token")
        .count() as u64;
    sources.iter().map(|s| tally.from(*s)).sum::<u64>() - agent_tokens
}

/// Sends the request and checks the status, and that exactly `arrive` connections
/// reached the stand-in's port 80 meanwhile.
pub(crate) fn expect(ctx: &Ctx, who: Who, to: SocketAddr, request: &str, status: u16, arrive: u64) -> Result<Answer> {
    let before = arrivals(ctx, who);
    let answer = exchange(ctx, who, to, request)?;
    std::thread::sleep(Duration::from_millis(20));
    let arrived = arrivals(ctx, who) - before;
    let first = request.lines().next().unwrap_or_default();
    ensure!(answer.status == status, "{who:?} `{first}` to {to}: expected {status}, got {answer:?}");
    ensure!(arrived == arrive, "{who:?} `{first}`: {arrived} connections reached the service, expected {arrive}");
    if status == 200 && arrive > 0 {
        ensure!(answer.text.ends_with(&format!("{STANDIN_BODY}\n")), "{first}: not the service's answer: {answer:?}");
    }
    Ok(answer)
}

fn aws_paths(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let imds = metadata(METADATA_V4);
    for pod in [Who::Pod(0), Who::Pod(1)] {
        let token = crate::conceal_tokens::pod_token(ctx, pod, "21600")?;
        for path in [
            "/latest/meta-data/placement/availability-zone/",
            "/latest/meta-data/placement/region",
            "/latest/meta-data/instance-id",
            "/latest/dynamic/instance-identity/document",
        ] {
            expect(ctx, pod, imds, &get(path, &format!("X-aws-ec2-metadata-token: {token}\r\n")), 200, 1)?;
        }
        for (path, rule) in [
            ("/latest/meta-data/iam/security-credentials/", "aws-iam-credentials"),
            (
                "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                "aws-identity-credentials",
            ),
            ("/latest/user-data", "aws-user-data"),
            ("/latest/dynamic/instance-identity/pkcs7", "aws-signed-identity"),
        ] {
            let started = Instant::now();
            let a = expect(ctx, pod, imds, &get(path, ""), 404, 0)?;
            ensure!(a.text.contains(&format!("concealed by rule {rule}")), "{path}: {a:?}");
            ensure!(started.elapsed() < Duration::from_secs(2), "{path}: the refusal was not immediate");
        }
    }
    Ok(())
}

fn path_tricks(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let imds = metadata(METADATA_V4);
    for path in [
        "/latest/meta-data/placement/../iam/security-credentials/",
        "/latest/meta-data/placement/%2e%2e/iam/security-credentials/",
        "/latest/meta-data/placement/%2E%2e/iam/info",
        "/latest//meta-data//iam//info",
        "/latest/meta-data/%69am/info",
        "/latest/meta-data/./iam/info",
        "/latest/meta-data/placement%2f..%2fiam/info",
        "/latest/meta-data/placement/..%5ciam/info",
        "/latest/meta-data/IAM/info",
    ] {
        expect(ctx, Who::Pod(0), imds, &get(path, ""), 404, 0)?;
    }
    // Absolute-form and authority-form never pick the upstream or the path.
    expect(ctx, Who::Pod(0), imds, &get("http://169.254.169.254/latest/meta-data/iam/info", ""), 400, 0)?;
    expect(ctx, Who::Pod(0), imds, "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400, 0)?;
    // The Host header chooses nothing: the request still goes to the metadata service.
    let host_game = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 10.200.2.2:22\r\nConnection: close\r\n\r\n";
    expect(ctx, Who::Pod(0), imds, host_game, 200, 1)?;
    // Bodies and both framings at once (smuggling) are refused.
    let smuggle = "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\
                   Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /latest/meta-data/iam/info HTTP/1.1\r\nHost: x\r\n\r\n";
    let a = exchange(ctx, Who::Pod(0), imds, smuggle)?;
    ensure!(a.status == 400 || a.status == 0, "smuggling: {a:?}");
    ensure!(!a.text.contains(STANDIN_BODY), "smuggling reached the service: {a:?}");
    let huge = get("/latest/meta-data/instance-id", &format!("X-Big: {}\r\n", "a".repeat(16 * 1024)));
    let before = arrivals(ctx, Who::Pod(0));
    let a = exchange(ctx, Who::Pod(0), imds, &huge)?;
    ensure!(a.status == 431 || a.status == 0, "oversized head: {a:?}");
    ensure!(arrivals(ctx, Who::Pod(0)) == before, "an oversized head reached the service");
    // Pipelined: the first passes, the second is refused, on one connection.
    let two = format!(
        "GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n{}",
        get("/latest/meta-data/iam/info", "")
    );
    let a = exchange(ctx, Who::Pod(0), imds, &two)?;
    ensure!(a.text.matches("HTTP/1.1 ").count() == 2 && a.text.contains("aws-iam-credentials"), "pipelined: {a:?}");
    Ok(())
}

fn v6_and_mapped(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let v6 = metadata(METADATA_V6);
    let mapped = SocketAddr::new(METADATA_V4.parse::<std::net::Ipv4Addr>()?.to_ipv6_mapped().into(), 80);
    for to in [v6, mapped] {
        expect(ctx, Who::Pod(0), to, &get("/latest/meta-data/placement/availability-zone", ""), 200, 1)?;
        expect(ctx, Who::Pod(0), to, &get("/latest/meta-data/iam/security-credentials/", ""), 404, 0)?;
    }
    Ok(())
}

fn rest_stays_blocked(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 443, false)?;
    ctx.expect_refused(Who::Pod(0), Kind::UdpSendto, METADATA_V4, 80, false)?;
    ctx.expect_refused(Who::Pod(0), Kind::UdpConnect, METADATA_V6, 80, false)?;
    // The host network is not filtered: it reaches credentials directly.
    let imds = metadata(METADATA_V4);
    expect(ctx, Who::HostInPodCgroup(0), imds, &get("/latest/meta-data/iam/security-credentials/", ""), 200, 1)?;
    // A pod that dials the proxy itself is not redirected: no kernel record, no answer.
    let direct: SocketAddr = proxy_addr(ctx).parse()?;
    let a = expect(ctx, Who::Pod(1), direct, &get("/latest/meta-data/instance-id", ""), 0, 0)?;
    ensure!(a.text.is_empty(), "a direct connection to the proxy was answered: {a:?}");
    Ok(())
}

fn gcp_and_azure(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let imds = metadata(METADATA_V4);
    let google = "Metadata-Flavor: Google\r\n";
    expect(ctx, Who::Pod(0), imds, &get("/computeMetadata/v1/instance/zone", google), 200, 1)?;
    expect(ctx, Who::Pod(0), imds, &get("/computeMetadata/v1/project/project-id", google), 200, 1)?;
    expect(ctx, Who::Pod(0), imds, &get("/computeMetadata/v1/instance/zone", ""), 403, 0)?;
    let token = "/computeMetadata/v1/instance/service-accounts/default/token";
    expect(ctx, Who::Pod(0), imds, &get(token, google), 404, 0)?;
    expect(ctx, Who::Pod(0), imds, &get("/computeMetadata/v1/instance/attributes/kube-env", google), 404, 0)?;
    expect(ctx, Who::Pod(0), imds, &get("/computeMetadata/v1/instance/?recursive=true", google), 404, 0)?;
    let azure = "Metadata: true\r\n";
    let location = "/metadata/instance/compute/location?api-version=2021-02-01&format=text";
    expect(ctx, Who::Pod(0), imds, &get(location, azure), 200, 1)?;
    expect(ctx, Who::Pod(0), imds, &get(location, ""), 400, 0)?;
    let identity = "/metadata/identity/oauth2/token?api-version=2018-02-01";
    expect(ctx, Who::Pod(0), imds, &get(identity, azure), 400, 0)?;
    expect(ctx, Who::Pod(0), imds, &get("/METADATA/Identity/oauth2/token?api-version=2018-02-01", azure), 400, 0)?;
    Ok(())
}

fn audit_records(ctx: &mut Ctx) -> Result<()> {
    conceal_agent(ctx, None)?;
    let imds = metadata(METADATA_V4);
    let path = "/latest/meta-data/iam/security-credentials/";
    for _ in 0..3 {
        expect(ctx, Who::Pod(1), imds, &get(path, ""), 404, 0)?;
    }
    let pod = &ctx.node.pods[1];
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let records = ctx.agent()?.audit_records();
        let found = records.iter().find(|r| {
            r.verdict == "concealed"
                && r.path.as_deref() == Some(path)
                && r.pod.as_deref() == Some(pod.name.as_str())
                && r.method.as_deref() == Some("GET")
        });
        if let Some(r) = found {
            ensure!(r.namespace.as_deref() == Some(pod.namespace.as_str()), "{r:?}");
            ensure!(r.rule.as_deref() == Some("aws-iam-credentials"), "{r:?}");
            ensure!(r.destination.map(|d| d.to_string()).as_deref() == Some(METADATA_V4) && r.port == 80, "{r:?}");
            ensure!(r.mode == "conceal", "{r:?}");
            break;
        }
        ensure!(Instant::now() < deadline, "no concealed record for {path} from {}: {records:?}", pod.name);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, metrics) = ctx.agent()?.http_get("/metrics")?;
    ensure!(status == 200, "metrics answered {status}");
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("metadata_guard_conceal_requests_total") && l.contains("result=\"refused\"")),
        "no refused-request series in /metrics"
    );
    ensure!(metrics.contains("metadata_guard_attempts_total{") && metrics.contains("verdict=\"concealed\""));
    Ok(())
}

fn allow_and_extras(ctx: &mut Ctx) -> Result<()> {
    let (ledger, api) = (&ctx.node.pods[3], &ctx.node.pods[1]);
    let yaml = format!(
        "allow_pods:\n  - namespace: {}\n    pod: {}\nconceal:\n  extra_paths:\n    - namespace: {}\n      pod: \"api-*\"\n      \
         paths: [/latest/meta-data/iam/info]\n",
        ledger.namespace, ledger.name, api.namespace
    );
    conceal_agent(ctx, Some(&yaml))?;
    let imds = metadata(METADATA_V4);
    let creds = get("/latest/meta-data/iam/security-credentials/", "");
    // The allowlist reaches the kernel within its resync period.
    let deadline = Instant::now() + Duration::from_secs(5);
    while expect(ctx, Who::Pod(3), imds, &creds, 200, 1).is_err() {
        ensure!(Instant::now() < deadline, "the allowlisted pod never got through");
        std::thread::sleep(Duration::from_millis(200));
    }
    expect(ctx, Who::Pod(1), imds, &get("/latest/meta-data/iam/info", ""), 200, 1)?;
    expect(ctx, Who::Pod(1), imds, &creds, 404, 0)?;
    expect(ctx, Who::Pod(0), imds, &get("/latest/meta-data/iam/info", ""), 404, 0)?;
    Ok(())
}

fn reload_switches_modes(ctx: &mut Ctx) -> Result<()> {
    let path = ctx.node.config_path();
    let write = |mode: &str| -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, format!("mode: {mode}\n"))?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    };
    // A conceal-mode run leaves conceal_ops pinned; an enforce-mode agent detaches it.
    conceal_agent(ctx, None)?;
    ensure!(sock_ops_attached(ctx)? == 1, "conceal mode runs without its sock_ops program");
    write("enforce")?;
    let addr = proxy_addr(ctx);
    let config = path.display().to_string();
    ctx.ensure_agent(&["--conceal-addr", &addr, "--config", &config])?;
    ensure!(sock_ops_attached(ctx)? == 0, "enforce mode left a sock_ops program on the cgroup");
    let status = ctx.status()?;
    ensure!(status.enforcing && status.programs.iter().all(|p| p.hook != "conceal_ops"), "{status:?}");
    let imds = metadata(METADATA_V4);
    let zone = get("/latest/meta-data/placement/availability-zone", "");
    ctx.expect_refused(Who::Pod(0), Kind::Http, METADATA_V4, 80, false)?;
    for (mode, status) in [("conceal", 200), ("enforce", 0), ("conceal", 200)] {
        write(mode)?;
        ctx.agent()?.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // Until the reload lands the old mode answers: refused (EPERM) or filtered.
            let a = exchange(ctx, Who::Pod(0), imds, &zone)?;
            if a.status == status {
                break;
            }
            ensure!(a.status == 0 || a.status == 200, "mid-reload answer: {a:?}");
            ensure!(Instant::now() < deadline, "mode {mode} did not take effect: {a:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let refused = exchange(ctx, Who::Pod(0), imds, &get("/latest/meta-data/iam/info", ""))?;
        ensure!(refused.status == if mode == "conceal" { 404 } else { 0 }, "{mode}: credentials answered {refused:?}");
        // Attached before conceal mode is written, detached right after enforce is.
        let wanted = u32::from(mode == "conceal");
        let deadline = Instant::now() + Duration::from_secs(2);
        while sock_ops_attached(ctx)? != wanted {
            ensure!(Instant::now() < deadline, "{mode}: not {wanted} sock_ops program(s) on the cgroup");
            std::thread::sleep(Duration::from_millis(50));
        }
        let status = ctx.status()?;
        ensure!(status.enforcing, "{mode}: status reports the enforcement incomplete: {:?}", status.problems);
    }
    Ok(())
}

/// The sock_ops programs on the agent's cgroup, as the kernel has them (not the pins).
fn sock_ops_attached(ctx: &Ctx) -> Result<u32> {
    use metadata_guard_tests::bpf::{self, bpf_attach_type};
    use std::os::fd::AsFd;
    let cgroup = ctx.spec(&ctx.agent_bin, &[]).attach_cgroup;
    let dir = std::fs::File::open(&cgroup).with_context(|| format!("could not open {}", cgroup.display()))?;
    bpf::prog_count(dir.as_fd(), bpf_attach_type::BPF_CGROUP_SOCK_OPS)
        .with_context(|| format!("could not query the sock_ops programs of {}", cgroup.display()))
}
