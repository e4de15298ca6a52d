//! The command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::ConfigArgs;

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/metadata-guard";

#[derive(Parser)]
#[command(
    name = "metadata-guard",
    version,
    about = "Blocks pods from the cloud instance metadata service, in the kernel",
    long_about = "Blocks pods from the cloud instance metadata service, in the kernel.\n\n\
        Sockets outside the host's network namespace get EPERM when they try a metadata \
        address; host-network processes (kubelet, CNI, cloud agents, hostNetwork pods) keep \
        their access. Enforcement is pinned on bpffs and outlives the agent."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Operational log format on stderr (audit records are separate and always JSON
    /// lines). Colours only when stderr is a terminal.
    #[arg(long, global = true, env = "METADATA_GUARD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load, attach and keep enforcing; write audit records and serve metrics.
    Run(Box<RunArgs>),
    /// Install (or adopt and update) the pinned enforcement `run` would, verify it and
    /// exit: for a node's boot, before the container runtime and kubelet start.
    Apply(Box<EnforceArgs>),
    /// Show what is in the kernel, read from the pins (works without an agent).
    Status {
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        host: HostNetnsArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Detach and unpin everything the guard put in the kernel. Idempotent.
    Uninstall {
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        host: HostNetnsArgs,
    },
    /// List the destination presets: what each blocks and what it leaves open.
    Presets,
    /// Check that this kernel and these privileges can enforce; exit 1 when not.
    Check {
        #[command(flatten)]
        pins: PinArgs,
        #[command(flatten)]
        host: HostNetnsArgs,
        /// The cgroup v2 directory to attach to (default: detected).
        #[arg(long, env = "METADATA_GUARD_CGROUP")]
        cgroup: Option<PathBuf>,
        /// As `run --mount-bpffs`: whether `run` would mount a missing bpffs itself.
        #[arg(long, env = "METADATA_GUARD_MOUNT_BPFFS", default_value_t = true, action = clap::ArgAction::Set)]
        mount_bpffs: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Clone)]
pub struct PinArgs {
    /// bpffs directory for the guard's pinned links and maps.
    #[arg(long, env = "METADATA_GUARD_BPFFS", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Where the host-side table lives (`status`, `uninstall`, `check`).
#[derive(Args)]
pub struct HostNetnsArgs {
    /// The host's network namespace (default: this process's own), e.g. /proc/1/ns/net.
    #[arg(long, env = "METADATA_GUARD_HOST_NETNS")]
    pub host_netns: Option<PathBuf>,
}

/// What `run` and `apply` share: the configuration and where enforcement goes.
#[derive(Args)]
pub struct EnforceArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub pins: PinArgs,
    /// The cgroup v2 directory to attach to (default: /sys/fs/cgroup when it is
    /// cgroup2, else /sys/fs/cgroup/unified). In a pod, mount the host's root.
    #[arg(long, env = "METADATA_GUARD_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Network namespace whose sockets are the host's (default: the agent's own),
    /// e.g. /proc/1/ns/net or /run/netns/node.
    #[arg(long, env = "METADATA_GUARD_HOST_NETNS")]
    pub host_netns: Option<PathBuf>,
    /// How to learn the host namespace's cookie: `auto` uses SO_NETNS_COOKIE when the
    /// kernel has it (5.14+) and the probe program otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub netns_cookie_from: CookieSource,
    /// How the packet backstop tells a host socket's packet from a pod's: `auto` asks
    /// the kernel where its cgroup_skb programs can (bpf_get_netns_cookie, kernels
    /// from 2025) and marks host sockets at creation otherwise; `marks` forces the
    /// marks, `helper` the kernel's answer (failing where the kernel has none).
    #[arg(long, value_enum, default_value = "auto")]
    pub packet_netns_from: PacketNetnsSource,
    /// Mount bpffs on the parent of --bpffs when it is missing. Set to false in a
    /// container: a mount made there dies with the container, and the pins with it.
    #[arg(long, env = "METADATA_GUARD_MOUNT_BPFFS", default_value_t = true, action = clap::ArgAction::Set)]
    pub mount_bpffs: bool,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub enforce: EnforceArgs,
    /// Remove enforcement when the agent exits (development only: in production the
    /// block must outlive the agent).
    #[arg(long)]
    pub detach_on_exit: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CookieSource {
    Auto,
    Sockopt,
    Probe,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PacketNetnsSource {
    Auto,
    Helper,
    Marks,
}

/// Runs one command; the exit code for a command that ran (a failed `check` is 1).
pub fn dispatch(command: Command) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;

    use crate::{hostside, loader, policy, preflight};
    match command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async {
                // First, so that a signal during start-up is queued, not fatal.
                let signals = crate::supervise::Signals::install()?;
                crate::run::run(*args, signals).await
            })?;
        }
        Command::Apply(args) => crate::apply::apply(&args)?,
        Command::Status { pins, host, json } => {
            let mut status = loader::status::read(&pins.bpffs)?;
            if let Some(conceal) = status.conceal.as_mut() {
                loader::status_conceal::check_listening(conceal, host.host_netns.as_deref());
            }
            let host_side = hostside::status(host.host_netns.as_deref())?;
            // Enforcement is the pinned programs and the table together.
            if status.installed && host_side.unreadable.is_none() && !host_side.installed {
                status.enforcing = false;
                status.problems.push(format!(
                    "the host-side table `{}` is missing from the host network namespace: packets entering the \
                     node (AF_PACKET frames, Service addresses DNATed to a metadata address) are not judged there; \
                     a running agent restores it within seconds, without one run `metadata-guard apply`",
                    host_side.table
                ));
            }
            if status.installed && host_side.dormant {
                status.enforcing = false;
                status.problems.push(hostside::dormant_problem());
            }
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
        Command::Check { pins, host, cgroup, mount_bpffs, json } => {
            let mut checks =
                preflight::run(&preflight::Inputs { cgroup: cgroup.as_deref(), bpffs: &pins.bpffs, mount_bpffs });
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
