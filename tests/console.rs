//! `console` as an operator meets it: the test worker binary serves it against a real
//! nats-server, headless Chromium (browser-kit) drives the page. The page's numbers are
//! `status --json`'s; a replay from the page republishes and the letter goes; a purge
//! needs the confirmation; a hostile dead letter stays text; a non-loopback console
//! without a token refuses to start, and with a token a request without it gets 401; a
//! POST without the CSRF token or from another origin is refused, and a read-only
//! console refuses replay and purge. Each page checked is saved as a screenshot
//! (target/screenshots/console-*.png).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use browser_kit::{Browser, Locator};
use common::*;
use jetworker::headers as dead_letter;
use jetworker::testing::server::NatsServer;
use jetworker::App;
use jetworker_suite::{scripted, Job, Mode, Probe};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// A job the scripted handler refuses for good: a `permanent` dead letter.
fn permanent(id: u64) -> Job {
    Job {
        mode: Mode::Permanent,
        ..Job::ok(id)
    }
}

/// A provisioned server with the suite's config in `dir`, and the dead letters a worker
/// made of `jobs` (refused ones) plus `raw` messages it could not decode.
struct Setup {
    _server: NatsServer,
    _dir: tempfile::TempDir,
    config: PathBuf,
    js: jetstream::Context,
}

/// A message published as is: subject, headers, payload.
type RawMessage = (String, Vec<(&'static str, &'static str)>, &'static [u8]);

async fn setup(jobs: &[Job], raw: &[RawMessage], dead_letters: u64) -> Setup {
    let server = NatsServer::start().expect("server");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = suite_config(&server.url()).in_consumer("jobs", "max_deliver = 1");
    let config_path = text.write(dir.path());
    let config = text.load();
    let (client, js) = connect(&server.url()).await;
    jetworker::provision(&client, &js, &config, false)
        .await
        .expect("provision");
    let worker = InProcessWorker::start(
        config,
        App::new(Arc::new(Probe::default())).handler("scripted", scripted),
    );
    publish_jobs(&js, jobs).await;
    for (subject, headers, payload) in raw {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        js.publish_with_headers(subject.clone(), map, payload.to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("puback");
    }
    wait_until(WAIT, "the dead letters", || async {
        count(&js, "DLQ").await == dead_letters
    })
    .await;
    // Acked and dead-lettered: nothing left in flight, so the figures hold still.
    wait_until(WAIT, "every job settled", || async {
        let info = consumer_info(&js, "EVENTS", "jobs").await;
        info.num_pending == 0 && info.num_ack_pending == 0
    })
    .await;
    worker.stop().await;
    Setup {
        _server: server,
        _dir: dir,
        config: config_path,
        js,
    }
}

/// The test worker's `console`, until dropped.
struct ConsoleProcess {
    process: WorkerProcess,
    addr: SocketAddr,
    stderr: PathBuf,
}

impl ConsoleProcess {
    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// What it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

fn console_command(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_test_worker"));
    command
        .arg("--config")
        .arg(config)
        .arg("console")
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NATS_URL")
        .env_remove(jetworker_cli::CONSOLE_TOKEN_ENV);
    command
}

/// Starts `console --listen 127.0.0.1:0 --sample-every 300ms ARGS` and reads the address
/// it prints.
fn start_console(config: &Path, args: &[&str], env: &[(&str, &str)]) -> ConsoleProcess {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, Ordering::SeqCst);
    let stderr = config.with_file_name(format!("console-{n}.log"));
    let mut command = console_command(
        config,
        &[
            &["--listen", "127.0.0.1:0", "--sample-every", "300ms"],
            args,
        ]
        .concat(),
    );
    command
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).expect("log file"));
    let mut process = WorkerProcess::spawn(&mut command);
    let stdout = process.child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the console's address");
    let addr = line
        .trim()
        .strip_prefix("console: http://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no address in {line:?}; stderr: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
    ConsoleProcess {
        process,
        addr,
        stderr,
    }
}

/// A browser on the console's page, at `fragment` (`#letters`, or "" for the overview).
async fn open_page(console: &ConsoleProcess, fragment: &str) -> Browser {
    let browser = Browser::start().await.expect("browser");
    browser
        .client()
        .goto(&format!("{}{fragment}", console.url()))
        .await
        .expect("goto");
    browser
}

/// `status --json` of the test worker binary.
fn status_json(config: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_test_worker"))
        .arg("--config")
        .arg(config)
        .args(["status", "--json"])
        .env("RUST_LOG", "warn")
        .env_remove("NATS_URL")
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

async fn js_value(browser: &Browser, script: &str) -> Value {
    browser
        .client()
        .execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("{script}: {e}"))
}

async fn wait_js(browser: &Browser, script: &str) {
    browser
        .wait_until_js(script, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The `textContent` of the element with this id.
async fn text_of(browser: &Browser, id: &str) -> String {
    let script = "return document.getElementById(arguments[0]).textContent;";
    let value = browser
        .client()
        .execute(script, vec![Value::from(id)])
        .await
        .unwrap_or_else(|e| panic!("#{id}: {e}"));
    value.as_str().unwrap_or_default().to_string()
}

/// Waits until the element with this id says exactly `text`.
async fn wait_text(browser: &Browser, id: &str, text: &str) {
    let script = format!(
        "return document.getElementById({}).textContent === {};",
        Value::from(id),
        Value::from(text)
    );
    wait_js(browser, &script).await;
}

/// Waits until table `id` has `n` rows.
async fn wait_rows(browser: &Browser, id: &str, n: usize) {
    let script = format!("return document.querySelectorAll('#{id} tbody tr').length === {n};");
    wait_js(browser, &script).await;
}

/// Clicks `button` and returns what the confirmation dialog it opens asks.
async fn ask(browser: &Browser, button: &str) -> String {
    click(browser, button).await;
    wait_js(browser, "return document.getElementById('confirm').open;").await;
    text_of(browser, "confirm-text").await
}

async fn click(browser: &Browser, css: &str) {
    browser
        .client()
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("find {css}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn screenshot(browser: &Browser, name: &str) {
    browser.screenshot(name).await.expect("screenshot");
}

/// The page's rows of table `id`: each row's `data-*` attributes and `data-field` cells.
const ROWS: &str =
    "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr')).map(r => {
    const o = Object.assign({}, r.dataset);
    r.querySelectorAll('[data-field]').forEach(c => o[c.dataset.field] = c.textContent);
    return o;
});";

async fn rows(browser: &Browser, table: &str) -> Vec<Value> {
    let value = browser
        .client()
        .execute(ROWS, vec![Value::from(table)])
        .await
        .expect("rows");
    value.as_array().cloned().unwrap_or_default()
}

/// The differences between the page's tables and a `status --json` report.
fn differences(status: &Value, streams: &[Value], consumers: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let mut compare = |what: String, row: Option<&Value>, entry: &Value, fields: &[&str]| {
        for field in fields {
            let shown = row.map(|r| r[*field].clone()).unwrap_or(Value::Null);
            let want = match &entry[*field] {
                Value::Null => "missing".to_string(),
                value => value.to_string(),
            };
            if shown != want {
                out.push(format!("{what} {field}: page {shown}, status {want}"));
            }
        }
    };
    for s in status["streams"].as_array().into_iter().flatten() {
        let row = streams.iter().find(|r| r["stream"] == s["name"]);
        let fields = [
            "messages",
            "bytes",
            "first_sequence",
            "last_sequence",
            "consumer_count",
        ];
        compare(format!("stream {}", s["name"]), row, s, &fields);
    }
    for c in status["consumers"].as_array().into_iter().flatten() {
        let row = consumers
            .iter()
            .find(|r| r["consumer"] == c["name"] && r["stream"] == c["stream"]);
        let fields = [
            "pending",
            "ack_pending",
            "redelivered",
            "waiting",
            "dead_letters",
        ];
        compare(format!("consumer {}", c["name"]), row, c, &fields);
    }
    out
}

#[tokio::test]
async fn the_page_shows_status_figures_and_a_replay_from_it_republishes() {
    let mut jobs: Vec<Job> = (1..=4).map(Job::ok).collect();
    jobs.extend((11..=13).map(permanent));
    let setup = setup(&jobs, &[], 3).await;
    let console = start_console(&setup.config, &[], &[]);
    let browser = open_page(&console, "").await;
    wait_rows(&browser, "consumers", 1).await;

    // The figures are status --json's (read again until the page has caught up).
    let mut last = Vec::new();
    for _ in 0..50 {
        let status = status_json(&setup.config);
        last = differences(
            &status,
            &rows(&browser, "streams").await,
            &rows(&browser, "consumers").await,
        );
        if last.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        last.is_empty(),
        "the page differs from status --json: {last:#?}"
    );
    let consumer = &rows(&browser, "consumers").await[0];
    assert_eq!(consumer["dead_letters"], "3");
    assert_eq!(consumer["by_reason"], "permanent 3");
    // Charts are SVG drawn from the sampled data: one line per series once two samples are in.
    wait_js(
        &browser,
        "return document.querySelectorAll('#charts figure svg polyline').length >= 4;",
    )
    .await;
    assert_eq!(
        js_value(
            &browser,
            "return document.querySelectorAll('#charts figure').length;"
        )
        .await,
        4
    );
    screenshot(&browser, "console-overview").await;

    // The dead letters, as `dlq list` lists them.
    click(&browser, "#nav-letters").await;
    wait_rows(&browser, "letters", 3).await;
    let letters = rows(&browser, "letters").await;
    assert!(letters
        .iter()
        .all(|l| l["reason"] == "permanent" && l["consumer"] == "jobs"));
    screenshot(&browser, "console-letters").await;

    // One letter: headers, and the MessagePack payload shown as JSON.
    let seq: u64 = letters[0]["seq"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("seq");
    click(&browser, "#letters tbody tr:first-child a.open").await;
    wait_js(&browser, r#"return document.getElementById('letter-payload').textContent.includes('"mode": "permanent"');"#).await;
    assert_eq!(
        text_of(&browser, "payload-title").await,
        "Payload (msgpack)"
    );
    assert_eq!(
        js_value(
            &browser,
            "return document.querySelector('[data-header=\"Jetworker-Reason\"]').textContent;"
        )
        .await,
        "permanent"
    );
    screenshot(&browser, "console-letter").await;

    // Replay it: confirm, and it is republished to its original subject and gone.
    let events_before = count(&setup.js, "EVENTS").await;
    let question = ask(&browser, "#replay-one").await;
    assert!(
        question.starts_with("Replay dead letter DLQ #"),
        "{question}"
    );
    screenshot(&browser, "console-replay-confirm").await;
    click(&browser, "#confirm-ok").await;
    wait_js(&browser, "return location.hash === '#letters' && document.querySelectorAll('#letters tbody tr').length === 2;").await;
    assert_eq!(count(&setup.js, "DLQ").await, 2);
    let events = messages(&setup.js, "EVENTS").await;
    assert_eq!(events.len() as u64, events_before + 1);
    let replayed = events.last().expect("the replay");
    assert_eq!(
        header(replayed, dead_letter::REPLAY_COUNT).as_deref(),
        Some("1")
    );
    let job: Job = rmp_serde::from_slice(&replayed.payload).expect("job");
    assert!((11..=13).contains(&job.id));
    let gone = setup
        .js
        .get_stream("DLQ")
        .await
        .expect("DLQ")
        .get_raw_message(seq)
        .await;
    assert!(gone.is_err(), "the replayed letter is deleted");
    let notice = text_of(&browser, "notice").await;
    assert!(notice.starts_with("replayed 1 of 1"), "{notice}");
    // The page follows: one dead letter fewer, one message more pending.
    wait_js(&browser, "return document.querySelector('#consumers [data-field=dead_letters]').textContent === '2';").await;
    screenshot(&browser, "console-after-replay").await;
    browser.close().await.expect("close");
    drop(console);
}

#[tokio::test]
async fn a_purge_needs_the_confirmation() {
    let setup = setup(&(21..=23).map(permanent).collect::<Vec<_>>(), &[], 3).await;
    let console = start_console(&setup.config, &[], &[]);
    let browser = open_page(&console, "#letters").await;
    wait_rows(&browser, "letters", 3).await;

    // Cancel keeps it.
    click(&browser, "#letters tbody tr:first-child input.pick").await;
    let question = ask(&browser, "#purge-selected").await;
    assert!(
        question.starts_with("Delete 1 selected dead letter for good?"),
        "{question}"
    );
    screenshot(&browser, "console-purge-confirm").await;
    click(&browser, "#confirm-cancel").await;
    wait_js(
        &browser,
        "return document.getElementById('notice').textContent.startsWith('cancelled');",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&setup.js, "DLQ").await, 3);

    // Confirm removes it.
    wait_rows(&browser, "letters", 3).await;
    click(&browser, "#letters tbody tr:first-child input.pick").await;
    assert!(ask(&browser, "#purge-selected")
        .await
        .starts_with("Delete 1 selected"));
    click(&browser, "#confirm-ok").await;
    wait_text(&browser, "notice", "purged 1 dead letter").await;
    assert_eq!(count(&setup.js, "DLQ").await, 2);

    // A filter: every `permanent` one of consumer jobs.
    wait_rows(&browser, "letters", 2).await;
    browser
        .client()
        .find(Locator::Id("filter-reason"))
        .await
        .expect("reason field")
        .send_keys("permanent")
        .await
        .expect("type");
    click(&browser, "#filter-apply").await;
    let question = ask(&browser, "#purge-matching").await;
    assert!(question.contains("matching reason permanent"), "{question}");
    click(&browser, "#confirm-ok").await;
    wait_text(&browser, "notice", "purged 2 dead letters").await;
    assert_eq!(count(&setup.js, "DLQ").await, 0);
    wait_text(&browser, "letters-count", "0 dead letters").await;
    screenshot(&browser, "console-after-purge").await;
    browser.close().await.expect("close");
    drop(console);
}

/// Markup and script in a dead letter's payload, subject and headers.
const HOSTILE_PAYLOAD: &[u8] =
    b"<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"><b>bold</b>";
const HOSTILE_SUBJECT: &str = "jobs.<b>subject</b><script>window.__pwned=3</script>";
const HOSTILE_HEADER: &str = "<img src=x onerror=\"window.__pwned = 4\">";

#[tokio::test]
async fn a_hostile_dead_letter_stays_text() {
    let raw: Vec<RawMessage> = vec![(
        HOSTILE_SUBJECT.to_string(),
        vec![("X-Note", HOSTILE_HEADER)],
        HOSTILE_PAYLOAD,
    )];
    let setup = setup(&[], &raw, 1).await;
    let console = start_console(&setup.config, &[], &[]);
    let browser = open_page(&console, "#letters").await;
    wait_rows(&browser, "letters", 1).await;
    let listed = &rows(&browser, "letters").await[0];
    assert_eq!(listed["original_subject"], HOSTILE_SUBJECT);
    assert_eq!(listed["reason"], "decode");
    screenshot(&browser, "console-hostile-list").await;
    click(&browser, "#letters tbody tr:first-child a.open").await;
    wait_js(
        &browser,
        "return document.getElementById('letter-payload').textContent.length > 0;",
    )
    .await;
    let payload = text_of(&browser, "letter-payload").await;
    assert_eq!(payload, String::from_utf8_lossy(HOSTILE_PAYLOAD).as_ref());
    let note = js_value(
        &browser,
        "return document.querySelector('[data-header=\"X-Note\"]').textContent;",
    )
    .await;
    assert_eq!(note, HOSTILE_HEADER);
    let original = js_value(
        &browser,
        "return document.querySelector('[data-field=original]').textContent;",
    )
    .await;
    assert!(
        original
            .as_str()
            .is_some_and(|o| o.starts_with(HOSTILE_SUBJECT)),
        "{original}"
    );
    // No script ran, no element was made of the letter's markup.
    assert_eq!(
        js_value(&browser, "return typeof window.__pwned;").await,
        "undefined"
    );
    assert_eq!(
        js_value(
            &browser,
            "return document.querySelectorAll('main img, main script, main b').length;"
        )
        .await,
        0
    );
    screenshot(&browser, "console-hostile-letter").await;
    browser.close().await.expect("close");
    drop(console);
}

/// One HTTP/1.0 exchange on loopback: (status, headers, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    };
    let response = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("an answer");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// The `name=value` of the session cookie a response's `head` sets.
fn session_cookie(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("a session cookie")
        .to_string()
}

/// The status of a GET of `path` with `headers`.
async fn get_status(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    http(addr, "GET", path, headers, "").await.0
}

/// A session of the console at `addr`: (its cookie, its CSRF token).
async fn open_session(addr: SocketAddr, headers: &[(&str, &str)]) -> (String, String) {
    let (status, head, body) = http(addr, "GET", "/api/session", headers, "").await;
    assert_eq!(status, 200, "{head}\n{body}");
    let cookie = session_cookie(&head);
    let session: Value = serde_json::from_str(&body).expect("session JSON");
    (cookie, session["csrf"].as_str().expect("csrf").to_string())
}

#[tokio::test]
async fn without_a_token_only_loopback_and_with_one_nothing_without_it() {
    let setup = setup(&[], &[], 0).await;

    // Anywhere but loopback without a token: refused before it listens.
    let out = console_command(&setup.config, &["--listen", "0.0.0.0:0"])
        .output()
        .expect("run console");
    assert_eq!(out.status.code(), Some(jetworker_cli::EXIT_USAGE as i32));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without a token"), "{stderr}");
    assert!(out.stdout.is_empty(), "it never served");

    // With a token (from a file), every API request needs it.
    let token = "console-token-8c1f0e2b5a";
    let token_file = setup.config.with_file_name("console-token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let console = start_console(
        &setup.config,
        &["--token-file", token_file.to_str().expect("path")],
        &[],
    );
    for path in ["/api/overview", "/api/session", "/api/letters"] {
        let (status, head, _) = http(console.addr, "GET", path, &[], "").await;
        assert_eq!(status, 401, "{path}: {head}");
        let wrong = http(
            console.addr,
            "GET",
            path,
            &[("Authorization", "Bearer nope")],
            "",
        )
        .await;
        assert_eq!(wrong.0, 401, "{path} with a wrong token");
    }
    let bearer = format!("Bearer {token}");
    let (status, _, body) = http(
        console.addr,
        "GET",
        "/api/overview",
        &[("Authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The page itself holds no data and loads, to ask for the token.
    let (status, head, page) = http(console.addr, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"login\""));
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{head}"
    );
    // A login with the token opens a session; the session then reads.
    let (status, head, _) = http(
        console.addr,
        "POST",
        "/api/login",
        &[],
        &format!("{{\"token\":\"{token}\"}}"),
    )
    .await;
    assert_eq!(status, 200, "{head}");
    let cookie = session_cookie(&head);
    let status = get_status(console.addr, "/api/overview", &[("Cookie", &cookie)]).await;
    assert_eq!(status, 200);
    let (status, _, _) = http(
        console.addr,
        "POST",
        "/api/login",
        &[],
        "{\"token\":\"guess\"}",
    )
    .await;
    assert_eq!(status, 401);
    // In the browser: the page asks for the token, refuses a wrong one, then shows it all.
    let browser = open_page(&console, "").await;
    wait_js(&browser, "return !document.getElementById('login').hidden;").await;
    assert_eq!(
        js_value(
            &browser,
            "return document.getElementById('view-overview').hidden;"
        )
        .await,
        true
    );
    screenshot(&browser, "console-login").await;
    let field = browser
        .client()
        .find(Locator::Id("login-token"))
        .await
        .expect("token field");
    field.send_keys("guess").await.expect("type");
    click(&browser, "#login-submit").await;
    wait_text(&browser, "login-error", "wrong token").await;
    field.clear().await.expect("clear");
    field.send_keys(token).await.expect("type");
    click(&browser, "#login-submit").await;
    wait_js(&browser, "return document.getElementById('login').hidden && document.querySelectorAll('#streams tbody tr').length === 2;").await;
    browser.close().await.expect("close");
    assert!(!console.log().contains(token), "the token is never logged");
    drop(console);

    // The token from the environment works the same way.
    let console = start_console(
        &setup.config,
        &[],
        &[(jetworker_cli::CONSOLE_TOKEN_ENV, token)],
    );
    let status = get_status(console.addr, "/api/overview", &[]).await;
    assert_eq!(status, 401);
    let status = get_status(console.addr, "/api/overview", &[("Authorization", &bearer)]).await;
    assert_eq!(status, 200);
    // SIGTERM ends it: the sampler stops, the requests in flight finish, exit 0.
    let mut console = console;
    console.process.signal("TERM");
    let exit = console.process.wait_exit(Duration::from_secs(15));
    assert!(exit.success(), "{exit:?}: {}", console.log());
    assert!(!console.log().contains(token), "the token is never logged");
}

#[tokio::test]
async fn changes_need_the_csrf_token_the_same_origin_and_a_writable_console() {
    let setup = setup(&(31..=32).map(permanent).collect::<Vec<_>>(), &[], 2).await;
    let dlq_stream = setup.js.get_stream("DLQ").await.expect("DLQ");
    let first = dlq_stream.cached_info().state.first_sequence;
    let purge_first =
        format!("{{\"letters\":[{{\"stream\":\"DLQ\",\"sequence\":{first}}}],\"confirmed\":true}}");

    let console = start_console(&setup.config, &[], &[]);
    let (cookie, csrf) = open_session(console.addr, &[]).await;
    let origin = format!("http://{}", console.addr);
    // Each is refused with 403.
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no session, no token", vec![]),
        ("no CSRF token", vec![("Cookie", &cookie)]),
        (
            "a wrong CSRF token",
            vec![("Cookie", &cookie), ("X-Jetworker-Csrf", "0123")],
        ),
        (
            "the token without its session",
            vec![("X-Jetworker-Csrf", &csrf)],
        ),
        (
            "a foreign Origin",
            vec![
                ("Cookie", &cookie),
                ("X-Jetworker-Csrf", &csrf),
                ("Origin", "http://evil.example"),
            ],
        ),
        (
            "a cross-site fetch",
            vec![
                ("Cookie", &cookie),
                ("X-Jetworker-Csrf", &csrf),
                ("Sec-Fetch-Site", "cross-site"),
            ],
        ),
    ];
    for (what, headers) in &cases {
        for path in ["/api/purge", "/api/replay"] {
            let (status, _, body) = http(console.addr, "POST", path, headers, &purge_first).await;
            assert_eq!(status, 403, "{path} with {what}: {body}");
        }
    }
    assert_eq!(count(&setup.js, "DLQ").await, 2, "nothing was changed");
    // A purge without the confirmation is refused too; with everything, it is done.
    let good = [
        ("Cookie", cookie.as_str()),
        ("X-Jetworker-Csrf", csrf.as_str()),
        ("Origin", origin.as_str()),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let unconfirmed = purge_first.replace(",\"confirmed\":true", "");
    let (status, _, body) = http(console.addr, "POST", "/api/purge", &good, &unconfirmed).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = http(
        console.addr,
        "POST",
        "/api/purge",
        &good,
        "{\"filter\":{},\"confirmed\":true}",
    )
    .await;
    assert_eq!(
        status, 400,
        "a filter that selects everything needs all: {body}"
    );
    let (status, _, body) = http(console.addr, "POST", "/api/purge", &good, &purge_first).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&setup.js, "DLQ").await, 1);
    drop(console);

    // Read-only: the same valid requests are refused.
    let console = start_console(&setup.config, &["--read-only"], &[]);
    let (cookie, csrf) = open_session(console.addr, &[]).await;
    let origin = format!("http://{}", console.addr);
    let good = [
        ("Cookie", cookie.as_str()),
        ("X-Jetworker-Csrf", csrf.as_str()),
        ("Origin", origin.as_str()),
    ];
    for path in ["/api/replay", "/api/purge"] {
        let (status, _, body) = http(
            console.addr,
            "POST",
            path,
            &good,
            "{\"all\":true,\"confirmed\":true}",
        )
        .await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("read-only"), "{body}");
    }
    assert_eq!(count(&setup.js, "DLQ").await, 1);
    // It still reads, and the page hides the buttons.
    let (status, _, body) = http(console.addr, "GET", "/api/letters", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["total"],
        1
    );
    let browser = open_page(&console, "#letters").await;
    wait_rows(&browser, "letters", 1).await;
    assert_eq!(
        js_value(&browser, "return document.getElementById('mode').hidden;").await,
        false
    );
    assert_eq!(
        js_value(
            &browser,
            "return document.querySelector('#view-letters .changes').hidden;"
        )
        .await,
        true
    );
    screenshot(&browser, "console-read-only").await;
    browser.close().await.expect("close");
    drop(console);
}
