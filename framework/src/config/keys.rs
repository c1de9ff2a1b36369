//! The keys of `streams.toml`, read from the schema's own `Deserialize` impls: every
//! key path with the kind of value it takes (an enum with its spellings). Loading uses
//! it to refuse a quoted number in the file and to name an enum's valid values; the
//! config reference (`docs/config-reference.md`) is tested against it, so a key added
//! to the schema without a reference entry fails the tests.
//!
//! How: a probing deserializer is handed to `Config::deserialize` once per key path.
//! It walks down the path (a map with that one key, a list with one element, `Some`),
//! and at the end records what the field asked for (`deserialize_struct` names the
//! fields, `deserialize_enum` the variants, `deserialize_i64` an integer, ...), then
//! stops the deserialization with an error that is thrown away.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::schema::Config;

/// The kind of value a key takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueKind {
    /// A whole number.
    Integer,
    /// A number with a fraction.
    Float,
    /// `true` or `false`.
    Boolean,
    /// A string (durations, paths and URLs are strings too).
    String,
    /// One of the listed spellings.
    Enum(&'static [&'static str]),
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueKind::Integer => f.write_str("an integer"),
            ValueKind::Float => f.write_str("a number"),
            ValueKind::Boolean => f.write_str("a boolean"),
            ValueKind::String => f.write_str("a string"),
            ValueKind::Enum(variants) => write!(f, "one of {}", spellings(variants)),
        }
    }
}

/// `"a", "b" or "c"`: an enum's spellings as they are written in `streams.toml`.
pub(crate) fn spellings(variants: &[&str]) -> String {
    let quoted: Vec<String> = variants.iter().map(|v| format!("\"{v}\"")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// One key of the schema: its dotted path without list indices
/// (`consumers.ack_wait`, `connection.tls.ca_file`) and the value it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SchemaKey {
    /// Dotted path, sections included, list indices left out.
    pub(crate) path: String,
    /// What a value of it is (for a list, what each element is).
    pub(crate) kind: ValueKind,
    /// A list of values (`subjects`, `backoff`).
    pub(crate) list: bool,
    /// May be left unset (`Option`): no default value.
    pub(crate) optional: bool,
}

/// Every key of `streams.toml`, in schema order.
pub(crate) fn schema_keys() -> Vec<SchemaKey> {
    let mut keys = Vec::new();
    collect(&mut Vec::new(), &mut keys);
    keys
}

fn collect(prefix: &mut Vec<&'static str>, keys: &mut Vec<SchemaKey>) {
    let shape = probe(prefix);
    match shape.found {
        Some(Found::Struct(fields)) => {
            for field in fields {
                prefix.push(field);
                collect(prefix, keys);
                prefix.pop();
            }
        }
        Some(Found::Value(kind)) => keys.push(SchemaKey {
            path: prefix.join("."),
            kind,
            list: shape.list,
            optional: shape.optional,
        }),
        // A map or a value the probe cannot classify: no such key in this schema.
        None => {}
    }
}

/// What the field at the end of a probed path asked for.
#[derive(Debug, Clone, Copy)]
enum Found {
    Struct(&'static [&'static str]),
    Value(ValueKind),
}

#[derive(Debug, Default)]
struct Shape {
    found: Option<Found>,
    list: bool,
    optional: bool,
}

fn probe(path: &[&'static str]) -> Shape {
    let shape = RefCell::new(Shape::default());
    // The error is the probe stopping once it has seen the field: expected, dropped.
    let _stopped = Config::deserialize(Probe {
        rest: path,
        shape: &shape,
    });
    shape.into_inner()
}

/// The probing deserializer: `rest` is the path still to walk.
#[derive(Clone, Copy)]
struct Probe<'a> {
    rest: &'a [&'static str],
    shape: &'a RefCell<Shape>,
}

type ProbeError = de::value::Error;

impl Probe<'_> {
    /// Records what the field at the end of the path asked for, and stops there.
    fn stop<T>(self, found: Found) -> Result<T, ProbeError> {
        if self.rest.is_empty() {
            self.shape.borrow_mut().found = Some(found);
        }
        Err(de::Error::custom("probed"))
    }

    fn leaf<T>(self, kind: ValueKind) -> Result<T, ProbeError> {
        self.stop(Found::Value(kind))
    }
}

macro_rules! probe_leaves {
    ($($method:ident => $kind:expr),+ $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeError> {
            self.leaf($kind)
        }
    )+};
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = ProbeError;

    probe_leaves! {
        deserialize_any => ValueKind::String,
        deserialize_bool => ValueKind::Boolean,
        deserialize_i8 => ValueKind::Integer,
        deserialize_i16 => ValueKind::Integer,
        deserialize_i32 => ValueKind::Integer,
        deserialize_i64 => ValueKind::Integer,
        deserialize_i128 => ValueKind::Integer,
        deserialize_u8 => ValueKind::Integer,
        deserialize_u16 => ValueKind::Integer,
        deserialize_u32 => ValueKind::Integer,
        deserialize_u64 => ValueKind::Integer,
        deserialize_u128 => ValueKind::Integer,
        deserialize_f32 => ValueKind::Float,
        deserialize_f64 => ValueKind::Float,
        deserialize_char => ValueKind::String,
        deserialize_str => ValueKind::String,
        deserialize_string => ValueKind::String,
        deserialize_bytes => ValueKind::String,
        deserialize_byte_buf => ValueKind::String,
        deserialize_identifier => ValueKind::String,
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        if self.rest.is_empty() {
            self.shape.borrow_mut().optional = true;
        }
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeError> {
        Err(de::Error::custom("probed"))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        if self.rest.is_empty() {
            self.shape.borrow_mut().list = true;
        }
        visitor.visit_seq(OneElement(Some(self)))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeError> {
        Err(de::Error::custom("probed"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        match self.rest.split_first() {
            None => self.stop(Found::Struct(fields)),
            Some((key, rest)) => visitor.visit_map(OneKey {
                key: Some(key),
                value: Probe {
                    rest,
                    shape: self.shape,
                },
            }),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.leaf(ValueKind::Enum(variants))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeError> {
        Err(de::Error::custom("probed"))
    }
}

/// A map holding one key, whose value is probed further.
struct OneKey<'a> {
    key: Option<&'static str>,
    value: Probe<'a>,
}

impl<'de> MapAccess<'de> for OneKey<'_> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        match self.key.take() {
            Some(key) => seed
                .deserialize(de::value::BorrowedStrDeserializer::new(key))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ProbeError> {
        seed.deserialize(self.value)
    }
}

/// A list holding one element, probed further.
struct OneElement<'a>(Option<Probe<'a>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = ProbeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ProbeError> {
        match self.0.take() {
            Some(probe) => seed.deserialize(probe).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_read_from_the_structs() {
        let keys = schema_keys();
        let key = |path: &str| {
            keys.iter()
                .find(|k| k.path == path)
                .unwrap_or_else(|| panic!("{path} not in {keys:#?}"))
                .clone()
        };
        assert_eq!(key("consumers.concurrency").kind, ValueKind::Integer);
        assert!(!key("consumers.concurrency").optional);
        assert_eq!(key("consumers.ack_wait").kind, ValueKind::String);
        let backoff = key("consumers.backoff");
        assert!(backoff.list && backoff.optional, "{backoff:?}");
        assert_eq!(key("connection.tls.required").kind, ValueKind::Boolean);
        assert!(key("connection.tls.ca_file").optional);
        assert!(key("connection.servers").list);
        assert_eq!(
            key("streams.retention").kind,
            ValueKind::Enum(&["limits", "interest", "work_queue", "workqueue"])
        );
        assert!(
            !keys
                .iter()
                .any(|k| k.path.ends_with("source") || k.path.ends_with("sources")),
            "skipped fields are not keys"
        );
        assert!(!keys
            .iter()
            .any(|k| k.path == "connection" || k.path == "streams"));
    }

    #[test]
    fn spellings_read_as_a_list() {
        assert_eq!(spellings(&["a"]), "\"a\"");
        assert_eq!(spellings(&["a", "b", "c"]), "\"a\", \"b\" or \"c\"");
    }

    /// One row of `docs/config-reference.md`.
    #[derive(Debug)]
    struct ReferenceRow {
        path: String,
        kind: String,
        default: String,
    }

    fn reference_rows() -> Vec<ReferenceRow> {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config-reference.md");
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("the config reference {file}: {e}"));
        let mut section = String::new();
        let mut rows = Vec::new();
        for line in text.lines() {
            if let Some(heading) = line.strip_prefix("## ") {
                section = heading
                    .trim_matches(|c| c == '`' || c == '[' || c == ']')
                    .to_string();
                continue;
            }
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | `key` | type | default | meaning |
            if cells.len() < 5 || !cells[1].starts_with('`') {
                continue;
            }
            rows.push(ReferenceRow {
                path: format!("{section}.{}", cells[1].trim_matches('`')),
                kind: cells[2].to_string(),
                default: cells[3].to_string(),
            });
        }
        rows
    }

    /// What a reference row's type says, as the schema spells it.
    fn documented_kind(text: &str) -> (ValueKind, bool) {
        let (list, item) = match text.strip_prefix("list of ") {
            Some(item) => (true, item),
            None => (false, text),
        };
        let kind = match item.trim_end_matches('s') {
            "integer" => ValueKind::Integer,
            "boolean" => ValueKind::Boolean,
            "string" | "duration" | "path" | "URL" => ValueKind::String,
            other if other.starts_with("one of ") => ValueKind::Enum(&[]),
            other => panic!("the reference has a type it does not define: {other:?}"),
        };
        (kind, list)
    }

    /// The smallest valid config, with no key that has a default; `key = value` lands
    /// in the section of `path`.
    fn config_with(path: Option<(&str, &str)>) -> String {
        let mut sections = vec![
            ("connection", "[connection]\n".to_string()),
            ("worker", "[worker]\n".to_string()),
            (
                "streams",
                "[[streams]]\nname = \"EVENTS\"\nsubjects = [\"events.>\"]\n".to_string(),
            ),
            (
                "consumers",
                "[[consumers]]\nname = \"clicks\"\nstream = \"EVENTS\"\nhandler = \"track_click\"\ndead_letter_subject = \"dlq.clicks\"\n".to_string(),
            ),
            ("kv_buckets", "[[kv_buckets]]\nname = \"state\"\n".to_string()),
            (
                "streams",
                "[[streams]]\nname = \"DLQ\"\nsubjects = [\"dlq.>\"]\n".to_string(),
            ),
        ];
        if let Some((path, value)) = path {
            let (section, key) = path.split_once('.').unwrap_or_else(|| panic!("{path}"));
            let text = sections
                .iter_mut()
                .find(|(name, _)| *name == section)
                .map(|(_, text)| text)
                .unwrap_or_else(|| panic!("no section for {path}"));
            text.push_str(&format!("{key} = {value}\n"));
        }
        sections.into_iter().map(|(_, text)| text).collect()
    }

    fn loaded(text: &str) -> String {
        let mut config = Config::from_toml_with_env(
            text,
            std::path::Path::new("reference.toml"),
            std::iter::empty(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
        config.connection.sources = Default::default();
        format!("{config:#?}")
    }

    #[test]
    fn the_config_reference_lists_every_key_as_the_code_has_it() {
        let schema = schema_keys();
        let rows = reference_rows();
        for key in &schema {
            let count = rows.iter().filter(|r| r.path == key.path).count();
            assert_eq!(
                count, 1,
                "docs/config-reference.md needs one row for {} (found {count}): add it to its section's table",
                key.path
            );
        }
        let defaults = loaded(&config_with(None));
        for row in &rows {
            let key = schema
                .iter()
                .find(|k| k.path == row.path)
                .unwrap_or_else(|| panic!("the reference lists {}, which is no key", row.path));
            let (kind, list) = documented_kind(&row.kind);
            assert_eq!(list, key.list, "{}: list or not: {row:?}", row.path);
            match key.kind {
                ValueKind::Enum(variants) => {
                    let mut documented: Vec<&str> =
                        row.kind.split('`').skip(1).step_by(2).collect();
                    let mut variants = variants.to_vec();
                    documented.sort_unstable();
                    variants.sort_unstable();
                    assert_eq!(documented, variants, "{}: the valid values", row.path);
                }
                kind_in_code => assert_eq!(kind, kind_in_code, "{}: the type", row.path),
            }
            if row.default.starts_with("unset") {
                assert!(key.optional, "{} has a default, not unset", row.path);
            } else if row.default == "required" {
                let missing = config_with(None).replace(
                    &format!("\n{} = ", row.path.rsplit('.').next().unwrap_or_default()),
                    "\nremoved_for_the_test = ",
                );
                let err = Config::from_toml_with_env(
                    &missing,
                    std::path::Path::new("reference.toml"),
                    std::iter::empty(),
                )
                .expect_err("a required key is missing");
                let (section, name) = row.path.rsplit_once('.').unwrap_or_default();
                assert!(
                    err.problems()
                        .iter()
                        .any(|p| p.key.starts_with(&format!("{section}["))
                            && p.key.ends_with(&format!("].{name}"))),
                    "{}: documented as required, but leaving it out is no problem: {err}",
                    row.path
                );
            } else {
                let value = row
                    .default
                    .strip_prefix('`')
                    .and_then(|d| d.strip_suffix('`'))
                    .unwrap_or_else(|| {
                        panic!("{}: a default is `value`, unset or required", row.path)
                    });
                assert_eq!(
                    loaded(&config_with(Some((&row.path, value)))),
                    defaults,
                    "{}: the documented default {value} is not the default",
                    row.path
                );
            }
        }
    }
}
