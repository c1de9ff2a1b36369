//! The console's HTTP surface: the page and its assets, and the JSON API the page polls
//! and posts to. Reads go through [`crate::status`] (via the sampler) and [`Dlq`];
//! replay and purge are POSTs that pass the token, same-origin and CSRF checks of
//! [`super::access`] and are refused in read-only mode.
//!
//! | route                              | what                                            |
//! |------------------------------------|-------------------------------------------------|
//! | `GET /`, `/console.js`, `/console.css` | the page (no data in it)                    |
//! | `GET /api/session`                 | this browser's CSRF token (sets the session cookie) |
//! | `POST /api/login`                  | `{"token"}`: opens a session when a token is set |
//! | `GET /api/overview`                | the latest `status` report, charts, dead letters by reason |
//! | `GET /api/letters?stream&consumer&reason&since&until` | `dlq list`               |
//! | `GET /api/letters/{stream}/{seq}`  | `dlq show`                                      |
//! | `POST /api/replay`, `POST /api/purge` | a selection: `letters`, `filter` or `all`    |

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::access::{
    bearer, check_csrf, check_same_origin, cookie, ConsoleToken, Refusal, RequestOrigin, Sessions,
};
use super::sampler::{charts, History};
use crate::command::{replay_notes, FilterArgs};
use crate::dlq::{Dlq, DlqError, DlqErrorKind, Letter, Summary};

/// The page, its script and its style, built into the binary.
const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// The header a state-changing request carries its CSRF token in.
const CSRF_HEADER: &str = "x-jetworker-csrf";

/// What the page may load and run: its own script and style, requests to itself, and
/// nothing else (no inline script or handler, no other origin, no framing).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// At most this many dead letters are sent to the page per listing (the total is said).
const LIST_LIMIT: usize = 500;

/// What every handler shares.
pub(super) struct ConsoleState {
    /// Dead-letter operations, or why there are none (the config has no dead-letter stream).
    pub(super) dlq: Result<Dlq, DlqError>,
    /// Replay and purge are refused.
    pub(super) read_only: bool,
    /// When set, every API request needs it (or a session opened with it).
    pub(super) token: Option<ConsoleToken>,
    /// Open sessions and their CSRF tokens.
    pub(super) sessions: Mutex<Sessions>,
    /// What the sampler read.
    pub(super) history: Arc<RwLock<History>>,
    /// Wakes the sampler after a replay or purge, so the page shows the effect at once.
    pub(super) wake: Arc<Notify>,
    /// The session cookie's name (with the port: consoles on one host keep apart).
    pub(super) cookie_name: String,
    /// How often the sampler reads the server.
    pub(super) sample_every: Duration,
}

type Shared = Arc<ConsoleState>;

/// The console's routes over `state`.
pub(super) fn router(state: Shared) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route("/api/session", get(session))
        .route("/api/login", post(login))
        .route("/api/overview", get(overview))
        .route("/api/letters", get(letters))
        .route("/api/letters/{stream}/{seq}", get(letter))
        .route("/api/replay", post(replay))
        .route("/api/purge", post(purge))
        .layer(middleware::from_fn_with_state(state.clone(), guard_host))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// A JSON response.
fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer: {e}"),
        ),
    }
}

/// `{"error": message}` with `status`.
fn error(status: StatusCode, message: &str) -> Response {
    Failure::new(status, message).into_response()
}

/// A request the console refuses or cannot carry out: its status and why, answered as
/// `{"error": message}`.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"jetworker console\""),
            );
        }
        response
    }
}

/// A `dlq` failure as the HTTP status that says what it is.
fn dlq_failure(e: &DlqError) -> Failure {
    let status = match e.kind() {
        DlqErrorKind::InvalidSelection | DlqErrorKind::NoDeadLetterStream => {
            StatusCode::BAD_REQUEST
        }
        DlqErrorKind::NotFound => StatusCode::NOT_FOUND,
        DlqErrorKind::NotADeadLetter | DlqErrorKind::PayloadMissing => StatusCode::CONFLICT,
        DlqErrorKind::Request | DlqErrorKind::Publish => StatusCode::BAD_GATEWAY,
    };
    Failure::new(status, e.to_string())
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What the request's headers say about where it comes from.
fn request_origin(headers: &HeaderMap) -> RequestOrigin<'_> {
    RequestOrigin {
        host: header_str(headers, header::HOST),
        origin: header_str(headers, header::ORIGIN),
        fetch_site: header_str(headers, "sec-fetch-site"),
    }
}

/// True for a `Host` naming a loopback address or `localhost`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Every response gets the security headers; without a token, only requests addressed
/// to a loopback name are answered, so a page whose DNS name is rebound to 127.0.0.1
/// cannot read the console.
async fn guard_host(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let host_ok = state.token.is_some()
        || header_str(request.headers(), header::HOST).is_some_and(loopback_host);
    let mut response = if host_ok {
        next.run(request).await
    } else {
        error(
            StatusCode::MISDIRECTED_REQUEST,
            "the console answers requests to a loopback address only",
        )
    };
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
        ("cross-origin-resource-policy", "same-origin"),
        ("cache-control", "no-store"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

impl ConsoleState {
    /// The id of the request's session, when it has an open one.
    fn session_id<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        let id = cookie(header_str(headers, header::COOKIE), &self.cookie_name)?;
        self.lock_sessions()
            .csrf(id, Instant::now())
            .is_some()
            .then_some(id)
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the request may read: no token is set, or it sends the token, or it has
    /// a session (which, with a token set, only a login opens).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        bearer(header_str(headers, header::AUTHORIZATION)).is_some_and(|t| token.matches(t))
            || self.session_id(headers).is_some()
    }

    /// The checks of a state-changing request: authorized, same origin, the session's
    /// CSRF token, and not a read-only console.
    fn check_change(&self, headers: &HeaderMap) -> Result<(), Failure> {
        self.check_read(headers)?;
        check_same_origin(request_origin(headers)).map_err(forbidden)?;
        let session = cookie(header_str(headers, header::COOKIE), &self.cookie_name);
        let sessions = self.lock_sessions();
        let expected = session.and_then(|id| sessions.csrf(id, Instant::now()));
        check_csrf(expected, header_str(headers, CSRF_HEADER)).map_err(forbidden)?;
        drop(sessions);
        if self.read_only {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                "this console is read-only: replay and purge are turned off",
            ));
        }
        Ok(())
    }

    /// The check of a read: authorized.
    fn check_read(&self, headers: &HeaderMap) -> Result<(), Failure> {
        if self.authorized(headers) {
            Ok(())
        } else {
            Err(unauthorized())
        }
    }

    fn dlq(&self) -> Result<&Dlq, Failure> {
        self.dlq.as_ref().map_err(dlq_failure)
    }
}

fn unauthorized() -> Failure {
    Failure::new(
        StatusCode::UNAUTHORIZED,
        "this console needs its token: log in",
    )
}

fn forbidden(refusal: Refusal) -> Failure {
    Failure::new(StatusCode::FORBIDDEN, refusal.to_string())
}

/// What the page learns about its session.
#[derive(Serialize)]
struct SessionInfo {
    csrf: String,
    read_only: bool,
    token_required: bool,
}

impl ConsoleState {
    /// The session's info, opening a session (and setting its cookie) when there is none.
    fn session_response(&self, headers: &HeaderMap) -> Response {
        let now = Instant::now();
        let mut sessions = self.lock_sessions();
        let existing = cookie(header_str(headers, header::COOKIE), &self.cookie_name)
            .and_then(|id| sessions.csrf(id, now).map(str::to_string));
        let (csrf, new_cookie) = match existing {
            Some(csrf) => (csrf, None),
            None => {
                let (id, csrf) = sessions.open(now);
                (csrf, Some(id))
            }
        };
        drop(sessions);
        let info = SessionInfo {
            csrf,
            read_only: self.read_only,
            token_required: self.token.is_some(),
        };
        let mut response = json(StatusCode::OK, &info);
        if let Some(id) = new_cookie {
            let value = format!(
                "{}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200",
                self.cookie_name
            );
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
        }
        response
    }
}

async fn session(State(state): State<Shared>, headers: HeaderMap) -> Result<Response, Failure> {
    state.check_read(&headers)?;
    Ok(state.session_response(&headers))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

async fn login(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    check_same_origin(request_origin(&headers)).map_err(forbidden)?;
    let Some(token) = &state.token else {
        return Ok(state.session_response(&headers));
    };
    let offered: Option<Login> = serde_json::from_slice(&body).ok();
    if offered.is_some_and(|l| token.matches(&l.token)) {
        // A fresh session: never one the request brought along.
        return Ok(state.session_response(&HeaderMap::new()));
    }
    // Slows down guessing; the token itself should be long and random.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Err(unauthorized())
}

/// What `GET /api/overview` answers.
#[derive(Serialize)]
struct Overview<'a> {
    /// When the report was read (ms since the epoch), `None` before the first sample.
    sampled_at_ms: Option<i64>,
    sample_every_ms: u128,
    read_only: bool,
    /// The report `status --json` prints.
    status: Option<&'a crate::status::StatusReport>,
    /// Why the last sample failed.
    error: Option<&'a str>,
    dead_letters_by_reason: &'a [super::sampler::ReasonCount],
    charts: Vec<super::sampler::Chart>,
}

async fn overview(State(state): State<Shared>, headers: HeaderMap) -> Result<Response, Failure> {
    state.check_read(&headers)?;
    let history = state.history.read().unwrap_or_else(|p| p.into_inner());
    let latest = history.latest();
    let body = Overview {
        sampled_at_ms: latest.map(|s| s.at_ms),
        sample_every_ms: state.sample_every.as_millis(),
        read_only: state.read_only,
        status: latest.map(|s| &s.report),
        error: history.error.as_deref(),
        dead_letters_by_reason: &history.reasons,
        charts: charts(&history.samples()),
    };
    Ok(json(StatusCode::OK, &body))
}

/// The `dlq` filter options of a query string (`consumer` and `reason` repeated or
/// comma separated, as on the command line).
fn filter_from_query(query: Option<&str>) -> FilterArgs {
    let mut filter = FilterArgs::default();
    let split = |value: &str| -> Vec<String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .collect()
    };
    let nonempty = |value: String| (!value.trim().is_empty()).then_some(value);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let value = value.into_owned();
        match key.as_ref() {
            "stream" => filter.stream = nonempty(value),
            "consumer" => filter.consumer.extend(split(&value)),
            "reason" => filter.reason.extend(split(&value)),
            "since" => filter.since = nonempty(value),
            "until" => filter.until = nonempty(value),
            _ => {}
        }
    }
    filter
}

/// What `GET /api/letters` answers.
#[derive(Serialize)]
struct Listing {
    total: usize,
    letters: Vec<Summary>,
}

async fn letters(
    State(state): State<Shared>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, Failure> {
    state.check_read(&headers)?;
    let dlq = state.dlq()?;
    let filter = filter_from_query(query.as_deref())
        .to_filter()
        .map_err(|e| dlq_failure(&e))?;
    let letters = dlq.list(&filter).await.map_err(|e| dlq_failure(&e))?;
    Ok(json(
        StatusCode::OK,
        &Listing {
            total: letters.len(),
            letters: letters
                .iter()
                .take(LIST_LIMIT)
                .map(Letter::summary)
                .collect(),
        },
    ))
}

async fn letter(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((stream, seq)): Path<(String, u64)>,
) -> Result<Response, Failure> {
    /// `dlq show --json`, and who else receives a replay.
    #[derive(Serialize)]
    struct Shown {
        #[serde(flatten)]
        detail: crate::dlq::Detail,
        other_readers: Vec<String>,
    }
    state.check_read(&headers)?;
    let dlq = state.dlq()?;
    let letter = dlq
        .get(Some(&stream), seq)
        .await
        .map_err(|e| dlq_failure(&e))?;
    Ok(json(
        StatusCode::OK,
        &Shown {
            detail: letter.detail(dlq.codec_of(&letter)),
            other_readers: dlq.other_readers(&letter),
        },
    ))
}

/// One dead letter named by the page.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LetterRef {
    stream: String,
    sequence: u64,
}

/// Which dead letters a replay or purge applies to: the named ones, those a filter
/// selects, or all (of `filter.stream`, or of every dead-letter stream). As on the
/// command line, a filter that does not narrow the selection needs `all`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    #[serde(default)]
    letters: Vec<LetterRef>,
    #[serde(default)]
    filter: Option<FilterArgs>,
    #[serde(default)]
    all: bool,
    /// The user confirmed (a purge needs it, as `dlq purge` needs its answer or `--yes`).
    #[serde(default)]
    confirmed: bool,
}

impl Selection {
    async fn letters(&self, dlq: &Dlq) -> Result<Vec<Letter>, Failure> {
        let by_filter = self.filter.is_some() || self.all;
        match (self.letters.is_empty(), by_filter) {
            (false, false) => {
                let mut out = Vec::with_capacity(self.letters.len());
                for named in &self.letters {
                    out.push(
                        dlq.get(Some(&named.stream), named.sequence)
                            .await
                            .map_err(|e| dlq_failure(&e))?,
                    );
                }
                Ok(out)
            }
            (true, true) => {
                let filter = self
                    .filter
                    .clone()
                    .unwrap_or_default()
                    .to_filter()
                    .map_err(|e| dlq_failure(&e))?;
                if !self.all && !filter.narrows() {
                    return Err(Failure::new(
                        StatusCode::BAD_REQUEST,
                        "say which dead letters: a consumer, reason or time filter, or all",
                    ));
                }
                dlq.list(&filter).await.map_err(|e| dlq_failure(&e))
            }
            _ => Err(Failure::new(
                StatusCode::BAD_REQUEST,
                "name dead letters, or give a filter (or all), not both and not neither",
            )),
        }
    }
}

fn parse_selection(body: &[u8]) -> Result<Selection, Failure> {
    serde_json::from_slice(body)
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, format!("the selection: {e}")))
}

/// What a replay from the page did.
#[derive(Serialize)]
struct ReplayAnswer {
    selected: usize,
    replayed: Vec<crate::dlq::Replayed>,
    skipped: Vec<Skipped>,
    failed: Option<String>,
    notes: Vec<String>,
}

#[derive(Serialize)]
struct Skipped {
    stream: String,
    sequence: u64,
    why: String,
}

async fn replay(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    state.check_change(&headers)?;
    let dlq = state.dlq()?;
    let letters = parse_selection(&body)?.letters(dlq).await?;
    let notes = replay_notes(dlq, &letters);
    let report = dlq.replay(&letters).await;
    state.wake.notify_one();
    tracing::info!(
        selected = letters.len(),
        replayed = report.replayed.len(),
        skipped = report.skipped.len(),
        failed = report.failed.is_some(),
        "console: replay"
    );
    let status = if report.failed.is_some() {
        StatusCode::BAD_GATEWAY
    } else {
        StatusCode::OK
    };
    let skipped = report
        .skipped
        .into_iter()
        .map(|(stream, sequence, why)| Skipped {
            stream,
            sequence,
            why,
        })
        .collect();
    Ok(json(
        status,
        &ReplayAnswer {
            selected: letters.len(),
            replayed: report.replayed,
            skipped,
            failed: report.failed.map(|e| e.to_string()),
            notes,
        },
    ))
}

async fn purge(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Failure> {
    state.check_change(&headers)?;
    let dlq = state.dlq()?;
    let selection = parse_selection(&body)?;
    if !selection.confirmed {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "a purge deletes for good: it needs the user's confirmation (\"confirmed\": true)",
        ));
    }
    let letters = selection.letters(dlq).await?;
    let result = dlq.purge(&letters).await;
    state.wake.notify_one();
    let report = result.map_err(|e| dlq_failure(&e))?;
    tracing::info!(
        selected = letters.len(),
        deleted = report.deleted,
        already_gone = report.already_gone,
        "console: purge"
    );
    Ok(json(StatusCode::OK, &report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1:8222",
            "127.0.0.1",
            "localhost:8222",
            "LOCALHOST",
            "[::1]:8222",
            "[::1]",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:8222",
            "10.0.0.1:8222",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
    }

    #[test]
    fn query_strings_give_the_dlq_filter_options() {
        let f = filter_from_query(Some(
            "stream=DLQ&consumer=a,b&consumer=c&reason=decode&since=1h&until=",
        ));
        assert_eq!(f.stream.as_deref(), Some("DLQ"));
        assert_eq!(f.consumer, ["a", "b", "c"]);
        assert_eq!(f.reason, ["decode"]);
        assert_eq!(f.since.as_deref(), Some("1h"));
        assert_eq!(f.until, None);
        let none = filter_from_query(None);
        assert!(none.stream.is_none() && none.consumer.is_empty());
        let parsed = filter_from_query(Some("reason=nonsense")).to_filter();
        assert_eq!(
            parsed.map_err(|e| e.kind()).err(),
            Some(DlqErrorKind::InvalidSelection)
        );
    }
}
