//! The layout keeps its promises (issue 14, docs/architecture.md): no
//! module of the primary or the libraries over 600 lines and no function
//! over 80 (tests and tables excepted), no import circle between the
//! primary's modules, `unsafe` nowhere but herd-protocol, and a worker
//! library that does not pull the primary's dependencies.
//!
//! The checks read the sources as text: a function runs from its `fn` line
//! to the first line that closes it at the same indentation (rustfmt's
//! layout), and a module's own code ends where its `#[cfg(test)] mod`
//! begins.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose code is held to the sizes, and their module roots.
const CRATES: &[&str] = &[
    "herd",
    "herd-protocol",
    "herd-worker",
    "herd-tooling",
    "herd-preload",
];
const MAX_MODULE_LINES: usize = 600;
const MAX_FUNCTION_LINES: usize = 80;
/// Functions that are tables, not logic: a row per metric or per key.
const TABLES: &[(&str, &str)] = &[(
    "herd/metrics.rs",
    "new", // one registration per metric, with its help text
)];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, sorted.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Files that hold only tests (or a test harness).
fn is_test_file(path: &Path) -> bool {
    let name = path.file_name().unwrap().to_str().unwrap();
    name == "tests.rs" || name == "world.rs" || name.ends_with("_tests.rs")
}

/// A module's own lines: up to its `#[cfg(test)] mod … {`.
fn own_lines(text: &str) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    let end = (0..lines.len())
        .find(|&i| {
            lines[i].starts_with("#[cfg(test)]")
                && lines
                    .get(i + 1)
                    .is_some_and(|next| next.starts_with("mod ") && next.ends_with('{'))
        })
        .unwrap_or(lines.len());
    lines[..end].to_vec()
}

/// `(name, first line, length)` of every function with a body.
fn functions(lines: &[&str]) -> Vec<(String, usize, usize)> {
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(name) = fn_name(trimmed) else {
            continue;
        };
        // The signature ends at the first line ending in `{` (a body) or `;`.
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{indent}}}");
        let end = (open + 1..lines.len())
            .find(|&j| lines[j] == close)
            .unwrap_or(lines.len() - 1);
        found.push((name, i + 1, end - i + 1));
    }
    found
}

/// The name of the function a line declares, if it declares one.
fn fn_name(line: &str) -> Option<String> {
    let mut rest = line;
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let rest = rest.strip_prefix("fn ")?;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

#[test]
fn no_module_over_600_lines_and_no_function_over_80() {
    let mut too_big = Vec::new();
    for krate in CRATES {
        let src = root().join("crates").join(krate).join("src");
        for path in sources(&src) {
            if is_test_file(&path) {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let lines = own_lines(&text);
            let rel = format!("{krate}/{}", path.strip_prefix(&src).unwrap().display());
            if lines.len() > MAX_MODULE_LINES {
                too_big.push(format!("{rel}: {} lines", lines.len()));
            }
            for (name, at, length) in functions(&lines) {
                let table = TABLES.iter().any(|(f, n)| *f == rel && *n == name);
                if length > MAX_FUNCTION_LINES && !table {
                    too_big.push(format!("{rel}:{at} fn {name}: {length} lines"));
                }
            }
        }
    }
    assert!(too_big.is_empty(), "split these:\n{}", too_big.join("\n"));
}

/// The primary's top-level modules, each with the others it names
/// (`crate::x`) outside its tests.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in sources(src) {
        if is_test_file(&path) {
            continue;
        }
        let rel = path.strip_prefix(src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        let top = top.trim_end_matches(".rs").to_string();
        if top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let uses = graph.entry(top.clone()).or_default();
        for line in own_lines(&text) {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + 7..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

/// A circle in `graph`, if there is one, as the path that closes it.
fn find_circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if !done.insert(node.to_string()) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, done, path) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_primarys_modules_import_each_other_without_a_circle() {
    let graph = module_graph(&root().join("crates/herd/src"));
    assert!(graph.len() > 10, "found the modules: {graph:?}");
    if let Some(circle) = find_circle(&graph) {
        panic!("import circle: {}", circle.join(" -> "));
    }
    // The status types sit below everyone who reports them.
    assert!(graph["status"].is_empty(), "{:?}", graph["status"]);
}

#[test]
fn the_circle_finder_finds_circles() {
    let graph = |edges: &[(&str, &str)]| {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in edges {
            graph
                .entry(from.to_string())
                .or_default()
                .insert(to.to_string());
            graph.entry(to.to_string()).or_default();
        }
        graph
    };
    assert_eq!(find_circle(&graph(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        find_circle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert!(find_circle(&graph(&[("x", "y"), ("a", "b"), ("b", "a")])).is_some());
}

#[test]
fn the_size_checks_see_functions_and_test_modules() {
    let text = "fn short() {\n    1;\n}\n\nimpl A {\n    pub(crate) fn method(\n        x: u8,\n    ) -> u8 {\n        x\n    }\n    fn declared();\n}\n#[cfg(test)]\nmod tests {\n    fn hidden() {}\n}\n";
    let lines = own_lines(text);
    assert_eq!(lines.len(), 12);
    assert_eq!(
        functions(&lines),
        vec![("short".to_string(), 1, 3), ("method".to_string(), 6, 5)]
    );
}

#[test]
fn unsafe_code_lives_in_herd_protocol_and_the_preload_library_alone() {
    let mut found = Vec::new();
    for dir in [
        "crates/herd/src",
        "crates/herd-worker/src",
        "crates/herd-tooling/src",
        "src",
        "workers",
    ] {
        for path in sources(&root().join(dir)) {
            let text = std::fs::read_to_string(&path).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap();
                if code.contains("unsafe ") || code.contains("unsafe{") {
                    found.push(format!("{}:{}", path.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "unsafe outside herd-protocol and herd-preload: {found:?}"
    );
    // And every unsafe block there says why it is sound; every unsafe fn
    // says what its callers must hold (`# Safety`).
    let protocol = sources(&root().join("crates/herd-protocol/src"));
    for path in protocol
        .into_iter()
        .chain(sources(&root().join("crates/herd-preload/src")))
    {
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap();
            if !(code.contains("unsafe {") || code.contains("unsafe fn")) {
                continue;
            }
            let above = &lines[n.saturating_sub(8)..n];
            let says = |l: &&str| {
                l.contains("SAFETY:") || (code.contains("unsafe fn") && l.contains("# Safety"))
            };
            assert!(
                above.iter().chain([line]).any(says),
                "{}:{}: unsafe without a `// SAFETY:` comment above it",
                path.display(),
                n + 1
            );
        }
    }
}

#[test]
fn the_worker_library_pulls_no_primary_dependency() {
    let manifest = std::fs::read_to_string(root().join("crates/herd-worker/Cargo.toml")).unwrap();
    let protocol = std::fs::read_to_string(root().join("crates/herd-protocol/Cargo.toml")).unwrap();
    let deps = |text: &str| -> Vec<String> {
        let Some(section) = text.split("[dependencies]").nth(1) else {
            return Vec::new();
        };
        let section = section.split("\n[").next().unwrap();
        section
            .lines()
            .filter_map(|l| l.split('=').next())
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty() && !name.starts_with('#'))
            .collect()
    };
    let mut pulled = deps(&manifest);
    pulled.extend(deps(&protocol));
    for primary_only in [
        "herd",
        "herd-tooling",
        "hyper",
        "prometheus",
        "clap",
        "toml",
        "hdrhistogram",
        "mio",
        "serde_json",
        "tracing-subscriber",
    ] {
        assert!(
            !pulled.iter().any(|d| d == primary_only),
            "herd-worker pulls {primary_only}: {pulled:?}"
        );
    }
}

/// What a Rust server adds to run under herd stays small: at most 25
/// crates, herd-worker's own included (`cargo tree -p herd-worker`).
#[test]
fn the_worker_library_has_at_most_25_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "herd-worker",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(root())
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let crates: BTreeSet<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(crates.len() <= 25, "{} crates: {crates:?}", crates.len());
    assert!(
        crates.contains("herd-protocol") && !crates.contains("herd"),
        "{crates:?}"
    );
}

/// Every event name herd logs (`event = "…"`) is listed in README's Logs
/// section, where log pipelines look them up.
#[test]
fn every_log_event_is_in_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let logs = readme
        .split("\n## Logs\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Logs section");
    let mut missing = BTreeSet::new();
    let mut seen = 0;
    for path in sources(&root().join("crates/herd/src")) {
        let text = std::fs::read_to_string(&path).unwrap();
        for (at, _) in text.match_indices("event = \"") {
            let name: String = text[at + 9..].chars().take_while(|&c| c != '"').collect();
            seen += 1;
            if !logs.contains(&format!("`{name}`")) {
                missing.insert(name);
            }
        }
    }
    assert!(seen > 40, "found only {seen} events");
    assert!(missing.is_empty(), "not in README's Logs: {missing:?}");
}
