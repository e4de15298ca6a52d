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
}

#[derive(Subcommand)]
pub enum Command {
    /// Load, attach and keep enforcing; write audit records and serve metrics.
    Run(Box<RunArgs>),
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

#[derive(Args)]
pub struct RunArgs {
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
    /// Mount bpffs on the parent of --bpffs when it is missing. Set to false in a
    /// container: a mount made there dies with the container, and the pins with it.
    #[arg(long, env = "METADATA_GUARD_MOUNT_BPFFS", default_value_t = true, action = clap::ArgAction::Set)]
    pub mount_bpffs: bool,
    /// Remove enforcement when the agent exits (development only: in production the
    /// block must outlive the agent).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Operational log format (audit records are separate and always JSON lines).
    #[arg(long, env = "METADATA_GUARD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
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
