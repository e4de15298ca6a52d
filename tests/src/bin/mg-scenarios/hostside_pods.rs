// SPDX-License-Identifier: Apache-2.0
//! The host side knows pods by the host end of their interface: an allowlisted pod
//! passes it on every path, and its refusals name the pod in the audit trail.

use std::{net::IpAddr, time::Duration};

use anyhow::{ensure, Result};
use metadata_guard_tests::{
    nat::Dnat,
    world::{AZURE_WIRESERVER, IMDS_V4, IMDS_V6},
};

use crate::{
    attempt::Kind,
    harness::{Ctx, Who},
    hostside::{host_status, syn_from_pod, SETTLE, VIRTUAL_IP},
};

pub(crate) const SCENARIOS: [crate::Scenario; 2] = [
    ("hostside: an allowlisted pod passes on every path (AF_PACKET, DNAT), its neighbour does not", allowlisted_pod),
    ("hostside: a refusal in the node is audited with hook host, naming the pod and its address", refusal_names_pod),
];

fn allowlisted_pod(ctx: &mut Ctx) -> Result<()> {
    let IpAddr::V4(wireserver) = AZURE_WIRESERVER else { unreachable!() };
    let _dnat = Dnat::add(ctx.node.sim.node(), &[(VIRTUAL_IP, wireserver, None)])?;
    let config = ctx.allow_api_pods_config("hostside-allow.yaml")?;
    ctx.ensure_agent(&["--config", &config])?;
    let api = ctx.node.pod_index("payments", "api-5f6c8")?;
    let ledger = ctx.node.pod_index("payments", "ledger-9k2x1")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while host_status(ctx)?.allowed_interfaces != 1 {
        ensure!(std::time::Instant::now() < deadline, "the allowlisted pod's interface never reached the table");
        std::thread::sleep(Duration::from_millis(50));
    }
    let exempt_before = host_status(ctx)?.exempt_packets;
    for (n, dest) in [IMDS_V4, IMDS_V6].into_iter().enumerate() {
        let (arrived, answered) = syn_from_pod(ctx, api, dest, 45000 + n as u16)?;
        ensure!(arrived >= 1 && answered, "{dest}: the allowlisted pod's AF_PACKET SYN was stopped");
        let (arrived, answered) = syn_from_pod(ctx, ledger, dest, 45010 + n as u16)?;
        ensure!(arrived == 0 && !answered, "{dest}: the neighbour's AF_PACKET SYN got through");
    }
    let vip = VIRTUAL_IP.to_string();
    ctx.expect_served(Who::Pod(api), Kind::Http, &vip, 80, false)?;
    let before = ctx.node.standin.arrivals();
    let out = ctx.try_once(Who::Pod(ledger), Kind::Http, &vip, 80, false)?;
    std::thread::sleep(SETTLE);
    ensure!(out.ok == 0 && ctx.node.standin.arrivals() == before, "the neighbour reached the WireServer via DNAT");
    let exempt = host_status(ctx)?.exempt_packets;
    ensure!(exempt > exempt_before, "exempt packets are not counted: {exempt_before} → {exempt}");
    Ok(())
}

fn refusal_names_pod(ctx: &mut Ctx) -> Result<()> {
    ctx.default_agent()?;
    let pod = &ctx.node.pods[0];
    let (name, container, source) = (pod.name.clone(), pod.container.clone(), pod.net.ipv4.to_string());
    syn_from_pod(ctx, 0, IMDS_V4, 46000)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let records = ctx.agent()?.audit_records();
        let found = records.iter().find(|r| r.hook == "host" && r.verdict == "blocked");
        if let Some(r) = found {
            ensure!(
                r.pod.as_deref() == Some(name.as_str()) && r.container.as_deref() == Some(container.as_str()),
                "not named: {r:?}"
            );
            let from = r.source.map(|s| s.to_string());
            ensure!(from.as_deref() == Some(source.as_str()) && r.port == 80 && r.protocol == "tcp", "{r:?}");
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "no audit record with hook host: {records:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
