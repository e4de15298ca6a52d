//! mg-scenarios: metadata-guard's real-kernel scenarios, as one self-contained
//! program (no tools beyond itself and the agent binary), so the very same scenarios
//! run on this machine and inside a VM with another kernel.
//!
//! Usage: mg-scenarios --agent PATH [--variant-agent PATH] [--filter TEXT] [--list]
//! Needs root. Without root it skips loudly, unless CI=true, where it fails.

mod agent;
mod attempt;
mod backstop;
mod block;
mod harness;
mod hostside;
mod hostside_forward;
mod hostside_pods;
mod lifecycle;
mod neighbour;
mod node;
mod packets;
mod policy;
mod raw;
mod trail;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use harness::Ctx;

type Scenario = (&'static str, fn(&mut Ctx) -> Result<()>);

fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    all.extend(block::SCENARIOS);
    all.extend(backstop::SCENARIOS);
    all.extend(policy::SCENARIOS);
    all.extend(trail::SCENARIOS);
    all.extend(lifecycle::SCENARIOS);
    all.extend(hostside::SCENARIOS);
    all.extend(hostside_pods::SCENARIOS);
    all.extend(hostside_forward::SCENARIOS);
    all
}

struct Args {
    agent: PathBuf,
    variant_agent: Option<PathBuf>,
    filter: Option<String>,
    list: bool,
    /// Check /metrics in-process instead of with promtool (for a VM without it).
    without_promtool: bool,
    /// Multiply every timing budget (e.g. 10 under software emulation).
    time_scale: u32,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        agent: PathBuf::new(),
        variant_agent: None,
        filter: None,
        list: false,
        without_promtool: false,
        time_scale: 1,
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--agent" => args.agent = it.next().context("--agent needs a path")?.into(),
            "--variant-agent" => args.variant_agent = Some(it.next().context("--variant-agent needs a path")?.into()),
            "--filter" => args.filter = Some(it.next().context("--filter needs text")?),
            "--list" => args.list = true,
            "--without-promtool" => args.without_promtool = true,
            "--time-scale" => {
                args.time_scale = it.next().and_then(|v| v.parse().ok()).filter(|&v| v > 0).context("--time-scale needs a factor")?
            }
            other => bail!("unknown argument {other}; usage: mg-scenarios --agent PATH [--variant-agent PATH] [--filter TEXT] [--list] [--without-promtool] [--time-scale N]"),
        }
    }
    if args.agent.as_os_str().is_empty() && !args.list {
        let sibling = std::env::current_exe()?.with_file_name("metadata-guard");
        args.agent = sibling;
    }
    Ok(args)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(metadata_guard_tests::sandbox::SANDBOX_ARG) {
        if let Err(e) = metadata_guard_tests::sandbox::child_main(&argv[2..]) {
            eprintln!("sandbox: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    if argv.get(1).map(String::as_str) == Some("attempt") {
        if let Err(e) = attempt::child_main(argv.get(2).map(String::as_str).unwrap_or("")) {
            eprintln!("attempt: {e:#}");
            std::process::exit(2);
        }
        return;
    }
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
    let args = parse_args()?;
    let selected: Vec<Scenario> =
        scenarios().into_iter().filter(|(name, _)| args.filter.as_deref().is_none_or(|f| name.contains(f))).collect();
    if args.list {
        for (name, _) in &selected {
            println!("{name}");
        }
        return Ok(true);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        eprintln!("mg-scenarios: the real-kernel scenarios need root (they load BPF and make namespaces)");
        if ci {
            bail!("CI=true: refusing to skip {} kernel scenarios; run as root", selected.len());
        }
        println!("scenarios: 0 passed, 0 failed, {} skipped", selected.len());
        return Ok(true);
    }
    if !args.agent.exists() {
        bail!("no agent binary at {}; build it with `cargo xtask build` or pass --agent", args.agent.display());
    }
    let started = Instant::now();
    let mut ctx = Ctx::new(args.agent.clone(), args.variant_agent.clone())?;
    ctx.without_promtool = args.without_promtool;
    harness::set_time_scale(args.time_scale);
    eprintln!("mg-scenarios: simulated node ready in {:?}", started.elapsed());
    let (mut passed, mut failed) = (0, 0);
    for (name, scenario) in &selected {
        let t = Instant::now();
        let result = scenario(&mut ctx).and_then(|()| ctx.after_scenario());
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
