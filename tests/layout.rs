//! The architecture as a test: the module graph of `src/` has no cycle, no pipeline stage imports
//! `app` or another stage or names a concrete input source (the seam is `crate::root`), and no
//! source file outside tests grows past ~600 lines. Run it with
//! `cargo test --test integration layout`.

#![allow(clippy::unwrap_used)]
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The stages, in pipeline order (`src/lib.rs` lists them so).
const STAGES: [&str; 6] = ["watch", "settle", "claim", "upload", "poll", "sort"];
/// Modules that know every stage: the wiring and the commands.
const WIRING: [&str; 4] = ["app", "commands", "demo", "lib"];
/// Modules that reach the scanning service only through its seam (`scanner`): the stages and
/// what they share.
const BEHIND_SEAM: [&str; 9] = [
    "watch", "settle", "claim", "upload", "poll", "sort", "context", "pipeline", "limits",
];
/// Names of the concrete scanner client that a module behind the seam must not use; a path into
/// the `kata` module at all counts too (the seam re-exports what the pipeline may name).
const CONCRETE_SCANNER: [&str; 4] = ["KataClient", "ClientOptions", "AnswerObserver", "kata::"];
/// The longest source file allowed outside tests.
const MAX_LINES: usize = 600;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn is_test_file(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_string_lossy();
    name == "tests.rs" || name.ends_with("_tests.rs")
}

/// The top-level module a file belongs to (`src/fsops/dir.rs` → `fsops`).
fn module_of(src: &Path, p: &Path) -> String {
    let rel = p.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file without its unit tests (they may use anything): an inline
/// `#[cfg(test)] mod … {` block at the end is cut off, and a `#[cfg(test)] mod tests;`
/// declaration is dropped, never the code after it (a folder's `mod.rs` declares its tests
/// near the top, above all of its imports).
fn production_code(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" {
            let next = lines.peek().map_or("", |l| l.trim());
            if next.starts_with("mod ") && next.ends_with(';') {
                lines.next();
                continue;
            }
            if next.starts_with("mod ") {
                break;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Top-level modules a piece of code refers to through `crate::` paths and `use crate::{…}`.
fn references(code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The names at the group's top level only (`crate::{a::{b, c}, d}` → a, d).
            let mut depth = 0usize;
            let mut top = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    _ if depth == 0 => top.push(c),
                    _ => {}
                }
            }
            for part in top.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if known.contains(&name) {
                    out.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if known.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

/// The production code of every module, comment lines left out, by top-level module.
fn module_code() -> BTreeMap<String, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for p in files.iter().filter(|p| !is_test_file(p)) {
        let text = std::fs::read_to_string(p).unwrap();
        let code = out.entry(module_of(&src, p)).or_default();
        for line in production_code(&text).lines() {
            if !line.trim_start().starts_with("//") {
                code.push_str(line);
                code.push('\n');
            }
        }
    }
    out
}

/// The concrete scanner names `code` uses, the first line of each.
fn concrete_scanner_uses(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    for name in CONCRETE_SCANNER {
        if let Some(line) = code.lines().find(|l| l.contains(name)) {
            found.push(format!("{name} in `{}`", line.trim()));
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let known: BTreeSet<String> = files.iter().map(|p| module_of(&src, p)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in files.iter().filter(|p| !is_test_file(p)) {
        let m = module_of(&src, p);
        let text = std::fs::read_to_string(p).unwrap();
        let code: String = production_code(&text)
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let refs = references(&code, &known);
        let entry = g.entry(m.clone()).or_default();
        entry.extend(refs.into_iter().filter(|r| *r != m));
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|x| x == m).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    if let Some(cycle) = find_cycle(&g) {
        panic!("import cycle: {}", cycle.join(" → "));
    }
}

#[test]
fn no_stage_imports_app_or_another_stage() {
    let g = graph();
    let mut bad = Vec::new();
    for stage in STAGES {
        for r in g.get(stage).into_iter().flatten() {
            if STAGES.contains(&r.as_str()) || WIRING.contains(&r.as_str()) {
                bad.push(format!("{stage} → {r}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "stages must meet only in pipeline/context: {bad:?}"
    );
}

/// What only `root` (the input-source seam) and the wiring may name: how a root keeps its
/// folders (`fsops::roots`, `RootDirs`), the claiming primitive behind `Root::claim_files`,
/// and the configuration's list of watches, which stages used to index in parallel with the
/// roots. A stage takes a `Root` or a `RootId`, so that a source that is not a folder (a
/// bucket) is a new module behind `Root`, not a change to every stage.
const CONCRETE_SOURCE: [&str; 5] = [
    "RootDirs",
    "fsops::roots",
    "claim_many",
    "staging_in_place",
    "config.watches",
];

/// The concrete source names a piece of production code uses.
fn concrete_source_names(code: &str) -> Vec<&'static str> {
    CONCRETE_SOURCE
        .into_iter()
        .filter(|name| code.contains(name))
        .collect()
}

#[test]
fn no_stage_names_a_concrete_source() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut bad = Vec::new();
    for p in files.iter().filter(|p| !is_test_file(p)) {
        let m = module_of(&src, p);
        if !STAGES.contains(&m.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(p).unwrap();
        let code: String = production_code(&text)
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for name in concrete_source_names(&code) {
            bad.push(format!("{} names {name}", p.display()));
        }
    }
    assert!(
        bad.is_empty(),
        "stages reach a root through crate::root (Root, RootId, Which): {bad:?}"
    );
}

#[test]
fn the_source_check_sees_a_concrete_source() {
    let code =
        "use crate::fsops::roots::Which;\nfn f(d: &RootDirs, c: &Config) { c.config.watches[0]; }";
    assert_eq!(
        concrete_source_names(code),
        vec!["RootDirs", "fsops::roots", "config.watches"]
    );
    assert!(concrete_source_names("use crate::root::{Root, Which};").is_empty());
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        find_cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let known: BTreeSet<String> = ["app".to_string(), "journal".to_string()].into();
    assert_eq!(
        references(
            "use crate::{app::X, journal};\nlet x = crate::journal::y;",
            &known
        ),
        known
    );
    assert_eq!(
        references("use crate::{journal::{A, B}, app};", &known),
        known,
        "a name after a nested group is missed"
    );
}

/// Review finding: the production code of a file was everything before its first
/// `#[cfg(test)]`, and `watch/mod.rs`, `settle/mod.rs` and `fsops/mod.rs` declare
/// `#[cfg(test)] mod tests;` above their imports: a stage importing another stage there went
/// unseen by the layout check.
#[test]
fn a_stage_import_below_a_test_module_declaration_is_seen() {
    let text = "//! settle\n#[cfg(test)]\nmod tests;\nuse crate::claim::Inputs;\n\
                fn f() {}\n#[cfg(test)]\nmod more {\n    use crate::app::X;\n}\n";
    let known: BTreeSet<String> = ["app".to_string(), "claim".to_string()].into();
    let refs = references(&production_code(text), &known);
    assert!(
        refs.contains("claim"),
        "an import below `mod tests;` is missed"
    );
    assert!(
        !refs.contains("app"),
        "an inline test module counts as production code"
    );
}

#[test]
fn no_source_file_outside_tests_exceeds_600_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let long: Vec<_> = files
        .iter()
        .filter(|p| !is_test_file(p))
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let n = production_code(&text).lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", p.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these by concern: {long:?}");
}

/// Issue 21: the stages named the KATA client where the scanner seam should be, so a second
/// scanner would have touched every stage.
#[test]
fn no_stage_names_the_concrete_scanner() {
    let code = module_code();
    let g = graph();
    let mut bad = Vec::new();
    for m in BEHIND_SEAM {
        let text = code.get(m).unwrap_or_else(|| panic!("no module {m}"));
        for u in concrete_scanner_uses(text) {
            bad.push(format!("{m}: {u}"));
        }
        if g.get(m).is_some_and(|refs| refs.contains("kata")) {
            bad.push(format!("{m} → kata"));
        }
    }
    assert!(
        bad.is_empty(),
        "use crate::scanner (the seam), not the KATA client: {bad:?}"
    );
}

#[test]
fn the_scanner_seam_check_sees_a_planted_use() {
    for planted in [
        "use crate::kata::KataClient;",
        "use crate::kata::{ScanId, ScanState};",
        "let c: crate::kata::client::KataClient = x;",
        "use crate::{journal, kata::ApiError};",
        "fn f(c: &KataClient) {}",
    ] {
        let code = format!("use crate::scanner::Scanner;\n{planted}\nfn g() {{}}\n");
        assert!(
            !concrete_scanner_uses(&production_code(&code)).is_empty(),
            "missed: {planted}"
        );
    }
    assert!(concrete_scanner_uses("use crate::scanner::{Scanner, ScanId};\n").is_empty());
}
