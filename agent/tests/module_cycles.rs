// SPDX-License-Identifier: Apache-2.0
//! No import cycle between the top-level modules of `agent/src` (a module is a file or
//! a folder directly under it): the data flow of lib.rs reads one way, so must the
//! `use`s. A new edge that closes a cycle fails this test, which names the cycle.
//!
//! The graph is the one `house-tools/cycles.py` builds: a file of module `a` that
//! mentions `crate::b` (or `b` in a `crate::{…}` group) makes the edge `a → b`.
//! Comment lines are skipped, and so are files whose name contains `tests` (unit
//! tests may reach anywhere).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::Path,
};

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn the_top_level_modules_have_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (modules, files) = read_tree(&src);
    let graph = graph(&modules, &files);
    assert!(graph.contains_key("conceal"), "no edges were found in {}: {graph:?}", src.display());
    let cycles = cycles(&graph);
    assert!(
        cycles.is_empty(),
        "import cycles between the top-level modules of agent/src:\n{}",
        describe(&graph, &cycles)
    );
}

#[test]
fn a_cycle_is_found_and_named() {
    let modules: BTreeSet<String> = ["a", "b", "c", "d"].map(String::from).into();
    let files = [
        ("a.rs", "use crate::b::Thing;\n"),
        ("b/mod.rs", "use crate::{\n    c::X,\n    d::{Y, a},\n};\n// crate::d in a comment\n"),
        ("b/tests.rs", "use crate::d;\n"),
        ("c.rs", "pub fn f() -> crate::a::Thing { todo!() }\n"),
        ("d.rs", "/// `crate::a`\nuse crate::{b as _};\n"),
    ]
    .map(|(path, text)| (path.to_owned(), text.to_owned()));
    let edges = graph(&modules, &files);
    assert_eq!(cycles(&edges), [vec!["a".to_owned(), "b".to_owned(), "c".to_owned(), "d".to_owned()]]);
    let text = describe(&edges, &cycles(&edges));
    assert!(text.contains("CYCLE: a, b, c, d") && text.contains("d -> b"), "{text}");
    // Without `d → b`, `d` leaves the cycle.
    let files: Vec<_> = files.into_iter().filter(|(path, _)| path != "d.rs").collect();
    assert_eq!(cycles(&graph(&modules, &files)), [vec!["a".to_owned(), "b".to_owned(), "c".to_owned()]]);
}

/// The top-level modules under `src`, and every `.rs` file below it (its path relative
/// to `src`, with `/` between components, and its text).
fn read_tree(src: &Path) -> (BTreeSet<String>, Vec<(String, String)>) {
    let mut modules = BTreeSet::new();
    for entry in fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type().unwrap().is_dir() {
            modules.insert(name);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem != "lib" && stem != "main" {
                modules.insert(stem.to_owned());
            }
        }
    }
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel: Vec<String> = path
                    .strip_prefix(src)
                    .unwrap()
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                files.push((rel.join("/"), fs::read_to_string(&path).unwrap()));
            }
        }
    }
    files.sort();
    (modules, files)
}

/// Module → the other top-level modules its files refer to.
fn graph(modules: &BTreeSet<String>, files: &[(String, String)]) -> Graph {
    let mut graph = Graph::new();
    for (path, text) in files {
        let first = path.split('/').next().unwrap_or_default();
        let module = first.strip_suffix(".rs").unwrap_or(first);
        let file_name = path.rsplit('/').next().unwrap_or_default();
        if module == "lib" || module == "main" || file_name.contains("tests") {
            continue;
        }
        let code: String =
            text.lines().filter(|line| !line.trim_start().starts_with("//")).flat_map(|line| [line, "\n"]).collect();
        for target in references(&code) {
            if target != module && modules.contains(&target) {
                graph.entry(module.to_owned()).or_default().insert(target);
            }
        }
    }
    graph
}

/// The first segment after every `crate::`, and the first segment of each item of a
/// `crate::{…}` group.
fn references(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect() };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start => {
                        item_start = false;
                        out.insert(ident(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// The strongly connected components of more than one module, each sorted (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found.sort();
    state.found
}

/// Each cycle with its members' edges inside it.
fn describe(graph: &Graph, cycles: &[Vec<String>]) -> String {
    let mut out = String::new();
    for cycle in cycles {
        let _ = writeln!(out, "CYCLE: {}", cycle.join(", "));
        for module in cycle {
            let inside: Vec<&str> =
                graph.get(module).into_iter().flatten().filter(|t| cycle.contains(t)).map(String::as_str).collect();
            let _ = writeln!(out, "   {module} -> {}", inside.join(", "));
        }
    }
    out
}
