// SPDX-License-Identifier: Apache-2.0
//! The node bootstrap recipes of deploy/node/: the boot unit verifies with
//! `systemd-analyze verify` after install.sh put it in a node root, is ordered before
//! the container runtimes and kubelet, runs the DaemonSet's own arguments, and every
//! recipe (cloud-init, Cluster API, EKS user data, Bottlerocket) parses and runs the
//! agent with flags its command line has.
//!
//! Needs systemd's `systemd-analyze` and the agent built at
//! target/debug/metadata-guard (or METADATA_GUARD_AGENT); `cargo xtask test` installs
//! the one and builds the other before it runs the tests. Without one these tests say
//! so loudly and pass, unless CI=true, where they fail.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use metadata_guard_tests::gate;
use serde_norway::Value;

const UNIT: &str = "metadata-guard-apply.service";
/// What must wait for the block: every container runtime a node may run, and kubelet.
const BEFORE: [&str; 4] = ["containerd.service", "crio.service", "docker.service", "kubelet.service"];
/// Firewall managers whose start flushes the nf_tables ruleset.
const AFTER_FLUSHERS: [&str; 2] = ["nftables.service", "firewalld.service"];
/// The subcommand whose `--help` lists the flags the recipes may pass: they run `apply`.
const CLI_OF_APPLY: &str = "apply";

fn root() -> PathBuf {
    gate::workspace_root()
}

fn node_dir() -> PathBuf {
    root().join("deploy/node")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("could not read {}: {e}", path.display()))
}

/// Whether the tool is usable; when not, fails under CI and skips loudly elsewhere.
fn have(tool: &str, problem: Option<String>) -> bool {
    gate::tool_or_skip(tool, problem, "the node recipes")
}

/// `systemd-analyze` (Debian's systemd package, which `cargo xtask test` installs).
fn systemd_tools() -> bool {
    let problem = match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`systemd-analyze --version` failed ({})", out.status)),
        Err(e) => Some(format!("could not run systemd-analyze ({e}); install Debian's systemd package")),
    };
    have("systemd-analyze", problem)
}

/// A unit file as (key, value) pairs in order, continuation lines joined.
fn unit_entries(text: &str) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let line = line.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('[')) {
            continue;
        }
        if let Some(start) = line.strip_suffix('\\') {
            pending.push_str(start);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let (k, v) = pending.split_once('=').unwrap_or_else(|| panic!("not key=value in the unit: {pending}"));
        entries.push((k.trim().to_string(), v.trim().to_string()));
        pending.clear();
    }
    entries
}

fn values(entries: &[(String, String)], key: &str) -> Vec<String> {
    entries.iter().filter(|(k, _)| k == key).flat_map(|(_, v)| v.split_whitespace().map(str::to_string)).collect()
}

fn unit() -> Vec<(String, String)> {
    unit_entries(&read(&node_dir().join(UNIT)))
}

/// The unit's ExecStart as words, after the binary.
fn unit_command() -> Vec<String> {
    let exec = values(&unit(), "ExecStart");
    assert_eq!(exec.first().map(String::as_str), Some("/usr/local/bin/metadata-guard"), "ExecStart: {exec:?}");
    exec[1..].to_vec()
}

#[test]
fn boot_unit_is_ordered_before_the_runtimes_and_kubelet_and_after_bpffs() {
    let u = unit();
    let before = values(&u, "Before");
    for b in BEFORE {
        assert!(before.iter().any(|x| x == b), "the unit must run Before={b}; it has Before={before:?}");
    }
    assert!(values(&u, "After").iter().any(|a| a == "sys-fs-bpf.mount"), "After=sys-fs-bpf.mount missing");
    // Their start flushes the ruleset, and with it a host-side table written before.
    for flusher in AFTER_FLUSHERS {
        assert!(values(&u, "After").iter().any(|a| a == flusher), "the unit must run After={flusher}");
    }
    assert!(values(&u, "RequiresMountsFor").iter().any(|a| a == "/sys/fs/bpf"), "RequiresMountsFor=/sys/fs/bpf");
    assert_eq!(values(&u, "Type"), ["oneshot"]);
    assert_eq!(values(&u, "RemainAfterExit"), ["yes"]);
    // Fail closed: kubelet requires the unit, and no Condition*= may turn a failure
    // into a skip (which counts as success for kubelet).
    assert!(values(&u, "RequiredBy").iter().any(|r| r == "kubelet.service"), "RequiredBy=kubelet.service missing");
    assert!(!u.iter().any(|(k, _)| k.starts_with("Condition")), "a Condition would let kubelet start unguarded");
}

#[test]
fn boot_unit_runs_the_daemonsets_arguments() {
    let ds: Value = serde_norway::from_str(&read(&root().join("deploy/base/daemonset.yaml"))).unwrap();
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let mut expected: Vec<String> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        // The container's view of the host's cgroup root; on the host it is detected.
        .filter(|a| !a.starts_with("--cgroup="))
        .collect();
    assert_eq!(expected[0], "run", "the DaemonSet's first argument is the subcommand");
    expected[0] = "apply".to_string();
    assert_eq!(unit_command(), expected, "the boot unit must run what the DaemonSet runs, with apply for run");
    // NODE_NAME only names the node in audit records, which apply does not write, and
    // the log format suits the container log, not the journal; any other variable the
    // DaemonSet sets changes the policy and must be mirrored.
    let env: Vec<&str> = container["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    let unit_env = values(&unit(), "Environment");
    for name in env.iter().filter(|n| !["NODE_NAME", "METADATA_GUARD_LOG_FORMAT"].contains(*n)) {
        assert!(unit_env.iter().any(|e| e.starts_with(&format!("{name}="))), "the unit does not set {name}");
    }
}

#[test]
fn install_script_puts_a_unit_in_a_node_root_that_systemd_analyze_verifies() {
    if !systemd_tools() {
        return;
    }
    let node = tempdir("node-root");
    // The distribution's own units (sysinit.target, basic.target, ...) that the
    // unit's default dependencies name.
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"].into_iter().find(|d| Path::new(d).is_dir());
    let units = units.expect("systemd is installed but has no /usr/lib/systemd/system");
    fs::create_dir_all(node.join("usr/lib/systemd")).unwrap();
    run(Command::new("cp").arg("-a").arg(units).arg(node.join("usr/lib/systemd/system")));
    std::os::unix::fs::symlink("usr/lib", node.join("lib")).unwrap();
    // A stand-in binary: verify checks that ExecStart is executable; the flags are
    // checked against the real agent in `recipe_commands_use_flags_the_agent_has`.
    let binary = node.join("metadata-guard.stand-in");
    fs::write(&binary, "#!/bin/sh\nexit 0\n").unwrap();

    run(Command::new(node_dir().join("install.sh")).arg(&binary).env("ROOT", &node));
    assert_eq!(read(&node.join("etc/metadata-guard/config.yaml")), read(&root().join("deploy/base/config.yaml")));
    for wants in ["kubelet.service.requires", "multi-user.target.wants"] {
        let link = node.join("etc/systemd/system").join(wants).join(UNIT);
        assert!(link.symlink_metadata().is_ok(), "install.sh did not enable the unit: no {}", link.display());
    }
    if let Err(e) = verify(&node) {
        panic!("systemd-analyze verify rejects {UNIT}:\n{e}");
    }

    // The check bites: a misspelt setting is reported.
    let installed = node.join("etc/systemd/system").join(UNIT);
    fs::write(&installed, read(&installed).replace("Type=oneshot", "Type=oneshoot")).unwrap();
    assert!(verify(&node).is_err(), "systemd-analyze verify accepted a unit with Type=oneshoot");
    fs::remove_dir_all(&node).unwrap();
}

/// `systemd-analyze verify` in the node root: Ok when it exits 0 and says nothing
/// (it reports bad settings as warnings, with exit 0).
fn verify(node: &Path) -> Result<(), String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", node.display()))
        .arg(UNIT)
        .output()
        .expect("could not start systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("({}) {said}", out.status))
    }
}

#[test]
fn cloud_init_and_cluster_api_recipes_parse_and_set_a_policy() {
    let cloud_init = read(&node_dir().join("cloud-init.yaml"));
    assert!(cloud_init.starts_with("#cloud-config\n"), "cloud-init.yaml must start with #cloud-config");
    let doc: Value = serde_norway::from_str(&cloud_init).unwrap();
    check_policy_file(&doc["write_files"], "cloud-init.yaml");
    // The join waits for the unit and fails with it.
    let runcmd: Vec<String> = doc["runcmd"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_sequence().unwrap().iter().map(|w| w.as_str().unwrap()).collect::<Vec<_>>().join(" "))
        .collect();
    let start = runcmd.iter().position(|c| *c == format!("systemctl start {UNIT}"));
    let join = runcmd.iter().position(|c| c.starts_with("kubeadm join"));
    assert!(
        start.is_some() && start < join,
        "cloud-init.yaml must `systemctl start {UNIT}` before joining: {runcmd:?}"
    );

    let capi: Value =
        serde_norway::from_str(&read(&node_dir().join("cluster-api-kubeadmconfigtemplate.yaml"))).unwrap();
    assert_eq!(capi["kind"], "KubeadmConfigTemplate");
    check_policy_file(&capi["spec"]["template"]["spec"]["files"], "the Cluster API template");
    let pre = &capi["spec"]["template"]["spec"]["preKubeadmCommands"];
    assert!(
        pre.as_sequence().into_iter().flatten().any(|c| c.as_str() == Some(&format!("systemctl start {UNIT}"))),
        "the Cluster API template must `systemctl start {UNIT}` before kubeadm: {pre:?}"
    );
}

#[test]
fn eks_user_data_is_a_nodeconfig_and_a_cloud_config() {
    let text = read(&node_dir().join("eks-al2023-user-data.mime"));
    let boundary = text
        .lines()
        .find_map(|l| l.split_once("boundary=\"").map(|(_, b)| b.trim_end_matches('"').to_string()))
        .expect("a multipart boundary");
    let parts: Vec<&str> = text.split(&format!("--{boundary}")).skip(1).filter(|p| !p.starts_with("--")).collect();
    assert_eq!(parts.len(), 2, "expected a NodeConfig part and a cloud-config part");
    let body = |part: &str| part.split_once("\n\n").map(|(_, b)| b.to_string()).unwrap();
    assert!(parts[0].contains("Content-Type: application/node.eks.aws"));
    let node_config: Value = serde_norway::from_str(&body(parts[0])).unwrap();
    assert_eq!(node_config["kind"], "NodeConfig");
    assert!(parts[1].contains("Content-Type: text/cloud-config"));
    let cloud_config = body(parts[1]);
    assert!(cloud_config.starts_with("#cloud-config\n"));
    check_policy_file(&serde_norway::from_str::<Value>(&cloud_config).unwrap()["write_files"], "the EKS user data");
}

#[test]
fn bottlerocket_user_data_runs_an_essential_bootstrap_container_with_a_policy() {
    let toml = node_dir().join("bottlerocket/user-data.toml");
    let script = "import json, sys, tomllib; print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))))";
    let json = run(Command::new("python3").args(["-c", script]).arg(&toml));
    let settings: serde_json::Value = serde_json::from_str(&json).unwrap();
    let container = &settings["settings"]["bootstrap-containers"]["metadata-guard"];
    assert_eq!(container["essential"], true, "the boot must halt when the block cannot be installed");
    assert_eq!(container["mode"], "always", "every boot installs the block (a new kernel has nothing pinned)");
    let decode = "import base64, sys; sys.stdout.write(base64.b64decode(sys.argv[1]).decode())";
    let policy = run(Command::new("python3").args(["-c", decode, container["user-data"].as_str().unwrap()]));
    check_policy(&serde_norway::from_str(&policy).unwrap(), "the Bottlerocket user data");
}

#[test]
fn recipe_commands_use_flags_the_agent_has() {
    let Some(agent) = gate::agent_or_skip("the node recipes") else { return };
    let help = run(Command::new(&agent).args([CLI_OF_APPLY, "--help"]));
    let bottlerocket = bottlerocket_command();
    for (recipe, command) in [(UNIT, unit_command()), ("bottlerocket/Containerfile", bottlerocket)] {
        assert_eq!(command[0], "apply", "{recipe} must run `metadata-guard apply`");
        for arg in &command[1..] {
            let flag = arg.split('=').next().unwrap();
            assert!(
                help.lines().any(|l| l.trim_start().split([' ', ',']).any(|w| w == flag)),
                "{recipe} passes {flag}, which `metadata-guard {CLI_OF_APPLY} --help` does not list:\n{help}"
            );
        }
    }
}

/// The Bottlerocket bootstrap image's CMD (a JSON array over continuation lines).
fn bottlerocket_command() -> Vec<String> {
    let text = read(&node_dir().join("bottlerocket/Containerfile"));
    let joined = text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    let cmd = joined.split_once("\nCMD ").expect("a CMD").1.replace("\\\n", " ");
    serde_json::from_str(cmd.trim()).expect("CMD is a JSON array")
}

/// `files` (cloud-init write_files or Cluster API files) holds the policy file.
fn check_policy_file(files: &Value, recipe: &str) {
    let file = files
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|f| f["path"] == "/etc/metadata-guard/config.yaml")
        .unwrap_or_else(|| panic!("{recipe} writes no /etc/metadata-guard/config.yaml"));
    let policy: Value = serde_norway::from_str(file["content"].as_str().unwrap()).unwrap();
    check_policy(&policy, recipe);
}

/// A recipe's policy uses only keys of deploy/base/config.yaml (the agent refuses
/// unknown keys) and sets a mode and presets.
fn check_policy(policy: &Value, recipe: &str) {
    let base: Value = serde_norway::from_str(&read(&root().join("deploy/base/config.yaml"))).unwrap();
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_mapping().into_iter().flatten().map(|(k, _)| k.as_str().unwrap().to_string()).collect()
    };
    let unknown: Vec<String> = keys(policy).difference(&keys(&base)).cloned().collect();
    assert!(unknown.is_empty(), "{recipe}: keys the configuration does not have: {unknown:?}");
    assert!(policy["mode"] == "enforce" || policy["mode"] == "audit", "{recipe}: no mode");
    assert!(policy["destinations"]["presets"].as_sequence().is_some_and(|p| !p.is_empty()), "{recipe}: no presets");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    text
}

fn tempdir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("node-{name}-{}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).unwrap();
    }
    fs::create_dir_all(&dir).unwrap();
    dir
}
