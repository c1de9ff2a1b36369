//! Loading: the file, then `NATS_URL` and `JETWORKER__...` environment overrides, parsed
//! with unknown keys collected (serde_ignored) and validated; [`ConfigError`] says why a
//! config cannot be used.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use super::schema::Config;
use super::server_url::scrub_secrets;
use super::validate::ConfigProblem;
use crate::error::Error;

/// Environment variable prefix for overrides (`JETWORKER__WORKER__SHUTDOWN_GRACE`).
pub const ENV_PREFIX: &str = "JETWORKER";
/// The default config path, relative to the working directory.
pub const DEFAULT_PATH: &str = "streams.toml";

/// Why a config could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigErrorKind {
    /// The file could not be read (the I/O error is the source).
    Read,
    /// The text is not valid TOML, or a value has the wrong type. The parser's own error
    /// is not kept as the source: its text can quote the line, secret and all; the
    /// message keeps its position and reason, scrubbed.
    Parse,
    /// The config parsed but is not valid; [`ConfigError::problems`] lists every problem.
    Invalid,
}

impl fmt::Display for ConfigErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigErrorKind::Read => "cannot read the config file",
            ConfigErrorKind::Parse => "cannot parse the config",
            ConfigErrorKind::Invalid => "the config has problems",
        })
    }
}

/// Why a config could not be used: every line names the file and, for a problem, the
/// key path (`streams.toml: consumers[1].max_deliver: ...`). Never contains a secret.
pub type ConfigError = Error<ConfigErrorKind>;

/// The file a config error is about and, when invalid, its problems.
#[derive(Debug)]
struct ConfigErrorDetail {
    file: String,
    problems: Vec<ConfigProblem>,
}

impl ConfigErrorDetail {
    fn new(file: &str, problems: Vec<ConfigProblem>) -> Self {
        ConfigErrorDetail {
            file: file.to_string(),
            problems,
        }
    }
}

impl ConfigError {
    /// The problems, when the config was invalid (empty for read and parse errors).
    pub fn problems(&self) -> &[ConfigProblem] {
        self.detail::<ConfigErrorDetail>()
            .map(|d| d.problems.as_slice())
            .unwrap_or_default()
    }

    /// The config file the error is about, as it was named.
    pub fn file(&self) -> Option<&str> {
        self.detail::<ConfigErrorDetail>().map(|d| d.file.as_str())
    }
}

fn render_problems(file: &str, problems: &[ConfigProblem]) -> String {
    let mut out = format!(
        "{file}: {} problem{} in the config",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        out.push_str(&format!("\n  {file}: {}: {}", p.key, p.message));
    }
    out
}

impl Config {
    /// Loads `path` with overrides from the process environment, then validates it.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        Config::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: impl AsRef<Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::with_source(ConfigErrorKind::Read, e)
                .with_message(format!("{file}: cannot read the config file"))
                .with_detail(ConfigErrorDetail::new(&file, Vec::new()))
        })?;
        Config::from_toml_with_env(&text, path, env)
    }

    /// Parses TOML text as if read from `source`, applying `env` overrides, and validates it.
    pub fn from_toml_with_env(
        text: &str,
        source: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let file = source.display().to_string();
        let parse_error = |message: String| {
            ConfigError::new(ConfigErrorKind::Parse)
                .with_message(format!("{file}: {message}"))
                .with_detail(ConfigErrorDetail::new(&file, Vec::new()))
        };

        let mut nats_url = None;
        let mut overrides: HashMap<String, String> = HashMap::new();
        for (k, v) in env {
            if k == "NATS_URL" && !v.trim().is_empty() {
                nats_url = Some(v);
            } else if k.starts_with(&format!("{ENV_PREFIX}__")) {
                overrides.insert(k, v);
            }
        }
        let servers_key = format!("{ENV_PREFIX}__CONNECTION__SERVERS");
        if let Some(url) = nats_url {
            overrides.entry(servers_key).or_insert(url);
        }
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("connection.servers")
            .source(Some(overrides));

        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .map_err(|e| parse_error(scrub_secrets(&e.to_string())))?;

        let mut unknown = Vec::new();
        let mut record_unknown =
            |path: serde_ignored::Path| unknown.push(key_path(&path.to_string()));
        let ignored = serde_ignored::Deserializer::new(raw, &mut record_unknown);
        let mut config: Config = serde_path_to_error::deserialize(ignored).map_err(|e| {
            let key = e.path().to_string();
            let message = if SECRET_KEYS.iter().any(|k| key.ends_with(k)) {
                "invalid value (not shown: it is a secret); expected a string".to_string()
            } else {
                scrub_secrets(&e.into_inner().to_string())
            };
            parse_error(format!("{key}: {message}"))
        })?;
        config.source = source.to_path_buf();

        let mut problems: Vec<ConfigProblem> = unknown
            .into_iter()
            .map(|key| ConfigProblem {
                message: "unknown key (a typo? see the documented keys in the README)".to_string(),
                key,
            })
            .collect();
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::new(ConfigErrorKind::Invalid)
                .with_message(render_problems(&file, &problems))
                .with_detail(ConfigErrorDetail::new(&file, problems)))
        }
    }
}

/// `consumers.0.typo` (serde_ignored's form) as `consumers[0].typo`, like every other key.
fn key_path(dotted: &str) -> String {
    let mut out = String::new();
    for part in dotted.split('.') {
        if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// Keys whose values are never quoted in an error.
const SECRET_KEYS: [&str; 2] = ["password", "token"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_do_not_quote_the_line() {
        for text in [
            "[connection]\npassword = \"pw-Unterminated-1\n",
            "[connection]\ntoken = \"tok-Twice-2\"\ntoken = \"tok-Twice-2\"\n",
            "[connection]\nservers = [\"nats://u:pw-In-Url-3@h:4222\" \"x\"]\n",
            "[connection]\nservers = \"tok-No-Scheme-4@h:4222\"\n",
        ] {
            let err = Config::from_toml_with_env(text, Path::new("s.toml"), std::iter::empty())
                .expect_err("a syntax error");
            assert_eq!(err.kind(), ConfigErrorKind::Parse, "{err}");
            assert_eq!(err.file(), Some("s.toml"));
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("pw-") && !shown.contains("tok-"), "{shown}");
            assert!(
                shown.contains("line 2")
                    || shown.contains("line 3")
                    || shown.contains("connection.servers: invalid type"),
                "{shown}"
            );
        }
    }
}
