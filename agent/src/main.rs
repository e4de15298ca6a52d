//! metadata-guard: blocks pods from the cloud instance metadata service, in the kernel.
//!
//! Data flow, one module per step: config → policy → loader (maps, links, pins) →
//! kernel verdict (ebpf/) → events → pod identity → audit / metrics and probes.

mod allowlist;
mod attempt;
mod audit;
mod cgroup;
mod cli;
mod config;
mod events;
mod hostside;
mod kubepods_watch;
mod loader;
mod metrics;
mod pod_identity;
mod policy;
mod preflight;
mod probes;
mod run;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Run(args) => args.log_format,
        _ => LogFormat::Text,
    };
    init_logging(log_format);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("metadata-guard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(run::run(*args))?;
        }
        Command::Status { pins, host, json } => {
            let status = loader::status::read(&pins.bpffs)?;
            let host_side = hostside::status(host.host_netns.as_deref())?;
            if json {
                let mut value = serde_json::to_value(&status)?;
                value["host_side"] = serde_json::to_value(&host_side)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                loader::status::print_human(&status);
                hostside::print_status(&host_side);
            }
        }
        Command::Uninstall { pins, host } => {
            let removed = loader::uninstall(&pins.bpffs)?;
            match hostside::uninstall(host.host_netns.as_deref())? {
                hostside::Removal::Removed => println!("removed the host-side table `inet {}`", hostside::TABLE),
                hostside::Removal::NotThere => {}
                hostside::Removal::NotPermitted(why) => eprintln!(
                    "metadata-guard: warning: the host-side table `inet {}` was not checked: {why}; run uninstall \
                     in the host network namespace with CAP_NET_ADMIN to remove it",
                    hostside::TABLE
                ),
            }
            if removed.is_empty() {
                println!("nothing to remove under {}: the guard is not installed", pins.bpffs.display());
            }
            for dir in removed {
                println!("removed {} (links detached, maps unpinned)", dir.display());
            }
        }
        Command::Presets => {
            for preset in policy::Preset::ALL {
                println!("{}\n  {}", preset.name(), preset.describe());
                for rule in preset.rules() {
                    println!("    block {rule}");
                }
            }
        }
        Command::Check { pins, host, cgroup, json } => {
            let mut checks = preflight::run(&preflight::Inputs { cgroup: cgroup.as_deref(), bpffs: &pins.bpffs });
            checks.push(preflight::Check::host_side(hostside::check(host.host_netns.as_deref())));
            if json {
                println!("{}", serde_json::to_string_pretty(&checks)?);
            } else {
                preflight::print_human(&checks);
            }
            if preflight::has_failure(&checks) {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Operational logs go to stderr; stdout is reserved for audit records.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("METADATA_GUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
