//! Key names in the `analytics` bucket, and how free text (event ids, users) becomes
//! part of a key.
//!
//! # Layout of the bucket
//! | key                                | value                        | written by            |
//! |------------------------------------|------------------------------|-----------------------|
//! | `m.<minute>.<kind>.<shard>`        | counter record (see below)   | every event           |
//! | `m.<minute>.active.<shard>`        | counter record: `n`          | first event of a user in a minute |
//! | `t.<kind>.<shard>`                 | counter record: totals       | every event           |
//! | `u.<user>`                         | counter record: `failed`     | failed logins         |
//! | `flag.<user>`                      | JSON `{user, failed}`        | `failed` reaching the threshold |
//! | `seen.<kind>.<event id>`           | applied marker               | every event, once     |
//! | `active.<minute>.<user>`           | applied marker               | first event of a user in a minute |
//!
//! `<minute>` is unix minutes; `<shard>` is `0..SHARDS`, from a stable hash of the event
//! id (of the user for `active`), so concurrent handlers spread over several keys instead
//! of all retrying compare-and-set on one.
//!
//! # Free text in keys
//! KV keys allow only `[A-Za-z0-9_=./-]`. Event ids, users and products are encoded with
//! [`encode`]: letters, digits, `_`, `-` and `/` are kept, every other byte becomes
//! `=XX` (upper-case hex) — `.` too, since it separates tokens. The encoding is
//! injective (two different names never share a key, which matters: a shared key would
//! make two events count once) and reversible ([`decode`]).

use crate::events::Kind;

/// Shards per counter. Part of the data format: every replica must use the same value,
/// and changing it needs a new bucket (an event's records are chosen by it).
pub const SHARDS: u64 = 16;

/// Encodes free text for use in one or more key tokens; see the module docs.
pub fn encode(text: &str) -> String {
    if text.is_empty() {
        // A lone `=` cannot be the encoding of anything else (escapes are three long).
        return "=".to_string();
    }
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'/' {
            out.push(char::from(b));
        } else {
            out.push('=');
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

/// Reverses [`encode`]; `None` when `key` is not an encoding of UTF-8 text.
pub fn decode(key: &str) -> Option<String> {
    if key == "=" {
        return Some(String::new());
    }
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'=' {
            let hex = key.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'/' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// FNV-1a, 64 bits: a hash that is the same in every process, version and replica
/// (std's `DefaultHasher` promises none of that, and two replicas choosing different
/// shards for one event would count it twice).
pub fn stable_hash(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The shard of `text` (an event id or a user).
pub fn shard(text: &str) -> u64 {
    stable_hash(text) % SHARDS
}

/// Per-minute counter record of one kind: `m.<minute>.<kind>.<shard>`.
pub fn minute_record(minute: u64, kind: Kind, shard: u64) -> String {
    format!("m.{minute}.{kind}.{shard}")
}

/// Per-minute active-user counter record: `m.<minute>.active.<shard>`.
pub fn active_record(minute: u64, shard: u64) -> String {
    format!("m.{minute}.active.{shard}")
}

/// Totals counter record of one kind: `t.<kind>.<shard>`.
pub fn total_record(kind: Kind, shard: u64) -> String {
    format!("t.{kind}.{shard}")
}

/// Prefix of the per-user records.
pub const USER_PREFIX: &str = "u.";

/// Per-user record (failed logins): `u.<user>`.
pub fn user_record(user: &str) -> String {
    format!("{USER_PREFIX}{}", encode(user))
}

/// Prefix of the flag keys.
pub const FLAG_PREFIX: &str = "flag.";

/// The flag of a user who failed to log in too often: `flag.<user>`.
pub fn flag(user: &str) -> String {
    format!("{FLAG_PREFIX}{}", encode(user))
}

/// The marker saying event `id` of `kind` was applied to every counter: `seen.<kind>.<id>`.
pub fn seen_marker(kind: Kind, id: &str) -> String {
    format!("seen.{kind}.{}", encode(id))
}

/// The marker saying `user` was counted active in `minute`: `active.<minute>.<user>`.
pub fn active_marker(minute: u64, user: &str) -> String {
    format!("active.{minute}.{}", encode(user))
}

/// The user named by a key under `prefix` (`u.` or `flag.`), if it is one.
pub fn user_of(key: &str, prefix: &str) -> Option<String> {
    decode(key.strip_prefix(prefix)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What async-nats accepts as a key.
    fn valid_key(key: &str) -> bool {
        !key.is_empty()
            && !key.starts_with('.')
            && !key.ends_with('.')
            && !key.contains("..")
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
    }

    #[test]
    fn keeps_safe_text() {
        assert_eq!(encode("user-42_a/b"), "user-42_a/b");
    }

    #[test]
    fn escapes_everything_else() {
        assert_eq!(encode("ann@example.com"), "ann=40example=2Ecom");
        assert_eq!(encode("a b"), "a=20b");
        assert_eq!(encode("="), "=3D");
        assert_eq!(encode("."), "=2E");
        assert_eq!(encode("é"), "=C3=A9");
        assert_eq!(encode(""), "=");
    }

    #[test]
    fn round_trips_and_is_injective() {
        let samples = [
            "",
            "=",
            "==",
            "=3D",
            "a",
            "a.b",
            "a..b",
            ".",
            "..",
            "a b",
            "a_b",
            "a=20b",
            "ann@example.com",
            "日本",
            "x/y",
            "*",
            ">",
            "a\nb",
            "=2E",
        ];
        let mut seen = std::collections::HashMap::new();
        for s in samples {
            let e = encode(s);
            assert_eq!(decode(&e).as_deref(), Some(s), "{s:?} -> {e:?}");
            assert!(valid_key(&format!("u.{e}")), "{e:?}");
            if let Some(other) = seen.insert(e.clone(), s) {
                panic!("{s:?} and {other:?} both encode to {e:?}");
            }
        }
    }

    #[test]
    fn decode_rejects_what_encode_never_writes() {
        assert_eq!(decode("a.b"), None);
        assert_eq!(decode("=4"), None);
        assert_eq!(decode("=ZZ"), None);
        assert_eq!(decode("=FF"), None, "not UTF-8");
    }

    #[test]
    fn key_names() {
        assert_eq!(minute_record(5, Kind::Click, 3), "m.5.click.3");
        assert_eq!(active_record(5, 1), "m.5.active.1");
        assert_eq!(total_record(Kind::Purchase, 0), "t.purchase.0");
        assert_eq!(user_record("a.b@c"), "u.a=2Eb=40c");
        assert_eq!(flag("bob"), "flag.bob");
        assert_eq!(seen_marker(Kind::Login, "e.1"), "seen.login.e=2E1");
        assert_eq!(active_marker(7, "bob smith"), "active.7.bob=20smith");
        assert_eq!(
            user_of("u.a=2Eb=40c", USER_PREFIX).as_deref(),
            Some("a.b@c")
        );
        assert_eq!(user_of("flag.bob", FLAG_PREFIX).as_deref(), Some("bob"));
        assert_eq!(user_of("t.click.1", USER_PREFIX), None);
        for key in [
            minute_record(u64::MAX, Kind::Login, SHARDS - 1),
            seen_marker(Kind::Click, ".."),
            active_marker(0, ""),
        ] {
            assert!(valid_key(&key), "{key}");
        }
    }

    #[test]
    fn hash_is_stable_and_shards_spread() {
        // FNV-1a reference values: these must never change (they place data).
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
        let mut counts = [0u32; SHARDS as usize];
        for i in 0..16_000 {
            counts[usize::try_from(shard(&format!("e-{i}"))).expect("small")] += 1;
        }
        assert!(counts.iter().all(|c| (700..1300).contains(c)), "{counts:?}");
    }
}
