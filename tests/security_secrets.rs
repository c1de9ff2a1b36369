//! Secret hygiene: passwords, tokens, nkey seeds, creds contents, TLS private keys and
//! URL userinfo never appear in the real worker process's logs (human and JSON, at trace
//! level, the client library's included), in error messages, in `Debug` output, or in
//! the output of `status`, `check`, `provision --dry-run` and `permissions`.

mod common;
mod security_kit;

use std::path::Path;
use std::time::Duration;

use jetworker::Config;
use jetworker_suite::Job;
use security_kit::*;

/// Fails when any secret (or an obvious encoding of it) shows in `text`.
fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        let encodings = [
            secret.clone(),
            secret.replace('@', "%40").replace(':', "%3A"),
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret),
        ];
        for form in encodings {
            assert!(
                !text.contains(&form),
                "{what} shows a secret ({} chars): {}",
                secret.len(),
                text.lines()
                    .find(|l| l.contains(&form))
                    .unwrap_or_default()
                    .replace(&form, "<SECRET>")
            );
        }
    }
}

/// Runs the worker at trace level in `format`, has it handle a job, stops it; returns
/// everything it wrote.
async fn worker_run_output(
    config_path: &Path,
    config: &Config,
    format: &str,
    envs: &[(&str, &str)],
) -> String {
    let path = config_path.to_string_lossy().into_owned();
    let mut env = vec![("RUST_LOG", "trace")];
    env.extend_from_slice(envs);
    let worker = WorkerProcess::spawn(&["--config", &path, "--log-format", format, "run"], &env);
    worker
        .wait_for(Duration::from_secs(30), "the worker to run", |e| {
            e.contains("workers running")
        })
        .await;
    let client = jetworker::connect(&config.connection)
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client.clone());
    let job = rmp_serde::to_vec_named(&Job::ok(1)).expect("encode");
    js.publish("jobs.1", job.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    worker
        .wait_for(Duration::from_secs(20), "the job settled", |e| {
            e.contains("settled")
        })
        .await;
    let (code, stderr) = worker.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "exits cleanly:\n{stderr}");
    // Trace level really is on, the client library's logs included.
    assert!(
        stderr.contains("TRACE") || stderr.contains("\"TRACE\""),
        "{stderr}"
    );
    assert!(stderr.contains("async_nats"), "{stderr}");
    stderr
}

/// The one-shot commands' whole output.
fn command_outputs(config_path: &Path, envs: &[(&str, &str)]) -> String {
    let path = config_path.to_string_lossy().into_owned();
    let mut all = String::new();
    for args in [
        vec!["status"],
        vec!["status", "--json"],
        vec!["check"],
        vec!["provision", "--dry-run"],
        vec!["permissions"],
        vec!["permissions", "--json"],
        vec!["dlq", "list"],
    ] {
        let mut full = vec!["--config", path.as_str()];
        full.extend(args.iter().copied());
        let mut env = vec![("RUST_LOG", "trace")];
        env.extend_from_slice(envs);
        let (code, stdout, stderr) = run_to_end(&full, &env);
        assert_eq!(code, Some(0), "{args:?} failed:\n{stdout}\n{stderr}");
        all.push_str(&stdout);
        all.push_str(&stderr);
    }
    all
}

/// The same worker with a wrong secret: the error it prints, and its logs.
fn refused_output(config_path: &Path, envs: &[(&str, &str)]) -> String {
    let path = config_path.to_string_lossy().into_owned();
    let mut all = String::new();
    for args in [vec!["status"], vec!["run"]] {
        let mut full = vec!["--config", path.as_str()];
        full.extend(args.iter().copied());
        let mut env = vec![("RUST_LOG", "trace")];
        env.extend_from_slice(envs);
        let (code, stdout, stderr) = run_to_end(&full, &env);
        assert_eq!(code, Some(1), "{args:?} must fail:\n{stdout}\n{stderr}");
        assert!(stderr.contains("cannot connect"), "{stderr}");
        all.push_str(&stdout);
        all.push_str(&stderr);
    }
    all
}

fn write_config(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Every output of one auth setup, checked for its secrets.
async fn check_everything(
    dir: &Path,
    connection_lines: &str,
    envs: &[(&str, &str)],
    wrong_connection_lines: &str,
    wrong_envs: &[(&str, &str)],
    secrets: &[String],
) {
    let text = config_text(connection_lines);
    let path = write_config(dir, "streams.toml", &text);
    let config = Config::from_toml_with_env(
        &text,
        &path,
        envs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("valid config");
    assert_clean(
        "Debug of the config",
        &format!("{config:?} {:?}", config.connection),
        secrets,
    );

    let human = worker_run_output(&path, &config, "human", envs).await;
    let json = worker_run_output(&path, &config, "json", envs).await;
    assert_clean("the human logs", &human, secrets);
    assert!(
        json.lines()
            .filter(|l| !l.is_empty())
            .all(|l| l.starts_with('{')),
        "JSON lines: {json}"
    );
    assert_clean("the JSON logs", &json, secrets);
    assert_clean("command output", &command_outputs(&path, envs), secrets);

    let wrong = write_config(dir, "wrong.toml", &config_text(wrong_connection_lines));
    let refused = refused_output(&wrong, wrong_envs);
    assert_clean("the refusal", &refused, secrets);
    let wrong_config = Config::from_toml_with_env(
        &config_text(wrong_connection_lines),
        &wrong,
        wrong_envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("valid");
    let err = jetworker::connect(&wrong_config.connection)
        .await
        .expect_err("refused");
    assert_clean("the connect error", &format!("{err} {err:?}"), secrets);
}

#[tokio::test]
async fn user_and_password_in_the_url_in_the_file_and_in_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (url_pw, file_pw, env_pw) = ("pw-InUrl-51d7", "pw-InFile-8a2e", "pw-InEnv-c3f0");
    let server = server_with(format!(
        "authorization {{\n  users: [\n    {{ user: \"u1\", password: \"{url_pw}\" }}\n    {{ user: \"u2\", password: \"{file_pw}\" }}\n    {{ user: \"u3\", password: \"{env_pw}\" }}\n  ]\n}}"
    ));
    let port = server.port();
    let secrets: Vec<String> = [url_pw, file_pw, env_pw, "u1:pw-InUrl"]
        .iter()
        .map(|s| s.to_string())
        .collect();

    // In the URL, one server given through NATS_URL-style overrides as well.
    check_everything(
        &dir.path().join("url").tap_create(),
        &format!("servers = [\"nats://u1:{url_pw}@127.0.0.1:{port}\"]"),
        &[],
        &format!("servers = [\"nats://u1:pw-InUrl-Wrong@127.0.0.1:{port}\"]"),
        &[],
        &secrets,
    )
    .await;
    // In the file.
    check_everything(
        &dir.path().join("file").tap_create(),
        &format!(
            "servers = [\"nats://127.0.0.1:{port}\"]\nuser = \"u2\"\npassword = \"{file_pw}\""
        ),
        &[],
        &format!("servers = [\"nats://127.0.0.1:{port}\"]\nuser = \"u2\"\npassword = \"{url_pw}\""),
        &[],
        &secrets,
    )
    .await;
    // In the environment.
    check_everything(
        &dir.path().join("env").tap_create(),
        &format!("servers = [\"nats://127.0.0.1:{port}\"]\nuser = \"u3\""),
        &[("JETWORKER__CONNECTION__PASSWORD", env_pw)],
        &format!("servers = [\"nats://127.0.0.1:{port}\"]\nuser = \"u3\""),
        &[("JETWORKER__CONNECTION__PASSWORD", file_pw)],
        &secrets,
    )
    .await;
}

#[tokio::test]
async fn token_and_nkey_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = "tok-Secret-77aa";
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().expect("seed");
    let seed_file = dir.path().join("worker.nk");
    std::fs::write(&seed_file, &seed).expect("write seed");
    let wrong_seed_file = dir.path().join("wrong.nk");
    let wrong_seed = nkeys::KeyPair::new_user().seed().expect("seed");
    std::fs::write(&wrong_seed_file, &wrong_seed).expect("write seed");
    let token_server = server_with(format!("authorization {{\n  token: \"{token}\"\n}}"));
    let nkey_server = server_with(format!(
        "authorization {{\n  users: [ {{ nkey: {} }} ]\n}}",
        user.public_key()
    ));
    let secrets = vec![token.to_string(), seed.clone(), wrong_seed.clone()];
    let token_url = format!("servers = [\"{}\"]", token_server.url());
    check_everything(
        &dir.path().join("token").tap_create(),
        &token_url,
        &[("JETWORKER__CONNECTION__TOKEN", token)],
        &token_url,
        &[("JETWORKER__CONNECTION__TOKEN", "tok-Secret-Wrong")],
        &[secrets.clone(), vec!["tok-Secret-Wrong".into()]].concat(),
    )
    .await;
    check_everything(
        &dir.path().join("nkey").tap_create(),
        &format!(
            "servers = [\"{}\"]\nnkey_seed_file = {:?}",
            nkey_server.url(),
            seed_file
        ),
        &[],
        &format!(
            "servers = [\"{}\"]\nnkey_seed_file = {:?}",
            nkey_server.url(),
            wrong_seed_file
        ),
        &[],
        &secrets,
    )
    .await;
}

#[tokio::test]
async fn creds_file_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::create(dir.path());
    let chain = Decentralized::create(dir.path());
    let server = server_with(format!(
        "{}\n{}",
        chain.server_block(),
        pki.server_block(true)
    ));
    let (creds, text) = chain.creds(dir.path(), "worker", &chain.account);
    let rogue_account = nkeys::KeyPair::new_account();
    let (rogue, rogue_text) = chain.creds(dir.path(), "rogue", &rogue_account);
    // The creds contents: the JWT and the seed of both files, and the TLS private keys.
    let mut secrets: Vec<String> = [text.as_str(), rogue_text.as_str()]
        .iter()
        .flat_map(|t| {
            t.lines()
                .filter(|l| l.starts_with("eyJ") || l.starts_with("SU"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(secrets.len(), 4, "two JWTs and two seeds");
    for key in &pki.private_keys {
        secrets.extend(
            key.lines()
                .filter(|l| !l.starts_with("-----"))
                .map(str::to_string),
        );
    }
    let tls = format!(
        "tls = {{ required = true, ca_file = {:?}, cert_file = {:?}, key_file = {:?} }}",
        pki.ca, pki.client_cert, pki.client_key
    );
    let lines = |creds: &Path| {
        format!(
            "servers = [\"{}\"]\ncreds_file = {:?}\n{tls}",
            server.url(),
            creds
        )
    };
    check_everything(
        &dir.path().join("creds").tap_create(),
        &lines(&creds),
        &[],
        &lines(&rogue),
        &[],
        &secrets,
    )
    .await;
}

/// Creates a directory and returns its path (chained on `join`).
trait TapCreate {
    fn tap_create(self) -> std::path::PathBuf;
}

impl TapCreate for std::path::PathBuf {
    fn tap_create(self) -> std::path::PathBuf {
        std::fs::create_dir_all(&self).expect("create dir");
        self
    }
}
