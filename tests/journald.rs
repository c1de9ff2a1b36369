//! Under systemd, stderr is a stream into the journal and `JOURNAL_STREAM` names it
//! (`DEVICE:INODE`). A real worker then starts every log line with its syslog priority
//! (`<3>` error, `<4>` warning, `<6>` info), which journald stores as the line's
//! priority, so `journalctl -p warning` finds the warnings. Without the variable, or when
//! it names another file, lines are plain.
//!
//! No journald in the sandbox: the worker's stderr is a file whose device and inode the
//! test puts in `JOURNAL_STREAM`, as systemd does for its stream socket.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::WorkerProcess;

/// What systemd sets (systemd.exec(5)).
const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// A config whose server does not answer (a port nobody listens on) and whose nkey seed
/// file every user can read: the worker warns about the file, then logs each failed
/// connection attempt as an error and retries.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let seed_file = dir.join("worker.nk");
    let seed = nkeys::KeyPair::new_user().seed().expect("a seed");
    std::fs::write(&seed_file, seed).expect("write the seed");
    std::fs::set_permissions(&seed_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.join("streams.toml");
    std::fs::write(
        &config,
        format!(
            "[connection]\nservers = [\"nats://127.0.0.1:{port}\"]\nnkey_seed_file = \"{}\"\nconnect_timeout = \"500ms\"\n\n[worker]\nops_listen = \"127.0.0.1:0\"\n",
            seed_file.display()
        ),
    )
    .expect("write the config");
    config
}

/// Runs the test worker with stderr going to a file (`JOURNAL_STREAM` set to that
/// file's identity when `journal`, to `other` when given) until it has logged an error,
/// and returns what it wrote.
async fn run_worker(log_format: &str, journal: bool, other: Option<&str>) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("stderr file");
    let meta = log.metadata().expect("stat stderr file");
    let mut command = Command::new(env!("CARGO_BIN_EXE_test_worker"));
    command
        .args([
            "--config",
            &config.display().to_string(),
            "--log-format",
            log_format,
            "run",
        ])
        .env("RUST_LOG", "info")
        .env_remove(JOURNAL_STREAM)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    if journal {
        command.env(JOURNAL_STREAM, format!("{}:{}", meta.dev(), meta.ino()));
    }
    if let Some(value) = other {
        command.env(JOURNAL_STREAM, value);
    }
    let worker = WorkerProcess::spawn(&mut command);
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("cannot connect") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no connection error logged:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(worker);
    text
}

/// The line that contains `what`.
fn line<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no line with {what:?} in:\n{text}"))
}

#[tokio::test]
async fn lines_carry_their_priority_when_stderr_is_the_journal() {
    let text = run_worker("human", true, None).await;
    assert!(
        line(&text, "readable by every user").starts_with("<4>"),
        "a warning is a warning:\n{text}"
    );
    assert!(line(&text, "cannot connect").starts_with("<3>"), "{text}");
    assert!(
        line(&text, "ops endpoint listening").starts_with("<6>"),
        "{text}"
    );
    for l in text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains(" INFO "))
    {
        assert!(
            l.starts_with("<3>") || l.starts_with("<4>") || l.starts_with("<6>"),
            "every event line has a priority: {l}"
        );
    }
    assert!(
        !text.contains('\u{1b}'),
        "no colors in the journal:\n{text}"
    );
}

#[tokio::test]
async fn json_lines_carry_their_priority_too() {
    let text = run_worker("json", true, None).await;
    let warning = line(&text, "readable by every user");
    let json = warning
        .strip_prefix("<4>")
        .unwrap_or_else(|| panic!("{text}"));
    let value: serde_json::Value = serde_json::from_str(json).expect("JSON after the prefix");
    assert_eq!(value["level"], "WARN");
    assert!(line(&text, "cannot connect").starts_with("<3>{"), "{text}");
}

#[tokio::test]
async fn lines_are_plain_when_stderr_is_not_the_journal() {
    for other in [None, Some("1:1"), Some("garbage")] {
        let text = run_worker("human", false, other).await;
        assert!(
            !text.lines().any(|l| l.starts_with('<')),
            "JOURNAL_STREAM={other:?} names another file: no prefixes:\n{text}"
        );
        assert!(
            line(&text, "readable by every user").contains("WARN"),
            "{text}"
        );
    }
}
