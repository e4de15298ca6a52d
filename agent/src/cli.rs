// SPDX-License-Identifier: Apache-2.0
//! The command line: clap's definitions, and dispatch to [`crate::commands`].

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};

use crate::{
    commands,
    config::ConfigArgs,
    enforce,
    loader::{uplink::TcAttach, Backstop, Mechanism},
    logging::{self, LogFormat},
    preflight,
    uplink::UplinkSpec,
};

pub(crate) const DEFAULT_BPFFS: &str = "/sys/fs/bpf/metadata-guard";

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
    command: Command,
    /// Operational log format on stderr (audit records are separate and always JSON
    /// lines). Colours only when stderr is a terminal.
    #[arg(long, global = true, env = "METADATA_GUARD_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

impl Cli {
    /// Operational logs to stderr, in the format asked for.
    pub fn init_logging(&self) {
        logging::init(self.log_format);
    }

    /// Runs the command; the exit code for a command that ran (a failed `check` is 1).
    pub fn dispatch(self) -> anyhow::Result<ExitCode> {
        dispatch(self.command)
    }
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
pub(crate) struct PinArgs {
    /// bpffs directory for the guard's pinned links and maps.
    #[arg(long, env = "METADATA_GUARD_BPFFS", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Where the host-side table lives (`status`, `uninstall`, `check`).
#[derive(Args)]
pub(crate) struct HostNetnsArgs {
    /// The host's network namespace (default: this process's own), e.g. /proc/1/ns/net.
    #[arg(long, env = "METADATA_GUARD_HOST_NETNS")]
    pub host_netns: Option<PathBuf>,
}

/// What `run` and `apply` share: the configuration and where enforcement goes.
#[derive(Args)]
pub(crate) struct EnforceArgs {
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
    /// The devices packets leave the node through, where the uplink program judges
    /// every packet to a blocked destination whatever datapath brought it (tc egress):
    /// `auto` (NICs, bonds, VLANs, macvlan/ipvlan lower devices, any device with a
    /// route to a blocked destination; followed as devices come and go), `none`, or a
    /// comma-separated list of interfaces of the host network namespace.
    #[arg(long, env = "METADATA_GUARD_UPLINKS", default_value = "auto", value_parser = UplinkSpec::parse)]
    pub uplinks: UplinkSpec,
    /// How the uplink program sits on a device: `auto` uses tcx links on kernels 6.6+
    /// and a clsact qdisc with a cls_bpf filter before them.
    #[arg(long, env = "METADATA_GUARD_UPLINK_ATTACH", value_enum, default_value = "auto")]
    pub uplink_attach: UplinkAttach,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum UplinkAttach {
    Auto,
    Tcx,
    Clsact,
}

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub enforce: EnforceArgs,
    /// Remove enforcement when the agent exits (development only: in production the
    /// block must outlive the agent).
    #[arg(long)]
    pub detach_on_exit: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum CookieSource {
    Auto,
    Sockopt,
    Probe,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PacketNetnsSource {
    Auto,
    Helper,
    Marks,
}

impl EnforceArgs {
    /// What `run` and `apply` install, as the enforcement code takes it.
    fn request(&self) -> enforce::Request {
        enforce::Request {
            config: self.config.clone(),
            bpffs: self.pins.bpffs.clone(),
            cgroup: self.cgroup.clone(),
            host_netns: self.host_netns.clone(),
            netns_cookie_from: match self.netns_cookie_from {
                CookieSource::Auto => None,
                CookieSource::Sockopt => Some(Mechanism::SoNetnsCookie),
                CookieSource::Probe => Some(Mechanism::ProbeProgram),
            },
            packet_netns_from: match self.packet_netns_from {
                PacketNetnsSource::Auto => None,
                PacketNetnsSource::Helper => Some(Backstop::NetnsHelper),
                PacketNetnsSource::Marks => Some(Backstop::SocketMarks),
            },
            mount_bpffs: self.mount_bpffs,
            uplinks: self.uplinks.clone(),
            uplink_attach: match self.uplink_attach {
                UplinkAttach::Auto => TcAttach::detect(),
                UplinkAttach::Tcx => TcAttach::Tcx,
                UplinkAttach::Clsact => TcAttach::Clsact,
            },
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => commands::run::run(args.enforce.request(), args.detach_on_exit)?,
        Command::Apply(args) => commands::apply::apply(&args.request())?,
        Command::Status { pins, host, json } => {
            commands::status::status(&pins.bpffs, host.host_netns.as_deref(), json)?;
        }
        Command::Uninstall { pins, host } => commands::uninstall::uninstall(&pins.bpffs, host.host_netns.as_deref())?,
        Command::Presets => commands::presets::presets(),
        Command::Check { pins, host, cgroup, mount_bpffs, json } => {
            let inputs = preflight::Inputs { cgroup: cgroup.as_deref(), bpffs: &pins.bpffs, mount_bpffs };
            if !commands::check::check(&inputs, host.host_netns.as_deref(), json)? {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
