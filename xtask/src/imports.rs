//! The import graph of each crate's modules, for `tidy`: a module may not import a module that
//! imports it back (an import circle), except along the tree itself (a module and its own
//! descendants share items by design: `mod.rs` re-exports its children, children use their
//! parent's types).
//!
//! What counts as an import: a path `crate::a::b…` or `super::a…` anywhere in code (not in
//! comments, not in the file's `#[cfg(test)] mod tests`), including the items of a
//! `use crate::{…}` group, resolved to the longest module path that exists. Paths into other crates are dependencies, which cargo already keeps
//! acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module path inside its crate: `["mha", "train"]`; the crate root is `[]`.
type Module = Vec<String>;

/// The module path of a source file under `src/`: `mha/train.rs` -> `mha::train`, `mha/mod.rs`
/// -> `mha`, `lib.rs` -> the root.
fn module_of(relative: &Path) -> Module {
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// The identifier paths that follow `prefix` (`crate::` or `super::`) in `code`, braces of a
/// `use` group expanded one level: `crate::{a::B, c}` gives `a::B` and `c`.
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        let mut path = Vec::new();
        let mut rest = s;
        loop {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                break;
            }
            path.push(rest[..end].to_string());
            match rest[end..].strip_prefix("::") {
                Some(next) if next.starts_with(|c: char| c.is_alphanumeric() || c == '_') => rest = next,
                _ => break,
            }
        }
        path
    };
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(found) = code[at..].find(prefix) {
        let start = at + found;
        at = start + prefix.len();
        // Not the tail of a longer name (`my_crate::`).
        if code[..start].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let path = ident(item.trim());
                if !path.is_empty() {
                    out.push(path);
                }
            }
        } else {
            let path = ident(rest);
            if !path.is_empty() {
                out.push(path);
            }
        }
    }
    out
}

/// The longest prefix of `path` that is a module of `modules`.
fn resolve(path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains(m))
}

/// Which modules each module imports (`(path under src/, text)` of one crate), a module's own
/// ancestors and descendants left out.
fn edges(files: &[(std::path::PathBuf, String)]) -> BTreeMap<Module, BTreeSet<Module>> {
    let modules: BTreeSet<Module> = files.iter().map(|(p, _)| module_of(p)).collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (path, text) in files {
        let here = module_of(path);
        // A module's own tests may import whatever they test together with it.
        let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut targets: Vec<Module> = paths_after(&code, "crate::")
            .into_iter()
            .filter_map(|p| resolve(&p, &modules))
            .collect();
        // `super::` from `a::b::c` (file `a/b/c.rs`) names `a::b`'s items.
        if let Some(parent) = here.split_last().map(|(_, p)| p.to_vec()) {
            targets.extend(paths_after(&code, "super::").into_iter().filter_map(|p| {
                let mut full = parent.clone();
                full.extend(p);
                resolve(&full, &modules)
            }));
        }
        for target in targets {
            let related = target.starts_with(&here) || here.starts_with(&target);
            if !related {
                edges.entry(here.clone()).or_default().insert(target);
            }
        }
    }
    edges
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".to_string()
    } else {
        m.join("::")
    }
}

/// The import circles of one crate's sources (`(path under src/, text)`): pairs of modules, as
/// `a <-> b`, neither inside the other.
pub fn circles(files: &[(std::path::PathBuf, String)]) -> Vec<String> {
    let edges = edges(files);
    let mut found = Vec::new();
    for (a, targets) in &edges {
        for b in targets {
            if a < b && edges.get(b).is_some_and(|back| back.contains(a)) {
                found.push(format!("{} <-> {}", name(a), name(b)));
            }
        }
    }
    found
}

/// Imports that go up a layering: a module under `lower` (`support`) importing one under
/// `upper` (`commands`), as `support::x -> commands::y`.
pub fn upward(files: &[(std::path::PathBuf, String)], lower: &str, upper: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (from, targets) in edges(files) {
        if from.first().map(String::as_str) != Some(lower) {
            continue;
        }
        for to in targets.iter().filter(|t| t.first().map(String::as_str) == Some(upper)) {
            found.push(format!("{} -> {}", name(&from), name(to)));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file(path: &str, text: &str) -> (PathBuf, String) {
        (PathBuf::from(path), text.to_string())
    }

    #[test]
    fn a_circle_is_found_and_the_tree_is_not_one() {
        let files = [
            file("lib.rs", "//! Root.\nmod a;\nmod b;\nmod m;\npub use a::X;\n"),
            file("a.rs", "//! A.\nuse crate::b::{Y, Z};\npub struct X;\n"),
            file(
                "b.rs",
                "//! B.\npub struct Y;\npub struct Z;\nfn f() { crate::a::X; }\n",
            ),
            file("m/mod.rs", "//! M.\nmod c;\nmod d;\npub use c::C;\npub struct Core;\n"),
            file(
                "m/c.rs",
                "//! C uses its parent and D.\nuse super::{Core, d::D};\npub struct C;\n",
            ),
            file(
                "m/d.rs",
                "//! D: no circle, only comments name C.\n// super::c::C\npub struct D;\n",
            ),
        ];
        assert_eq!(circles(&files), vec!["a <-> b".to_string()]);
        let fixed = [
            file("lib.rs", "//! Root.\nmod a;\nmod b;\n"),
            file("a.rs", "//! A.\nuse crate::{b::Y, b};\n"),
            file("b.rs", "//! B.\npub struct Y;\nfn g(x: my_crate::a::X) {}\n"),
        ];
        assert!(circles(&fixed).is_empty());
    }

    #[test]
    fn an_import_up_the_layers_is_found() {
        let files = [
            file("lib.rs", "//! Root.\nmod commands;\nmod support;\n"),
            file("commands/mod.rs", "//! Commands.\npub mod run;\n"),
            file("commands/run.rs", "//! Run.\nuse crate::support::timing::measure;\n"),
            file("support/mod.rs", "//! Support.\npub mod timing;\npub mod plot;\n"),
            file("support/timing.rs", "//! Timing.\npub fn measure() {}\n"),
            file("support/plot.rs", "//! Plot.\nuse crate::commands::run;\n"),
        ];
        assert_eq!(
            upward(&files, "support", "commands"),
            ["support::plot -> commands::run"]
        );
        assert!(upward(&files[..5], "support", "commands").is_empty());
    }
}
