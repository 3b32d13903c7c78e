//! House rules no compiler checks, as a `#[test]` (the way rust-analyzer runs its tidy checks)
//! and as `cargo xtask tidy`: every module opens with a `//!` header, no `#[should_panic]`
//! (input errors are asserted as `Err`), no trailing whitespace, and every planted bug of
//! `cargo xtask mutants --planted` still finds the code it patches, no import circle between
//! a crate's modules (`imports.rs`), and rooms a reader can hold: outside tests, no file over
//! [`MAX_FILE_LINES`] lines and no function over [`MAX_FN_LINES`] (about 600 and 120, with a
//! few lines' margin).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The Rust sources of the crates and of xtask, with their text (fixtures and targets skipped).
fn rust_files(root: &Path) -> Result<Vec<(PathBuf, String)>> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "target" && n != "fixtures") {
                    walk(&path, out)?;
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push((path.clone(), std::fs::read_to_string(&path)?));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(&root.join("crates"), &mut files)?;
    walk(&root.join("xtask/src"), &mut files)?;
    Ok(files)
}

/// What breaks the house rules in one file, `shown` naming it.
fn problems_in(shown: &str, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if !text.trim_start().starts_with("//!") {
        problems.push(format!(
            "{shown}: does not open with a `//!` header saying what it is for"
        ));
    }
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[should_panic") {
            problems.push(format!("{shown}:{}: #[should_panic]; assert the Err instead", i + 1));
        }
        if line.ends_with(' ') || line.ends_with('\t') {
            problems.push(format!("{shown}:{}: trailing whitespace", i + 1));
        }
    }
    problems
}

/// Lines a source file may have before its `#[cfg(test)] mod tests` (tests, benches and
/// examples are not counted).
const MAX_FILE_LINES: usize = 610;
/// Lines a function may have, signature to closing brace.
const MAX_FN_LINES: usize = 125;

/// Whether `path` holds only tests, benchmarks, examples or fuzz targets.
fn is_test_code(path: &Path) -> bool {
    path.iter()
        .any(|c| matches!(c.to_str(), Some("tests" | "benches" | "examples" | "fuzz_targets")))
        || path.file_name().is_some_and(|n| n == "tests.rs")
}

/// Files and functions of `text` longer than the limits, `shown` naming the file. Only the code
/// before a `#[cfg(test)]` (or `#[cfg(all(test, …))]`) `mod tests` counts.
fn too_long(shown: &str, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .windows(2)
        .position(|w| w[0].starts_with("#[cfg(") && w[0].contains("test") && w[1].starts_with("mod tests"))
        .unwrap_or(lines.len());
    let mut problems = Vec::new();
    if end > MAX_FILE_LINES {
        problems.push(format!(
            "{shown}: {end} lines of non-test code (at most {MAX_FILE_LINES}): split it by what its parts are for"
        ));
    }
    for (start, line) in lines[..end].iter().enumerate() {
        let Some(name) = fn_name(line) else { continue };
        let indent = &line[..line.len() - line.trim_start().len()];
        // The signature ends at the first line ending in `{` (a body) or `;` (a declaration).
        let Some(open) = (start..end).find(|&i| lines[i].trim_end().ends_with(['{', ';'])) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let close = (open..end).find(|&i| lines[i].strip_prefix(indent) == Some("}"));
        let length = close.map_or(end - start, |c| c - start + 1);
        if length > MAX_FN_LINES {
            problems.push(format!(
                "{shown}:{}: fn {name} has {length} lines (at most {MAX_FN_LINES}): give its parts names",
                start + 1
            ));
        }
    }
    problems
}

/// The name of the function `line` declares, if it declares one.
fn fn_name(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    if rest.starts_with("//") {
        return None;
    }
    if let Some(after) = rest.strip_prefix("pub") {
        rest = match after.strip_prefix('(') {
            Some(scoped) => scoped.split_once(')')?.1.trim_start(),
            None => after.strip_prefix(' ')?,
        };
    }
    for qualifier in ["const ", "async ", "unsafe ", "extern \"C\" "] {
        rest = rest.strip_prefix(qualifier).unwrap_or(rest);
    }
    let name = rest.strip_prefix("fn ")?;
    let len = name.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(&name[..len])
}

/// `xtask/python/planted_bugs.py --check-anchors`: each planted bug's anchor text is still in its
/// file (python3, or `ATTN_PYTHON`, standard library only).
fn planted_anchors(root: &Path) -> Result<()> {
    let python = std::env::var("ATTN_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(root.join("xtask/python/planted_bugs.py"))
        .arg("--check-anchors")
        .current_dir(root)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {python} for the planted bugs' anchors: {e}"))?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Checks every source file under `root`; fails listing each problem.
pub fn check(root: &Path) -> Result<()> {
    let mut problems = Vec::new();
    let files = rust_files(root)?;
    for (path, text) in &files {
        let shown = path.strip_prefix(root).unwrap_or(path).display().to_string();
        problems.extend(problems_in(&shown, text));
        if !is_test_code(path.strip_prefix(root).unwrap_or(path)) {
            problems.extend(too_long(&shown, text));
        }
    }
    for krate in std::fs::read_dir(root.join("crates"))? {
        let src = krate?.path().join("src");
        if !src.is_dir() {
            continue;
        }
        let files: Vec<(PathBuf, String)> = files
            .iter()
            .filter_map(|(p, t)| p.strip_prefix(&src).ok().map(|r| (r.to_path_buf(), t.clone())))
            .collect();
        let shown = src.strip_prefix(root).unwrap_or(&src).display().to_string();
        for circle in crate::imports::circles(&files) {
            problems.push(format!(
                "{shown}: import circle {circle}: move what both need below both"
            ));
        }
        // The CLI's rooms: subcommands over what they share.
        for up in crate::imports::upward(&files, "support", "commands") {
            problems.push(format!("{shown}: {up}: support/ may not import a subcommand"));
        }
    }
    if let Err(e) = planted_anchors(root) {
        problems.push(e.to_string());
    }
    if !problems.is_empty() {
        bail!("tidy:\n  {}", problems.join("\n  "));
    }
    eprintln!("tidy: ok ({} files)", files.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workspace_follows_the_house_rules() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let files = rust_files(root).unwrap();
        assert!(files.len() > 40, "only {} files found", files.len());
        check(root).unwrap();
    }

    #[test]
    fn each_rule_catches_its_breach() {
        let bad = "use std::fmt; \n#[test]\n#[should_panic]\nfn f() {}\n";
        let problems = problems_in("bad.rs", bad);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("`//!` header"));
        assert!(problems[1].contains("bad.rs:1: trailing whitespace"));
        assert!(problems[2].contains("bad.rs:3: #[should_panic]"));
        assert!(problems_in("good.rs", "//! What it is.\nfn f() {}\n").is_empty());
    }

    #[test]
    fn long_files_and_functions_are_named() {
        let body = |n: usize| "    let x = 1;\n".repeat(n);
        let long_fn = format!("pub(crate) fn big(\n    a: usize,\n) {{\n{}}}\n", body(MAX_FN_LINES));
        let problems = too_long("big.rs", &long_fn);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("big.rs:1: fn big has"), "{problems:?}");
        // At the limit, a declaration, and functions inside the tests module pass.
        let at_limit = format!("fn ok() {{\n{}}}\n", body(MAX_FN_LINES - 2));
        assert!(too_long("ok.rs", &at_limit).is_empty());
        let declared = "trait T {\n    fn f(\n        &self,\n    ) -> usize;\n}\n";
        assert!(too_long("trait.rs", declared).is_empty());
        let in_tests = format!("//! x\n#[cfg(test)]\nmod tests {{\n{long_fn}}}\n");
        assert!(too_long("tests_mod.rs", &in_tests).is_empty());
        let long_file = "// line\n".repeat(MAX_FILE_LINES + 1);
        assert_eq!(too_long("long.rs", &long_file).len(), 1);
        assert!(is_test_code(Path::new("crates/a/tests/x.rs")) && is_test_code(Path::new("src/flash/tests.rs")));
        assert!(!is_test_code(Path::new("crates/a/src/lib.rs")));
    }
}
