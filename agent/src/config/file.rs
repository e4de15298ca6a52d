// SPDX-License-Identifier: Apache-2.0
//! The YAML config file: its schema, and its translation into checked plain values.
//!
//! Every field is optional so that flags and built-in defaults can fill the gaps;
//! unknown fields are refused so that a typo cannot silently leave a default in force.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use metadata_guard_common::{PROTO_ALL, PROTO_OTHER, PROTO_TCP, PROTO_UDP};
use serde::Deserialize;

use super::{
    identity::{
        first_duplicate, AwsIdentityConfig, Endpoint, IdentityConfig, RoleArn, RoleMapping, MAX_SESSION_DURATION,
        MIN_SESSION_DURATION,
    },
    values::{ByteSize, Cidr, ListenAddr, Parsed, Port},
    ConcealConfig, ConfigError, ExtraPaths, Mode, Origin,
};
use crate::policy::{AllowRule, BlockRule, PortMatch, Preset};

/// What a config file sets, checked; `None` where the file is silent.
#[derive(Debug, Default)]
pub(super) struct FileValues {
    pub mode: Option<Mode>,
    pub destinations: Option<Destinations>,
    pub allow_pods: Vec<AllowRule>,
    pub log_file: Option<PathBuf>,
    pub max_size: Option<u64>,
    pub max_files: Option<u32>,
    pub dedup_window: Option<Duration>,
    pub rate_limit: Option<u32>,
    pub node_name: Option<String>,
    pub pod_logs_dir: Option<PathBuf>,
    pub container_logs_dir: Option<PathBuf>,
    pub kubelet_dir: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub conceal: ConcealConfig,
}

#[derive(Debug)]
pub(super) struct Destinations {
    pub presets: Vec<Preset>,
    pub block: Vec<BlockRule>,
}

pub(super) fn read(path: &Path) -> Result<FileValues, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|reason| ConfigError::Read { path: path.to_path_buf(), reason })?;
    parse(&text, path)
}

/// `path` only names the file in errors.
pub(super) fn parse(text: &str, path: &Path) -> Result<FileValues, ConfigError> {
    // An empty file (or one of comments only) is YAML null: it sets nothing.
    let file: Option<FileConfig> =
        serde_norway::from_str(text).map_err(|reason| ConfigError::Syntax { path: path.to_path_buf(), reason })?;
    file.unwrap_or_default().check().map_err(|(field, reason)| ConfigError::Invalid {
        origin: Origin::File(path.to_path_buf()),
        field,
        reason,
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    mode: Option<Mode>,
    destinations: Option<DestinationsFile>,
    allow_pods: Option<Vec<AllowRule>>,
    audit: Option<AuditFile>,
    node_name: Option<String>,
    pod_logs_dir: Option<PathBuf>,
    container_logs_dir: Option<PathBuf>,
    kubelet_dir: Option<PathBuf>,
    metrics: Option<MetricsFile>,
    conceal: Option<ConcealFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConcealFile {
    addr: Option<Parsed<ListenAddr>>,
    extra_paths: Option<Vec<ExtraPaths>>,
    identity: Option<IdentityFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    aws: Option<AwsFile>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AwsFile {
    sts_endpoint: Option<Parsed<Endpoint>>,
    token_volume: Option<String>,
    roles: Option<Vec<RoleFile>>,
    session_duration: Option<Parsed<humantime::Duration>>,
    refresh_before: Option<Parsed<humantime::Duration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleFile {
    namespace: String,
    service_account: String,
    role_arn: Parsed<RoleArn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationsFile {
    presets: Option<Vec<Parsed<Preset>>>,
    block: Option<Vec<BlockFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockFile {
    cidr: Parsed<Cidr>,
    protocols: Option<Vec<ProtocolName>>,
    ports: Option<Vec<Parsed<Port>>>,
    except_ports: Option<Vec<Parsed<Port>>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ProtocolName {
    Tcp,
    Udp,
    Other,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    log_file: Option<PathBuf>,
    max_size: Option<Parsed<ByteSize>>,
    max_files: Option<u32>,
    dedup_window: Option<Parsed<humantime::Duration>>,
    rate_limit: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    addr: Option<Parsed<ListenAddr>>,
}

/// A field's path as the file spells it, and what is wrong with its value.
type FieldError = (String, String);

impl FileConfig {
    fn check(self) -> Result<FileValues, FieldError> {
        let audit = self.audit.unwrap_or_default();
        let conceal = self.conceal.unwrap_or_default();
        let extra_paths = conceal.extra_paths.unwrap_or_default();
        for (i, extra) in extra_paths.iter().enumerate() {
            extra.validate().map_err(|reason| field(&format!("conceal.extra_paths[{i}]"), &reason))?;
        }
        Ok(FileValues {
            mode: self.mode,
            destinations: self.destinations.map(DestinationsFile::check).transpose()?,
            allow_pods: self.allow_pods.unwrap_or_default(),
            log_file: non_empty("audit.log_file", audit.log_file)?,
            max_size: audit.max_size.map(|s| s.0 .0),
            max_files: audit.max_files,
            dedup_window: audit.dedup_window.map(|d| d.0.into()),
            rate_limit: audit.rate_limit,
            // `node_name: ""` is the documented way of deferring to NODE_NAME or the hostname.
            node_name: self.node_name.filter(|name| !name.is_empty()),
            pod_logs_dir: non_empty("pod_logs_dir", self.pod_logs_dir)?,
            container_logs_dir: non_empty("container_logs_dir", self.container_logs_dir)?,
            kubelet_dir: non_empty("kubelet_dir", self.kubelet_dir)?,
            metrics_addr: self.metrics.and_then(|m| m.addr).map(|a| a.0 .0),
            conceal: ConcealConfig {
                addr: conceal.addr.map(|a| a.0 .0),
                extra_paths,
                identity: IdentityConfig { aws: conceal.identity.and_then(|i| i.aws).map(AwsFile::check).transpose()? },
            },
        })
    }
}

impl AwsFile {
    fn check(self) -> Result<AwsIdentityConfig, FieldError> {
        const AT: &str = "conceal.identity.aws";
        let defaults = AwsIdentityConfig::default();
        let roles: Vec<RoleMapping> = self
            .roles
            .unwrap_or_default()
            .into_iter()
            .map(|r| RoleMapping { namespace: r.namespace, service_account: r.service_account, role_arn: r.role_arn.0 })
            .collect();
        for (i, role) in roles.iter().enumerate() {
            // Kubernetes names: DNS labels (namespaces) and subdomains (service accounts).
            let name_ok = |s: &str| {
                !s.is_empty()
                    && s.len() <= 253
                    && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            };
            if !name_ok(&role.namespace) {
                return Err(field(
                    &format!("{AT}.roles[{i}].namespace"),
                    &format!("`{}` is not a Kubernetes namespace name", role.namespace),
                ));
            }
            if !name_ok(&role.service_account) {
                return Err(field(
                    &format!("{AT}.roles[{i}].service_account"),
                    &format!("`{}` is not a Kubernetes service account name", role.service_account),
                ));
            }
        }
        if let Some(i) = first_duplicate(&roles) {
            return Err(field(
                &format!("{AT}.roles[{i}]"),
                &format!(
                    "service account {}/{} already has a role; give each service account one role",
                    roles[i].namespace, roles[i].service_account
                ),
            ));
        }
        if let Some(volume) = &self.token_volume {
            let ok = !volume.is_empty()
                && volume.len() <= 63
                && volume.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(field(
                    &format!("{AT}.token_volume"),
                    &format!("`{volume}` is not a volume name (a DNS label)"),
                ));
            }
        }
        let session_duration = self.session_duration.map_or(defaults.session_duration, |d| d.0.into());
        if !(MIN_SESSION_DURATION..=MAX_SESSION_DURATION).contains(&session_duration) {
            return Err(field(
                &format!("{AT}.session_duration"),
                "STS issues credentials for 15m to 12h; pick a duration in that range",
            ));
        }
        let refresh_before = self.refresh_before.map_or(defaults.refresh_before, |d| d.0.into());
        if refresh_before >= session_duration {
            return Err(field(
                &format!("{AT}.refresh_before"),
                &format!(
                    "{} is not shorter than session_duration ({}): credentials would be refreshed on every request",
                    humantime::format_duration(refresh_before),
                    humantime::format_duration(session_duration)
                ),
            ));
        }
        Ok(AwsIdentityConfig {
            sts_endpoint: self.sts_endpoint.map(|e| e.0),
            token_volume: self.token_volume,
            roles,
            session_duration,
            refresh_before,
        })
    }
}

impl DestinationsFile {
    fn check(self) -> Result<Destinations, FieldError> {
        if self.presets.is_none() && self.block.is_none() {
            return Ok(Destinations { presets: vec![Preset::Default], block: Vec::new() });
        }
        let presets: Vec<Preset> = self.presets.unwrap_or_default().into_iter().map(|p| p.0).collect();
        let block = self.block.unwrap_or_default();
        if presets.is_empty() && block.is_empty() {
            return Err(field(
                "destinations",
                "blocks nothing; list presets or block rules, or leave destinations out for the default preset",
            ));
        }
        let block = block
            .into_iter()
            .enumerate()
            .map(|(i, rule)| rule.check().map_err(|reason| field(&format!("destinations.block[{i}]"), &reason)))
            .collect::<Result<_, _>>()?;
        Ok(Destinations { presets, block })
    }
}

impl BlockFile {
    fn check(self) -> Result<BlockRule, String> {
        let ports = |list: Vec<Parsed<Port>>| list.into_iter().map(|p| p.0 .0).collect();
        let ports = match (self.ports, self.except_ports) {
            (Some(_), Some(_)) => return Err("ports and except_ports exclude each other; keep one".to_owned()),
            (Some(only), None) => PortMatch::Only(ports(only)),
            (None, Some(except)) => PortMatch::Except(ports(except)),
            (None, None) => PortMatch::Any,
        };
        let protocols = match self.protocols {
            None => PROTO_ALL,
            Some(names) => names.into_iter().fold(0, |mask, name| mask | name.bit()),
        };
        let rule = BlockRule { cidr: self.cidr.0 .0, protocols, ports };
        rule.validate().map_err(|e| e.to_string())?;
        Ok(rule)
    }
}

impl ProtocolName {
    fn bit(self) -> u8 {
        match self {
            ProtocolName::Tcp => PROTO_TCP,
            ProtocolName::Udp => PROTO_UDP,
            ProtocolName::Other => PROTO_OTHER,
        }
    }
}

fn field(name: &str, reason: &str) -> FieldError {
    (name.to_owned(), reason.to_owned())
}

fn non_empty(name: &str, path: Option<PathBuf>) -> Result<Option<PathBuf>, FieldError> {
    match path {
        Some(p) if p.as_os_str().is_empty() => {
            Err(field(name, "an empty path names nothing; give a path, or leave the field out for the default"))
        }
        other => Ok(other),
    }
}
