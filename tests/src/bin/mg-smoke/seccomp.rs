// SPDX-License-Identifier: Apache-2.0
//! `seccompProfile: RuntimeDefault` as the Kubernetes runtimes give it today.
//!
//! containerd (1.6.9+, 1.7+) and CRI-O (1.31+, whose default is containers-common's
//! 0.60+) allow bpf(2) to a container holding CAP_BPF and perf_event_open(2) to one
//! holding CAP_PERFMON; before, both only to CAP_SYS_ADMIN. Debian 12's podman ships
//! containers-common 0.50, the older rules. The smoke test runs the agent under
//! podman's own default profile with exactly that difference brought up to date
//! (what containers-common 0.60 changed for these two calls), so it proves the
//! manifest against the profile a current node applies, and nothing more lenient.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// podman's default profile (Debian package golang-github-containers-common).
const PODMAN_DEFAULT: &str = "/usr/share/containers/seccomp.json";

/// Each call, and the capability a current runtime's default profile admits it for.
const CAP_GATED: [(&str, &str); 2] = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];

/// Writes the profile into `dir`; returns its path.
pub(crate) fn runtime_default(dir: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string(PODMAN_DEFAULT)
        .with_context(|| format!("could not read podman's default seccomp profile {PODMAN_DEFAULT}"))?;
    let mut profile: Value = serde_json::from_str(&text).with_context(|| format!("{PODMAN_DEFAULT} is not JSON"))?;
    let rules = profile["syscalls"].as_array_mut().with_context(|| format!("{PODMAN_DEFAULT} has no syscalls"))?;
    for (call, cap) in CAP_GATED {
        update(rules, call, cap);
    }
    let path = dir.join("seccomp-runtime-default.json");
    fs::write(&path, serde_json::to_vec_pretty(&profile)?)
        .with_context(|| format!("could not write {}", path.display()))?;
    Ok(path)
}

/// Makes `call` allowed to holders of `cap` (as well as CAP_SYS_ADMIN), and refused
/// with EPERM only to containers holding neither: containers-common 0.60's rules.
fn update(rules: &mut Vec<Value>, call: &str, cap: &str) {
    let names = |r: &Value| -> Vec<String> {
        r["names"].as_array().into_iter().flatten().filter_map(|n| n.as_str().map(str::to_string)).collect()
    };
    let caps_of = |r: &Value, key: &str| -> Vec<String> {
        r[key]["caps"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_string)).collect()
    };
    let already = rules.iter().any(|r| {
        r["action"] == "SCMP_ACT_ALLOW" && names(r).iter().any(|n| n == call) && caps_of(r, "includes") == [cap]
    });
    if already {
        return;
    }
    // The refusal for containers without CAP_SYS_ADMIN would also refuse a CAP_BPF
    // holder: take the call out of it, and refuse it to those holding neither.
    for rule in rules.iter_mut() {
        let refuses =
            rule["action"] == "SCMP_ACT_ERRNO" && caps_of(rule, "excludes").iter().any(|c| c == "CAP_SYS_ADMIN");
        if refuses && names(rule).iter().any(|n| n == call) {
            let kept: Vec<Value> = names(rule).into_iter().filter(|n| n != call).map(Value::from).collect();
            rule["names"] = Value::from(kept);
        }
    }
    rules.retain(|r| r["names"].as_array().is_none_or(|n| !n.is_empty()));
    rules.push(json!({
        "names": [call],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": libc::EPERM,
        "excludes": {"caps": ["CAP_SYS_ADMIN", cap]},
    }));
    rules.push(json!({"names": [call], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}}));
}
