// SPDX-License-Identifier: Apache-2.0
//! Whether a test can run here: root, the tools it needs, and CI's rule that nothing
//! may be skipped. Without what it needs a test skips loudly, unless CI=true, where it
//! fails naming the missing piece; `cargo xtask test` installs the tools and builds the
//! binaries first, so there nothing is missing.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

/// Whether CI=true (or 1): then nothing may be skipped.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For a `#[test]` that needs root for `why` (e.g. "network namespaces, cgroups"):
/// true as root; otherwise panics under CI and says it skipped elsewhere.
pub fn root_or_skip(why: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(!ci(), "this test needs root ({why}), and CI=true forbids skipping it");
    // Straight to stderr: libtest swallows eprintln! from passing tests.
    let _ = writeln!(std::io::stderr(), "skipped: needs root ({why}); run as root to run it");
    false
}

/// For a `#[test]` that needs `tool`: true when `problem` is None; otherwise panics
/// under CI and says loudly elsewhere that `what` was not tested.
pub fn tool_or_skip(tool: &str, problem: Option<String>, what: &str) -> bool {
    let Some(problem) = problem else { return true };
    assert!(
        !ci(),
        "CI=true: {tool} is needed to test {what}, and it is not usable: {problem}. Run the tests with `cargo xtask \
         test`, which installs and builds what they need."
    );
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!! SKIPPED: {tool} is not usable ({problem}); {what} were NOT fully tested. `cargo xtask test` \
         installs and builds what the tests need. !!!!!\n"
    );
    false
}

/// For a `#[test]` that runs the agent to test `what`: the binary at
/// METADATA_GUARD_AGENT, else target/debug/metadata-guard (which `cargo xtask build`
/// and `cargo xtask test` build); None (skipped loudly, failing under CI) when missing.
pub fn agent_or_skip(what: &str) -> Option<PathBuf> {
    let agent = std::env::var_os("METADATA_GUARD_AGENT")
        .map_or_else(|| workspace_root().join("target/debug/metadata-guard"), PathBuf::from);
    let problem = (!agent.is_file()).then(|| format!("no {}; build it with `cargo xtask build`", agent.display()));
    tool_or_skip("the agent", problem, what).then_some(agent)
}

/// The workspace's root directory (the test crate's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().expect("the workspace root above tests/")
}
