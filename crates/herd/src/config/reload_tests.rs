//! The reload table against the code and the docs: [`RELOAD`] lists every
//! key the file takes, a reload refuses exactly its `restart` keys, and
//! README's configuration reference and `config.toml` say the same per key.

use super::*;

use std::collections::{BTreeMap, BTreeSet};

/// A file at the repository's root.
fn repository_file(name: &str) -> String {
    let path = format!("{}/../../{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn table() -> BTreeMap<&'static str, &'static str> {
    let table: BTreeMap<_, _> = RELOAD.iter().map(|&(key, r)| (key, r.word())).collect();
    assert_eq!(table.len(), RELOAD.len(), "a key is in RELOAD twice");
    table
}

/// The names serde lists after "expected" when `text` sets an unknown key.
fn fields_named_by(text: &str) -> Vec<String> {
    let message = Config::parse(text).unwrap_err().message;
    let (_, expected) = message
        .split_once("expected ")
        .unwrap_or_else(|| panic!("{text:?}: {message}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// Every key the file takes, as serde knows them: the top-level fields,
/// and the fields of each table that is a struct of its own.
fn config_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for field in fields_named_by("no_such_key = 1\n") {
        let below = format!("[{field}]\nno_such_key = 1\n");
        let is_table = Config::parse(&below)
            .err()
            .is_some_and(|e| e.message.starts_with("unknown field `no_such_key`"));
        if is_table {
            keys.extend(
                fields_named_by(&below)
                    .into_iter()
                    .map(|sub| format!("{field}.{sub}")),
            );
        } else {
            keys.insert(field);
        }
    }
    keys
}

#[test]
fn the_table_lists_every_key_the_file_takes() {
    let table: BTreeSet<String> = table().keys().map(|k| k.to_string()).collect();
    assert_eq!(config_keys(), table);
}

/// The rows of README's configuration reference: key -> "on reload" cell.
fn readme_reference() -> BTreeMap<String, String> {
    let readme = repository_file("README.md");
    let section = readme
        .split("\n## Configuration reference\n")
        .nth(1)
        .expect("README has a configuration reference")
        .split("\n## ")
        .next()
        .unwrap();
    let mut rows = section.lines().filter(|line| line.starts_with('|'));
    let header: Vec<&str> = rows.next().unwrap().split('|').map(str::trim).collect();
    let column = header
        .iter()
        .position(|&cell| cell == "on reload")
        .expect("the reference has an `on reload` column");
    let mut reference = BTreeMap::new();
    for row in rows.filter(|row| row.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        for key in cells[1].split(", ") {
            let key = key.trim_matches('`').to_string();
            let word = cells[column].to_string();
            assert!(reference.insert(key, word).is_none(), "{row}");
        }
    }
    reference
}

#[test]
fn readme_states_each_keys_reload_as_the_table_does() {
    let readme = readme_reference();
    let table: BTreeMap<String, String> = table()
        .into_iter()
        .map(|(key, word)| (key.to_string(), word.to_string()))
        .collect();
    assert_eq!(
        readme, table,
        "README's configuration reference (left) and RELOAD (right)"
    );
}

/// `config.toml`'s keys (set or commented out), each with the comment
/// paragraph above it, from the blank line before.
fn config_toml_keys() -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let (mut table, mut paragraph) = (String::new(), String::new());
    for line in repository_file("config.toml").lines() {
        if line.trim().is_empty() {
            paragraph.clear();
        } else if let Some(name) = line.strip_prefix('[') {
            table = name.trim_end_matches(']').to_string();
        } else if let Some(key) = key_of(line) {
            let key = match table.as_str() {
                "" => key.to_string(),
                table => format!("{table}.{key}"),
            };
            keys.insert(key, paragraph.clone());
        } else {
            paragraph.push_str(line);
            paragraph.push('\n');
        }
    }
    keys
}

/// `key` of a `key = value` line, or of one commented out (`# key = value`).
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.trim_start_matches("# ").split_once(" = ")?;
    key.chars()
        .all(|c| c.is_ascii_lowercase() || c == '_')
        .then_some(key)
}

#[test]
fn config_toml_documents_each_key_and_marks_the_restart_ones() {
    let documented = config_toml_keys();
    let table = table();
    let documented_keys: BTreeSet<&str> = documented.keys().map(String::as_str).collect();
    let table_keys: BTreeSet<&str> = table.keys().copied().collect();
    assert_eq!(
        documented_keys, table_keys,
        "config.toml (left) and RELOAD (right)"
    );
    for (key, paragraph) in &documented {
        let marked = paragraph.contains("Restart to change");
        assert_eq!(
            marked,
            table[key.as_str()] == "restart",
            "config.toml's comment on `{key}` and RELOAD disagree:\n{paragraph}"
        );
    }
}

/// Settings from a minimal file with `extra` after it.
fn with(extra: &str) -> Settings {
    super::tests::with(extra).unwrap()
}

#[test]
fn a_reload_names_every_key_only_a_restart_can_change() {
    let running = with("");
    assert!(running.restart_needed(&with("")).is_empty());
    assert_eq!(running.reload_refusal(&with("")), None);
    // What a reload applies itself.
    let applied = with(
        "workers = 3\ncommand = [\"sh\"]\nhang_timeout = \"1s\"\nready_timeout = \"5s\"\n\
         shutdown_timeout = \"1s\"\nreload_batch = 2\nuser = \"root\"\nenv = { A = \"b\" }\n\
         [handoff]\nmax_unacked = 3\nqueue_limit = 0\n[restart]\nbackoff_base = \"1s\"\n",
    );
    assert_eq!(running.restart_needed(&applied), Vec::<String>::new());
    for (extra, named) in [
        (
            "listen = [\"127.0.0.2:0\"]\n",
            "`listen` ([127.0.0.1:0] -> [127.0.0.2:0])",
        ),
        ("backlog = 64\n", "`backlog` (511 -> 64)"),
        ("mode = \"sticky\"\n", "`mode` (round-robin -> sticky)"),
        (
            "kill_mode = \"process-group\"\n",
            "`kill_mode` (auto -> process-group)",
        ),
        (
            "protocol = \"node-cluster\"\n",
            "`protocol` (herd -> node-cluster)",
        ),
        (
            "control = \"other.sock\"\n",
            "`control` (herd.sock -> other.sock)",
        ),
        (
            "[metrics]\naddress = \"9000\"\n",
            "`metrics.address` (none -> 127.0.0.1:9000)",
        ),
        (
            "monitor_interval = \"2s\"\n",
            "`monitor_interval` (1s -> 2s)",
        ),
    ] {
        assert_eq!(running.restart_needed(&with(extra)), [named], "{extra}");
    }
    // Node workers: rotation on its own, and not again when mode changes it.
    let node = with("protocol = \"node-cluster\"\n");
    let handoff = with("protocol = \"node-cluster\"\nrotation = \"handoff\"\n");
    assert_eq!(
        node.restart_needed(&handoff),
        ["`rotation` (kernel -> handoff)"]
    );
    let sticky = with("protocol = \"node-cluster\"\nmode = \"sticky\"\n");
    assert_eq!(
        node.restart_needed(&sticky),
        ["`mode` (round-robin -> sticky)"]
    );
    // The refusal names them all and what to do.
    assert_eq!(
        running
            .reload_refusal(&with("backlog = 64\nmode = \"sticky\"\ncontrol = \"o.sock\"\n"))
            .unwrap(),
        "reload refused, keeping the running config: `backlog` (511 -> 64), `mode` (round-robin -> sticky) and `control` (herd.sock -> o.sock) cannot change by reload: restart herd to change them"
    );
}
