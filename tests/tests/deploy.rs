// SPDX-License-Identifier: Apache-2.0
//! The shipped manifests: every overlay renders, validates strictly against the
//! newest Kubernetes schemas kubernetes-validate knows, and keeps the security
//! posture docs/install.md promises.
//!
//! Needs `kubectl` (for `kubectl kustomize`) and Python with kubernetes-validate
//! (`cargo xtask test` installs it with pip). Without a tool these tests say so
//! loudly and pass, unless CI=true, where they fail.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use metadata_guard_tests::gate;
use serde::Deserialize;
use serde_norway::Value;

/// Every kustomization a user applies, by directory under `deploy/`.
const OVERLAYS: [&str; 5] = ["overlays/default", "overlays/audit", "overlays/gke", "overlays/eks", "overlays/conceal"];
/// Kinds that are CRDs, which kubernetes-validate has no schema for.
const CRD_KINDS: [&str; 1] = ["PodMonitor"];
/// The agent's capabilities: exactly these, found by `cargo xtask smoke` (see the
/// comments in deploy/base/daemonset.yaml). A change here is a security review.
const AGENT_CAPS: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"];
const BPFFS_ARG: &str = "--bpffs=/sys/fs/bpf/metadata-guard";

fn deploy_dir() -> PathBuf {
    gate::workspace_root().join("deploy")
}

/// Whether the tool is usable; when not, fails under CI and skips loudly elsewhere.
fn have(tool: &str, problem: Option<String>) -> bool {
    gate::tool_or_skip(tool, problem, "the manifests")
}

fn kubectl() -> bool {
    let ok = Command::new("kubectl").args(["version", "--client"]).output().is_ok_and(|o| o.status.success());
    have("kubectl", (!ok).then(|| "`kubectl version --client` failed; install kubectl".to_string()))
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("could not start {cmd:?}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed ({}):\n{text}", out.status))
    }
}

/// The newest Kubernetes version kubernetes-validate (which `cargo xtask test`
/// installs) has schemas for; None (after [`have`]) when it is missing.
fn validator() -> Option<&'static str> {
    static VERSION: OnceLock<Result<String, String>> = OnceLock::new();
    let version = VERSION.get_or_init(|| {
        run(Command::new("python3").args(["-c", "import kubernetes_validate.utils as u; print(u.latest_version())"]))
    });
    match version {
        Ok(v) => Some(v.trim()),
        Err(e) => {
            have("kubernetes-validate", Some(e.clone()));
            None
        }
    }
}

fn render(dir: &Path) -> (String, Vec<Value>) {
    let text = run(Command::new("kubectl").arg("kustomize").arg(dir)).unwrap_or_else(|e| panic!("{e}"));
    let docs = serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{} rendered invalid YAML: {e}", dir.display())))
        .collect();
    (text, docs)
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn one<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    let found = kind(docs, k);
    assert_eq!(found.len(), 1, "expected one {k}, found {}", found.len());
    found[0]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence().into_iter().flatten().filter_map(Value::as_str).collect()
}

/// Renders a kustomization, validates it strictly and returns its documents.
fn validated(dir: &Path, version: &str) -> Vec<Value> {
    let (text, docs) = render(dir);
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "deploy-{}.yaml",
        dir.strip_prefix(deploy_dir()).unwrap_or(dir).display().to_string().replace('/', "-")
    ));
    std::fs::write(&file, &text).unwrap();
    let report = run(Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--kubernetes-version", version])
        .arg(&file))
    .unwrap_or_else(|e| panic!("{} does not validate against Kubernetes {version}:\n{e}", dir.display()));
    // A kind without a schema passes with a warning: allow that for CRDs only.
    for line in report.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(
            CRD_KINDS.iter().any(|k| line.contains(&format!("kind {k} "))),
            "{}: no schema for a kind that is not a known CRD: {line}",
            dir.display()
        );
    }
    let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
    let crds = docs.iter().filter(|d| CRD_KINDS.contains(&d["kind"].as_str().unwrap_or(""))).count();
    assert_eq!(passed + crds, docs.len(), "{}: not every resource was validated:\n{report}", dir.display());
    docs
}

#[test]
fn every_overlay_validates_and_keeps_the_posture() {
    if !kubectl() {
        return;
    }
    let Some(version) = validator() else { return };
    for overlay in OVERLAYS {
        let docs = validated(&deploy_dir().join(overlay), version);
        agent_posture(overlay, &docs);
        let env = &one(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["env"];
        let var = |name: &str| {
            env.as_sequence().into_iter().flatten().find(|e| e["name"] == name).map(|e| e["value"].as_str().unwrap())
        };
        let expected = match overlay {
            "overlays/audit" => (Some("audit"), None),
            "overlays/conceal" => {
                assert_eq!(var("METADATA_GUARD_CONCEAL_ADDR"), Some("$(HOST_IP):8775"), "{overlay}");
                (Some("conceal"), None)
            }
            "overlays/gke" => (None, Some("gke-workload-identity")),
            "overlays/eks" => (None, Some("aws")),
            _ => (None, None),
        };
        assert_eq!((var("METADATA_GUARD_MODE"), var("METADATA_GUARD_PRESETS")), expected, "{overlay}");
    }
}

/// What every overlay's DaemonSet must keep, whatever else it changes.
fn agent_posture(overlay: &str, docs: &[Value]) {
    let ds = one(docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true, "{overlay}: the agent's netns must be the host's");
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet", "{overlay}");
    assert_eq!(pod["priorityClassName"], "system-node-critical", "{overlay}");
    assert_eq!(pod["automountServiceAccountToken"], false, "{overlay}: the agent needs no API token");
    assert_eq!(one(docs, "ServiceAccount")["automountServiceAccountToken"], false, "{overlay}");
    let tolerations = pod["tolerations"].as_sequence().expect("tolerations");
    assert!(
        tolerations.iter().any(|t| t["operator"] == "Exists" && t["key"].is_null()),
        "{overlay}: must tolerate every taint"
    );
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        (&rolling["maxUnavailable"], &rolling["maxSurge"]),
        (&Value::from(1), &Value::from(0)),
        "{overlay}: no surge"
    );
    assert!(pod["hostPID"].is_null() && pod["hostIPC"].is_null(), "{overlay}: no host PID or IPC namespace");

    let containers = pod["containers"].as_sequence().unwrap();
    assert_eq!(containers.len(), 1, "{overlay}: one container");
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "{overlay}: the agent must not be privileged");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{overlay}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}");
    assert_eq!(sc["runAsUser"], 0, "{overlay}: uid 0 for the host's root-owned bpffs and cgroups");
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{overlay}");
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{overlay}");
    let mut caps = strings(&sc["capabilities"]["add"]);
    caps.sort();
    assert_eq!(caps, AGENT_CAPS, "{overlay}: the capability set changed");

    let args = strings(&c["args"]);
    for arg in ["run", "--config=/etc/metadata-guard/config.yaml", "--cgroup=/host/sys/fs/cgroup", BPFFS_ARG] {
        assert!(args.contains(&arg), "{overlay}: agent args {args:?} lack {arg}");
    }
    let node_name = c["env"].as_sequence().unwrap().iter().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName", "{overlay}");
    let port = c["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == "metrics").expect("a port named metrics");
    assert_eq!(port["containerPort"], 9965, "{overlay}");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{overlay}: {probe}");
        assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{overlay}: {probe}");
    }
    let resources = &c["resources"];
    for field in [&resources["requests"]["cpu"], &resources["requests"]["memory"], &resources["limits"]["memory"]] {
        assert!(field.is_string(), "{overlay}: resources must set cpu and memory requests and a memory limit");
    }

    // Mount path → (host path, read-only, propagation).
    let volumes = pod["volumes"].as_sequence().unwrap();
    let mount = |path: &str| {
        let m = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["mountPath"] == path);
        let m = m.unwrap_or_else(|| panic!("{overlay}: nothing mounted at {path}"));
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        (v["hostPath"]["path"].as_str(), m["readOnly"] == true, m["mountPropagation"].as_str())
    };
    assert_eq!(mount("/sys/fs/bpf"), (Some("/sys/fs/bpf"), false, Some("HostToContainer")), "{overlay}");
    assert_eq!(mount("/host/sys/fs/cgroup"), (Some("/sys/fs/cgroup"), true, None), "{overlay}");
    assert_eq!(mount("/var/log/pods"), (Some("/var/log/pods"), true, None), "{overlay}");
    assert_eq!(mount("/var/log/containers"), (Some("/var/log/containers"), true, None), "{overlay}");
    assert!(mount("/etc/metadata-guard").1, "{overlay}: config read-only");
    // Pods' tokens, for their own identities: conceal mode only, read-only, and seeing
    // the token volumes of pods started after the agent.
    let kubelet_pods =
        c["volumeMounts"].as_sequence().unwrap().iter().any(|m| m["mountPath"] == "/var/lib/kubelet/pods");
    if overlay == "overlays/conceal" {
        let expected = (Some("/var/lib/kubelet/pods"), true, Some("HostToContainer"));
        assert_eq!(mount("/var/lib/kubelet/pods"), expected, "{overlay}");
    } else {
        assert!(!kubelet_pods, "{overlay}: only conceal mode reads the kubelet's pods directory");
    }

    // The policy file is the repository's, byte for byte, and parses.
    let config = one(docs, "ConfigMap")["data"]["config.yaml"].as_str().expect("config.yaml in the ConfigMap");
    assert_eq!(config, std::fs::read_to_string(deploy_dir().join("base/config.yaml")).unwrap(), "{overlay}");
    serde_norway::from_str::<Value>(config).expect("config.yaml is YAML");
}

#[test]
fn monitoring_component_selects_the_agents() {
    if !kubectl() {
        return;
    }
    let Some(version) = validator() else { return };
    // A throwaway overlay: the default one plus the component.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-monitoring");
    std::fs::create_dir_all(&dir).unwrap();
    let deploy = deploy_dir();
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
            relative(&dir, &deploy.join("overlays/default")),
            relative(&dir, &deploy.join("components/monitoring")),
        ),
    )
    .unwrap();
    let docs = validated(&dir, version);
    let monitor = one(&docs, "PodMonitor");
    let ds = one(&docs, "DaemonSet");
    assert_eq!(monitor["metadata"]["namespace"], ds["metadata"]["namespace"]);
    let labels = ds["spec"]["template"]["metadata"]["labels"].as_mapping().unwrap();
    let selector = monitor["spec"]["selector"]["matchLabels"].as_mapping().expect("PodMonitor matchLabels");
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "the PodMonitor selects {k:?}={v:?}, which the agent pods lack");
    }
    let port = &monitor["spec"]["podMetricsEndpoints"][0]["port"];
    let ports = &ds["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(ports.as_sequence().unwrap().iter().any(|p| p["name"] == *port), "the PodMonitor scrapes port {port:?}");
}

/// kustomize refuses absolute resource paths.
fn relative(from: &Path, to: &Path) -> String {
    let from = from.canonicalize().unwrap();
    let common = from.ancestors().find(|a| to.starts_with(a)).unwrap();
    let ups = from.strip_prefix(common).unwrap().components().count();
    format!("{}{}", "../".repeat(ups), to.strip_prefix(common).unwrap().display())
}

#[test]
fn uninstall_removes_the_pins_and_the_host_side_table_with_net_admin_alone() {
    if !kubectl() {
        return;
    }
    let Some(version) = validator() else { return };
    let docs = validated(&deploy_dir().join("uninstall"), version);
    let guard_ns = one(&render(&deploy_dir().join("overlays/default")).1, "Namespace")["metadata"]["name"].clone();
    let ds = one(&docs, "DaemonSet");
    assert_ne!(ds["metadata"]["namespace"], guard_ns, "a namespace of its own: the guard's may be terminating");
    let pod = &ds["spec"]["template"]["spec"];
    let init = pod["initContainers"].as_sequence().expect("an uninstall init container");
    assert_eq!(init.len(), 1);
    assert_eq!(strings(&init[0]["args"]), ["uninstall", BPFFS_ARG], "the same --bpffs as the agent");
    let tolerations = pod["tolerations"].as_sequence().expect("tolerations");
    assert!(tolerations.iter().any(|t| t["operator"] == "Exists" && t["key"].is_null()), "must reach every node");
    assert_eq!(pod["hostNetwork"], true, "the host-side table is in the node's network namespace");
    assert!(pod["hostPID"].is_null() && pod["hostIPC"].is_null(), "no host PID or IPC namespace");
    for c in init.iter().chain(pod["containers"].as_sequence().unwrap()) {
        let name = c["name"].as_str().unwrap();
        let sc = &c["securityContext"];
        assert_ne!(sc["privileged"], true, "{name}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        // Unpinning needs no capability; deleting the nf_tables table needs NET_ADMIN.
        let wanted: &[&str] = if c["name"] == init[0]["name"] { &["NET_ADMIN"] } else { &[] };
        assert_eq!(strings(&sc["capabilities"]["add"]), wanted, "{name}: the capability set changed");
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
    }
}
