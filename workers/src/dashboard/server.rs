//! The dashboard's HTTP side: the routes, the security headers every response carries,
//! and the one shared read of the bucket behind `GET /api/summary`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::summary::{merge_minutes, Summary, SummaryOptions};
use super::{listen_address, DashboardError, DashboardErrorKind, DashboardOptions};
use crate::aggregates::{self, Minute, Snapshot};
use crate::publish::now_ms;

const INDEX_HTML: &str = include_str!("assets/index.html");
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");

/// Scripts, styles and requests from the dashboard itself only: no inline script or
/// style, no plugin, no frame, no form, no other origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The newest minutes, read on every refresh; older ones change only with late events.
const RECENT_MINUTES: u64 = 2;
/// How long the older minutes of the chart are reused before being read again.
const OLDER_MINUTES_MAX_AGE: Duration = Duration::from_secs(30);
/// A read of the bucket that takes longer fails the request (503), not the page.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful shutdown waits for open requests before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Binds the dashboard's address and serves it on a task of `tasks` until `shutdown`.
/// Fails at once when the address is not allowed ([`listen_address`]) or cannot be
/// bound; returns the bound address (the real port when asked for port 0).
pub async fn serve(
    kv: kv::Store,
    options: DashboardOptions,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<SocketAddr, DashboardError> {
    let address = listen_address(&options.listen, options.allow_remote)?;
    let listener = tokio::net::TcpListener::bind(address).await.map_err(|e| {
        DashboardError::with_source(DashboardErrorKind::Listen, e)
            .with_message(format!("dashboard: cannot listen on {address}"))
    })?;
    let bound = listener.local_addr().unwrap_or(address);
    let state = Arc::new(DashboardState {
        kv,
        options,
        bound,
        cache: Mutex::new(Cache::default()),
    });
    let app = Router::new()
        .route("/", get(index))
        .route("/dashboard.js", get(script))
        .route("/dashboard.css", get(style))
        .route("/api/summary", get(summary))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state);
    tasks.spawn(async move {
        let graceful = shutdown.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { graceful.cancelled().await });
        tokio::select! {
            result = served => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "dashboard failed");
                }
            }
            _ = async {
                shutdown.cancelled().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => tracing::warn!("dashboard: requests still open after the grace period, dropped"),
        }
    });
    tracing::info!(address = %bound, "dashboard listening");
    Ok(bound)
}

/// Whether a request whose `Host` header is `host` may be answered by a dashboard bound
/// to `bound`. A loopback dashboard answers only loopback names (`127.0.0.1`, `[::1]`,
/// `localhost`) on its port: a page of another site whose name resolves to 127.0.0.1
/// (DNS rebinding) is refused. A dashboard allowed off loopback answers any host.
fn host_allowed(host: Option<&str>, bound: SocketAddr) -> bool {
    if !bound.ip().is_loopback() {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') => (name, Some(port)),
        _ => (host, None),
    };
    if port.is_some_and(|p| p.parse::<u16>() != Ok(bound.port())) {
        return false;
    }
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

struct DashboardState {
    kv: kv::Store,
    options: DashboardOptions,
    bound: SocketAddr,
    cache: Mutex<Cache>,
}

/// The last answer, shared by every page open, and the chart's older minutes.
#[derive(Default)]
struct Cache {
    latest: Option<(Instant, bytes::Bytes)>,
    older: Option<OlderMinutes>,
}

/// Minutes before the recent ones, read at `read_at`.
struct OlderMinutes {
    read_at: Instant,
    range: RangeInclusive<u64>,
    minutes: BTreeMap<u64, Minute>,
}

/// Refuses requests for another host, and adds the security headers to every response
/// (errors included).
async fn guard(State(state): State<Arc<DashboardState>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    let mut response = if host_allowed(host, state.bound) {
        next.run(request).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            "this dashboard answers on its loopback address only\n",
        )
            .into_response()
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

async fn summary(State(state): State<Arc<DashboardState>>) -> Response {
    let (status, body) = match summary_json(&state).await {
        Ok(body) => (StatusCode::OK, body),
        Err(message) => {
            tracing::warn!(error = %message, "dashboard: cannot read the aggregates");
            let body = serde_json::json!({ "error": message }).to_string();
            (StatusCode::SERVICE_UNAVAILABLE, bytes::Bytes::from(body))
        }
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The summary as JSON: the cached one when younger than half the refresh period (many
/// pages, one read), else read now. Requests wait for a read in progress rather than
/// starting their own.
async fn summary_json(state: &DashboardState) -> Result<bytes::Bytes, String> {
    let options = &state.options;
    let mut cache = state.cache.lock().await;
    if let Some((at, body)) = &cache.latest {
        if at.elapsed() < options.refresh / 2 {
            return Ok(body.clone());
        }
    }
    let read_at_ms = now_ms();
    let now = read_at_ms / 60_000;
    let window = now.saturating_sub(options.window_minutes.max(1) - 1)..=now;
    let recent_start = now.saturating_sub(RECENT_MINUTES - 1).max(*window.start());
    let mut snapshot = read(&state.kv, recent_start..=now).await?;

    if recent_start > *window.start() {
        let range = *window.start()..=recent_start - 1;
        let fresh = cache
            .older
            .as_ref()
            .is_some_and(|o| o.range == range && o.read_at.elapsed() < OLDER_MINUTES_MAX_AGE);
        if !fresh {
            let older = read(&state.kv, range.clone()).await?;
            cache.older = Some(OlderMinutes {
                read_at: Instant::now(),
                range,
                minutes: older.aggregates.minutes,
            });
        }
        if let Some(older) = &cache.older {
            let minutes = &mut snapshot.aggregates.minutes;
            *minutes = merge_minutes(minutes, &older.minutes);
        }
    }

    let summary = Summary::new(
        &snapshot,
        window,
        read_at_ms,
        &SummaryOptions {
            top: options.top,
            flag_threshold: options.flag_threshold,
            refresh_ms: u64::try_from(options.refresh.as_millis()).unwrap_or(u64::MAX),
        },
    );
    let body = bytes::Bytes::from(serde_json::to_vec(&summary).map_err(|e| e.to_string())?);
    cache.latest = Some((Instant::now(), body.clone()));
    Ok(body)
}

/// [`aggregates::read`] of `minutes`, bounded by [`READ_TIMEOUT`].
async fn read(kv: &kv::Store, minutes: RangeInclusive<u64>) -> Result<Snapshot, String> {
    match tokio::time::timeout(READ_TIMEOUT, aggregates::read(kv, minutes)).await {
        Ok(Ok(snapshot)) => Ok(snapshot),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "reading the aggregates took longer than {READ_TIMEOUT:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_dashboard_answers_loopback_names_on_its_port_only() {
        let bound: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "[::1]",
            "127.0.0.2:8080",
        ] {
            assert!(host_allowed(Some(ok), bound), "{ok}");
        }
        for refused in [
            "evil.example:8080",
            "evil.example",
            "127.0.0.1:9090",
            "localhost.evil.example:8080",
            "10.0.0.1:8080",
            "",
        ] {
            assert!(!host_allowed(Some(refused), bound), "{refused}");
        }
        assert!(!host_allowed(None, bound), "HTTP/1.1 requires Host");
        let remote: SocketAddr = "0.0.0.0:8080".parse().expect("address");
        assert!(host_allowed(Some("dashboard.internal:8080"), remote));
    }

    #[test]
    fn the_policy_allows_nothing_inline_and_nothing_foreign() {
        assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'none'"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
        assert!(!CONTENT_SECURITY_POLICY.contains("http"));
        assert!(!INDEX_HTML.contains("<script>"), "no inline script");
        assert!(!INDEX_HTML.contains("style="), "no inline style");
        assert!(
            !DASHBOARD_JS.contains("innerHTML"),
            "data is written as text"
        );
        assert!(!DASHBOARD_JS.contains("insertAdjacentHTML"));
    }
}
