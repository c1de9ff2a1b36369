//! Who may use the console and how a state-changing request proves it came from the
//! console's own page: the token rule for the listen address, the token itself
//! ([`ConsoleToken`]), sessions with their CSRF tokens, and the same-origin check.
//! Every decision here is a pure function over headers and state.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

use super::error::{console_error, ConsoleError, ConsoleErrorKind};

/// The environment variable the console's token is read from.
pub const CONSOLE_TOKEN_ENV: &str = "JETWORKER_CONSOLE_TOKEN";

/// The shared secret a console asks for. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ConsoleToken(SecretString);

impl fmt::Debug for ConsoleToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConsoleToken(<redacted>)")
    }
}

impl ConsoleToken {
    /// A token with this text (surrounding whitespace removed). Empty text is refused:
    /// a console "protected" by an empty token would let anyone in.
    pub fn new(text: &str) -> Result<ConsoleToken, ConsoleError> {
        ConsoleToken::from_source(text, "the console token")
    }

    /// [`ConsoleToken::new`], the error naming where the text came from.
    fn from_source(text: &str, source: &str) -> Result<ConsoleToken, ConsoleError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(console_error(
                ConsoleErrorKind::Token,
                format!("{source} is empty"),
            ));
        }
        Ok(ConsoleToken(SecretString::from(text.to_string())))
    }

    /// The token from `--token-file` when given, else from `JETWORKER_CONSOLE_TOKEN`
    /// (`env` is that variable's value), else none. The error names the file or the
    /// variable, never the content.
    pub fn resolve(
        token_file: Option<&Path>,
        env: Option<String>,
    ) -> Result<Option<ConsoleToken>, ConsoleError> {
        if let Some(path) = token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConsoleError::with_source(ConsoleErrorKind::Token, e)
                    .with_message(format!("reading the token file {}", path.display()))
            })?;
            let source = format!("the token file {}", path.display());
            return ConsoleToken::from_source(&text, &source).map(Some);
        }
        env.map(|text| ConsoleToken::from_source(&text, CONSOLE_TOKEN_ENV))
            .transpose()
    }

    /// Whether `offered` is this token, comparing in time that does not depend on
    /// where they first differ.
    pub fn matches(&self, offered: &str) -> bool {
        constant_time_eq(self.0.expose_secret().as_bytes(), offered.trim().as_bytes())
    }
}

/// Byte equality whose duration depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses to listen on `listen` without a token unless it is a loopback address: on
/// any other address (`0.0.0.0` included) the console is reachable by others.
pub fn check_listen(listen: &SocketAddr, token: Option<&ConsoleToken>) -> Result<(), ConsoleError> {
    if listen.ip().is_loopback() || token.is_some() {
        return Ok(());
    }
    Err(console_error(
        ConsoleErrorKind::Insecure,
        format!(
            "refusing to serve the console on {listen} without a token: it is not a loopback address; set {CONSOLE_TOKEN_ENV} or pass --token-file"
        ),
    ))
}

/// A random value for a session id or a CSRF token: 32 bytes as hex.
fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One browser's session: the CSRF token its state-changing requests must carry.
#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    created: Instant,
}

/// The console's sessions, bounded in number and age: the oldest go first.
#[derive(Debug)]
pub(super) struct Sessions {
    by_id: HashMap<String, Session>,
    order: VecDeque<String>,
    capacity: usize,
    max_age: Duration,
}

impl Sessions {
    /// At most `capacity` sessions, each valid for `max_age`.
    pub(super) fn new(capacity: usize, max_age: Duration) -> Sessions {
        Sessions {
            by_id: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            max_age,
        }
    }

    /// A new session: (its id, its CSRF token).
    pub(super) fn open(&mut self, now: Instant) -> (String, String) {
        while self.order.len() >= self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.by_id.remove(&oldest);
            }
        }
        let (id, csrf) = (random_hex(), random_hex());
        self.by_id.insert(
            id.clone(),
            Session {
                csrf: csrf.clone(),
                created: now,
            },
        );
        self.order.push_back(id.clone());
        (id, csrf)
    }

    /// The CSRF token of session `id` if it is open and not too old.
    pub(super) fn csrf(&self, id: &str, now: Instant) -> Option<&str> {
        self.by_id
            .get(id)
            .filter(|s| now.duration_since(s.created) < self.max_age)
            .map(|s| s.csrf.as_str())
    }
}

/// Why a state-changing request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// It comes from another site's page (`Origin` or `Sec-Fetch-Site` say so).
    CrossSite,
    /// It has no session, or its CSRF token is missing or wrong.
    Csrf,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::CrossSite => "cross-site request refused",
            Refusal::Csrf => "missing or wrong CSRF token: reload the console",
        })
    }
}

/// What a request says about where it comes from.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RequestOrigin<'a> {
    /// The `Host` header.
    pub(super) host: Option<&'a str>,
    /// The `Origin` header.
    pub(super) origin: Option<&'a str>,
    /// The `Sec-Fetch-Site` header.
    pub(super) fetch_site: Option<&'a str>,
}

/// Same-origin check: `Sec-Fetch-Site`, when sent, must be `same-origin` (or `none`, a
/// request the user typed); `Origin`, when sent, must be `http://` + the `Host` the
/// request was sent to. A client that sends neither (a script) still needs the CSRF
/// token, which only the console's own responses hand out.
pub(super) fn check_same_origin(request: RequestOrigin<'_>) -> Result<(), Refusal> {
    if let Some(site) = request.fetch_site {
        if !matches!(site.trim(), "same-origin" | "none") {
            return Err(Refusal::CrossSite);
        }
    }
    if let Some(origin) = request.origin {
        let expected = request.host.map(|h| format!("http://{}", h.trim()));
        if expected.as_deref() != Some(origin.trim()) {
            return Err(Refusal::CrossSite);
        }
    }
    Ok(())
}

/// The CSRF check: the token sent must be the session's.
pub(super) fn check_csrf(session_csrf: Option<&str>, sent: Option<&str>) -> Result<(), Refusal> {
    match (session_csrf, sent) {
        (Some(expected), Some(sent))
            if constant_time_eq(expected.as_bytes(), sent.trim().as_bytes()) =>
        {
            Ok(())
        }
        _ => Err(Refusal::Csrf),
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub(super) fn cookie<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub(super) fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listens_without_a_token() {
        let token = ConsoleToken::new("s3cret").ok();
        let cases = [
            ("127.0.0.1:8222", false, true),
            ("127.0.0.2:8222", false, true),
            ("[::1]:8222", false, true),
            ("0.0.0.0:8222", false, false),
            ("[::]:8222", false, false),
            ("192.168.1.5:8222", false, false),
            ("0.0.0.0:8222", true, true),
            ("192.168.1.5:8222", true, true),
        ];
        for (addr, with_token, allowed) in cases {
            let addr: SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
            let given = if with_token { token.as_ref() } else { None };
            let result = check_listen(&addr, given).map_err(|e| e.kind());
            let want = if allowed {
                Ok(())
            } else {
                Err(ConsoleErrorKind::Insecure)
            };
            assert_eq!(result, want, "{addr} token={with_token}");
        }
    }

    #[test]
    fn tokens_come_from_the_file_first_then_the_environment_and_never_show() {
        let dir = std::env::temp_dir().join(format!("console-token-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("token");
        let _ = std::fs::write(&file, "from-file\n");
        let from_file = ConsoleToken::resolve(Some(&file), Some("from-env".into()));
        assert!(from_file.is_ok_and(|t| t.is_some_and(|t| t.matches("from-file"))));
        let from_env = ConsoleToken::resolve(None, Some("from-env".into()));
        assert!(from_env.is_ok_and(|t| t.is_some_and(|t| t.matches("from-env"))));
        assert!(ConsoleToken::resolve(None, None).is_ok_and(|t| t.is_none()));
        let empty = ConsoleToken::resolve(None, Some("  ".into())).map_err(|e| e.kind());
        assert_eq!(empty.err(), Some(ConsoleErrorKind::Token));
        let missing = ConsoleToken::resolve(Some(&dir.join("absent")), None).map_err(|e| e.kind());
        assert_eq!(missing.err(), Some(ConsoleErrorKind::Token));
        let token = ConsoleToken::new("hunter2").ok();
        assert!(!format!("{token:?}").contains("hunter2"));
        assert!(token.as_ref().is_some_and(|t| !t.matches("hunter3")));
        assert!(token.as_ref().is_some_and(|t| !t.matches("hunter")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn same_origin_check() {
        let host = Some("127.0.0.1:8222");
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Result<(), Refusal>);
        let cases: [Case<'_>; 8] = [
            (None, None, Ok(())),
            (Some("http://127.0.0.1:8222"), Some("same-origin"), Ok(())),
            (Some("http://127.0.0.1:8222"), None, Ok(())),
            (None, Some("none"), Ok(())),
            (Some("http://evil.example"), None, Err(Refusal::CrossSite)),
            (Some("http://127.0.0.1:9999"), None, Err(Refusal::CrossSite)),
            (None, Some("cross-site"), Err(Refusal::CrossSite)),
            (
                Some("http://127.0.0.1:8222"),
                Some("same-site"),
                Err(Refusal::CrossSite),
            ),
        ];
        for (origin, fetch_site, want) in cases {
            let request = RequestOrigin {
                host,
                origin,
                fetch_site,
            };
            assert_eq!(
                check_same_origin(request),
                want,
                "{origin:?} {fetch_site:?}"
            );
        }
        let no_host = RequestOrigin {
            host: None,
            origin: Some("http://127.0.0.1:8222"),
            fetch_site: None,
        };
        assert_eq!(check_same_origin(no_host), Err(Refusal::CrossSite));
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let now = Instant::now();
        let mut sessions = Sessions::new(2, Duration::from_secs(60));
        let (a, a_csrf) = sessions.open(now);
        let (b, b_csrf) = sessions.open(now);
        assert_ne!(a_csrf, b_csrf);
        assert_eq!(check_csrf(sessions.csrf(&a, now), Some(&a_csrf)), Ok(()));
        assert_eq!(
            check_csrf(sessions.csrf(&a, now), Some(&b_csrf)),
            Err(Refusal::Csrf)
        );
        assert_eq!(check_csrf(sessions.csrf(&a, now), None), Err(Refusal::Csrf));
        assert_eq!(
            check_csrf(sessions.csrf("nope", now), Some(&a_csrf)),
            Err(Refusal::Csrf)
        );
        // Too old, and the oldest is dropped when full.
        let later = now + Duration::from_secs(61);
        assert!(sessions.csrf(&b, later).is_none());
        let _ = sessions.open(now);
        assert!(sessions.csrf(&a, now).is_none());
        assert!(sessions.csrf(&b, now).is_some());
    }

    #[test]
    fn cookies_and_bearer_tokens_are_read_from_headers() {
        let header = Some("theme=dark; jw_console=abc123; other=x=y");
        assert_eq!(cookie(header, "jw_console"), Some("abc123"));
        assert_eq!(cookie(header, "other"), Some("x=y"));
        assert_eq!(cookie(header, "jw"), None);
        assert_eq!(cookie(None, "jw_console"), None);
        assert_eq!(bearer(Some("Bearer tok")), Some("tok"));
        assert_eq!(bearer(Some("bearer  tok ")), Some("tok"));
        assert_eq!(bearer(Some("Basic dXNlcg==")), None);
        assert_eq!(bearer(None), None);
    }
}
