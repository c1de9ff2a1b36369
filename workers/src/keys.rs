//! Key names in the `analytics` bucket, and how free text (users) becomes
//! part of a key.
//!
//! # Layout of the bucket
//! | key                                | value                        | written by            |
//! |------------------------------------|------------------------------|-----------------------|
//! | `p.<kind>.<shard>`                 | partition ledger: counters per minute and in total, products, failed logins per user, the ids counted (see [`crate::counters`]) | every batch, once per partition |
//! | `m.<minute>.active.<shard>`        | set of the users active in the minute | batches with that minute's events |
//! | `flag.<user>`                      | JSON `{user, failed}`        | `failed` reaching the threshold |
//!
//! `<minute>` is unix minutes; `<shard>` is `0..SHARDS`, from a stable hash of the
//! event's **user**: every copy of an event (same user) meets the same ledger, a user's
//! failed logins are in one ledger, and a minute's active users split into disjoint
//! sets. Concurrent batches spread over `SHARDS` keys per kind instead of all retrying
//! compare-and-set on one.
//!
//! # Free text in keys
//! KV keys allow only `[A-Za-z0-9_=./-]`. Users are encoded with [`encode`]: letters,
//! digits, `_`, `-` and `/` are kept, every other byte becomes `=XX` (upper-case hex) —
//! `.` too, since it separates tokens. The encoding is injective (two different users
//! never share a flag) and reversible ([`decode`]). Event ids and products are never
//! part of a key: they are JSON strings inside the ledgers.

use crate::events::Kind;

/// Shards per counter. Part of the data format: every replica must use the same value,
/// and changing it needs a new bucket (an event's ledger is chosen by it).
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

/// The shard of `text` (a user).
pub fn shard(text: &str) -> u64 {
    stable_hash(text) % SHARDS
}

/// The ledger of one partition (a kind, a shard of the users): `p.<kind>.<shard>`.
pub fn ledger(kind: Kind, shard: u64) -> String {
    format!("p.{kind}.{shard}")
}

/// Per-minute active-user set: `m.<minute>.active.<shard>`.
pub fn active_record(minute: u64, shard: u64) -> String {
    format!("m.{minute}.active.{shard}")
}

/// Prefix of the flag keys.
pub const FLAG_PREFIX: &str = "flag.";

/// The flag of a user who failed to log in too often: `flag.<user>`.
pub fn flag(user: &str) -> String {
    format!("{FLAG_PREFIX}{}", encode(user))
}

/// The user named by a key under `prefix` (`flag.`), if it is one.
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
            assert!(valid_key(&format!("flag.{e}")), "{e:?}");
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
        assert_eq!(ledger(Kind::Click, 3), "p.click.3");
        assert_eq!(active_record(5, 1), "m.5.active.1");
        assert_eq!(flag("a.b@c"), "flag.a=2Eb=40c");
        assert_eq!(
            user_of("flag.a=2Eb=40c", FLAG_PREFIX).as_deref(),
            Some("a.b@c")
        );
        assert_eq!(user_of("p.click.1", FLAG_PREFIX), None);
        for key in [
            ledger(Kind::Login, SHARDS - 1),
            active_record(u64::MAX, SHARDS - 1),
            flag(".."),
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
