//! The NATS ecosystem's conventions against real servers with auth: `NATS_URL`,
//! `NATS_USER` / `NATS_PASSWORD`, `NATS_NKEY`, `NATS_CREDS`, the `nats` CLI's contexts
//! (the selected one under the file, `NATS_CONTEXT`'s over it), and JetStream domains.
//! The environment wins over the file; `check` names each setting's source and never
//! its value.

mod common;
mod security_kit;

use std::path::Path;

use async_nats::jetstream;
use jetworker::testing::server::{NatsServer, ServerOptions};
use jetworker::{Config, ConfigSource};
use security_kit::*;

const PASSWORD: &str = "pw-Conventions-91c2";

fn users_server() -> NatsServer {
    server_with(format!(
        "authorization {{\n  users: [ {{ user: \"worker\", password: \"{PASSWORD}\" }} ]\n}}"
    ))
}

/// Loads `text` with exactly `env` (no HOME unless given: no context by accident).
fn load(text: &str, env: &[(&str, &str)]) -> Config {
    Config::from_toml_with_env(
        text,
        Path::new("streams.toml"),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .unwrap_or_else(|e| panic!("valid config: {e}"))
}

/// Connects with the config's connection and uses its JetStream.
async fn assert_connects(config: &Config) {
    let client = jetworker::connect(&config.connection)
        .await
        .unwrap_or_else(|e| panic!("connects: {e}"));
    let js = jetworker::jetstream(client, &config.connection);
    js.get_or_create_stream(jetstream::stream::Config {
        name: "CONVENTIONS".into(),
        subjects: vec!["conventions.>".into()],
        ..Default::default()
    })
    .await
    .expect("JetStream answers");
}

fn assert_no_secret(config: &Config, secret: &str) {
    let shown = format!("{config:?} {:?}", config.connection.sources);
    assert!(!shown.contains(secret), "{shown}");
}

#[tokio::test]
async fn nats_url_user_and_password_from_the_environment() {
    let server = users_server();
    let url = server.url();
    let config = load(
        &config_text("servers = [\"nats://127.0.0.1:1\"]"),
        &[
            ("NATS_URL", &url),
            ("NATS_USER", "worker"),
            ("NATS_PASSWORD", PASSWORD),
        ],
    );
    assert_connects(&config).await;
    let sources = &config.connection.sources;
    assert_eq!(
        sources.get("servers"),
        Some(&ConfigSource::Env("NATS_URL".into()))
    );
    assert_eq!(
        sources.get("password"),
        Some(&ConfigSource::Env("NATS_PASSWORD".into()))
    );
    assert_no_secret(&config, PASSWORD);
}

#[tokio::test]
async fn nats_nkey_and_nats_creds_replace_the_files_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = nkeys::KeyPair::new_user();
    let server = server_with(format!(
        "authorization {{\n  users: [ {{ nkey: {} }} ]\n}}",
        user.public_key()
    ));
    let seed_file = dir.path().join("worker.nk");
    std::fs::write(&seed_file, user.seed().expect("seed")).expect("write seed");
    let file = config_text(&format!(
        "servers = [\"{}\"]\nuser = \"someone\"\npassword = \"pw-Wrong-File\"",
        server.url()
    ));
    let config = load(&file, &[("NATS_NKEY", &seed_file.display().to_string())]);
    assert!(config.connection.user.is_none() && config.connection.password.is_none());
    assert_connects(&config).await;
    assert_eq!(
        config.connection.sources.get("nkey_seed_file"),
        Some(&ConfigSource::Env("NATS_NKEY".into()))
    );
    assert_eq!(config.connection.sources.get("user"), None);

    let chain = Decentralized::create(dir.path());
    let server = server_with(chain.server_block());
    let (creds, _text) = chain.creds(dir.path(), "worker", &chain.account);
    let file = config_text(&format!(
        "servers = [\"{}\"]\nuser = \"someone\"\npassword = \"pw-Wrong-File\"",
        server.url()
    ));
    let config = load(&file, &[("NATS_CREDS", &creds.display().to_string())]);
    assert_connects(&config).await;
    assert_eq!(
        config.connection.sources.get("creds_file"),
        Some(&ConfigSource::Env("NATS_CREDS".into()))
    );
}

/// Writes `$dir/nats/context/NAME.json`.
fn write_context(dir: &Path, name: &str, json: serde_json::Value) {
    let contexts = dir.join("nats/context");
    std::fs::create_dir_all(&contexts).expect("context dir");
    std::fs::write(contexts.join(format!("{name}.json")), json.to_string()).expect("context");
}

#[tokio::test]
async fn contexts_the_selected_one_under_the_file_nats_context_over_it() {
    let server = users_server();
    let xdg = tempfile::tempdir().expect("tempdir");
    let xdg_path = xdg.path().display().to_string();
    // As the nats CLI writes them: every field, unset ones empty.
    write_context(
        xdg.path(),
        "dev",
        serde_json::json!({"description": "", "url": server.url(), "user": "worker",
            "password": PASSWORD, "token": "", "creds": "", "nkey": "", "cert": "", "key": "",
            "ca": "", "nsc": "", "jetstream_domain": "", "jetstream_api_prefix": "",
            "jetstream_event_prefix": "", "inbox_prefix": "", "user_jwt": ""}),
    );
    write_context(
        xdg.path(),
        "broken",
        serde_json::json!({"url": "nats://127.0.0.1:1", "password": "pw-Not-Shown"}),
    );
    std::fs::write(xdg.path().join("nats/context.txt"), "dev\n").expect("context.txt");
    let env = [("XDG_CONFIG_HOME", xdg_path.as_str())];

    // No servers in the file: the selected context provides everything.
    let no_servers = config_text("");
    let config = load(&no_servers, &env);
    assert_connects(&config).await;
    assert!(
        matches!(config.connection.sources.get("password"), Some(ConfigSource::Context { name, .. }) if name == "dev"),
        "{:?}",
        config.connection.sources
    );
    assert_no_secret(&config, PASSWORD);

    // The file wins over the selected context...
    let with_servers = config_text("servers = [\"nats://127.0.0.1:2\"]");
    let config = load(&with_servers, &env);
    assert_eq!(
        config.connection.sources.get("servers"),
        Some(&ConfigSource::File)
    );

    // ...and NATS_CONTEXT over the file.
    let env = [
        ("XDG_CONFIG_HOME", xdg_path.as_str()),
        ("NATS_CONTEXT", "dev"),
    ];
    let config = load(&with_servers, &env);
    assert_connects(&config).await;

    // A named context that is missing is an error naming it, never a silent default.
    let env = [
        ("XDG_CONFIG_HOME", xdg_path.as_str()),
        ("NATS_CONTEXT", "nope"),
    ];
    let err = Config::from_toml_with_env(
        &with_servers,
        Path::new("streams.toml"),
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect_err("a missing context");
    assert!(err.to_string().contains("\"nope\""), "{err}");

    // check names each source, and no secret.
    let (code, stdout, stderr) = run_to_end(
        &["--config", &write_file(xdg.path(), &no_servers), "check"],
        &[
            ("XDG_CONFIG_HOME", &xdg_path),
            ("NATS_CONTEXT", "dev"),
            ("NATS_URL", &server.url()),
        ],
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("connection.servers"), "{stdout}");
    assert!(stdout.contains("env NATS_URL"), "{stdout}");
    assert!(stdout.contains("context dev"), "{stdout}");
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "{stdout}{stderr}"
    );
}

fn write_file(dir: &Path, text: &str) -> String {
    let path = dir.join("streams.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

#[tokio::test]
async fn a_jetstream_domain_is_used_for_jetstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start_with(ServerOptions {
        jetstream: false,
        extra_config: Some(format!(
            "jetstream {{\n  store_dir: \"{}\"\n  domain: hub\n}}",
            dir.path().display()
        )),
        ..ServerOptions::default()
    })
    .expect("a server with a JetStream domain");
    let url = server.url();
    let text = config_text(&format!(
        "servers = [\"{url}\"]\njetstream_domain = \"hub\""
    ));
    let config = load(&text, &[]);
    assert_connects(&config).await;

    // Another domain has no JetStream: the configured one is really the one asked.
    let elsewhere = load(
        &text,
        &[("JETWORKER__CONNECTION__JETSTREAM_DOMAIN", "elsewhere")],
    );
    let client = jetworker::connect(&elsewhere.connection)
        .await
        .expect("connects");
    let js = jetworker::jetstream(client, &elsewhere.connection);
    assert!(js.get_stream("CONVENTIONS").await.is_err());

    // The operator tools use it too.
    let (code, stdout, stderr) =
        run_to_end(&["--config", &write_file(dir.path(), &text), "status"], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let (code, _, stderr) = run_to_end(
        &["--config", &write_file(dir.path(), &text), "status"],
        &[("JETWORKER__CONNECTION__JETSTREAM_DOMAIN", "elsewhere")],
    );
    assert_ne!(code, Some(0), "{stderr}");
}
