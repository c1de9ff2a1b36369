//! The READMEs of the published crates (`framework/README.md` for jetworker,
//! `cli/README.md` for jetworker-cli) show a minimal worker that builds: their code is
//! `examples/minimal_worker.rs` and `examples/configs/minimal.toml`, which cargo compiles
//! and `tests/cli.rs` runs, and their `cargo add` lines add every crate the code uses,
//! with the features it needs.
//!
//! The crates' `lib.rs` do not include their README as a doc test, so this is what keeps
//! the READMEs from drifting away from the API. No server needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The READMEs shown on crates.io, one per published crate.
const READMES: [&str; 2] = ["framework/README.md", "cli/README.md"];

/// Crates a snippet may name without adding them.
const BUILT_IN: [&str; 6] = ["std", "core", "alloc", "crate", "self", "super"];

/// What in a snippet needs a crate feature that `cargo add` must turn on.
const FEATURE_USES: [(&str, &str, &[&str]); 2] = [
    ("#[tokio::main]", "tokio", &["macros", "rt-multi-thread"]),
    ("Deserialize)]", "serde", &["derive"]),
];

fn repository_file(path: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// The fenced code blocks of a Markdown text whose info string starts with `language`
/// (so `rust,no_run` counts as `rust`).
fn code_blocks(markdown: &str, language: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<(bool, String)> = None;
    for line in markdown.lines() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(info)) => {
                let wanted = info.split(',').next().map(str::trim) == Some(language);
                current = Some((wanted, String::new()));
            }
            (Some(_), Some(_)) => {
                if let Some((true, block)) = current.take() {
                    blocks.push(block);
                }
            }
            (Some((_, block)), None) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(current.is_none(), "a code block is not closed");
    blocks
}

/// A file without its leading comment lines (and the blank lines after them): the part
/// that explains how to run the example, not what a user copies.
fn without_header(text: &str, comment: &str) -> String {
    let body: Vec<&str> = text
        .lines()
        .skip_while(|line| line.starts_with(comment) || line.trim().is_empty())
        .collect();
    body.join("\n") + "\n"
}

/// The first segments of the paths in `code` (`serde` of `serde::Deserialize`), with
/// `-` for `_` as crates.io spells crate names.
fn crates_named(code: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut crates = BTreeSet::new();
    for (at, _) in code.match_indices("::") {
        let before = &code[..at];
        let start = before.rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
        let name = &before[start..];
        let is_root = !before[..start].ends_with(':');
        if is_root && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            crates.insert(name.replace('_', "-"));
        }
    }
    crates
}

/// Per `cargo add` line: the crates it adds and the features it turns on. Dev
/// dependencies are left out: the example's `main` cannot use them.
fn cargo_adds(markdown: &str) -> Vec<(Vec<String>, Vec<String>)> {
    code_blocks(markdown, "sh")
        .iter()
        .flat_map(|block| block.lines().map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|line| {
            let args = line.strip_prefix("cargo add ")?;
            let mut words = args.split_whitespace();
            let mut crates = Vec::new();
            let mut features = Vec::new();
            while let Some(word) = words.next() {
                match word {
                    "--dev" => return None,
                    "--features" | "-F" => features.extend(
                        words
                            .next()
                            .unwrap_or_default()
                            .split(',')
                            .map(str::to_owned),
                    ),
                    _ => crates.push(word.to_owned()),
                }
            }
            Some((crates, features))
        })
        .collect()
}

#[test]
fn each_readme_shows_the_minimal_worker_example() {
    // Per language: the file each README's one block of it must equal, and the
    // comment marker of the header that block leaves out.
    let sources = [
        ("rust", "examples/minimal_worker.rs", "//!"),
        ("toml", "examples/configs/minimal.toml", "#"),
    ];
    for (language, source, comment) in sources {
        let (_, text) = repository_file(source);
        let expected = without_header(&text, comment);
        for readme in READMES {
            let (path, markdown) = repository_file(readme);
            assert_eq!(
                code_blocks(&markdown, language),
                [expected.as_str()],
                "{}: its one {language} block must be {source} without its leading {comment} comments",
                path.display()
            );
        }
    }
}

#[test]
fn each_readme_adds_every_crate_its_example_uses() {
    for readme in READMES {
        let (path, markdown) = repository_file(readme);
        let adds = cargo_adds(&markdown);
        let added: BTreeSet<&str> = adds
            .iter()
            .flat_map(|(crates, _)| crates.iter().map(String::as_str))
            .collect();
        for code in code_blocks(&markdown, "rust") {
            for name in crates_named(&code) {
                if !BUILT_IN.contains(&name.as_str()) {
                    assert!(
                        added.contains(name.as_str()),
                        "{}: the example uses `{name}` but no `cargo add` line adds it",
                        path.display()
                    );
                }
            }
            for (usage, name, features) in FEATURE_USES {
                if !code.contains(usage) {
                    continue;
                }
                let turned_on: BTreeSet<&str> = adds
                    .iter()
                    .filter(|(crates, _)| crates.iter().any(|c| c == name))
                    .flat_map(|(_, features)| features.iter().map(String::as_str))
                    .collect();
                for feature in features {
                    assert!(
                        turned_on.contains(feature),
                        "{}: `{usage}` needs `cargo add {name} --features {feature}`",
                        path.display()
                    );
                }
            }
        }
    }
}

#[test]
fn crates_named_finds_path_roots_only() {
    let code = "use jetworker::{App, Event};\n#[tokio::main]\nfn f() { std::process::exit(0); Event::<u8>::new(); jetworker_cli::main(); }";
    let expected: BTreeSet<String> = ["jetworker", "tokio", "std", "jetworker-cli"]
        .map(String::from)
        .into();
    assert_eq!(crates_named(code), expected);
}
