//! docs/CLI.md, the command-line reference that ships with the project, names every command and
//! every flag that `--help` lists, so it cannot fall behind the binary; `attn --help` points to
//! it.

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The long flags in a help text: `--name` at the start of an option line.
fn flags(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("--") || (l.starts_with('-') && l.get(2..4) == Some(", ")))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
        .map(|w| w.trim_end_matches(',').to_string())
        // A wrapped line of prose can start with a flag's name and punctuation
        // ("--eval-every]"): only whole names count.
        .filter(|w| {
            w[2..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

#[test]
fn the_reference_names_every_command_and_flag() {
    let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/CLI.md")).unwrap();
    assert!(help(&[]).contains("docs/CLI.md"));
    let commands = [
        "sdpa",
        "run",
        "embed",
        "attend",
        "check",
        "demo",
        "dates",
        "train",
        "translate",
    ];
    let benches = ["sdpa", "gemm", "run", "embed", "train", "sweep", "bandwidth"];
    let mut checked = 0;
    for command in commands
        .iter()
        .map(|c| vec![*c])
        .chain(benches.iter().map(|b| vec!["bench", *b]))
    {
        let name = command.join(" ");
        assert!(
            reference.contains(&format!("attn {name}")),
            "docs/CLI.md does not show `attn {name}`"
        );
        for flag in flags(&help(&command)) {
            assert!(
                reference.contains(&flag),
                "docs/CLI.md does not name {flag} of `attn {name}`"
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} flags found: the help parsing is broken");
}
