// SPDX-License-Identifier: Apache-2.0
//! Conceal mode's workload identity with real clients: moto as IMDS and as STS,
//! unchanged boto3 in the pods, and STS itself (GetCallerIdentity) saying which role
//! the credentials a pod got belong to. See identity_node.rs for the world.

use std::{collections::HashSet, fs, path::Path, time::Duration};

use anyhow::{ensure, Context, Result};

use crate::{
    conceal_moto::python,
    harness::{budget, wait_until, Ctx},
    identity_node::{token, IdentityNode, ACCOUNT, STS_PORT},
};

pub(crate) const SCENARIOS: [crate::Scenario; 3] = [
    (
        "identity (moto, boto3): a mapped pod gets its own role (STS names it); another service account, another \
         namespace, a token naming another pod get none; the host gets the node's",
        each_pod_its_own_role,
    ),
    (
        "identity (moto): credentials are refreshed before expiry; a deleted pod's address reused by another pod \
         never gets its credentials; a reload adds and removes a mapping",
        refresh_reuse_and_reload,
    ),
    (
        "identity (moto): STS unreachable is an IMDS failure, never the node's; a storm from many pods makes one STS \
         call per pod",
        sts_down_then_a_storm,
    ),
];

/// boto3's credential chain, unchanged: what an SDK in the pod ends up with.
const BOTO: &str = r#"
import json, boto3
c = boto3.Session(region_name="us-east-1").get_credentials()
f = c.get_frozen_credentials() if c else None
print(json.dumps({"access_key": f.access_key if f else None, "secret_key": f.secret_key if f else None,
                  "token": f.token if f else None, "method": c.method if c else None}))
"#;

/// STS's own answer: whose credentials these are (run on the node, where moto's STS is).
const WHOAMI: &str = r#"
import json, sys, boto3
sts = boto3.client("sts", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id=sys.argv[2],
                   aws_secret_access_key=sys.argv[3], aws_session_token=sys.argv[4])
print(json.dumps({"arn": sts.get_caller_identity()["Arn"]}))
"#;

/// IMDS by hand: `v2` (one token, then a GET of each path) or `v1` (GETs alone);
/// statuses and bodies.
const RAW: &str = r#"
import json, sys, urllib.request, urllib.error
def call(method, path, headers):
    req = urllib.request.Request("http://169.254.169.254" + path, method=method, headers=headers)
    try:
        r = urllib.request.urlopen(req, timeout=5)
        return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
v1 = sys.argv[1] == "v1"
if not v1:
    _, tok = call("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
out = []
for p in sys.argv[2:]:
    s, b = call("GET", p, {} if v1 else {"X-aws-ec2-metadata-token": tok})
    out.append({"status": s, "body": b})
print(json.dumps(out))
"#;

/// Many requests of one pod at once, each with its own IMDSv2 session as separate
/// SDK clients would: the statuses and the key ids they got.
const STORM: &str = r#"
import json, sys, threading, urllib.request, urllib.error
n, path = int(sys.argv[1]), sys.argv[2]
got = []
def one():
    try:
        t = urllib.request.urlopen(urllib.request.Request("http://169.254.169.254/latest/api/token", method="PUT",
            headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=10).read().decode()
        r = urllib.request.urlopen(urllib.request.Request("http://169.254.169.254" + path,
            headers={"X-aws-ec2-metadata-token": t}), timeout=10)
        got.append([r.status, json.loads(r.read()).get("AccessKeyId")])
    except urllib.error.HTTPError as e:
        got.append([e.code, None])
    except Exception as e:
        got.append([0, str(e)])
ts = [threading.Thread(target=one) for _ in range(n)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(got))
"#;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn sts_url() -> String {
    format!("http://127.0.0.1:{STS_PORT}")
}

fn config(roles: &[(&str, &str, &str)], sts: &str, extra: &str) -> String {
    let mut text = format!("conceal:\n  identity:\n    aws:\n      sts_endpoint: {sts}\n{extra}      roles:\n");
    if roles.is_empty() {
        text = text.replace("      roles:\n", "      roles: []\n");
    }
    for (namespace, account, role) in roles {
        text.push_str(&format!(
            "        - namespace: {namespace}\n          service_account: {account}\n          role_arn: \
             arn:aws:iam::{ACCOUNT}:role/{role}\n"
        ));
    }
    text
}

/// Which role STS says the credentials a pod's boto3 got are for; None without any.
fn role_of(node: &IdentityNode, python: &Path, pod: usize) -> Result<Option<String>> {
    let creds = node.python_in_pod(python, pod, BOTO, &[])?;
    let Some(key) = creds["access_key"].as_str() else { return Ok(None) };
    ensure!(creds["method"] == "iam-role", "pod {pod}: credentials from {} (not IMDS)", creds["method"]);
    let (secret, token) = (creds["secret_key"].as_str().unwrap_or(""), creds["token"].as_str().unwrap_or(""));
    let who = node.python_on_host(python, WHOAMI, &[&sts_url(), key, secret, token])?;
    Ok(who["arn"].as_str().map(str::to_owned))
}

fn raw(node: &IdentityNode, python: &Path, pod: usize, paths: &[&str]) -> Result<Vec<(u64, String)>> {
    raw_as(node, python, pod, "v2", paths)
}

fn raw_as(node: &IdentityNode, python: &Path, pod: usize, version: &str, paths: &[&str]) -> Result<Vec<(u64, String)>> {
    let args: Vec<&str> = std::iter::once(version).chain(paths.iter().copied()).collect();
    let out = node.python_in_pod(python, pod, RAW, &args)?;
    let list = out.as_array().context("a list")?;
    Ok(list.iter().map(|r| (r["status"].as_u64().unwrap_or(0), r["body"].as_str().unwrap_or("").to_owned())).collect())
}

fn key_of(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body).ok()?["AccessKeyId"].as_str().map(str::to_owned)
}

fn each_pod_its_own_role(ctx: &mut Ctx) -> Result<()> {
    let python = python()?;
    let roles = [("payments", "api", "payments-api"), ("shop", "web", "shop-web")];
    let pods = [
        ("payments", "api-1", "api"),
        ("payments", "batch-1", "batch"),
        ("other", "api-1", "api"),
        ("payments", "forger", "api"),
    ];
    let node = IdentityNode::build(&ctx.agent_bin, &python, "own", &config(&roles, &sts_url(), ""), &pods)?;
    let (api, batch, other, forger) = (1, 2, 3, 4);
    // The forger's volume holds a token of api-1's: another pod's identity.
    let victim = &node.pods[api];
    node.write_token(&node.pods[forger].uid, &token("payments", &victim.name, &victim.uid, "api"))?;

    let arn = role_of(&node, &python, api)?;
    let expected = format!("arn:aws:sts::{ACCOUNT}:assumed-role/payments-api/payments.api-1");
    ensure!(arn.as_deref() == Some(expected.as_str()), "the mapped pod's credentials are for {arn:?}, not {expected}");
    let listing = raw(&node, &python, api, &[CREDS, "/latest/meta-data/iam/info"])?;
    ensure!(listing[0] == (200, "payments-api".into()), "the mapped pod's listing: {:?}", listing[0]);
    ensure!(listing[1].1.contains(&format!("arn:aws:iam::{ACCOUNT}:role/payments-api")), "iam/info: {:?}", listing[1]);
    // IMDSv1 where the node's IMDS allows it (moto does), the same answers.
    let v1 = raw_as(&node, &python, api, "v1", &[CREDS, &format!("{CREDS}payments-api")])?;
    ensure!(v1[0] == (200, "payments-api".into()) && key_of(&v1[1].1).is_some(), "IMDSv1: {v1:?}");
    for (pod, what) in
        [(batch, "another service account"), (other, "another namespace"), (forger, "a token naming another pod")]
    {
        ensure!(role_of(&node, &python, pod)?.is_none(), "{what}: got credentials");
        let r = raw(&node, &python, pod, &[CREDS, &format!("{CREDS}payments-api")])?;
        ensure!(r.iter().all(|(s, _)| *s == 404), "{what}: the credential paths answered {r:?}, not 404 as concealed");
    }
    let host = node.python_on_host(&python, BOTO, &[])?;
    let pod_key = node.python_in_pod(&python, api, BOTO, &[])?["access_key"].clone();
    ensure!(host["access_key"].is_string() && host["access_key"] != pod_key, "the host got {host}, the pod {pod_key}");
    // One exchange for the one mapped pod (the later WHOAMI is the only other STS request).
    let assumed = node.sts_requests() - 1;
    ensure!(assumed == 1, "moto's STS saw {assumed} exchanges, not 1");

    let records = node.agent().audit_records();
    let served = records.iter().any(|r| {
        r.verdict == "identity"
            && r.pod.as_deref() == Some("api-1")
            && r.namespace.as_deref() == Some("payments")
            && r.role.as_deref() == Some(&format!("arn:aws:iam::{ACCOUNT}:role/payments-api")[..])
            && r.identity_result.as_deref() == Some("served")
    });
    ensure!(served, "no audit record of api-1 getting its role");
    let refused = records.iter().any(|r| {
        r.verdict == "identity"
            && r.pod.as_deref() == Some("forger")
            && r.identity_result.as_deref() == Some("token_refused")
    });
    ensure!(refused, "no audit record of the forger's token being refused");
    ensure!(
        !records.iter().any(|r| r.pod.as_deref() == Some("batch-1") && r.verdict == "identity"),
        "batch-1 audited as identity"
    );
    let served_metric =
        node.metric("metadata_guard_identity_requests_total", &["result=\"served\"", "namespace=\"payments\""])?;
    ensure!(served_metric >= 3.0, "identity_requests_total{{served}} is {served_metric}");
    Ok(())
}

fn refresh_reuse_and_reload(ctx: &mut Ctx) -> Result<()> {
    let python = python()?;
    let roles = [("payments", "api", "payments-api")];
    // Credentials for 15 minutes, renewed when less than 14m55s is left: after 5 s.
    let refresh = "      session_duration: 15m\n      refresh_before: 14m 55s\n";
    let mut node = IdentityNode::build(
        &ctx.agent_bin,
        &python,
        "life",
        &config(&roles, &sts_url(), refresh),
        &[("payments", "api-1", "api")],
    )?;
    let creds = format!("{CREDS}payments-api");
    let first = raw(&node, &python, 1, &[&creds, &creds])?;
    let keys: Vec<Option<String>> = first.iter().map(|(_, b)| key_of(b)).collect();
    ensure!(keys[0].is_some() && keys[0] == keys[1], "two requests at once: {first:?}");
    ensure!(node.sts_requests() == 1, "STS saw {} exchanges for two requests", node.sts_requests());
    std::thread::sleep(Duration::from_secs(6));
    let later = raw(&node, &python, 1, &[&creds])?;
    let renewed = key_of(&later[0].1);
    ensure!(renewed.is_some() && renewed != keys[0], "6 s later the credentials were not renewed: {later:?}");
    ensure!(node.sts_requests() == 2, "STS saw {} exchanges, not 2", node.sts_requests());

    // api-1 goes: its credentials are dropped; web-1 (not mapped) gets its network
    // namespace, so its address.
    ensure!(node.metric("metadata_guard_identity_pods", &[])? == 1.0, "api-1's credentials are not kept");
    let net = node.delete_pod(1)?;
    wait_until(budget(Duration::from_secs(10)), || Ok(node.metric("metadata_guard_identity_pods", &[])? == 0.0))
        .context("the deleted pod's credentials were kept")?;
    let web = node.add_pod_in("payments", "web-1", "web", net)?;
    std::thread::sleep(budget(Duration::from_millis(1500)));
    let r = raw(&node, &python, web, &[CREDS, &creds])?;
    ensure!(r.iter().all(|(s, b)| *s == 404 && key_of(b).is_none()), "the pod at api-1's address got {r:?}");
    ensure!(role_of(&node, &python, web)?.is_none(), "the pod at api-1's address got credentials");

    // A reload that maps web-1's service account to its own role, then one that removes it.
    let both = [("payments", "api", "payments-api"), ("payments", "web", "payments-web")];
    fs::write(&node.config, config(&both, &sts_url(), refresh))?;
    let mapped = |node: &IdentityNode| -> Result<bool> {
        Ok(raw(node, &python, web, &[CREDS])?[0] == (200, "payments-web".into()))
    };
    wait_until(budget(Duration::from_secs(10)), || mapped(&node))?;
    let arn = role_of(&node, &python, web)?;
    let expected = format!("arn:aws:sts::{ACCOUNT}:assumed-role/payments-web/payments.web-1");
    ensure!(arn.as_deref() == Some(expected.as_str()), "after the reload web-1 has {arn:?}");
    fs::write(&node.config, config(&roles, &sts_url(), refresh))?;
    wait_until(budget(Duration::from_secs(10)), || Ok(raw(&node, &python, web, &[CREDS])?[0].0 == 404))?;
    ensure!(role_of(&node, &python, web)?.is_none(), "after the mapping went, web-1 still got credentials");
    Ok(())
}

fn sts_down_then_a_storm(ctx: &mut Ctx) -> Result<()> {
    let python = python()?;
    let roles = [("payments", "api", "payments-api")];
    let pods: Vec<(String, String)> = (1..=8).map(|i| ("payments".to_owned(), format!("api-{i}"))).collect();
    let pods: Vec<(&str, &str, &str)> = pods.iter().map(|(ns, n)| (ns.as_str(), n.as_str(), "api")).collect();
    // Nothing listens on the node's loopback at port 9: STS is unreachable.
    let down = "http://127.0.0.1:9";
    let node = IdentityNode::build(&ctx.agent_bin, &python, "storm", &config(&roles, down, ""), &pods)?;
    let creds = format!("{CREDS}payments-api");
    let r = raw(&node, &python, 1, &[&creds])?;
    let body: serde_json::Value = serde_json::from_str(&r[0].1).with_context(|| format!("not JSON: {r:?}"))?;
    ensure!(r[0].0 == 200 && body["Code"] == "STSUnreachable" && body.get("AccessKeyId").is_none(), "STS down: {r:?}");
    ensure!(role_of(&node, &python, 2)?.is_none(), "STS down: boto3 found credentials");
    let host_key = node.python_on_host(&python, BOTO, &[])?["access_key"].clone();
    ensure!(host_key.is_string(), "the host lost the node's credentials");
    let failed = node.agent().audit_records().iter().any(|r| r.identity_result.as_deref() == Some("sts_error"));
    ensure!(failed, "no audit record of the STS failure");
    ensure!(
        node.metric("metadata_guard_identity_requests_total", &["result=\"sts_error\""])? >= 1.0,
        "sts_error uncounted"
    );

    fs::write(&node.config, config(&roles, &sts_url(), ""))?;
    // The reload is in force once pod 1, whose failure is held for a few seconds, gets
    // its credentials (a listing of the role proves nothing: it needs no STS). The storm
    // is of pods 3 to 8, which have asked for nothing yet.
    wait_until(budget(Duration::from_secs(20)), || {
        let r = raw(&node, &python, 1, &[&creds])?;
        let body = serde_json::from_str::<serde_json::Value>(&r[0].1).unwrap_or_default();
        Ok(r[0].0 == 200 && body.get("AccessKeyId").is_some())
    })?;
    let before = node.sts_requests();
    let ok_before = node.metric("metadata_guard_identity_sts_seconds_count", &["result=\"ok\""])?;
    let storm: Vec<usize> = (3..=8).collect();
    let per_pod = 12;
    let answers: Vec<Result<serde_json::Value>> = std::thread::scope(|scope| {
        let running: Vec<_> = storm
            .iter()
            .map(|&pod| {
                let (node, python, path) = (&node, &python, &creds);
                scope.spawn(move || node.python_in_pod(python, pod, STORM, &[&per_pod.to_string(), path]))
            })
            .collect();
        running
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a storm thread panicked"))))
            .collect()
    });
    let mut all_keys = HashSet::new();
    for (pod, got) in storm.iter().zip(answers) {
        let got = got?;
        let got = got.as_array().context("a list")?;
        ensure!(got.len() == per_pod, "pod {pod}: {} answers", got.len());
        let keys: HashSet<&str> = got.iter().filter_map(|g| g[1].as_str()).collect();
        ensure!(got.iter().all(|g| g[0] == 200) && keys.len() == 1, "pod {pod}: {got:?}");
        ensure!(
            all_keys.insert(keys.into_iter().next().unwrap_or("").to_owned()),
            "pod {pod} shares its key with another pod"
        );
    }
    let exchanges = node.sts_requests() - before;
    ensure!(
        exchanges == storm.len(),
        "{} pods × {per_pod} requests made {exchanges} STS calls, not one per pod",
        storm.len()
    );
    let ok_calls = node.metric("metadata_guard_identity_sts_seconds_count", &["result=\"ok\""])? - ok_before;
    ensure!(ok_calls as usize == storm.len(), "the agent counts {ok_calls} STS calls for the storm");
    Ok(())
}
