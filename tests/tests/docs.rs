// SPDX-License-Identifier: Apache-2.0
//! The user docs stay true: README.md stays a short page that links every page under
//! docs/, every relative link and anchor in them resolves, and the samples that
//! describe the agent's command line (the command list, the options table, the presets
//! table, every `metadata-guard` command line) are what the agent itself says.
//!
//! The tests that read the agent's own help need it built at target/debug/metadata-guard
//! (`cargo xtask build`, or METADATA_GUARD_AGENT). Without it they say so loudly and
//! pass, unless CI=true, where they fail. The audit samples are checked in
//! agent/src/audit/record/tests.rs, the metrics table in agent/src/metrics/tests.rs,
//! the YAML samples in agent/src/config/tests.rs, the `cargo xtask` command lines in
//! xtask/src/main.rs.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use metadata_guard_tests::gate;

/// What a newcomer reads in minutes.
const README_MAX_LINES: usize = 300;

fn root() -> PathBuf {
    gate::workspace_root()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("could not read {}: {e}", path.display()))
}

/// README.md, every page under docs/ and the boot recipes' page.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("deploy/node/README.md")];
    pages.extend(docs_pages());
    pages
}

/// Every Markdown file under docs/, subdirectories too.
fn docs_pages() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("docs"), &mut out);
    out.sort();
    out
}

/// The page's lines outside fenced code blocks, and the fenced blocks with their
/// info string.
fn split_fences(text: &str) -> (Vec<&str>, Vec<(&str, Vec<&str>)>) {
    let (mut prose, mut blocks) = (Vec::new(), Vec::new());
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            blocks.push((info.trim(), lines.by_ref().take_while(|l| !l.trim_start().starts_with("```")).collect()));
        } else {
            prose.push(line);
        }
    }
    (prose, blocks)
}

/// The line without its inline code spans.
fn without_code(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join("")
}

/// Targets of the `[text](target)` links on a line (inline code left out).
fn links(line: &str) -> Vec<String> {
    let line = without_code(line);
    let mut out = Vec::new();
    let mut rest = line.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        out.push(after[..end].to_string());
        rest = &after[end..];
    }
    out
}

/// The anchors GitHub gives the page's headings.
fn anchors(text: &str) -> BTreeSet<String> {
    let (prose, _) = split_fences(text);
    let mut seen = BTreeSet::new();
    for heading in prose.iter().filter_map(|l| l.strip_prefix('#')).map(|h| h.trim_start_matches('#').trim()) {
        let mut slug: String = heading
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        if seen.contains(&slug) {
            let base = slug.clone();
            slug = (1..).map(|n| format!("{base}-{n}")).find(|s| !seen.contains(s)).unwrap();
        }
        seen.insert(slug);
    }
    seen
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = read(&page);
        let (prose, _) = split_fences(&text);
        for target in prose.iter().flat_map(|l| links(l)) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = target.split_once('#').map_or((target.as_str(), None), |(f, a)| (f, Some(a)));
            let dest = if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            let name = format!("{}: {target}", page.strip_prefix(root()).unwrap().display());
            if !dest.exists() {
                broken.push(format!("{name} (no such file)"));
            } else if let Some(anchor) = anchor {
                if dest.extension().is_none_or(|e| e != "md") || !anchors(&read(&dest)).contains(anchor) {
                    broken.push(format!("{name} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_short_and_links_every_docs_page() {
    let readme = read(&root().join("README.md"));
    let lines = readme.lines().count();
    assert!(lines < README_MAX_LINES, "README.md has {lines} lines; move detail into a page under docs/");
    let linked: BTreeSet<PathBuf> = readme
        .lines()
        .flat_map(links)
        .filter(|t| !t.contains("://"))
        .filter_map(|t| root().join(t.split('#').next().unwrap()).canonicalize().ok())
        .collect();
    let unlinked: Vec<_> = docs_pages().into_iter().filter(|p| !linked.contains(p)).collect();
    assert!(unlinked.is_empty(), "README.md links none of {unlinked:?}");
}

#[test]
fn the_readme_gives_the_two_set_up_commands() {
    let readme = read(&root().join("README.md"));
    let (_, blocks) = split_fences(&readme);
    let commands: Vec<&str> = blocks
        .iter()
        .filter(|(info, _)| *info == "sh")
        .flat_map(|(_, lines)| lines.iter().map(|l| l.split('#').next().unwrap().trim()))
        .collect();
    for wanted in ["cargo xtask run", "cargo xtask test"] {
        assert!(commands.contains(&wanted), "README.md's shell blocks lack `{wanted}`: {commands:?}");
    }
}

/// The agent's output for `args`, or None (skipped loudly, failing under CI) when the
/// agent is not built.
fn agent(args: &[&str]) -> Option<String> {
    let agent = gate::agent_or_skip("the docs' command-line samples")?;
    let out = Command::new(&agent).args(args).output().unwrap();
    assert!(out.status.success(), "metadata-guard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Some(String::from_utf8(out.stdout).unwrap())
}

/// The long flags a `--help` text lists.
fn help_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',']).filter(|w| w.starts_with("--")).map(str::to_string).take(1))
        .filter(|f| f != "--help")
        .collect()
}

/// The rows of the first Markdown table after `heading`, each split into cells.
fn table_after(text: &str, heading: &str) -> Vec<Vec<String>> {
    let start = text.find(heading).unwrap_or_else(|| panic!("no {heading:?}"));
    text[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|row| {
            // `\|` inside a cell is a literal bar, not a separator.
            let row = row.replace("\\|", "\u{0}");
            row.trim().trim_matches('|').split(" | ").map(|c| c.trim().replace('\u{0}', "|")).collect()
        })
        .collect()
}

#[test]
fn the_options_table_is_what_run_help_lists() {
    let Some(help) = agent(&["run", "--help"]) else { return };
    let page = read(&root().join("docs/configuration.md"));
    let documented: BTreeSet<String> = table_after(&page, "## Options")
        .iter()
        .map(|row| row[0].trim_matches('`').split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(documented, help_flags(&help), "docs/configuration.md's options table against `run --help`");
}

#[test]
fn the_command_list_is_what_the_agent_has() {
    let Some(help) = agent(&["--help"]) else { return };
    let commands: BTreeSet<&str> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    let readme = read(&root().join("README.md"));
    let (_, blocks) = split_fences(&readme);
    let listed: BTreeSet<&str> = blocks
        .iter()
        .flat_map(|(_, lines)| lines.iter())
        .filter_map(|l| l.strip_prefix("metadata-guard "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(listed, commands, "README.md's command list against `metadata-guard --help`");
}

#[test]
fn every_documented_command_line_uses_flags_the_agent_has() {
    let mut wrong = Vec::new();
    for page in pages() {
        let text = read(&page);
        let (prose, blocks) = split_fences(&text);
        // Command lines in shell blocks, and in inline code that is not a synopsis.
        let spans = prose.iter().flat_map(|l| l.split('`').skip(1).step_by(2)).filter(|s| !s.contains(['[', '|']));
        let shell = blocks.iter().filter(|(info, _)| *info == "sh").flat_map(|(_, lines)| lines.iter().copied());
        for line in spans.chain(shell).filter_map(|l| l.trim().strip_prefix("metadata-guard ")) {
            let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
            let Some((command, args)) = words.split_first() else { continue };
            let Some(help) = agent(&[command, "--help"]) else { return };
            let flags = help_flags(&help);
            for flag in args.iter().filter(|a| a.starts_with("--")).map(|a| a.split('=').next().unwrap()) {
                if !flags.contains(flag) && flag != "--help" {
                    wrong.push(format!("{}: `metadata-guard {line}`: {flag}", page.display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "flags the agent does not have:\n{}", wrong.join("\n"));
}

#[test]
fn the_presets_table_is_what_presets_prints() {
    let Some(printed) = agent(&["presets"]) else { return };
    // name, description, blocks, as `metadata-guard presets` prints them.
    let mut presets: Vec<(String, String, Vec<String>)> = Vec::new();
    for line in printed.lines() {
        if let Some(block) = line.strip_prefix("    block ") {
            presets.last_mut().unwrap().2.push(block.to_string());
        } else if let Some(description) = line.strip_prefix("  ") {
            presets.last_mut().unwrap().1 = description.to_string();
        } else if !line.is_empty() {
            presets.push((line.to_string(), String::new(), Vec::new()));
        }
    }
    let page = read(&root().join("docs/configuration.md"));
    let documented: Vec<(String, String, Vec<String>)> = table_after(&page, "## Destination presets")
        .iter()
        .map(|row| {
            let blocks = row[1].split("<br>").map(|b| b.trim_matches('`').to_string()).collect();
            (row[0].trim_matches('`').to_string(), row[2].clone(), blocks)
        })
        .collect();
    assert!(!presets.is_empty());
    assert_eq!(documented, presets, "docs/configuration.md's presets table against `metadata-guard presets`");
}
