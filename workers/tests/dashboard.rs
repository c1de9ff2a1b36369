//! The analytics dashboard in headless Chromium against a real nats-server: a known set
//! of events (a product and a user named with markup among them) is counted by the
//! platform's workers, then the page served by `workers dashboard` must show what
//! `workers stats --json` prints (per kind counts, per minute counts, revenue, top
//! products, failed logins, flagged users), keep the hostile names as inert text, and
//! follow new events without being reloaded. Screenshots land in target/screenshots.
//!
//! The HTTP side is checked too: every response carries the strict
//! Content-Security-Policy, nothing but `GET` is served, and a request naming another
//! host (DNS rebinding) is refused.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use browser_kit::Browser;
use bytes::Bytes;
use jetworker::testing::server::NatsServer;
use jetworker::{Config, Publisher};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use workers::aggregates::{self, Aggregates, DEFAULT_FLAG_THRESHOLD};
use workers::events::{AnyEvent, Click, Login, Purchase};
use workers::handlers::{self, Analytics, BUCKET};
use workers::publish::now_ms;
use workers::report::money;

mod http;

/// A product name that is markup: shown as text, it must never become an element.
const HOSTILE_PRODUCT: &str = r#"<img src=x onerror="window.__pwned='product'">"#;
/// A user name that is markup, failing often enough to be flagged.
const HOSTILE_USER: &str = r#"<b onmouseover="window.__pwned='user'">mallory</b>"#;

fn streams_toml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../streams.toml")
}

fn config(url: &str) -> Config {
    let mut config =
        Config::load_with_env(streams_toml(), [("NATS_URL".to_string(), url.to_string())])
            .expect("streams.toml is valid");
    config.worker.ops_listen = String::new();
    config.worker.shutdown_grace = Duration::from_secs(5);
    config
}

fn click(id: &str, user: &str, time: u64) -> AnyEvent {
    AnyEvent::Click(Click {
        id: id.into(),
        user: user.into(),
        time,
        page: "/".into(),
    })
}

fn purchase(id: &str, user: &str, product: &str, amount: u64, time: u64) -> AnyEvent {
    AnyEvent::Purchase(Purchase {
        id: id.into(),
        user: user.into(),
        time,
        product: product.into(),
        amount,
    })
}

fn login(id: &str, user: &str, success: bool, time: u64) -> AnyEvent {
    AnyEvent::Login(Login {
        id: id.into(),
        user: user.into(),
        time,
        success,
        method: None,
    })
}

/// The first events: this minute and ten minutes ago, the hostile names among them.
fn first_events(now: u64) -> Vec<AnyEvent> {
    let earlier = now - 10 * 60_000;
    let mut events = vec![
        click("c1", "ann", now),
        click("c2", "ann", now),
        click("c3", "bob", earlier),
        click("c4", HOSTILE_USER, now),
        purchase("p1", "ann", "Blue Mug", 1999, now),
        purchase("p2", "bob", "Blue Mug", 1999, earlier),
        purchase("p3", "ann", HOSTILE_PRODUCT, 4250, now),
        purchase("p4", "carol", "Tea", 350, earlier),
        login("l-ok-1", "ann", true, now),
        login("l-ok-2", "bob", true, earlier),
        login("l-ann", "ann", false, now),
    ];
    for i in 0..DEFAULT_FLAG_THRESHOLD {
        events.push(login(&format!("l-m{i}"), HOSTILE_USER, false, now));
    }
    events
}

/// More events, published while the page is open.
fn more_events(now: u64) -> Vec<AnyEvent> {
    vec![
        click("c10", "dave", now),
        click("c11", "dave", now),
        click("c12", "erin", now),
        purchase("p10", "dave", "Tea", 350, now),
        purchase("p11", "erin", "Kettle", 8900, now),
        login("l-ann-2", "ann", false, now),
    ]
}

async fn publish(js: &jetstream::Context, events: &[AnyEvent]) {
    let publisher = Publisher::new(js.clone());
    for event in events {
        let payload = Bytes::from(event.encode().expect("encode"));
        publisher
            .publish_bytes(
                &event.kind().subject(),
                event.id(),
                HeaderMap::new(),
                payload,
            )
            .await
            .expect("published");
    }
}

/// Waits until the bucket holds exactly what `events` imply, nothing in flight.
async fn wait_counted(kv: &kv::Store, events: &[AnyEvent]) -> Aggregates {
    let expected = Aggregates::from_events(events, DEFAULT_FLAG_THRESHOLD);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snapshot = aggregates::read(kv, expected.minutes.keys().copied())
            .await
            .expect("read the aggregates");
        if snapshot.aggregates == expected && snapshot.pending == 0 {
            return expected;
        }
        assert!(
            Instant::now() < deadline,
            "not counted within 30s: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `workers stats --json --minutes 60`, as an operator runs it.
fn stats_json(url: &str) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_workers"))
        .arg("--config")
        .arg(streams_toml())
        .args(["stats", "--json", "--minutes", "60", "--top", "10"])
        .env("NATS_URL", url)
        .env_remove("JETWORKER_CONFIG")
        .output()
        .expect("workers stats runs");
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("stats --json prints JSON")
}

/// `workers dashboard` on a free loopback port, killed on drop.
struct DashboardProcess {
    child: Child,
    address: SocketAddr,
}

impl DashboardProcess {
    fn start(url: &str) -> DashboardProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_workers"))
            .arg("--config")
            .arg(streams_toml())
            .args([
                "dashboard",
                "--listen",
                "127.0.0.1:0",
                "--refresh-ms",
                "250",
            ])
            .env("NATS_URL", url)
            .env_remove("JETWORKER_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("workers dashboard starts");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let line = received
            .recv_timeout(Duration::from_secs(20))
            .expect("the dashboard prints its address");
        let address = line
            .strip_prefix("dashboard at http://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        DashboardProcess { child, address }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.address)
    }
}

impl Drop for DashboardProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn js_value(browser: &Browser, script: &str) -> Value {
    browser
        .client()
        .execute(script, vec![])
        .await
        .expect("script runs")
}

/// The page's numbers, read from the DOM.
async fn page_numbers(browser: &Browser) -> Value {
    js_value(
        browser,
        r#"
        const value = (id) => Number(document.getElementById(id).dataset.value);
        const rows = (id) => Array.from(document.querySelectorAll('#' + id + ' tbody tr'))
            .map((r) => Array.from(r.cells).map((c) => c.textContent));
        const minutes = {};
        for (const g of document.querySelectorAll('#events-chart g.minute')) {
            minutes[g.dataset.minute] = {
                clicks: Number(g.dataset.clicks),
                purchases: Number(g.dataset.purchases),
                logins: Number(g.dataset.logins),
            };
        }
        for (const g of document.querySelectorAll('#active-chart g.minute')) {
            minutes[g.dataset.minute].active_users = Number(g.dataset.activeUsers);
        }
        return {
            totals: {
                clicks: value('total-clicks'),
                purchases: value('total-purchases'),
                logins: value('total-logins'),
                failed_logins: value('failed-logins'),
                revenue_cents: value('revenue'),
            },
            revenue: document.getElementById('revenue').textContent,
            window_revenue: document.getElementById('revenue-window').textContent,
            minutes: minutes,
            top_products: rows('top-products'),
            failing_users: rows('failing-users'),
            flagged: Array.from(document.querySelectorAll('#flagged li')).map((li) => li.textContent),
            flagged_count: value('flagged-count'),
        };
        "#,
    )
    .await
}

/// What the page must show, from `workers stats --json`.
fn expected_page(stats: &Value) -> Value {
    let totals = &stats["totals"];
    let mut products: Vec<(String, u64, u64)> = stats["products"]
        .as_object()
        .expect("products")
        .iter()
        .map(|(name, p)| {
            let n = |k: &str| p[k].as_u64().expect("a count");
            (name.clone(), n("purchases"), n("revenue_cents"))
        })
        .collect();
    products.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    let flagged: Vec<String> = stats["flagged"]
        .as_array()
        .expect("flagged")
        .iter()
        .map(|u| u.as_str().expect("a name").to_string())
        .collect();
    let mut failing: Vec<(String, u64)> = stats["failed_logins"]
        .as_object()
        .expect("failed logins")
        .iter()
        .map(|(user, n)| (user.clone(), n.as_u64().expect("a count")))
        .collect();
    failing.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let minutes: serde_json::Map<String, Value> = stats["minutes"]
        .as_object()
        .expect("minutes")
        .iter()
        .map(|(minute, m)| {
            let m = json!({
                "clicks": m["clicks"], "purchases": m["purchases"], "logins": m["logins"],
                "active_users": m["active_users"],
            });
            (minute.clone(), m)
        })
        .collect();
    let window_cents = stats["minutes"]
        .as_object()
        .expect("minutes")
        .values()
        .map(|m| m["revenue_cents"].as_u64().expect("cents"))
        .sum();
    json!({
        "totals": {
            "clicks": totals["clicks"], "purchases": totals["purchases"],
            "logins": totals["logins"], "failed_logins": totals["failed_logins"],
            "revenue_cents": totals["revenue_cents"],
        },
        "revenue": money(totals["revenue_cents"].as_u64().expect("cents")),
        "window_revenue": money(window_cents),
        "minutes": minutes,
        "top_products": products.iter().map(|(name, n, cents)| json!([name, n.to_string(), money(*cents)])).collect::<Vec<_>>(),
        "failing_users": failing.iter().map(|(user, n)| json!([
            user, n.to_string(), if flagged.contains(user) { "flagged" } else { "" }
        ])).collect::<Vec<_>>(),
        "flagged": flagged,
        "flagged_count": flagged.len(),
    })
}

/// The page's chart holds every minute; only those with events are compared.
fn with_minutes_of(page: &Value, stats: &Value) -> Value {
    let mut page = page.clone();
    let wanted = stats["minutes"].as_object().expect("minutes");
    if let Some(minutes) = page["minutes"].as_object_mut() {
        minutes.retain(|minute, _| wanted.contains_key(minute));
    }
    page
}

async fn wait_for_totals(browser: &Browser, expected: &Aggregates) {
    let t = expected.totals;
    browser
        .wait_until_js(
            &format!(
                "const v = (id) => document.getElementById(id).dataset.value; \
                 return v('total-clicks') === '{}' && v('total-purchases') === '{}' \
                 && v('total-logins') === '{}' && v('failed-logins') === '{}' \
                 && v('revenue') === '{}';",
                t.clicks, t.purchases, t.logins, t.failed_logins, t.revenue_cents
            ),
            Duration::from_secs(20),
        )
        .await
        .expect("the page shows the counted totals");
}

fn assert_headers(headers: &BTreeMap<String, String>, what: &str) {
    let csp = headers
        .get("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no CSP in {headers:?}"));
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{what}: {directive} not in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{what}: {csp}");
    assert_eq!(
        headers.get("x-content-type-options").map(String::as_str),
        Some("nosniff"),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_stats_prints_keeps_names_inert_and_updates_live() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.url();
    let stop = CancellationToken::new();
    let running = handlers::app(Analytics::new())
        .start(config(&url), stop.clone())
        .await
        .expect("the workers start");
    let client = async_nats::connect(&url).await.expect("connect");
    let js = jetstream::new(client.clone());
    let kv = js.get_key_value(BUCKET).await.expect("bucket provisioned");

    let now = now_ms();
    let mut events = first_events(now);
    publish(&js, &events).await;
    let expected = wait_counted(&kv, &events).await;
    assert_eq!(expected.flagged.len(), 1, "the hostile user is flagged");

    let dashboard = DashboardProcess::start(&url);
    let host = dashboard.address.to_string();

    // The HTTP side: security headers everywhere, GET only, loopback names only.
    let page = http::get(dashboard.address, "/");
    assert_eq!(page.status, 200);
    assert_headers(&page.headers, "GET /");
    assert!(
        page.body.contains(r#"<script src="/dashboard.js""#),
        "{page:?}"
    );
    let api = http::get(dashboard.address, "/api/summary");
    assert_eq!(api.status, 200, "{api:?}");
    assert_headers(&api.headers, "GET /api/summary");
    assert_eq!(
        api.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        api.headers.get("cache-control").map(String::as_str),
        Some("no-store")
    );
    let summary: Value = serde_json::from_str(&api.body).expect("JSON");
    assert_eq!(summary["totals"]["events"], expected.totals.events());
    for (method, path) in [("POST", "/api/summary"), ("DELETE", "/"), ("PUT", "/")] {
        let refused = http::request(dashboard.address, method, &host, path);
        assert_eq!(refused.status, 405, "{method} {path} is refused: read-only");
        assert_headers(&refused.headers, method);
    }
    let unknown = http::get(dashboard.address, "/nowhere");
    assert_eq!(unknown.status, 404);
    assert_headers(&unknown.headers, "an unknown path");
    let rebound = format!("attacker.example:{}", dashboard.address.port());
    let rebound = http::request(dashboard.address, "GET", &rebound, "/api/summary");
    assert_eq!(
        rebound.status, 421,
        "another host's page cannot read it: {rebound:?}"
    );
    assert!(!rebound.body.contains("totals"), "{rebound:?}");

    // The page: the numbers `stats` prints.
    let browser = Browser::start().await.expect("headless Chromium");
    browser.client().goto(&dashboard.url()).await.expect("open");
    wait_for_totals(&browser, &expected).await;
    let stats = stats_json(&url);
    let page = page_numbers(&browser).await;
    assert_eq!(with_minutes_of(&page, &stats), expected_page(&stats));
    assert_eq!(
        page["minutes"].as_object().map(|m| m.len()),
        Some(60),
        "the chart has the last 60 minutes"
    );
    assert_eq!(stats["totals"]["clicks"], expected.totals.clicks);
    assert_eq!(stats["flagged"], json!([HOSTILE_USER]));
    browser
        .screenshot("workers-dashboard")
        .await
        .expect("screenshot");

    // The hostile names are text: the exact strings, no element made of them, no script run.
    let inert = browser
        .client()
        .execute(
            r#"
            const [product, user] = arguments;
            const cells = Array.from(document.querySelectorAll('td, li')).map((c) => c.textContent);
            return {
                product_shown: cells.includes(product),
                user_shown: cells.filter((t) => t === user).length,
                images: document.querySelectorAll('img').length,
                bold: document.querySelectorAll('main b').length,
                pwned: window.__pwned === undefined ? null : String(window.__pwned),
            };
            "#,
            vec![json!(HOSTILE_PRODUCT), json!(HOSTILE_USER)],
        )
        .await
        .expect("script runs");
    assert_eq!(
        inert,
        json!({"product_shown": true, "user_shown": 2, "images": 0, "bold": 0, "pwned": null}),
        "names from events stay text (failing users table and flagged list show the user)"
    );

    // Live: more events, the same document (no reload) shows them.
    js_value(&browser, "window.__sameDocument = 'yes'; return true;").await;
    let updates_before = js_value(&browser, "return Number(document.body.dataset.updates);").await;
    let more = more_events(now_ms());
    publish(&js, &more).await;
    events.extend(more);
    let expected = wait_counted(&kv, &events).await;
    wait_for_totals(&browser, &expected).await;
    let still = js_value(&browser, "return window.__sameDocument === 'yes';").await;
    assert_eq!(still, json!(true), "updated in place, not reloaded");
    let updates_after = js_value(&browser, "return Number(document.body.dataset.updates);").await;
    assert!(
        updates_after.as_u64() > updates_before.as_u64(),
        "{updates_before} -> {updates_after}"
    );
    // Let one more poll land, so every section shows the counted state.
    browser
        .wait_until_js(
            &format!(
                "return Number(document.body.dataset.updates) > {};",
                updates_after
            ),
            Duration::from_secs(10),
        )
        .await
        .expect("the page keeps polling");
    let stats = stats_json(&url);
    let page = page_numbers(&browser).await;
    assert_eq!(with_minutes_of(&page, &stats), expected_page(&stats));
    assert_eq!(stats["products"]["Kettle"]["revenue_cents"], 8900);
    browser
        .screenshot("workers-dashboard-live")
        .await
        .expect("screenshot");

    browser.close().await.expect("close the browser");
    drop(dashboard);
    stop.cancel();
    running.wait().await;
    let _ = client.drain().await;
}

#[test]
fn a_non_loopback_address_is_refused_unless_allowed() {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_workers"))
        .arg("--config")
        .arg(streams_toml())
        .args(["dashboard", "--listen", "0.0.0.0:0"])
        // Nothing listens there: the address is refused before any connection.
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env_remove("JETWORKER_CONFIG")
        .output()
        .expect("workers dashboard runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--allow-remote"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
