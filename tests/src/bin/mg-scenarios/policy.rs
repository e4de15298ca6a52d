// SPDX-License-Identifier: Apache-2.0
//! Destination policy: each preset blocks what it lists and nothing else, and the pod
//! allowlist lets the chosen pods through while their neighbours stay blocked.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::{
    attempt::Kind,
    harness::{budget, wait_until, Ctx, Who},
    node::Layout,
};

pub(crate) const SCENARIOS: [crate::Scenario; 4] = [
    ("policy: each preset blocks what it lists and leaves its neighbours and DNS open", presets_block_what_they_list),
    ("policy: an allowlisted pod is served while its neighbour in the namespace is refused", allowlisted_pod_served),
    (
        "policy: a new allowlisted container is let through within 100 ms of its cgroup appearing",
        allowlist_follows_new_pods,
    ),
    ("policy: churn of 200 pods leaves the allowlist and the agent's memory where they started", churn_leaves_no_trace),
];

/// (preset, blocked destinations, open destinations), as "address:port" over UDP.
const PRESETS: [(&str, &[&str], &[&str]); 9] = [
    (
        "default",
        &[
            "169.254.169.254:80",
            "[fd00:ec2::254]:80",
            "100.100.100.200:80",
            "169.254.0.23:80",
            "192.0.0.192:80",
            "168.63.129.16:80",
        ],
        &["169.254.169.254:53", "168.63.129.16:53", "169.254.170.2:80", "169.254.170.23:80", "169.254.169.253:80"],
    ),
    (
        "aws",
        &["169.254.169.254:80", "[fd00:ec2::254]:80"],
        &["169.254.170.23:80", "169.254.170.2:80", "169.254.169.254:53", "100.100.100.200:80"],
    ),
    ("aws-ecs", &["169.254.169.254:80", "169.254.170.2:80"], &["169.254.170.23:80", "169.254.169.253:80"]),
    ("gcp", &["169.254.169.254:80"], &["169.254.169.254:53", "[fd00:ec2::254]:80", "100.100.100.200:80"]),
    (
        "azure",
        &["169.254.169.254:80", "168.63.129.16:80"],
        &["168.63.129.16:53", "169.254.169.254:53", "[fd00:ec2::254]:80"],
    ),
    ("alibaba", &["100.100.100.200:80", "100.100.100.200:53"], &["169.254.169.254:80"]),
    ("tencent", &["169.254.0.23:80", "169.254.0.23:53"], &["169.254.169.254:80", "100.100.100.200:80"]),
    ("oracle", &["169.254.169.254:80", "192.0.0.192:80"], &["169.254.169.254:53", "100.100.100.200:80"]),
    ("openstack", &["169.254.169.254:80"], &["169.254.169.254:53", "192.0.0.192:80", "169.254.169.253:80"]),
];

fn split(target: &str) -> Result<(String, u16)> {
    let addr: std::net::SocketAddr = target.parse().with_context(|| format!("bad target {target}"))?;
    Ok((addr.ip().to_string(), addr.port()))
}

fn presets_block_what_they_list(ctx: &mut Ctx) -> Result<()> {
    for (preset, blocked, open) in PRESETS {
        ctx.ensure_agent(&["--preset", preset])?;
        for target in blocked {
            let (ip, port) = split(target)?;
            ctx.expect_refused(Who::Pod(0), Kind::UdpSendto, &ip, port, false)
                .with_context(|| format!("preset {preset}"))?;
        }
        for target in open {
            let (ip, port) = split(target)?;
            ctx.expect_served(Who::Pod(0), Kind::UdpSendto, &ip, port, false)
                .with_context(|| format!("preset {preset}"))?;
        }
    }
    Ok(())
}

fn allowlisted_pod_served(ctx: &mut Ctx) -> Result<()> {
    let config = ctx.allow_api_pods_config("allow.yaml")?;
    ctx.ensure_agent(&["--config", &config])?;
    let api = ctx.node.pod_index("payments", "api-5f6c8")?;
    let ledger = ctx.node.pod_index("payments", "ledger-9k2x1")?;
    wait_until(Duration::from_secs(3), || {
        Ok(ctx.try_once(Who::Pod(api), Kind::UdpSendto, "169.254.169.254", 80, false)?.ok == 1)
    })
    .context("the allowlisted pod was never let through")?;
    ctx.expect_served(Who::Pod(api), Kind::Http, "169.254.169.254", 80, false)?;
    ctx.expect_refused(Who::Pod(ledger), Kind::Http, "169.254.169.254", 80, false)?;
    ctx.expect_refused(Who::Pod(0), Kind::Http, "169.254.169.254", 80, false)
}

fn allowlisted_ids(ctx: &Ctx) -> Result<Vec<u64>> {
    let status = ctx.status()?;
    Ok(status.allowlisted_cgroups)
}

fn allowlist_follows_new_pods(ctx: &mut Ctx) -> Result<()> {
    let config = ctx.allow_api_pods_config("allow.yaml")?;
    ctx.ensure_agent(&["--config", &config])?;
    let started = Instant::now();
    let pod = ctx.node.kubelet_pod("payments", "api-new", Layout::SystemdContainerd, 9001)?;
    let id = pod.id();
    wait_until(Duration::from_secs(2), || Ok(allowlisted_ids(ctx)?.contains(&id)))?;
    // Measured from just before the cgroup was made; includes one `status` run.
    let took = started.elapsed();
    let limit = budget(Duration::from_millis(100));
    ensure!(took <= limit, "the new container was allowlisted {took:?} after its cgroup appeared (limit {limit:?})");
    drop(pod);
    wait_until(Duration::from_secs(3), || Ok(!allowlisted_ids(ctx)?.contains(&id)))
        .context("the removed container stayed in the allowlist")?;
    Ok(())
}

const CHURN: u32 = 200;

fn churn_leaves_no_trace(ctx: &mut Ctx) -> Result<()> {
    let config = ctx.allow_api_pods_config("allow.yaml")?;
    ctx.ensure_agent(&["--config", &config])?;
    // The first sync is done once the node's allowlisted pod is in the kernel's list.
    let api = ctx.node.pod_index("payments", "api-5f6c8")?;
    let api_id = ctx.node.pods[api].cgroup.id();
    wait_until(budget(Duration::from_secs(2)), || Ok(allowlisted_ids(ctx)?.contains(&api_id)))
        .context("the allowlisted pod never reached the kernel's allowlist")?;
    let baseline = allowlisted_ids(ctx)?.len();
    let rss_before = ctx.agent()?.peak_rss_kib().context("no RSS")?;
    let pods: Vec<_> = (0..CHURN)
        .map(|n| ctx.node.kubelet_pod("payments", &format!("api-churn-{n}"), Layout::SystemdContainerd, 10_000 + n))
        .collect::<Result<_>>()?;
    // Each pod brings two cgroups: the pod's own and its container's.
    let full = baseline + 2 * CHURN as usize;
    wait_until(Duration::from_secs(5), || Ok(allowlisted_ids(ctx)?.len() == full)).with_context(|| {
        format!("not every churned pod was allowlisted: {} of {full}", allowlisted_ids(ctx).map_or(0, |v| v.len()))
    })?;
    drop(pods);
    wait_until(Duration::from_secs(5), || Ok(allowlisted_ids(ctx)?.len() == baseline))
        .context("the allowlist did not shrink back after the pods went")?;
    let rss_after = ctx.agent()?.peak_rss_kib().context("no RSS")?;
    ensure!(
        rss_after < rss_before + 16 * 1024,
        "the agent grew from {rss_before} KiB to {rss_after} KiB over the churn"
    );
    Ok(())
}
