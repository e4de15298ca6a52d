// SPDX-License-Identifier: Apache-2.0
use std::{net::IpAddr, path::Path};

use clap::Parser;
use metadata_guard_common::{PROTO_TCP, PROTO_UDP};

use super::*;
use crate::policy::PortMatch;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: ConfigArgs,
}

fn flags(argv: &[&str]) -> Result<ConfigArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("metadata-guard").chain(argv.iter().copied())).map(|cli| cli.args)
}

/// Loads `yaml` as the config file, with `args` for everything else.
fn load_yaml(yaml: &str, args: ConfigArgs) -> Result<Config, ConfigError> {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    load(&ConfigArgs { config: Some(file.path().to_path_buf()), ..args }).map_err(|e| rename(e, file.path()))
}

fn rename(err: ConfigError, temp: &Path) -> ConfigError {
    let fixed = || PathBuf::from("config.yaml");
    match err {
        ConfigError::Syntax { path, reason } if path == temp => ConfigError::Syntax { path: fixed(), reason },
        ConfigError::Invalid { origin: Origin::File(path), field, reason } if path == temp => {
            ConfigError::Invalid { origin: Origin::File(fixed()), field, reason }
        }
        ConfigError::Policy { origin: Origin::File(path), reason } if path == temp => {
            ConfigError::Policy { origin: Origin::File(fixed()), reason }
        }
        other => other,
    }
}

fn load_error(yaml: &str) -> String {
    load_yaml(yaml, ConfigArgs::default()).expect_err("the config must be refused").to_string()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[test]
fn without_a_file_every_default_applies() {
    let config = load(&ConfigArgs::default()).unwrap();
    assert_eq!(config.mode, Mode::Enforce);
    assert_eq!(config.presets, [Preset::Default]);
    assert_eq!(config.block, Preset::Default.rules());
    assert!(config.allow_pods.is_empty());
    assert_eq!(config.audit, AuditSettings::default());
    assert_eq!(config.audit.max_size, 100 * 1024 * 1024);
    assert_eq!(config.node_name, nix::unistd::gethostname().unwrap().into_string().unwrap());
    assert_eq!(config.pod_logs_dir, Path::new("/var/log/pods"));
    assert_eq!(config.container_logs_dir, Path::new("/var/log/containers"));
    assert_eq!(config.metrics_addr, "0.0.0.0:9965".parse().unwrap());
}

#[test]
fn an_empty_file_sets_nothing() {
    let config = load_yaml("# nothing here yet\n", ConfigArgs::default()).unwrap();
    assert_eq!(config, load(&ConfigArgs::default()).unwrap());
}

const FULL: &str = r#"
mode: audit
destinations:
  presets: [aws, gcp]
  block:
    - cidr: 169.254.170.2
      protocols: [tcp, udp]
      ports: [80]
    - cidr: 10.0.0.0/8
      except_ports: [53, 443]
allow_pods:
  - namespace: kube-system
    pod: "metadata-proxy-*"
audit:
  log_file: /var/log/metadata-guard/audit.log
  max_size: 10MiB
  max_files: 3
  dedup_window: 1m 30s
  rate_limit: 20
node_name: node-a
pod_logs_dir: /host/var/log/pods
container_logs_dir: /host/var/log/containers
metrics:
  addr: "[::]:9100"
"#;

#[test]
fn the_file_sets_every_value() {
    let config = load_yaml(FULL, ConfigArgs::default()).unwrap();
    assert_eq!(config.mode, Mode::Audit);
    assert_eq!(config.presets, [Preset::Aws, Preset::Gcp]);
    let extra = [
        BlockRule { protocols: PROTO_TCP | PROTO_UDP, ..BlockRule::only(net("169.254.170.2/32"), &[80]) },
        BlockRule::except(net("10.0.0.0/8"), &[53, 443]),
    ];
    let expected: Vec<BlockRule> = Preset::Aws.rules().into_iter().chain(Preset::Gcp.rules()).chain(extra).collect();
    assert_eq!(config.block, expected);
    assert!(config.allow_pods[0].matches("kube-system", "metadata-proxy-abc12"));
    assert!(!config.allow_pods[0].matches("default", "metadata-proxy-abc12"));
    assert_eq!(
        config.audit,
        AuditSettings {
            log_file: Some("/var/log/metadata-guard/audit.log".into()),
            max_size: 10 << 20,
            max_files: 3,
            dedup_window: Duration::from_secs(90),
            rate_limit: 20,
        }
    );
    assert_eq!(config.node_name, "node-a");
    assert_eq!(config.pod_logs_dir, Path::new("/host/var/log/pods"));
    assert_eq!(config.container_logs_dir, Path::new("/host/var/log/containers"));
    assert_eq!(config.metrics_addr, "[::]:9100".parse().unwrap());

    let policy = config.compile_policy().unwrap();
    assert!(policy.blocks("10.1.2.3".parse().unwrap(), PROTO_TCP, 80));
    assert!(!policy.blocks("10.1.2.3".parse().unwrap(), PROTO_UDP, 53));
}

#[test]
fn flags_override_the_file() {
    let args = flags(&[
        "--mode=enforce",
        "--node-name=node-b",
        "--pod-logs-dir=/pods",
        "--container-logs-dir=/containers",
        "--audit-log=/tmp/audit.log",
        "--audit-log-max-size=1GiB",
        "--audit-log-max-files=9",
        "--audit-dedup-window=2s",
        "--audit-rate-limit=7",
        "--metrics-addr=127.0.0.1:1",
    ])
    .unwrap();
    let config = load_yaml(FULL, args).unwrap();
    assert_eq!(config.mode, Mode::Enforce);
    assert_eq!(config.node_name, "node-b");
    assert_eq!(config.pod_logs_dir, Path::new("/pods"));
    assert_eq!(config.container_logs_dir, Path::new("/containers"));
    assert_eq!(
        config.audit,
        AuditSettings {
            log_file: Some("/tmp/audit.log".into()),
            max_size: 1 << 30,
            max_files: 9,
            dedup_window: Duration::from_secs(2),
            rate_limit: 7,
        }
    );
    assert_eq!(config.metrics_addr, "127.0.0.1:1".parse().unwrap());
    assert_eq!(config.presets, [Preset::Aws, Preset::Gcp], "no --preset or --block: the file's destinations hold");
}

#[test]
fn preset_and_block_flags_replace_the_files_destinations() {
    let args = flags(&["--preset", "aws", "--block", "10.0.0.0/8"]).unwrap();
    let config = load_yaml(FULL, args).unwrap();
    assert_eq!(config.presets, [Preset::Aws]);
    let mut expected = Preset::Aws.rules();
    expected.push(BlockRule::all(net("10.0.0.0/8")));
    assert_eq!(config.block, expected);

    let policy = config.compile_policy().unwrap();
    let blocks = |addr: &str, port| policy.blocks(addr.parse::<IpAddr>().unwrap(), PROTO_UDP, port);
    assert!(blocks("10.9.9.9", 53), "--block covers every port");
    assert!(!blocks("169.254.169.254", 53), "aws keeps DNS");
    assert!(!blocks("169.254.170.2", 80), "the file's rule is gone");
}

#[test]
fn a_block_flag_alone_blocks_only_that() {
    let config = load(&flags(&["--block=fd00:ec2::254"]).unwrap()).unwrap();
    assert!(config.presets.is_empty());
    assert_eq!(config.block, [BlockRule::all(net("fd00:ec2::254/128"))]);
}

#[test]
fn presets_may_be_repeated_or_comma_separated_and_count_once() {
    let config = load(&flags(&["--preset=aws,gcp", "--preset", "aws"]).unwrap()).unwrap();
    assert_eq!(config.presets, [Preset::Aws, Preset::Gcp]);
    assert_eq!(config.block.len(), Preset::Aws.rules().len() + Preset::Gcp.rules().len());
}

#[test]
fn flag_values_are_checked_when_parsed() {
    let refused = |argv: &[&str]| flags(argv).expect_err("must be refused").to_string();
    assert!(refused(&["--preset=aws_ecs"]).contains("aws-ecs"), "lists the valid names");
    assert!(refused(&["--block=169.254.169.254/16"]).contains("write 169.254.0.0/16"));
    assert!(refused(&["--audit-log-max-size=100MB"]).contains("KiB, MiB or GiB"));
    assert!(refused(&["--audit-log-max-files=-1"]).contains("--audit-log-max-files"));
    assert!(refused(&["--audit-rate-limit=lots"]).contains("--audit-rate-limit"));
    assert!(refused(&["--audit-dedup-window=10"]).contains("--audit-dedup-window"));
    assert!(refused(&["--metrics-addr=0.0.0.0"]).contains("e.g. 0.0.0.0:9965"));
    assert!(refused(&["--mode=enforcing"]).contains("--mode"));
}

#[test]
fn an_unknown_field_is_named() {
    assert_eq!(
        load_error("audit:\n  max_sise: 1MiB\n"),
        "config config.yaml: audit: unknown field `max_sise`, expected one of `log_file`, `max_size`, \
         `max_files`, `dedup_window`, `rate_limit` at line 2 column 3"
    );
    assert!(load_error("destination:\n  presets: [aws]\n").contains("unknown field `destination`"));
}

#[test]
fn bad_values_name_their_field() {
    assert_eq!(
        load_error("mode: enforcing\n"),
        "config config.yaml: mode: unknown variant `enforcing`, expected one of `enforce`, `audit`, `conceal` at line 1 column 7"
    );
    let block = |rules: &str| load_error(&format!("destinations:\n  block:\n{rules}"));
    assert_eq!(
        block("    - cidr: 10.0.0.0/8\n    - cidr: 169.254.169.254/16\n"),
        "config config.yaml: destinations.block[1].cidr: 169.254.169.254/16 has host bits set; \
         write 169.254.0.0/16 at line 4 column 13"
    );
    assert_eq!(
        block("    - cidr: 10.0.0.0/8\n    - cidr: 10.0.0.1\n      ports: [80, 0]\n"),
        "config config.yaml: destinations.block[1].ports[1]: port 0 is not a port (1-65535) at line 5 column 19"
    );
    assert!(block("    - cidr: 10.0.0.0/8\n      protocols: [icmp]\n")
        .contains("destinations.block[0].protocols[0]: unknown variant `icmp`, expected one of `tcp`, `udp`, `other`"));
    assert!(load_error("audit:\n  dedup_window: 10 sex\n")
        .starts_with("config config.yaml: audit.dedup_window: unknown time unit \"sex\""));
    assert!(load_error("audit:\n  max_size: 100MB\n")
        .starts_with("config config.yaml: audit.max_size: `100MB` is not a size"));
    assert!(load_error("metrics:\n  addr: 9965\n").starts_with("config config.yaml: metrics.addr: `9965` is not"));
    assert!(load_error("destinations:\n  presets: [aws, azur]\n")
        .starts_with("config config.yaml: destinations.presets[1]: unknown preset `azur`"));
    assert!(load_error("allow_pods:\n  - namespace: kube-system\n    pod: ''\n")
        .starts_with("config config.yaml: allow_pods[0].pod: an empty pattern"));
}

#[test]
fn rules_that_cannot_work_are_refused_with_their_index() {
    let block = |rules: &str| load_error(&format!("destinations:\n  block:\n{rules}"));
    assert_eq!(
        block("    - cidr: 10.0.0.0/8\n      ports: [80]\n      except_ports: [53]\n"),
        "config config.yaml: destinations.block[0]: ports and except_ports exclude each other; keep one"
    );
    assert!(block("    - cidr: 10.0.0.0/8\n    - cidr: 10.0.0.0/8\n      ports: []\n")
        .starts_with("config config.yaml: destinations.block[1]: the rule for 10.0.0.0/8 has an empty port list"));
    assert!(block("    - cidr: 10.0.0.0/8\n      protocols: []\n")
        .starts_with("config config.yaml: destinations.block[0]: the rule for 10.0.0.0/8 blocks no protocol"));
    assert!(block("    - cidr: 10.0.0.0/8\n      ports: [1, 2, 3, 4, 5, 6, 7, 8, 9]\n")
        .contains("lists 9 ports but the kernel holds at most 8"));
}

#[test]
fn a_policy_the_kernel_cannot_hold_is_refused_at_load() {
    let rules: String = (1..=5).map(|port| format!("    - cidr: 10.0.0.0/8\n      ports: [{port}]\n")).collect();
    let err = load_yaml(&format!("destinations:\n  block:\n{rules}"), ConfigArgs::default()).unwrap_err();
    assert!(matches!(&err, ConfigError::Policy { reason: PolicyError::TooManyRules { .. }, .. }), "{err:?}");
    assert!(err
        .to_string()
        .starts_with("config config.yaml: destinations: 10.0.0.0/8 is covered by 5 different rules"));
}

#[test]
fn destinations_that_block_nothing_are_refused() {
    assert_eq!(
        load_error("destinations:\n  presets: []\n  block: []\n"),
        "config config.yaml: destinations: blocks nothing; list presets or block rules, or leave destinations \
         out for the default preset"
    );
    let config = load_yaml("destinations: {}\n", ConfigArgs::default()).unwrap();
    assert_eq!(config.presets, [Preset::Default]);
}

#[test]
fn audit_settings_that_could_never_write_are_refused_at_load() {
    assert!(load_error("audit:\n  rate_limit: 0\n").starts_with("audit rate_limit is 0"));
    let tiny = "audit:\n  log_file: /var/log/audit.log\n  max_size: 100\n";
    assert!(load_error(tiny).starts_with("audit max_size is 100 bytes, too small"));
    let err = load(&flags(&["--audit-rate-limit=0"]).unwrap()).unwrap_err();
    assert!(matches!(err, ConfigError::Audit { .. }), "{err:?}");
    assert!(load_error("audit:\n  log_file: ''\n").starts_with("config config.yaml: audit.log_file: an empty path"));
}

#[test]
fn zero_rotated_files_is_a_choice() {
    let config = load(&flags(&["--audit-log-max-files=0"]).unwrap()).unwrap();
    assert_eq!(config.audit.max_files, 0);
    assert_eq!(load_yaml("audit:\n  max_files: 0\n", ConfigArgs::default()).unwrap().audit.max_files, 0);
}

#[test]
fn an_empty_node_name_defers_to_the_flag_then_the_hostname() {
    let args = flags(&["--node-name=node-c"]).unwrap();
    assert_eq!(load_yaml("node_name: ''\n", args).unwrap().node_name, "node-c");
    let hostname = load(&ConfigArgs::default()).unwrap().node_name;
    assert_eq!(load_yaml("node_name: ''\n", ConfigArgs::default()).unwrap().node_name, hostname);
    let empty_flag = ConfigArgs { node_name: Some(String::new()), ..ConfigArgs::default() };
    assert_eq!(load_yaml("node_name: node-d\n", empty_flag).unwrap().node_name, "node-d");
}

#[test]
fn a_missing_file_is_named() {
    let args = ConfigArgs { config: Some("/nonexistent/metadata-guard.yaml".into()), ..ConfigArgs::default() };
    let err = load(&args).unwrap_err().to_string();
    assert!(err.starts_with("could not read config /nonexistent/metadata-guard.yaml: "), "{err}");
    assert!(err.ends_with("check --config or METADATA_GUARD_CONFIG"), "{err}");
}

#[test]
fn the_example_deployment_config_loads_as_the_defaults() {
    let example = include_str!("../../../deploy/base/config.yaml");
    let config = load_yaml(example, ConfigArgs::default()).unwrap();
    let defaults = load(&ConfigArgs::default()).unwrap();
    assert_eq!(config, defaults, "the example documents the built-in defaults");
    assert!(matches!(config.block[0].ports, PortMatch::Except(_)));
}

#[test]
fn conceal_mode_needs_an_address_and_takes_extra_paths() {
    assert!(load_error("mode: conceal\n").contains("--conceal-addr"));
    let file = "mode: conceal\nconceal:\n  addr: 10.0.0.5:8775\n  extra_paths:\n    - namespace: monitoring\n      \
                pod: \"agent-*\"\n      paths: [/latest/meta-data/iam/info]\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, file).unwrap();
    let args = ConfigArgs { config: Some(path), node_name: Some("n".into()), ..Default::default() };
    let config = load(&args).unwrap();
    assert_eq!(config.mode, Mode::Conceal);
    assert_eq!(config.conceal.addr, Some("10.0.0.5:8775".parse().unwrap()));
    assert_eq!(config.conceal.extra_paths[0].rule_name(), "extra:monitoring/agent-*");
    let bad = "conceal:\n  extra_paths:\n    - {namespace: a, pod: b, paths: [/latest/../iam]}\n";
    assert!(load_error(bad).contains("conceal.extra_paths[0]"), "{}", load_error(bad));
}

const IDENTITY: &str = r#"
mode: conceal
kubelet_dir: /host/var/lib/kubelet
conceal:
  addr: 10.0.0.5:8775
  identity:
    aws:
      sts_endpoint: https://sts.us-east-1.amazonaws.com
      token_volume: aws-iam-token
      session_duration: 2h
      refresh_before: 20m
      roles:
        - namespace: payments
          service_account: api
          role_arn: arn:aws:iam::111122223333:role/payments-api
"#;

#[test]
fn identities_map_service_accounts_to_roles() {
    let config = load_yaml(IDENTITY, ConfigArgs::default()).unwrap();
    assert_eq!(config.kubelet_dir, Path::new("/host/var/lib/kubelet"));
    let aws = config.conceal.identity.aws.unwrap();
    assert_eq!(aws.sts_endpoint.unwrap().to_string(), "https://sts.us-east-1.amazonaws.com/");
    assert_eq!(aws.token_volume.as_deref(), Some("aws-iam-token"));
    assert_eq!((aws.session_duration, aws.refresh_before), (Duration::from_secs(7200), Duration::from_secs(1200)));
    assert_eq!(aws.roles[0].role_arn.name(), "payments-api");
    assert_eq!((aws.roles[0].namespace.as_str(), aws.roles[0].service_account.as_str()), ("payments", "api"));
    let defaults = load(&ConfigArgs::default()).unwrap();
    assert_eq!(defaults.kubelet_dir, Path::new("/var/lib/kubelet"));
    assert!(defaults.conceal.identity.aws.is_none());
    let flag = ConfigArgs { kubelet_dir: Some("/k".into()), ..ConfigArgs::default() };
    assert_eq!(load_yaml(IDENTITY, flag).unwrap().kubelet_dir, Path::new("/k"), "the flag wins");
    let minimal = load_yaml("conceal:\n  identity:\n    aws: {}\n", ConfigArgs::default()).unwrap();
    let aws = minimal.conceal.identity.aws.unwrap();
    assert!(aws.sts_endpoint.is_none() && aws.token_volume.is_none() && aws.roles.is_empty());
    assert_eq!((aws.session_duration, aws.refresh_before), (Duration::from_secs(3600), Duration::from_secs(900)));
}

#[test]
fn a_wrong_identity_setting_is_refused_with_its_path() {
    let with = |from: &str, to: &str| load_error(&IDENTITY.replace(from, to));
    let err = with("arn:aws:iam::111122223333:role/payments-api", "payments-api");
    assert!(err.contains("conceal.identity.aws.roles[0].role_arn") && err.contains("not an IAM role ARN"), "{err}");
    let err = with("https://sts.us-east-1.amazonaws.com", "sts.us-east-1.amazonaws.com");
    assert!(err.contains("conceal.identity.aws.sts_endpoint") && err.contains("not an endpoint URL"), "{err}");
    let err = with("namespace: payments", "namespace: Payments_");
    assert!(err.contains("conceal.identity.aws.roles[0].namespace"), "{err}");
    let err = with("token_volume: aws-iam-token", "token_volume: ../x");
    assert!(err.contains("conceal.identity.aws.token_volume"), "{err}");
    let err = with("session_duration: 2h", "session_duration: 5m");
    assert!(err.contains("conceal.identity.aws.session_duration") && err.contains("15m to 12h"), "{err}");
    let err = with("refresh_before: 20m", "refresh_before: 3h");
    assert!(err.contains("conceal.identity.aws.refresh_before"), "{err}");
    let twice = IDENTITY.to_owned()
        + "        - namespace: payments\n          service_account: api\n          role_arn: arn:aws:iam::111122223333:role/other\n";
    let err = load_error(&twice);
    assert!(err.contains("conceal.identity.aws.roles[1]") && err.contains("already has a role"), "{err}");
    let err = with("token_volume:", "token_volumes:");
    assert!(err.contains("unknown field `token_volumes`"), "{err}");
    assert!(load_error("kubelet_dir: ''\n").contains("kubelet_dir: an empty path"));
}

#[test]
fn every_yaml_sample_in_the_docs_loads() {
    let pages = [
        ("README.md", include_str!("../../../README.md")),
        ("docs/conceal.md", include_str!("../../../docs/conceal.md")),
        ("docs/configuration.md", include_str!("../../../docs/configuration.md")),
        ("docs/identity.md", include_str!("../../../docs/identity.md")),
    ];
    let mut samples = 0;
    for (name, text) in pages {
        let mut lines = text.lines();
        while lines.any(|l| l == "```yaml") {
            let sample = lines.by_ref().take_while(|l| *l != "```").collect::<Vec<_>>().join("\n");
            let args = ConfigArgs { node_name: Some("n".into()), ..ConfigArgs::default() };
            if let Err(e) = load_yaml(&sample, args) {
                panic!("{name}: this sample does not load: {e:#}\n{sample}");
            }
            samples += 1;
        }
    }
    assert!(samples > 0, "no YAML sample found in the docs");
}
