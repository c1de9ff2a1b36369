//! The `workers` binary's command line is jetworker-cli's, with the platform's own name,
//! version, about text and commands added through `jetworker_cli::Cli` (no server needed).

use std::process::{Command, Output};

fn workers(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_workers"))
        .args(args)
        .env_remove("NATS_URL")
        .output()
        .expect("the workers binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn version_is_the_platforms_own() {
    let output = workers(&["--version"]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        stdout(&output).trim(),
        format!("workers {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_lists_the_builtin_and_the_platforms_commands() {
    let output = workers(&["--help"]);
    assert!(output.status.success(), "{output:?}");
    let help = stdout(&output);
    assert!(
        help.contains("Real-time analytics workers on NATS JetStream"),
        "{help}"
    );
    assert!(help.contains("Usage: workers"), "{help}");
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for expected in [
        "run",
        "check",
        "provision",
        "status",
        "dlq",
        "permissions",
        "publish",
        "stats",
        "demo",
    ] {
        assert!(
            commands.contains(&expected),
            "{expected} not in {commands:?}"
        );
    }
}

#[test]
fn an_own_command_parses_its_arguments_and_a_builtin_one_runs() {
    // `publish --help` is the platform's own command, parsed by clap through the Cli.
    let output = workers(&["publish", "--help"]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("--rate"), "{}", stdout(&output));

    // `check` is jetworker's, run on the platform's real config.
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../streams.toml");
    let output = workers(&["--config", config, "check"]);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout(&output).contains(": OK ("), "{}", stdout(&output));

    // A usage error exits 2 with clap's message, as for the built-in commands.
    let output = workers(&["publish", "--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}
