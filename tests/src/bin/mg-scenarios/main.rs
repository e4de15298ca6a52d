// SPDX-License-Identifier: Apache-2.0
//! mg-scenarios: metadata-guard's real-kernel scenarios, as one self-contained
//! program (no tools beyond itself and the agent binary), so the very same scenarios
//! run on this machine and inside a VM with another kernel.
//!
//! Usage: mg-scenarios [--agent PATH] [--variant-agent PATH] [--filter TEXT] [--list]
//! (`--help` for all). Needs root. Without root it skips loudly, unless CI=true, where it fails.

mod attempt;
mod backstop;
mod backstop_source_route;
mod block;
mod boot;
mod conceal;
mod conceal_grammar;
mod conceal_moto;
mod conceal_nat;
mod conceal_tokens;
mod conceal_without_agent;
mod frames;
mod harness;
mod health;
mod hostside;
mod hostside_bridge;
mod hostside_flush;
mod hostside_forward;
mod hostside_health;
mod hostside_ipvs;
mod hostside_pods;
mod hostside_source_route;
mod identity;
mod identity_node;
mod lifecycle;
mod neighbour;
mod packets;
mod policy;
mod protocols;
mod raw;
mod trail;
mod uplink;
mod uplink_ops;
mod uplink_order;
mod uplink_replies;
mod uplink_world;

use metadata_guard_tests::{agent, gate, node, reexec};

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::Parser;
use harness::Ctx;

type Scenario = (&'static str, fn(&mut Ctx) -> Result<()>);

fn scenarios(without_python: bool, without_ipvs: bool, without_ipvlan: bool) -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(block::SCENARIOS);
    all.extend(backstop::SCENARIOS);
    all.extend(backstop_source_route::SCENARIOS);
    all.extend(protocols::SCENARIOS);
    all.extend(policy::SCENARIOS);
    all.extend(trail::SCENARIOS);
    all.extend(lifecycle::SCENARIOS);
    all.extend(health::SCENARIOS);
    all.extend(boot::SCENARIOS);
    all.extend(conceal::SCENARIOS);
    all.extend(conceal_without_agent::SCENARIOS);
    all.extend(conceal_tokens::SCENARIOS);
    all.extend(conceal_grammar::SCENARIOS);
    all.extend(conceal_nat::SCENARIOS);
    // Real SDK clients need Python (the VM guests carry one: `--python`).
    if !without_python {
        all.extend(conceal_moto::SCENARIOS);
        all.extend(identity::SCENARIOS);
    }
    all.extend(hostside::SCENARIOS);
    all.extend(hostside_pods::SCENARIOS);
    all.extend(hostside_bridge::SCENARIOS);
    all.extend(hostside_forward::SCENARIOS);
    all.extend(hostside_health::SCENARIOS);
    all.extend(hostside_flush::SCENARIOS);
    all.extend(hostside_source_route::SCENARIOS);
    // Kernels built without IPVS (this project's own development kernel) cannot run it;
    // Debian's, in the VM matrix, do.
    if !without_ipvs {
        all.extend(hostside_ipvs::SCENARIOS);
        all.extend(conceal_nat::IPVS_SCENARIOS);
    }
    all.extend(uplink::SCENARIOS);
    all.extend(uplink_ops::SCENARIOS);
    all.extend(uplink_order::SCENARIOS);
    all.extend(uplink_replies::SCENARIOS);
    // Likewise ipvlan: missing here, in every guest of the VM matrix.
    if !without_ipvlan {
        all.extend(uplink::IPVLAN_SCENARIOS);
    }
    all
}

/// metadata-guard's real-kernel scenarios on a simulated node. Needs root.
#[derive(Parser)]
#[command(name = "mg-scenarios")]
struct Args {
    /// The agent under test (default: `metadata-guard` beside this program).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// A build of the agent with the harmless test-variant programs (upgrade scenarios).
    #[arg(long)]
    variant_agent: Option<PathBuf>,
    /// Run only the scenarios whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// List the (selected) scenarios instead of running them.
    #[arg(long)]
    list: bool,
    /// Check /metrics in-process instead of with promtool (for a VM without it).
    #[arg(long)]
    without_promtool: bool,
    /// Leave out the scenarios that run real Python SDK clients (for a machine without Python).
    #[arg(long, conflicts_with = "python")]
    without_python: bool,
    /// The Python interpreter of the real-SDK scenarios; it must import moto (with its
    /// server) and boto3. Default: a virtualenv made under target/ on first use.
    #[arg(long, value_name = "PATH")]
    python: Option<PathBuf>,
    /// Leave out the scenarios that need the kernel's IPVS (for a kernel built without it).
    #[arg(long)]
    without_ipvs: bool,
    /// Leave out the scenarios that need the kernel's ipvlan (for a kernel built without it).
    #[arg(long)]
    without_ipvlan: bool,
    /// Multiply every timing budget (e.g. 10 under software emulation).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    time_scale: u32,
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    reexec::run_role(
        "mg-scenarios",
        &argv,
        &[
            ("attempt", |args| attempt::child_main(reexec::first(args))),
            ("conceal-client", |args| conceal::client_main(reexec::first(args))),
        ],
    );
    match real_main() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("mg-scenarios: error: {e:#}");
            std::process::exit(2);
        }
    }
}

fn real_main() -> Result<bool> {
    let args = Args::parse();
    let selected: Vec<Scenario> = scenarios(args.without_python, args.without_ipvs, args.without_ipvlan)
        .into_iter()
        .filter(|(name, _)| args.filter.as_deref().is_none_or(|f| name.contains(f)))
        .collect();
    if args.list {
        for (name, _) in &selected {
            println!("{name}");
        }
        return Ok(true);
    }
    if !gate::is_root() {
        eprintln!("mg-scenarios: the real-kernel scenarios need root (they load BPF and make namespaces)");
        if gate::ci() {
            bail!("CI=true: refusing to skip {} kernel scenarios; run as root", selected.len());
        }
        println!("scenarios: 0 passed, 0 failed, {} skipped", selected.len());
        return Ok(true);
    }
    let agent = match args.agent {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("metadata-guard"),
    };
    if !agent.exists() {
        bail!("no agent binary at {}; build it with `cargo xtask build` or pass --agent", agent.display());
    }
    let started = Instant::now();
    let mut ctx = Ctx::new(agent, args.variant_agent.clone())?;
    ctx.without_promtool = args.without_promtool;
    harness::set_time_scale(args.time_scale);
    if let Some(python) = args.python {
        conceal_moto::set_python(python);
    }
    eprintln!("mg-scenarios: simulated node ready in {:?}", started.elapsed());
    let (mut passed, mut failed) = (0, 0);
    for (name, scenario) in &selected {
        let t = Instant::now();
        let result = ctx.before_scenario().and_then(|()| scenario(&mut ctx)).and_then(|()| ctx.after_scenario());
        match result {
            Ok(()) => {
                passed += 1;
                println!("ok   {name} ({})", millis(t.elapsed()));
            }
            Err(e) => {
                failed += 1;
                println!("FAIL {name} ({}): {e:#}", millis(t.elapsed()));
                ctx.recover();
            }
        }
    }
    drop(ctx);
    println!("scenarios: {passed} passed, {failed} failed");
    Ok(failed == 0)
}

fn millis(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}
