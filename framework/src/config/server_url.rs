//! Server URLs and the secrets they can carry: [`ServerUrl`] (whose `Debug` and
//! `Display` redact userinfo), the [`UrlCredentials`] read out of a URL, and the
//! scrubbing that keeps secrets out of parse errors.

use std::fmt;

use secrecy::SecretString;
use serde::Deserialize;

/// A server URL whose `Debug` and `Display` never show a password or token in it.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl(String);

impl<'de> Deserialize<'de> for ServerUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Trimmed: lists from `NATS_URL` are often written "a, b".
        Ok(ServerUrl(String::deserialize(d)?.trim().to_string()))
    }
}

impl ServerUrl {
    /// Wraps a URL string as given (`nats://host:4222`, `tls://user:pass@host`, `host:4222`).
    pub fn new(url: impl Into<String>) -> Self {
        ServerUrl(url.into())
    }

    /// The full URL, userinfo included: for connecting only, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any `user:password@` or `token@` replaced by `***@`.
    pub fn redacted(&self) -> String {
        redact_userinfo(&self.0)
    }

    /// The URL without its userinfo: what is handed to the client library, whose own
    /// debug logs print server addresses in full.
    pub fn without_userinfo(&self) -> String {
        match split_userinfo(&self.0) {
            Some((scheme, _, host)) => format!("{scheme}{host}"),
            None => self.0.clone(),
        }
    }

    /// Credentials written into the URL, as the NATS clients read them:
    /// `nats://user:password@host` is user/password auth, `nats://token@host` token auth.
    /// Percent-escapes (`%40` for `@`, ...) are decoded.
    pub fn credentials(&self) -> Option<UrlCredentials> {
        let (_, userinfo, _) = split_userinfo(&self.0)?;
        if userinfo.is_empty() {
            return None;
        }
        Some(match userinfo.split_once(':') {
            Some((user, password)) => UrlCredentials::UserPassword {
                user: percent_decode(user),
                password: SecretString::from(percent_decode(password)),
            },
            None => UrlCredentials::Token(SecretString::from(percent_decode(userinfo))),
        })
    }
}

/// Credentials found in a server URL. `Debug` shows the user, never the secret.
#[derive(Clone)]
pub enum UrlCredentials {
    /// `user:password@`.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: SecretString,
    },
    /// `token@`.
    Token(SecretString),
}

impl UrlCredentials {
    /// True when both carry the same credentials (compared in full, never printed).
    pub fn same_as(&self, other: &UrlCredentials) -> bool {
        use secrecy::ExposeSecret;
        match (self, other) {
            (
                UrlCredentials::UserPassword { user, password },
                UrlCredentials::UserPassword {
                    user: user2,
                    password: password2,
                },
            ) => user == user2 && password.expose_secret() == password2.expose_secret(),
            (UrlCredentials::Token(a), UrlCredentials::Token(b)) => {
                a.expose_secret() == b.expose_secret()
            }
            _ => false,
        }
    }
}

impl fmt::Debug for UrlCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlCredentials::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"[REDACTED]")
                .finish(),
            UrlCredentials::Token(_) => f.write_str("Token([REDACTED])"),
        }
    }
}

/// `(scheme://, userinfo, rest)` when the URL has a userinfo part.
fn split_userinfo(url: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// Decodes `%XX` escapes (invalid ones are kept as written; invalid UTF-8 is replaced).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Replaces the userinfo part of a URL (`scheme://userinfo@host`) with `***`.
pub fn redact_userinfo(url: &str) -> String {
    match split_userinfo(url) {
        Some((scheme, _, host)) => format!("{scheme}***@{host}"),
        None => url.to_string(),
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Parse errors can quote values: drop the source excerpt a TOML syntax error shows (the
/// offending line can hold a secret: `3 | password = "..."`), keeping the position and
/// the reason, and remove anything that looks like URL userinfo (`user:pw@`, `token@`).
pub(super) fn scrub_secrets(message: &str) -> String {
    let kept: Vec<&str> = message
        .lines()
        .filter(|line| !is_source_excerpt(line) && !line.trim().is_empty())
        .map(str::trim)
        .collect();
    kept.join(": ")
        .split(' ')
        .map(|word| {
            // `scheme://userinfo@host`, and `token@host` (a server URL without scheme).
            if word.contains("://") || word.contains('@') {
                redact_userinfo(word.trim_start_matches(['"', '\'']))
            } else {
                word.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A line of the source excerpt in a TOML error: `  |`, `3 | text`, `  | ^^^`.
fn is_source_excerpt(line: &str) -> bool {
    line.trim_start()
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start()
        .starts_with('|')
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn url_credentials_are_read_and_stripped() {
        let url = ServerUrl::new("tls://alice:p%40ss:w@nats.example:4222/x");
        match url.credentials() {
            Some(UrlCredentials::UserPassword { user, password }) => {
                assert_eq!(user, "alice");
                assert_eq!(password.expose_secret(), "p@ss:w");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(url.without_userinfo(), "tls://nats.example:4222/x");
        assert_eq!(url.redacted(), "tls://***@nats.example:4222/x");
        let shown = format!("{url} {url:?} {:?}", url.credentials());
        assert!(
            !shown.contains("p%40ss") && !shown.contains("p@ss"),
            "{shown}"
        );

        let token = ServerUrl::new("s3cr3t@127.0.0.1:4222");
        assert!(
            matches!(token.credentials(), Some(UrlCredentials::Token(t)) if t.expose_secret() == "s3cr3t")
        );
        assert_eq!(token.without_userinfo(), "127.0.0.1:4222");

        let plain = ServerUrl::new("nats://127.0.0.1:4222");
        assert!(plain.credentials().is_none());
        assert_eq!(plain.without_userinfo(), "nats://127.0.0.1:4222");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
