//! House rules no compiler checks, as a `#[test]` (the way rust-analyzer runs its tidy checks)
//! and as `cargo xtask tidy`: every module opens with a `//!` header, no `#[should_panic]`
//! (input errors are asserted as `Err`), no trailing whitespace, and every planted bug of
//! `cargo xtask mutants --planted` still finds the code it patches, and no import circle between
//! a crate's modules (`imports.rs`).

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
}
