// SPDX-License-Identifier: Apache-2.0
//! The DaemonSet's container, read from the rendered kustomization, as what a
//! container runtime needs: image-independent settings the smoke test replays
//! with podman. Reading them from the manifest (instead of repeating them here)
//! makes the smoke test prove the manifest that ships.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_norway::Value;

/// One container of a pod template, reduced to what the smoke test can replay.
#[derive(Debug)]
pub(crate) struct Container {
    pub name: String,
    pub args: Vec<String>,
    /// Plain values; `fieldRef: spec.nodeName` becomes [`NODE_NAME`].
    pub env: Vec<(String, String)>,
    pub privileged: bool,
    pub allow_privilege_escalation: bool,
    pub read_only_root: bool,
    pub run_as_user: Option<i64>,
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    /// `RuntimeDefault`, `Unconfined` or `Localhost`.
    pub seccomp: String,
    pub mounts: Vec<Mount>,
    /// The readiness probe's HTTP path and port, port names resolved.
    pub readiness: Option<(String, u16)>,
    pub memory_limit: Option<u64>,
}

#[derive(Debug)]
pub(crate) struct Mount {
    pub path: String,
    pub read_only: bool,
    /// `None`, `HostToContainer` or `Bidirectional`.
    pub propagation: String,
    pub source: Source,
}

#[derive(Debug)]
pub(crate) enum Source {
    HostPath(String),
    /// A ConfigMap's files: name → content.
    Files(BTreeMap<String, String>),
}

/// What the simulated node's name is, as the downward API would give it.
pub(crate) const NODE_NAME: &str = "smoke-node";

/// The DaemonSet of a kustomization: its containers (init containers first) and
/// whether it runs in the host's network namespace.
pub(crate) struct DaemonSet {
    pub name: String,
    pub host_network: bool,
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
}

pub(crate) fn render(dir: &Path) -> Result<Vec<Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("could not run `kubectl kustomize`; is kubectl installed?")?;
    ensure!(
        out.status.success(),
        "`kubectl kustomize {}` failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let text = String::from_utf8(out.stdout).context("kubectl kustomize printed non-UTF-8")?;
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).context("kubectl kustomize printed a document that is not YAML"))
        .collect()
}

pub(crate) fn daemonset(dir: &Path) -> Result<DaemonSet> {
    let docs = render(dir)?;
    let mut sets = docs.iter().filter(|d| d["kind"].as_str() == Some("DaemonSet"));
    let ds = sets.next().with_context(|| format!("{} renders no DaemonSet", dir.display()))?;
    ensure!(sets.next().is_none(), "{} renders more than one DaemonSet; the smoke test runs one", dir.display());
    let pod = &ds["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_sequence().cloned().unwrap_or_default();
    let parse_all = |key: &str| -> Result<Vec<Container>> {
        pod[key].as_sequence().into_iter().flatten().map(|c| container(c, &volumes, &docs)).collect()
    };
    Ok(DaemonSet {
        name: str_of(&ds["metadata"]["name"]).to_string(),
        host_network: pod["hostNetwork"].as_bool() == Some(true),
        init_containers: parse_all("initContainers")?,
        containers: parse_all("containers")?,
    })
}

fn container(c: &Value, volumes: &[Value], docs: &[Value]) -> Result<Container> {
    let name = str_of(&c["name"]).to_string();
    let sc = &c["securityContext"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_sequence().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    let mut env = Vec::new();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let key = str_of(&e["name"]).to_string();
        let value = match (e["value"].as_str(), e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
            (Some(v), _) => v.to_string(),
            (None, Some("spec.nodeName")) => NODE_NAME.to_string(),
            _ => bail!("container {name}: env {key} comes from a source the smoke test cannot fill in"),
        };
        env.push((key, value));
    }
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
        let volume_name = str_of(&m["name"]);
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(volume_name))
            .with_context(|| format!("container {name} mounts volume {volume_name}, which the pod does not have"))?;
        ensure!(m["subPath"].is_null(), "container {name}: subPath mounts never see updates; mount the directory");
        mounts.push(Mount {
            path: str_of(&m["mountPath"]).to_string(),
            read_only: m["readOnly"].as_bool() == Some(true),
            propagation: m["mountPropagation"].as_str().unwrap_or("None").to_string(),
            source: source(volume, docs)?,
        });
    }
    let readiness = match c["readinessProbe"]["httpGet"].as_mapping() {
        None => None,
        Some(get) => {
            let port = &get[&Value::from("port")];
            let port = match port.as_u64() {
                Some(p) => p,
                None => c["ports"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .find(|p| p["name"] == *port)
                    .and_then(|p| p["containerPort"].as_u64())
                    .with_context(|| format!("container {name}: readiness port {port:?} is not a named port"))?,
            };
            Some((str_of(&get[&Value::from("path")]).to_string(), u16::try_from(port)?))
        }
    };
    Ok(Container {
        args: strings(&c["args"]),
        env,
        privileged: sc["privileged"].as_bool() == Some(true),
        allow_privilege_escalation: sc["allowPrivilegeEscalation"].as_bool() != Some(false),
        read_only_root: sc["readOnlyRootFilesystem"].as_bool() == Some(true),
        run_as_user: sc["runAsUser"].as_i64(),
        caps_add: strings(&sc["capabilities"]["add"]),
        caps_drop: strings(&sc["capabilities"]["drop"]),
        seccomp: sc["seccompProfile"]["type"].as_str().unwrap_or("Unconfined").to_string(),
        mounts,
        readiness,
        memory_limit: c["resources"]["limits"]["memory"].as_str().map(quantity).transpose()?,
        name,
    })
}

fn source(volume: &Value, docs: &[Value]) -> Result<Source> {
    if let Some(path) = volume["hostPath"]["path"].as_str() {
        return Ok(Source::HostPath(path.to_string()));
    }
    if let Some(cm) = volume["configMap"]["name"].as_str() {
        let map = docs
            .iter()
            .find(|d| d["kind"].as_str() == Some("ConfigMap") && d["metadata"]["name"].as_str() == Some(cm))
            .with_context(|| {
                format!("volume {} uses ConfigMap {cm}, which the kustomization lacks", str_of(&volume["name"]))
            })?;
        let files = map["data"]
            .as_mapping()
            .into_iter()
            .flatten()
            .map(|(k, v)| (str_of(k).to_string(), str_of(v).to_string()))
            .collect();
        return Ok(Source::Files(files));
    }
    bail!("volume {:?} is neither a hostPath nor a ConfigMap; teach the smoke test about it", volume["name"])
}

/// A memory quantity ("128Mi", "1Gi", "500M", "1048576") in bytes.
fn quantity(q: &str) -> Result<u64> {
    let units =
        [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("k", 1000), ("M", 1_000_000), ("G", 1_000_000_000)];
    let (digits, unit) =
        units.iter().find_map(|(suffix, unit)| q.strip_suffix(suffix).map(|d| (d, *unit))).unwrap_or((q, 1));
    Ok(digits.parse::<u64>().with_context(|| format!("memory quantity {q:?} is not understood"))? * unit)
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}
