//! Loading: the selected `nats` context, the file, the context `NATS_CONTEXT` names,
//! the NATS variables (`NATS_URL`, `NATS_CREDS`, ...) and `JETWORKER__...` overrides,
//! parsed with unknown keys collected (serde_ignored) and validated; [`ConfigError`] says
//! why a config cannot be used, [`ConnectionSources`] where each connection setting
//! came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use super::keys::{schema_keys, SchemaKey, ValueKind};
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
    /// The text is not valid TOML (the message says where), or some values do not
    /// parse (wrong type, bad duration, unknown enum value): then
    /// [`ConfigError::problems`] lists them with every other problem of the config. The
    /// parser's own error is not kept as the source: its text can quote the line, secret
    /// and all; the message keeps its position and reason, scrubbed.
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
    /// The problems, when the config was invalid or values did not parse (empty for
    /// read errors and text that is not TOML).
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

        let env: HashMap<String, String> = env.into_iter().collect();
        let context = nats_context(&env).map_err(&parse_error)?;
        // Lowest precedence first: the selected context (a user-wide default), the file,
        // a context chosen with NATS_CONTEXT, the NATS variables, JETWORKER__ variables.
        let mut below_file = Vec::new();
        let mut above_file = Vec::new();
        if let Some(context) = context {
            if context.chosen_by_env {
                above_file.push(context.settings());
            } else {
                below_file.push(context.settings());
            }
        }
        above_file.push(nats_variables(&env));
        above_file.push(jetworker_variables(&env));
        // Values stay the strings they are (a password "0123" or "TRUE" is that password);
        // numbers and booleans are read from them when the key asks for one. Only the
        // server list is split, at commas.
        let sources_of = |layer: &[Setting]| {
            let (lists, values): (Vec<&Setting>, Vec<&Setting>) = layer
                .iter()
                .partition(|s| LIST_KEYS.contains(&s.key.as_str()));
            let map = |settings: Vec<&Setting>| -> HashMap<String, String> {
                settings
                    .into_iter()
                    .map(|s| (s.variable.clone(), s.value.clone()))
                    .collect()
            };
            let environment = || {
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
            };
            let mut list_source = environment().try_parsing(true).list_separator(",");
            for key in LIST_KEYS {
                list_source = list_source.with_list_parse_key(&format!("connection.{key}"));
            }
            [
                environment().try_parsing(false).source(Some(map(values))),
                list_source.source(Some(map(lists))),
            ]
        };
        let mut builder = config::Config::builder();
        for layer in &below_file {
            for source in sources_of(layer) {
                builder = builder.add_source(source);
            }
        }
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        for layer in &above_file {
            for source in sources_of(layer) {
                builder = builder.add_source(source);
            }
        }
        let mut layers = below_file;
        layers.push(file_settings(text));
        layers.extend(above_file);

        let raw = builder
            .build()
            .map_err(|e| parse_error(scrub_secrets(&e.to_string())))?;

        let schema = schema_keys();
        let mut tree = raw.cache;
        // Values that do not parse are reported, taken out and parsing goes on, so one
        // bad value does not hide the others (nor the validation problems).
        let mut unparsed = quoted_values(&mut tree, &schema);
        let (mut config, unknown) = loop {
            let mut unknown = Vec::new();
            let mut record_unknown =
                |path: serde_ignored::Path| unknown.push(key_path(&path.to_string()));
            let ignored = serde_ignored::Deserializer::new(tree.clone(), &mut record_unknown);
            let failed = match serde_path_to_error::deserialize::<_, Config>(ignored) {
                Ok(config) => break (config, unknown),
                Err(failed) => failed,
            };
            let key = failed.path().to_string();
            let Some(value) = take_key(&mut tree, failed.path()) else {
                // Not at a key (the document as a whole): nothing to take out and go on.
                let message = scrub_secrets(&failed.into_inner().to_string());
                return Err(parse_error(format!("{key}: {message}")));
            };
            let message = if SECRET_KEYS.iter().any(|k| key.ends_with(k)) {
                "invalid value (not shown: it is a secret); expected a string".to_string()
            } else {
                match schema_key(&schema, &key) {
                    Some(SchemaKey {
                        kind: kind @ ValueKind::Enum(_),
                        ..
                    }) => match value.kind {
                        config::ValueKind::String(text) => {
                            format!("{text:?} is not a valid value: expected {kind}")
                        }
                        _ => format!("expected {kind}"),
                    },
                    _ => {
                        let message = failed.into_inner().to_string();
                        // The config crate names the key again, mangled
                        // (`consumers[0]ack_wait`): the problem names it already.
                        let message = message
                            .split_once(" for key `")
                            .map_or(message.as_str(), |(reason, _)| reason);
                        scrub_secrets(message)
                    }
                }
            };
            unparsed.push(ConfigProblem { key, message });
        };
        config.source = source.to_path_buf();
        config.connection.sources = settle_sources(&mut config.connection, &layers);

        let mut problems = unparsed.clone();
        problems.extend(unknown.into_iter().map(|key| ConfigProblem {
            message: format!("unknown key (a typo?{}); every key is listed in the config reference, {REFERENCE}",
                closest_key(&schema, &key).map(|k| format!(" did you mean {k}")).unwrap_or_default()),
            key,
        }));
        // A key taken out for not parsing is at its default now: what validation says
        // of that default is not news.
        problems.extend(
            config
                .problems()
                .into_iter()
                .filter(|p| !unparsed.iter().any(|u| u.key == p.key)),
        );
        if !unparsed.is_empty() {
            return Err(ConfigError::new(ConfigErrorKind::Parse)
                .with_message(render_problems(&file, &problems))
                .with_detail(ConfigErrorDetail::new(&file, problems)));
        }
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

/// Where every key of `streams.toml` is listed, with its default and meaning.
pub(crate) const REFERENCE: &str = "docs/config-reference.md in the jetworker repository";

/// The schema key of a key path as problems name it (`consumers[0].ack_wait`).
fn schema_key<'a>(schema: &'a [SchemaKey], key: &str) -> Option<&'a SchemaKey> {
    let path = strip_indices(key);
    schema.iter().find(|k| k.path == path)
}

/// `consumers[0].tls.ca_file` as `consumers.tls.ca_file`.
fn strip_indices(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => in_index = true,
            ']' => in_index = false,
            c if !in_index => out.push(c),
            _ => {}
        }
    }
    out
}

/// The schema key an unknown key was most likely meant to be: same section, at most
/// two edits away from its last part (`max_delivers` -> `max_deliver`).
fn closest_key(schema: &[SchemaKey], unknown: &str) -> Option<String> {
    let path = strip_indices(unknown);
    let (section, name) = path.rsplit_once('.').unwrap_or(("", path.as_str()));
    schema
        .iter()
        .filter_map(|k| {
            let (k_section, k_name) = k.path.rsplit_once('.').unwrap_or(("", k.path.as_str()));
            (k_section == section).then(|| (edit_distance(name, k_name), k_name))
        })
        .filter(|(distance, _)| *distance <= 2)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, name)| name.to_string())
}

/// Levenshtein distance between two short keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Takes out, and reports, every value the file quotes where its key wants a number
/// or a boolean (`concurrency = "64"`). Environment variables are text by nature and
/// are read as the key wants; the file says what it means.
fn quoted_values(tree: &mut config::Value, schema: &[SchemaKey]) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    quoted_values_under(tree, "", schema, &mut problems);
    problems
}

fn quoted_values_under(
    value: &mut config::Value,
    key: &str,
    schema: &[SchemaKey],
    problems: &mut Vec<ConfigProblem>,
) {
    match &mut value.kind {
        config::ValueKind::Table(table) => {
            let mut quoted = Vec::new();
            for (name, child) in table.iter_mut() {
                let child_key = if key.is_empty() {
                    name.clone()
                } else {
                    format!("{key}.{name}")
                };
                let wanted = schema_key(schema, &child_key).map(|k| k.kind);
                match (&child.kind, wanted) {
                    (
                        config::ValueKind::String(text),
                        Some(kind @ (ValueKind::Integer | ValueKind::Float | ValueKind::Boolean)),
                    ) if child.origin().is_none() => {
                        problems.push(ConfigProblem {
                            message: format!(
                                "expected {kind}, found the string {text:?}: write it without quotes ({name} = {text})"
                            ),
                            key: child_key,
                        });
                        quoted.push(name.clone());
                    }
                    _ => quoted_values_under(child, &child_key, schema, problems),
                }
            }
            for name in quoted {
                table.remove(&name);
            }
        }
        config::ValueKind::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                quoted_values_under(item, &format!("{key}[{i}]"), schema, problems);
            }
        }
        _ => {}
    }
}

/// Takes the key an error path leads to (the nearest key at or above it: a list whose
/// element is bad goes as a whole) out of the tree; `None` when the path names no key.
fn take_key(tree: &mut config::Value, path: &serde_path_to_error::Path) -> Option<config::Value> {
    let segments: Vec<&serde_path_to_error::Segment> = path.iter().collect();
    let last_key = segments
        .iter()
        .rposition(|s| matches!(s, serde_path_to_error::Segment::Map { .. }))?;
    let mut node = tree;
    for segment in &segments[..last_key] {
        node = match (segment, &mut node.kind) {
            (serde_path_to_error::Segment::Map { key }, config::ValueKind::Table(table)) => {
                table.get_mut(key)?
            }
            (serde_path_to_error::Segment::Seq { index }, config::ValueKind::Array(items)) => {
                items.get_mut(*index)?
            }
            _ => return None,
        };
    }
    match (segments[last_key], &mut node.kind) {
        (serde_path_to_error::Segment::Map { key }, config::ValueKind::Table(table)) => {
            table.remove(key)
        }
        _ => None,
    }
}

/// Keys whose values are never quoted in an error.
const SECRET_KEYS: [&str; 2] = ["password", "token"];

/// Where a connection setting came from. Never holds the setting's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// The config file.
    File,
    /// An environment variable, by name (`NATS_URL`, `JETWORKER__CONNECTION__PASSWORD`).
    Env(String),
    /// A `nats` CLI context (ADR-21), by name and file.
    Context {
        /// The context's name.
        name: String,
        /// Its file (`~/.config/nats/context/NAME.json`).
        path: PathBuf,
    },
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File => f.write_str("file"),
            ConfigSource::Env(name) => write!(f, "env {name}"),
            ConfigSource::Context { name, path } => {
                write!(f, "context {name} ({})", path.display())
            }
        }
    }
}

/// Per connection setting (`servers`, `user`, `tls.ca_file`, `jetstream_domain`, ...),
/// the source that set it. Settings left at their default are absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionSources(BTreeMap<String, ConfigSource>);

impl ConnectionSources {
    /// The source of one setting, by its key under `connection.` (`"tls.ca_file"`).
    pub fn get(&self, key: &str) -> Option<&ConfigSource> {
        self.0.get(key)
    }

    /// Every setting that was set, by key, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ConfigSource)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// One connection setting of one source: its key under `connection.`, the
/// `JETWORKER__...` variable it is fed to the `config` crate as, its value.
#[derive(Debug, Clone)]
struct Setting {
    key: String,
    variable: String,
    value: String,
    source: ConfigSource,
}

impl Setting {
    fn new(key: &str, value: &str, source: ConfigSource) -> Setting {
        Setting {
            key: key.to_string(),
            variable: format!(
                "{ENV_PREFIX}__CONNECTION__{}",
                key.replace('.', "__").to_ascii_uppercase()
            ),
            value: value.to_string(),
            source,
        }
    }
}

/// Connection keys whose override is a comma-separated list.
const LIST_KEYS: [&str; 1] = ["servers"];

/// The NATS ecosystem's variables, as the `nats` CLI reads them.
const NATS_VARIABLES: [(&str, &str); 5] = [
    ("NATS_URL", "servers"),
    ("NATS_USER", "user"),
    ("NATS_PASSWORD", "password"),
    ("NATS_CREDS", "creds_file"),
    ("NATS_NKEY", "nkey_seed_file"),
];

fn nats_variables(env: &HashMap<String, String>) -> Vec<Setting> {
    NATS_VARIABLES
        .iter()
        .filter_map(|(variable, key)| {
            let value = env.get(*variable).filter(|v| !v.trim().is_empty())?;
            Some(Setting::new(
                key,
                value,
                ConfigSource::Env(variable.to_string()),
            ))
        })
        .collect()
}

/// Every `JETWORKER__` override (any section), connection settings with their key.
fn jetworker_variables(env: &HashMap<String, String>) -> Vec<Setting> {
    let connection = format!("{ENV_PREFIX}__CONNECTION__");
    env.iter()
        .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
        .map(|(variable, value)| Setting {
            key: variable
                .strip_prefix(&connection)
                .map(|k| k.to_ascii_lowercase().replace("__", "."))
                .unwrap_or_default(),
            variable: variable.clone(),
            value: value.clone(),
            source: ConfigSource::Env(variable.clone()),
        })
        .collect()
}

/// The connection settings the file sets (values not kept: only the keys matter).
fn file_settings(text: &str) -> Vec<Setting> {
    let Ok(file) = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
    else {
        return Vec::new();
    };
    let Ok(connection) = file.get_table("connection") else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for (key, value) in connection {
        match value.into_table() {
            Ok(table) if key == "tls" => {
                keys.extend(table.into_keys().map(|k| format!("tls.{k}")));
            }
            _ => keys.push(key),
        }
    }
    keys.into_iter()
        .map(|key| Setting::new(&key, "", ConfigSource::File))
        .collect()
}

/// The auth mode a credential key belongs to.
fn auth_mode(key: &str) -> Option<u8> {
    match key {
        "user" | "password" => Some(0),
        "token" => Some(1),
        "nkey_seed_file" => Some(2),
        "creds_file" => Some(3),
        _ => None,
    }
}

/// Records the source of each connection setting (the highest layer that set it) and
/// keeps the credentials of one source: the highest layer that sets credentials
/// chooses the auth mode, and credentials of another mode from lower layers are
/// dropped (`NATS_CREDS` in the environment replaces a user and password in the file).
/// Credentials of one mode combine across layers (a user in the file, its password in
/// the environment).
fn settle_sources(
    connection: &mut super::schema::ConnectionConfig,
    layers: &[Vec<Setting>],
) -> ConnectionSources {
    let mut origin: BTreeMap<String, (usize, ConfigSource)> = BTreeMap::new();
    for (rank, layer) in layers.iter().enumerate() {
        for setting in layer.iter().filter(|s| !s.key.is_empty()) {
            origin.insert(setting.key.clone(), (rank, setting.source.clone()));
        }
    }
    let top = origin
        .iter()
        .filter(|(key, _)| auth_mode(key).is_some())
        .map(|(_, (rank, _))| *rank)
        .max();
    if let Some(top) = top {
        let winners: Vec<u8> = origin
            .iter()
            .filter(|(key, (rank, _))| *rank == top && auth_mode(key).is_some())
            .filter_map(|(key, _)| auth_mode(key))
            .collect();
        // One mode at the top; several there is a conflict that validation reports.
        if winners.windows(2).all(|w| w[0] == w[1]) {
            let mode = winners.first().copied();
            let dropped: Vec<String> = origin
                .iter()
                .filter(|(key, (rank, _))| {
                    *rank < top && auth_mode(key).is_some_and(|m| Some(m) != mode)
                })
                .map(|(key, _)| key.clone())
                .collect();
            for key in dropped {
                origin.remove(&key);
                match key.as_str() {
                    "user" => connection.user = None,
                    "password" => connection.password = None,
                    "token" => connection.token = None,
                    "nkey_seed_file" => connection.nkey_seed_file = None,
                    _ => connection.creds_file = None,
                }
            }
        }
    }
    ConnectionSources(origin.into_iter().map(|(k, (_, s))| (k, s)).collect())
}

/// A `nats` CLI context (ADR-21): `~/.config/nats/context/NAME.json`. Every field is
/// optional; the CLI writes empty strings for unset ones.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct ContextFile {
    url: String,
    user: String,
    password: String,
    token: String,
    creds: String,
    nkey: String,
    cert: String,
    key: String,
    ca: String,
    jetstream_domain: String,
    jetstream_api_prefix: String,
    inbox_prefix: String,
}

/// The context in use: its settings, and whether `NATS_CONTEXT` chose it (over the
/// file) or `context.txt` did (under the file).
struct NatsContext {
    file: ContextFile,
    source: ConfigSource,
    chosen_by_env: bool,
}

impl NatsContext {
    fn settings(&self) -> Vec<Setting> {
        let f = &self.file;
        [
            ("servers", &f.url),
            ("user", &f.user),
            ("password", &f.password),
            ("token", &f.token),
            ("creds_file", &f.creds),
            ("nkey_seed_file", &f.nkey),
            ("tls.cert_file", &f.cert),
            ("tls.key_file", &f.key),
            ("tls.ca_file", &f.ca),
            ("jetstream_domain", &f.jetstream_domain),
            ("jetstream_api_prefix", &f.jetstream_api_prefix),
            ("inbox_prefix", &f.inbox_prefix),
        ]
        .into_iter()
        .filter(|(_, value)| !value.trim().is_empty())
        .map(|(key, value)| Setting::new(key, value.trim(), self.source.clone()))
        .collect()
    }
}

/// `$XDG_CONFIG_HOME/nats`, else `$HOME/.config/nats`, from the given environment.
fn nats_config_dir(env: &HashMap<String, String>) -> Option<PathBuf> {
    let non_empty = |k: &str| {
        env.get(k)
            .filter(|v| !v.trim().is_empty())
            .map(PathBuf::from)
    };
    non_empty("XDG_CONFIG_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| non_empty("HOME").map(|home| home.join(".config")))
        .map(|dir| dir.join("nats"))
}

/// The context `NATS_CONTEXT` names, else the one `context.txt` selects, as the `nats`
/// CLI chooses; `None` when neither names one. A named context that cannot be read is
/// an error (its text never quoted: it holds secrets).
fn nats_context(env: &HashMap<String, String>) -> Result<Option<NatsContext>, String> {
    let dir = nats_config_dir(env);
    let (name, chosen_by_env) = match env.get("NATS_CONTEXT").map(|n| n.trim()) {
        Some(name) if !name.is_empty() => (name.to_string(), true),
        _ => {
            let Some(selected) = dir
                .as_ref()
                .and_then(|d| std::fs::read_to_string(d.join("context.txt")).ok())
            else {
                return Ok(None);
            };
            let name = selected.trim().to_string();
            if name.is_empty() {
                return Ok(None);
            }
            (name, false)
        }
    };
    let chooser = if chosen_by_env {
        "NATS_CONTEXT"
    } else {
        "the selected nats context (context.txt)"
    };
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(format!("{chooser}: {name:?} is not a context name"));
    }
    let Some(dir) = dir else {
        return Err(format!(
            "{chooser} names context {name:?}, but neither XDG_CONFIG_HOME nor HOME is set to find it"
        ));
    };
    let path = dir.join("context").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{chooser} names context {name:?}: cannot read {}: {}",
            path.display(),
            std::io::Error::from(e.kind())
        )
    })?;
    let file: ContextFile = serde_json::from_str(&text).map_err(|e| {
        // Only the position: serde_json's message can quote a value.
        format!(
            "{chooser} names context {name:?}: {} is not a context file (JSON, line {} column {})",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    Ok(Some(NatsContext {
        file,
        source: ConfigSource::Context { name, path },
        chosen_by_env,
    }))
}

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
