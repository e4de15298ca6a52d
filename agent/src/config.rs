// SPDX-License-Identifier: Apache-2.0
//! The agent's configuration: a YAML file, flags and environment variables, resolved
//! into one checked [`Config`].
//!
//! Precedence is flag or environment variable, then the file, then the built-in
//! default. [`load`] runs at start and again on every reload, and checks everything a
//! later step could trip on (the policy included), so a loaded [`Config`] can always be
//! applied and a bad edit leaves the running one in force.

mod conceal;
mod file;
pub(crate) mod identity;
mod values;

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use clap::{builder::PossibleValue, ValueEnum};
use ipnet::IpNet;
use metadata_guard_common::{MODE_AUDIT, MODE_CONCEAL, MODE_ENFORCE};
use serde::Deserialize;

#[cfg(test)]
pub(crate) use self::conceal::known_metadata_tree;
pub(crate) use self::conceal::{is_aws_date, ConcealConfig, ExtraPaths};
use self::identity::DEFAULT_KUBELET_DIR;
use crate::audit::{AuditSettings, AuditSettingsError};
use crate::policy::{compile, parse_cidr, AllowRule, BlockRule, CompiledPolicy, PolicyError, Preset};

const DEFAULT_POD_LOGS_DIR: &str = "/var/log/pods";
const DEFAULT_CONTAINER_LOGS_DIR: &str = "/var/log/containers";
const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 9965));

/// What the kernel does when a pod tries a blocked destination.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// Refuse the connection or datagram (EPERM) and record it.
    #[default]
    Enforce,
    /// Let it through and record it, to see what enforcing would break.
    Audit,
    /// Like enforce, but a pod's HTTP requests to the metadata service go through the
    /// agent's filtering proxy (--conceal-addr): harmless paths pass, credentials not.
    Conceal,
}

impl Mode {
    pub(crate) fn as_kernel(self) -> u32 {
        match self {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
            Mode::Conceal => MODE_CONCEAL,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
            Mode::Conceal => "conceal",
        }
    }
}

impl ValueEnum for Preset {
    fn value_variants<'a>() -> &'a [Self] {
        &Preset::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}

/// Flags and environment variables of `metadata-guard run` that override the file.
/// Each is optional (or empty) when not given, so the file's value can show through.
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct ConfigArgs {
    /// YAML config file, re-read on SIGHUP and whenever it changes. Flags and
    /// environment variables take precedence over its values.
    #[arg(long, env = "METADATA_GUARD_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// enforce: pods get EPERM from blocked destinations. audit: they get through,
    /// and every attempt is recorded [default: enforce].
    #[arg(long, env = "METADATA_GUARD_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// Block a preset's metadata destinations (repeatable, or comma-separated).
    /// --preset and --block replace the config file's destinations entirely
    /// [default: default].
    #[arg(long = "preset", env = "METADATA_GUARD_PRESETS", value_name = "NAME", value_enum, value_delimiter = ',')]
    pub presets: Vec<Preset>,
    /// Block every protocol and port of an address or CIDR (repeatable). --preset and
    /// --block replace the config file's destinations entirely.
    #[arg(long = "block", value_name = "CIDR", value_parser = parse_cidr)]
    pub block: Vec<IpNet>,
    /// This node's Kubernetes name, written into audit records [default: the hostname].
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Where the kubelet keeps pod logs; pods are identified from its layout
    /// [default: /var/log/pods].
    #[arg(long, value_name = "DIR")]
    pub pod_logs_dir: Option<PathBuf>,
    /// Where the kubelet links container logs [default: /var/log/containers].
    #[arg(long, value_name = "DIR")]
    pub container_logs_dir: Option<PathBuf>,
    /// Where the kubelet keeps its state; conceal mode's identities read each pod's
    /// service-account token from its pods/ directory [default: /var/lib/kubelet].
    #[arg(long, value_name = "DIR")]
    pub kubelet_dir: Option<PathBuf>,
    /// Write audit records to this file, rotated by size [default: stdout].
    #[arg(long = "audit-log", value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Rotate the audit log at this size: bytes, or with KiB, MiB or GiB
    /// [default: 100MiB].
    #[arg(long, value_name = "SIZE", value_parser = values::parse_size)]
    pub audit_log_max_size: Option<u64>,
    /// How many rotated audit logs to keep; 0 keeps none [default: 5].
    #[arg(long, value_name = "N")]
    pub audit_log_max_files: Option<u32>,
    /// Repeats of an attempt within this window make one audit record, e.g. 10s or
    /// 1m [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub audit_dedup_window: Option<Duration>,
    /// At most this many audit records per second for the whole node; the rest are
    /// counted as dropped [default: 100].
    #[arg(long, value_name = "N")]
    pub audit_rate_limit: Option<u32>,
    /// Serve /metrics, /healthz and /readyz here [default: 0.0.0.0:9965].
    #[arg(
        long,
        env = "METADATA_GUARD_METRICS_ADDR",
        value_name = "ADDR",
        value_parser = values::parse_listen_addr
    )]
    pub metrics_addr: Option<SocketAddr>,
    /// Conceal mode: the proxy's address, in the host's network namespace and reachable
    /// from pods (in a cluster, the node's IP from the downward API), e.g. 10.0.0.5:8775.
    #[arg(long, env = "METADATA_GUARD_CONCEAL_ADDR", value_name = "IP:PORT", value_parser = values::parse_listen_addr)]
    pub conceal_addr: Option<SocketAddr>,
}

/// The resolved configuration: every default applied, every value checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Config {
    pub mode: Mode,
    /// The presets' rules followed by the extra rules.
    pub block: Vec<BlockRule>,
    pub presets: Vec<Preset>,
    pub allow_pods: Vec<AllowRule>,
    pub audit: AuditSettings,
    pub node_name: String,
    pub pod_logs_dir: PathBuf,
    pub container_logs_dir: PathBuf,
    pub kubelet_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    pub conceal: ConcealConfig,
}

impl Config {
    pub(crate) fn compile_policy(&self) -> Result<CompiledPolicy, PolicyError> {
        let mut policy = compile(&self.block)?;
        let node_only: Vec<BlockRule> = self.presets.iter().flat_map(|p| p.host_side_rules()).collect();
        if !node_only.is_empty() {
            policy.node_only = Some(Box::new(compile(&node_only)?));
        }
        Ok(policy)
    }
}

/// Where a checked value came from, to tell the operator what to edit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    File(PathBuf),
    Flags,
    Defaults,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config {}", path.display()),
            Origin::Flags => f.write_str("--preset/--block"),
            Origin::Defaults => f.write_str("built-in default destinations"),
        }
    }
}

/// Why no configuration could be loaded. Complete on its own with `{}`: nothing is
/// left for a source chain, so `{:#}` prints the same.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("could not read config {}: {reason}; check --config or METADATA_GUARD_CONFIG", path.display())]
    Read { path: PathBuf, reason: std::io::Error },
    #[error("config {}: {reason}", path.display())]
    Syntax { path: PathBuf, reason: serde_norway::Error },
    #[error("{origin}: {field}: {reason}")]
    Invalid { origin: Origin, field: String, reason: String },
    #[error("{origin}: destinations: {reason}")]
    Policy { origin: Origin, reason: PolicyError },
    #[error("{reason}")]
    Audit { reason: AuditSettingsError },
    #[error("no node name given (--node-name, NODE_NAME or node_name) and the hostname could not be read: {reason}")]
    NodeName { reason: String },
}

/// Reads the file named by `args` (if any) and resolves it with the flags.
pub(crate) fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
    let file = match &args.config {
        Some(path) => file::read(path)?,
        None => file::FileValues::default(),
    };
    resolve(args, file)
}

fn resolve(args: &ConfigArgs, file: file::FileValues) -> Result<Config, ConfigError> {
    let (origin, presets, extra) = if !args.presets.is_empty() || !args.block.is_empty() {
        (Origin::Flags, args.presets.clone(), args.block.iter().copied().map(BlockRule::all).collect())
    } else if let (Some(path), Some(destinations)) = (&args.config, file.destinations) {
        (Origin::File(path.clone()), destinations.presets, destinations.block)
    } else {
        (Origin::Defaults, vec![Preset::Default], Vec::new())
    };
    let mut presets_once: Vec<Preset> = Vec::new();
    for preset in presets {
        if !presets_once.contains(&preset) {
            presets_once.push(preset);
        }
    }
    let mut block: Vec<BlockRule> = presets_once.iter().flat_map(|p| p.rules()).collect();
    block.extend(extra);

    let defaults = AuditSettings::default();
    let config = Config {
        mode: args.mode.or(file.mode).unwrap_or_default(),
        block,
        presets: presets_once,
        allow_pods: file.allow_pods,
        audit: AuditSettings {
            log_file: args.audit_log.clone().or(file.log_file),
            max_size: args.audit_log_max_size.or(file.max_size).unwrap_or(defaults.max_size),
            max_files: args.audit_log_max_files.or(file.max_files).unwrap_or(defaults.max_files),
            dedup_window: args.audit_dedup_window.or(file.dedup_window).unwrap_or(defaults.dedup_window),
            rate_limit: args.audit_rate_limit.or(file.rate_limit).unwrap_or(defaults.rate_limit),
        },
        node_name: match args.node_name.clone().filter(|n| !n.is_empty()).or(file.node_name) {
            Some(name) => name,
            None => hostname()?,
        },
        pod_logs_dir: args.pod_logs_dir.clone().or(file.pod_logs_dir).unwrap_or_else(|| DEFAULT_POD_LOGS_DIR.into()),
        container_logs_dir: args
            .container_logs_dir
            .clone()
            .or(file.container_logs_dir)
            .unwrap_or_else(|| DEFAULT_CONTAINER_LOGS_DIR.into()),
        kubelet_dir: args.kubelet_dir.clone().or(file.kubelet_dir).unwrap_or_else(|| DEFAULT_KUBELET_DIR.into()),
        metrics_addr: args.metrics_addr.or(file.metrics_addr).unwrap_or(DEFAULT_METRICS_ADDR),
        conceal: ConcealConfig { addr: args.conceal_addr.or(file.conceal.addr), ..file.conceal },
    };
    if config.mode == Mode::Conceal && config.conceal.addr.is_none() {
        return Err(ConfigError::Invalid {
            origin: args.config.clone().map_or(Origin::Flags, Origin::File),
            field: "conceal.addr".into(),
            reason: "conceal mode needs the proxy's address: pass --conceal-addr IP:PORT (the node's IP, reachable \
                     from pods) or set conceal.addr"
                .into(),
        });
    }
    config.audit.validate().map_err(|reason| ConfigError::Audit { reason })?;
    config.compile_policy().map_err(|reason| ConfigError::Policy { origin, reason })?;
    Ok(config)
}

fn hostname() -> Result<String, ConfigError> {
    let name = nix::unistd::gethostname().map_err(|e| ConfigError::NodeName { reason: e.to_string() })?;
    name.into_string().map_err(|raw| ConfigError::NodeName { reason: format!("{raw:?} is not UTF-8") })
}

#[cfg(test)]
mod tests;
