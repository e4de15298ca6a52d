// SPDX-License-Identifier: Apache-2.0
//! Every tracked source file names its license first: an SPDX-License-Identifier line
//! that matches the `license` field of the crate it belongs to (the eBPF crate's
//! "MIT OR GPL-2.0", everything else the workspace's "Apache-2.0"). A new file
//! without one fails here, not in a later license review.

use std::{fs, path::Path, process::Command};

use metadata_guard_tests::gate;

/// The `license = "..."` of a Cargo.toml.
fn license_field(manifest: &Path) -> String {
    let text = fs::read_to_string(manifest).unwrap_or_else(|e| panic!("could not read {}: {e}", manifest.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("license = \"")?.strip_suffix('"').map(str::to_string))
        .unwrap_or_else(|| panic!("{} has no license = \"...\" line", manifest.display()))
}

/// The files git tracks, relative to the workspace root.
fn tracked(root: &Path) -> Vec<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["ls-files", "-z"])
        .output()
        .expect("could not run git; the SPDX check lists the tracked files with `git ls-files`");
    assert!(out.status.success(), "git ls-files failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .expect("tracked file names are UTF-8")
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

/// The SPDX line a file needs, or None for files that take no comment.
fn expected(path: &str, workspace: &str, ebpf: &str) -> Option<String> {
    let license = if path.starts_with("ebpf/") { ebpf } else { workspace };
    let name = path.rsplit('/').next().unwrap_or(path);
    let comment = if path.ends_with(".rs") {
        "//"
    } else if path.ends_with(".sh")
        || path.ends_with(".yaml")
        || path.ends_with(".yml")
        || path.ends_with(".service")
        || name == "Containerfile"
        || path == ".ci/run"
    {
        "#"
    } else {
        return None;
    };
    Some(format!("{comment} SPDX-License-Identifier: {license}"))
}

/// Whether the SPDX line comes first, after only a line that must itself be first (a
/// shebang, cloud-init's `#cloud-config`).
fn starts_with_spdx(text: &str, line: &str) -> bool {
    let mut lines = text.lines();
    match lines.next() {
        Some(first) if first == line => true,
        Some(first) if first.starts_with("#!") || first == "#cloud-config" => lines.next() == Some(line),
        _ => false,
    }
}

#[test]
fn every_source_file_starts_with_its_crates_spdx_line() {
    let root = gate::workspace_root();
    let workspace = license_field(&root.join("Cargo.toml"));
    let ebpf = license_field(&root.join("ebpf/Cargo.toml"));
    let mut missing = Vec::new();
    let mut checked = 0;
    for path in tracked(&root) {
        let Some(line) = expected(&path, &workspace, &ebpf) else { continue };
        // Tracked but deleted in the working tree: nothing to check.
        let Ok(text) = fs::read_to_string(root.join(&path)) else { continue };
        checked += 1;
        if !starts_with_spdx(&text, &line) {
            missing.push(format!("{path} (needs `{line}`)"));
        }
    }
    assert!(checked > 100, "only {checked} source files found; is {} the workspace?", root.display());
    assert!(missing.is_empty(), "files without their SPDX line first:\n  {}", missing.join("\n  "));
}

#[test]
fn the_check_tells_a_header_from_none() {
    let rs = expected("agent/src/main.rs", "Apache-2.0", "MIT OR GPL-2.0").unwrap();
    assert_eq!(rs, "// SPDX-License-Identifier: Apache-2.0");
    let ebpf = expected("ebpf/src/main.rs", "Apache-2.0", "MIT OR GPL-2.0").unwrap();
    assert_eq!(ebpf, "// SPDX-License-Identifier: MIT OR GPL-2.0");
    assert!(starts_with_spdx(&format!("{rs}\n//! docs\n"), &rs));
    assert!(!starts_with_spdx("//! docs\n", &rs));
    assert!(!starts_with_spdx(&format!("//! docs\n{rs}\n"), &rs), "the line must come first");
    assert!(!starts_with_spdx(&format!("{ebpf}\n"), &rs), "another crate's license is not this one's");
    let sh = expected("deploy/node/install.sh", "Apache-2.0", "").unwrap();
    assert!(starts_with_spdx(&format!("#!/bin/sh\n{sh}\n"), &sh));
    assert!(expected("README.md", "Apache-2.0", "").is_none());
}
