// SPDX-License-Identifier: Apache-2.0
//! The library's public surface is what `agent/public-api.txt` lists, no more: a new
//! `pub` item reachable from outside the crate (a re-export in lib.rs, a public
//! field or method of a re-exported type, a `pub mod`) fails this test until the
//! listing is updated on purpose.
//!
//! The listing is built from the sources, on the stable toolchain: the re-exports of
//! `lib.rs` followed to their definitions, each with its derives, its public fields
//! or variants and the public methods of its inherent `impl` blocks; and, for a
//! module made `pub` in lib.rs, every `pub` line in its files.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

const LISTING: &str = "public-api.txt";
const UPDATE: &str = "UPDATE_PUBLIC_API";

#[test]
fn the_public_surface_is_the_checked_in_listing() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let built = listing(&manifest.join("src"));
    let path = manifest.join(LISTING);
    if std::env::var_os(UPDATE).is_some() {
        fs::write(&path, &built).unwrap();
        return;
    }
    let checked_in = fs::read_to_string(&path).unwrap_or_default();
    if checked_in != built {
        let (old, new): (Vec<&str>, Vec<&str>) = (checked_in.lines().collect(), built.lines().collect());
        let mut diff = String::new();
        for line in &new {
            if !old.contains(line) {
                let _ = writeln!(diff, "+ {line}");
            }
        }
        for line in &old {
            if !new.contains(line) {
                let _ = writeln!(diff, "- {line}");
            }
        }
        panic!(
            "the library's public surface differs from agent/{LISTING}:\n{diff}\nKeep new items pub(crate) \
             unless main.rs or the test crates need them. If the change is intended, update the listing with\n    \
             {UPDATE}=1 cargo test -p metadata-guard --test public_api\nand commit agent/{LISTING}."
        );
    }
}

/// The whole listing, one line per public item.
fn listing(src: &Path) -> String {
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut out = String::new();
    for statement in statements(&lib) {
        if let Some(tree) = statement.strip_prefix("pub use ") {
            for (path, name) in use_tree(tree.trim_end_matches(';')) {
                let segments: Vec<&str> = path.iter().map(String::as_str).filter(|s| *s != "crate").collect();
                item(src, &segments, &name, &mut out);
            }
        } else if let Some(module) = statement.strip_prefix("pub mod ") {
            let module = module.trim_end_matches(';').trim();
            let _ = writeln!(out, "mod {module}");
            for file in module_files(src, &[module]) {
                for line in fs::read_to_string(&file).unwrap().lines() {
                    let line = line.trim();
                    if is_pub(line) {
                        let _ = writeln!(out, "  {}: {line}", file.strip_prefix(src).unwrap().display());
                    }
                }
            }
        } else if is_pub(&statement) {
            let _ = writeln!(out, "{}", statement.lines().next().unwrap_or_default());
        }
    }
    out
}

/// `pub` and not `pub(crate)` / `pub(super)` / `pub(in …)`.
fn is_pub(line: &str) -> bool {
    line.starts_with("pub ")
}

/// The top-level statements of a file that start with `pub`, whole (to their `;` or
/// the end of their first line for items with a body).
fn statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        if let Some(s) = open.as_mut() {
            s.push(' ');
            s.push_str(line.trim());
            if line.trim_end().ends_with(';') {
                out.push(open.take().unwrap());
            }
        } else if line.starts_with("pub use ") && !line.trim_end().ends_with(';') {
            open = Some(line.trim().to_string());
        } else if line.starts_with("pub") {
            out.push(line.trim().to_string());
        }
    }
    out
}

/// The leaves of a use tree: each path (without the leaf) and the name it is
/// exported under, e.g. `a::{b::C, d as e}` → (`[a, b]`, `C` as `C`), (`[a]`, `d` as `e`).
fn use_tree(tree: &str) -> Vec<(Vec<String>, Leaf)> {
    fn walk(tree: &str, prefix: &[String], out: &mut Vec<(Vec<String>, Leaf)>) {
        let tree = tree.trim();
        if let Some(open) = tree.find('{') {
            let mut prefix = prefix.to_vec();
            prefix.extend(tree[..open].split("::").map(str::trim).filter(|s| !s.is_empty()).map(String::from));
            let inner = &tree[open + 1..tree.rfind('}').unwrap()];
            let (mut depth, mut start) = (0, 0);
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        walk(&inner[start..i], &prefix, out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            walk(&inner[start..], &prefix, out);
        } else if !tree.is_empty() {
            let (path, alias) = match tree.split_once(" as ") {
                Some((p, a)) => (p.trim(), Some(a.trim())),
                None => (tree, None),
            };
            let mut segments: Vec<String> = prefix.to_vec();
            segments.extend(path.split("::").map(|s| s.trim().to_string()));
            let name = segments.pop().unwrap();
            let exported = alias.unwrap_or(&name).to_string();
            out.push((segments, Leaf { name, exported }));
        }
    }
    let mut out = Vec::new();
    walk(tree, &[], &mut out);
    out
}

struct Leaf {
    name: String,
    exported: String,
}

/// The file of module `segments` (`a/b.rs` or `a/b/mod.rs`).
fn module_file(src: &Path, segments: &[&str]) -> PathBuf {
    let joined: PathBuf = segments.iter().collect();
    let file = src.join(&joined).with_extension("rs");
    if file.exists() {
        file
    } else {
        src.join(joined).join("mod.rs")
    }
}

/// A module's files: its own and every file under its folder.
fn module_files(src: &Path, segments: &[&str]) -> Vec<PathBuf> {
    let mut files = vec![module_file(src, segments)];
    let dir: PathBuf = src.join(segments.iter().collect::<PathBuf>());
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        let mut entries: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        entries.sort();
        for e in entries {
            if e.is_dir() {
                stack.push(e);
            } else if e.extension().is_some_and(|x| x == "rs") && !files.contains(&e) {
                files.push(e);
            }
        }
    }
    files
}

/// Lists the item `leaf` of module `module`, following re-exports to its definition.
fn item(src: &Path, module: &[&str], leaf: &Leaf, out: &mut String) {
    let file = module_file(src, module);
    let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let lines: Vec<&str> = text.lines().collect();
    let kinds = ["struct", "enum", "fn", "const", "static", "type", "trait"];
    // Only items at the file's top level (a method of the same name is not the item).
    let found = lines.iter().position(|l| {
        l.strip_prefix("pub ").is_some_and(|rest| {
            kinds.iter().any(|k| {
                rest.strip_prefix(k).and_then(|r| r.strip_prefix(' ')).is_some_and(|r| {
                    r.strip_prefix(leaf.name.as_str())
                        .is_some_and(|after| !after.starts_with(|c: char| c == '_' || c.is_alphanumeric()))
                })
            })
        })
    });
    let Some(at) = found else {
        // A re-export: follow it (paths relative to this module, or `crate::`/`super::`).
        for statement in statements(&text) {
            let Some(tree) = statement.strip_prefix("pub use ") else { continue };
            for (path, inner) in use_tree(tree.trim_end_matches(';')) {
                if inner.exported == leaf.name {
                    let mut target: Vec<&str> = module.to_vec();
                    for segment in &path {
                        match segment.as_str() {
                            "crate" => target.clear(),
                            "super" => drop(target.pop()),
                            "self" => {}
                            s => target.push(s),
                        }
                    }
                    let renamed = Leaf { name: inner.name, exported: leaf.exported.clone() };
                    return item(src, &target, &renamed, out);
                }
            }
        }
        panic!("{}: no definition or re-export of `{}`", file.display(), leaf.name);
    };
    let rel = file.strip_prefix(src).unwrap().display().to_string();
    let _ = writeln!(out, "{} ({rel})", leaf.exported);
    // Its derives, just above it.
    for l in lines[..at].iter().rev().map(|l| l.trim()) {
        if l.starts_with("#[derive(") || l.starts_with("#[serde(") {
            let _ = writeln!(out, "  {l}");
        } else if !(l.starts_with("///") || l.starts_with("#[")) {
            break;
        }
    }
    let _ = writeln!(out, "  {}", signature(&lines[at..]));
    let head = lines[at].trim_start();
    if head.starts_with("pub struct") || head.starts_with("pub enum") {
        let enumeration = head.starts_with("pub enum");
        for l in body(&lines[at..]) {
            if enumeration || l.starts_with("pub ") {
                let _ = writeln!(out, "    {l}");
            }
        }
        // Its inherent impls' public methods, in any file of the module's folder.
        let dir: Vec<&str> = module.to_vec();
        for f in module_files(src, &dir) {
            let t = fs::read_to_string(&f).unwrap();
            let ls: Vec<&str> = t.lines().collect();
            for (i, l) in ls.iter().enumerate() {
                let l = l.trim_start();
                let inherent = !l.contains(" for ") && impl_target(l) == Some(leaf.name.as_str());
                if inherent {
                    for (j, m) in ls.iter().enumerate().skip(i + 1) {
                        if m.starts_with('}') {
                            break;
                        }
                        let m = m.trim_start();
                        if m.starts_with("pub fn") || m.starts_with("pub const") || m.starts_with("pub async fn") {
                            let _ = writeln!(out, "    {}", signature(&ls[j..]));
                        }
                    }
                }
            }
        }
    }
}

/// The type an `impl` line is for: `impl<T> Name<T> {` → `Name`.
fn impl_target(line: &str) -> Option<&str> {
    let mut rest = line.strip_prefix("impl")?;
    if rest.starts_with('<') {
        let mut depth = 0;
        let end = rest.char_indices().find(|&(_, c)| {
            depth += match c {
                '<' => 1,
                '>' => -1,
                _ => 0,
            };
            depth == 0
        })?;
        rest = &rest[end.0 + 1..];
    } else if !rest.starts_with(' ') {
        return None;
    }
    let rest = rest.trim_start();
    let end = rest.find(|c: char| !(c == '_' || c.is_alphanumeric())).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// An item's signature: its lines up to its body or its end, on one line.
fn signature(lines: &[&str]) -> String {
    let mut s = String::new();
    for l in lines {
        let l = l.trim();
        // A type alias shows what it names; a constant or static its type, not its value.
        let ends = if l.starts_with("pub type") { &[";"][..] } else { &[" {", " = "][..] };
        let cut = ends.iter().filter_map(|p| l.find(p)).chain(l.ends_with(';').then(|| l.len() - 1)).min();
        if !s.is_empty() && !s.ends_with('(') && !l.starts_with(')') {
            s.push(' ');
        }
        match cut {
            Some(c) => {
                s.push_str(l[..c].trim_end());
                return s.replace("( ", "(").replace(", )", ")").replace(",)", ")");
            }
            None => s.push_str(l),
        }
    }
    s
}

/// The lines of an item's body at its first level, comments and attributes left out.
fn body<'a>(lines: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    for (n, l) in lines.iter().enumerate() {
        let code = l.split("//").next().unwrap_or_default();
        let t = l.trim();
        if depth == 1 && n > 0 && !t.is_empty() && !t.starts_with("//") && !t.starts_with("#[") && !t.starts_with('}') {
            out.push(t);
        }
        depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
        if n > 0 && depth <= 0 || (n == 0 && depth == 0 && t.ends_with(';')) {
            break;
        }
    }
    out
}
