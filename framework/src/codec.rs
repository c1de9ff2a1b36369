//! Payload encoding: MessagePack (rmp-serde, the default) or JSON.
//!
//! Decoding is defensive: the payload comes from the network. MessagePack nesting is
//! limited to [`MAX_MSGPACK_DEPTH`] so a hostile payload cannot exhaust the stack: the
//! bytes are scanned without recursion before serde sees them, because rmp-serde's own
//! depth counter does not cover every path (enum variants, which recursive handler types
//! such as expression trees are made of, are not counted). JSON nesting is limited by
//! serde_json (128 levels, every path). Length prefixes are never trusted for
//! allocation: a value longer than the bytes left is an error before anything is read.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;

pub use crate::config::CodecKind;

/// The deepest MessagePack nesting accepted.
pub const MAX_MSGPACK_DEPTH: usize = 64;

/// Why a payload could not be decoded into the handler's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// MessagePack nested deeper than [`MAX_MSGPACK_DEPTH`] (JSON's own limit reports
    /// as [`DecodeErrorKind::Malformed`]).
    TooDeep,
    /// Not a value of the handler's type in this codec: malformed, truncated, a missing
    /// field, a wrong type.
    Malformed,
}

impl fmt::Display for DecodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeErrorKind::TooDeep => "depth limit exceeded",
            DecodeErrorKind::Malformed => "malformed payload",
        })
    }
}

/// A payload that could not be decoded into the handler's type. The message names the
/// codec; the codec library's error is the source.
pub type DecodeError = Error<DecodeErrorKind>;

impl DecodeError {
    /// The codec that was used (`None` for a scan without one, see [`check_msgpack_depth`]).
    pub fn codec(&self) -> Option<CodecKind> {
        self.detail::<DecodeDetail>().map(|d| d.codec)
    }

    /// The other codec, when the payload is a whole value in it: a JSON payload sent to
    /// a MessagePack consumer (the default codec), or the reverse. The message then says
    /// so and names the `codec` setting to use.
    pub fn payload_looks_like(&self) -> Option<CodecKind> {
        self.detail::<DecodeDetail>().and_then(|d| d.looks_like)
    }
}

/// What a decode error knows beyond its kind.
#[derive(Debug, Clone, Copy)]
struct DecodeDetail {
    codec: CodecKind,
    looks_like: Option<CodecKind>,
}

/// The codec other than `codec` that `bytes` are a whole document of, if any. Cheap
/// enough for the failure path only: it parses the payload once more.
fn other_codec_fitting(codec: CodecKind, bytes: &[u8]) -> Option<CodecKind> {
    match codec {
        // A JSON object or array; a MessagePack reader sees `{` and `[` as small integers.
        CodecKind::Msgpack => {
            let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
            (matches!(first, b'{' | b'[')
                && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok())
            .then_some(CodecKind::Json)
        }
        // A MessagePack map or array: its first byte is never the start of JSON text.
        CodecKind::Json => {
            let first = *bytes.first()?;
            let container = matches!(first, 0x80..=0x9f | 0xdc..=0xdf);
            (container
                && check_msgpack_depth(bytes, MAX_MSGPACK_DEPTH).is_ok()
                && rmp_serde::from_slice::<serde::de::IgnoredAny>(bytes).is_ok())
            .then_some(CodecKind::Msgpack)
        }
    }
}

/// Why a value could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeErrorKind {
    /// The codec cannot represent the value (a JSON map key that is not a string, a
    /// `Serialize` impl that fails, ...).
    Unsupported,
}

impl fmt::Display for EncodeErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodeErrorKind::Unsupported => "the codec cannot represent the value",
        })
    }
}

/// A value that could not be encoded. The message names the codec; the codec library's
/// error is the source.
pub type EncodeError = Error<EncodeErrorKind>;

impl EncodeError {
    /// The codec that was used.
    pub fn codec(&self) -> Option<CodecKind> {
        self.detail::<CodecKind>().copied()
    }
}

/// Decodes `bytes` with `codec`.
pub fn decode<T: DeserializeOwned>(codec: CodecKind, bytes: &[u8]) -> Result<T, DecodeError> {
    let fail = |kind, source: Box<dyn std::error::Error + Send + Sync>| {
        let looks_like = other_codec_fitting(codec, bytes);
        let message = match looks_like {
            Some(other) => format!(
                "cannot decode {codec} payload (the payload looks like {}: if the consumer's messages are {other}, set codec = \"{other}\" on it in streams.toml)",
                match other {
                    CodecKind::Json => "JSON",
                    CodecKind::Msgpack => "MessagePack",
                }
            ),
            None => format!("cannot decode {codec} payload"),
        };
        DecodeError::with_source(kind, source)
            .with_message(message)
            .with_detail(DecodeDetail { codec, looks_like })
    };
    match codec {
        CodecKind::Msgpack => {
            check_msgpack_depth(bytes, MAX_MSGPACK_DEPTH)
                .map_err(|e| fail(DecodeErrorKind::TooDeep, e.into()))?;
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            // The same limit as the scan (rmp-serde counts down to zero exclusive).
            de.set_max_depth(MAX_MSGPACK_DEPTH + 1);
            T::deserialize(&mut de).map_err(|e| {
                let kind = match e {
                    rmp_serde::decode::Error::DepthLimitExceeded => DecodeErrorKind::TooDeep,
                    _ => DecodeErrorKind::Malformed,
                };
                fail(kind, e.into())
            })
        }
        CodecKind::Json => {
            serde_json::from_slice(bytes).map_err(|e| fail(DecodeErrorKind::Malformed, e.into()))
        }
    }
}

/// Scans the first MessagePack value in `bytes`, without recursion, and fails when
/// arrays, maps and extension values nest deeper than `max_depth`. Malformed or
/// truncated input passes: the deserializer that follows reports it with its position.
pub fn check_msgpack_depth(bytes: &[u8], max_depth: usize) -> Result<(), DecodeError> {
    // Values still to read at each open level; the bottom entry is the top-level value.
    // Runs for every message: the usual few levels live on the stack, no allocation.
    let mut open: Levels = Levels::default();
    open.push(1);
    let mut pos = 0usize;
    let be = |at: usize, len: usize| -> Option<u64> {
        let slice = bytes.get(at..at.checked_add(len)?)?;
        Some(slice.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
    };
    while let Some(left) = open.last_mut() {
        if *left == 0 {
            open.pop();
            continue;
        }
        *left -= 1;
        let Some(&marker) = bytes.get(pos) else {
            return Ok(());
        };
        pos += 1;
        // (bytes to skip, values nested inside) for this marker.
        let (skip, nested): (u64, Option<u64>) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, None),
            0x80..=0x8f => (0, Some(2 * u64::from(marker & 0x0f))),
            0x90..=0x9f => (0, Some(u64::from(marker & 0x0f))),
            0xa0..=0xbf => (u64::from(marker & 0x1f), None),
            0xc1 => return Ok(()),
            0xc4 | 0xd9 => (be(pos, 1).unwrap_or(u64::MAX).saturating_add(1), None),
            0xc5 | 0xda => (be(pos, 2).unwrap_or(u64::MAX).saturating_add(2), None),
            0xc6 | 0xdb => (be(pos, 4).unwrap_or(u64::MAX).saturating_add(4), None),
            // Extensions: length, type byte, data. Counted as a level, as rmp-serde does.
            0xc7 => (be(pos, 1).unwrap_or(u64::MAX).saturating_add(2), Some(0)),
            0xc8 => (be(pos, 2).unwrap_or(u64::MAX).saturating_add(3), Some(0)),
            0xc9 => (be(pos, 4).unwrap_or(u64::MAX).saturating_add(5), Some(0)),
            0xd4 => (2, Some(0)),
            0xd5 => (3, Some(0)),
            0xd6 => (5, Some(0)),
            0xd7 => (9, Some(0)),
            0xd8 => (17, Some(0)),
            0xca => (4, None),
            0xcb => (8, None),
            0xcc | 0xd0 => (1, None),
            0xcd | 0xd1 => (2, None),
            0xce | 0xd2 => (4, None),
            0xcf | 0xd3 => (8, None),
            0xdc => (2, be(pos, 2)),
            0xdd => (4, be(pos, 4)),
            0xde => (2, be(pos, 2).map(|n| 2 * n)),
            0xdf => (4, be(pos, 4).map(|n| 2 * n)),
        };
        pos = match usize::try_from(skip).ok().and_then(|s| pos.checked_add(s)) {
            Some(next) if next <= bytes.len() => next,
            _ => return Ok(()),
        };
        if let Some(values) = nested {
            // `open` holds the top-level entry plus one per container entered.
            if open.len() > max_depth {
                return Err(
                    DecodeError::new(DecodeErrorKind::TooDeep).with_message(format!(
                        "depth limit exceeded: MessagePack nested deeper than {max_depth} levels"
                    )),
                );
            }
            open.push(values);
        }
    }
    Ok(())
}

/// The open levels of [`check_msgpack_depth`]: the first 16 inline, deeper ones in a
/// `Vec` (only a deeply nested payload allocates).
#[derive(Default)]
struct Levels {
    inline: [u64; 16],
    len: usize,
    spilled: Vec<u64>,
}

impl Levels {
    fn len(&self) -> usize {
        self.len + self.spilled.len()
    }

    fn push(&mut self, values: u64) {
        match self.inline.get_mut(self.len) {
            Some(slot) if self.spilled.is_empty() => {
                *slot = values;
                self.len += 1;
            }
            _ => self.spilled.push(values),
        }
    }

    fn pop(&mut self) {
        if self.spilled.pop().is_none() {
            self.len = self.len.saturating_sub(1);
        }
    }

    fn last_mut(&mut self) -> Option<&mut u64> {
        match self.spilled.last_mut() {
            Some(last) => Some(last),
            None => self.len.checked_sub(1).map(|at| &mut self.inline[at]),
        }
    }
}

/// Encodes `value` with `codec`. MessagePack encodes structs as maps (field names
/// included), so fields can be added without breaking older readers.
pub fn encode<T: Serialize + ?Sized>(codec: CodecKind, value: &T) -> Result<Vec<u8>, EncodeError> {
    let fail = |source: Box<dyn std::error::Error + Send + Sync>| {
        EncodeError::with_source(EncodeErrorKind::Unsupported, source)
            .with_message(format!("cannot encode {codec} payload"))
            .with_detail(codec)
    };
    match codec {
        CodecKind::Msgpack => rmp_serde::to_vec_named(value).map_err(|e| fail(e.into())),
        CodecKind::Json => serde_json::to_vec(value).map_err(|e| fail(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Click {
        id: String,
        page: String,
    }

    #[test]
    fn round_trips() {
        let click = Click {
            id: "e1".into(),
            page: "/".into(),
        };
        for codec in [CodecKind::Msgpack, CodecKind::Json] {
            let bytes = encode(codec, &click).expect("encode");
            assert_eq!(decode::<Click>(codec, &bytes).expect("decode"), click);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for codec in [CodecKind::Msgpack, CodecKind::Json] {
            assert!(decode::<Click>(codec, b"\xc1\xff not it").is_err());
            assert!(decode::<Click>(codec, b"").is_err());
        }
        // Truncated MessagePack.
        let bytes = encode(
            CodecKind::Msgpack,
            &Click {
                id: "e".into(),
                page: "p".into(),
            },
        )
        .expect("encode");
        assert!(decode::<Click>(CodecKind::Msgpack, &bytes[..bytes.len() - 2]).is_err());
        // Invalid UTF-8 in JSON.
        assert!(decode::<Click>(CodecKind::Json, b"{\"id\":\"\xff\",\"page\":\"x\"}").is_err());
    }

    #[test]
    fn a_payload_of_the_other_codec_is_named_with_the_setting_to_use() {
        let click = Click {
            id: "e1".into(),
            page: "/".into(),
        };
        let json = encode(CodecKind::Json, &click).expect("encode");
        let err = decode::<Click>(CodecKind::Msgpack, &json).expect_err("JSON is not MessagePack");
        assert_eq!(err.kind(), DecodeErrorKind::Malformed);
        assert_eq!(err.codec(), Some(CodecKind::Msgpack));
        assert_eq!(err.payload_looks_like(), Some(CodecKind::Json));
        let shown = err.to_string();
        assert!(
            shown.contains("looks like JSON") && shown.contains("codec = \"json\""),
            "{shown}"
        );

        let msgpack = encode(CodecKind::Msgpack, &click).expect("encode");
        let err = decode::<Click>(CodecKind::Json, &msgpack).expect_err("MessagePack is not JSON");
        assert_eq!(err.payload_looks_like(), Some(CodecKind::Msgpack));
        assert!(err.to_string().contains("codec = \"msgpack\""), "{err}");

        // Neither codec's document, or the right codec with the wrong fields: no hint.
        for (codec, bytes) in [
            (CodecKind::Msgpack, &b"{\"id\": 1, oops"[..]),
            (CodecKind::Json, &b"\x81\xa2id"[..]),
            (CodecKind::Json, &b"{\"other\": 1}"[..]),
            (CodecKind::Msgpack, &b"\x81\xa5other\x01"[..]),
        ] {
            let err = decode::<Click>(codec, bytes).expect_err("not a click");
            assert_eq!(err.payload_looks_like(), None, "{codec} {bytes:?}: {err}");
            assert!(!err.to_string().contains("looks like"), "{err}");
        }
    }

    /// A recursive handler type: rmp-serde does not count enum variants as depth.
    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    enum Expr {
        Lit(i64),
        Neg(Box<Expr>),
    }

    fn nested_msgpack(levels: usize) -> Vec<u8> {
        // {"Neg": {"Neg": ... {"Lit": 1}}}: fixmap(1), fixstr "Neg".
        let mut bytes = Vec::with_capacity(levels * 5 + 6);
        for _ in 0..levels {
            bytes.extend_from_slice(&[0x81, 0xa3, b'N', b'e', b'g']);
        }
        bytes.extend_from_slice(&[0x81, 0xa3, b'L', b'i', b't', 0x01]);
        bytes
    }

    #[test]
    fn recursive_enums_are_depth_limited_too() {
        let shallow = nested_msgpack(10);
        let expr = decode::<Expr>(CodecKind::Msgpack, &shallow).expect("10 levels decode");
        assert!(matches!(expr, Expr::Neg(_)));
        // 200k levels would overflow any thread's stack without the scan.
        let deep = nested_msgpack(200_000);
        let err = decode::<Expr>(CodecKind::Msgpack, &deep).expect_err("too deep");
        assert_eq!(err.kind(), DecodeErrorKind::TooDeep, "{err}");
        // The same shape in JSON is stopped by serde_json's limit.
        let json = format!(
            "{}{{\"Lit\":1}}{}",
            "{\"Neg\":".repeat(200_000),
            "}".repeat(200_000)
        );
        assert!(decode::<Expr>(CodecKind::Json, json.as_bytes()).is_err());
    }

    #[test]
    fn the_depth_limit_is_exact() {
        let nested = |levels: usize| {
            let mut bytes = vec![0x91u8; levels];
            bytes.push(0x00);
            bytes
        };
        assert!(
            decode::<serde_json::Value>(CodecKind::Msgpack, &nested(MAX_MSGPACK_DEPTH)).is_ok()
        );
        assert!(
            decode::<serde_json::Value>(CodecKind::Msgpack, &nested(MAX_MSGPACK_DEPTH + 1))
                .is_err()
        );
        assert!(check_msgpack_depth(&nested(MAX_MSGPACK_DEPTH), MAX_MSGPACK_DEPTH).is_ok());
        assert!(check_msgpack_depth(&nested(MAX_MSGPACK_DEPTH + 1), MAX_MSGPACK_DEPTH).is_err());
        // Maps count as levels, scalars and strings do not.
        let mut maps = vec![0x81u8, 0xa1, b'k'];
        for _ in 1..=MAX_MSGPACK_DEPTH {
            maps.extend_from_slice(&[0x81, 0xa1, b'k']);
        }
        maps.push(0xc0);
        assert!(check_msgpack_depth(&maps, MAX_MSGPACK_DEPTH).is_err());
        assert!(check_msgpack_depth(&maps[3..], MAX_MSGPACK_DEPTH).is_ok());
    }

    #[test]
    fn hostile_length_prefixes_are_errors_not_allocations() {
        // array32 / map32 / str32 / bin32 claiming 4 GiB with nothing behind them.
        for marker in [0xdd_u8, 0xdf, 0xdb, 0xc6, 0xc9] {
            let bytes = [marker, 0xff, 0xff, 0xff, 0xff, 0x00];
            assert!(decode::<serde_json::Value>(CodecKind::Msgpack, &bytes).is_err());
            assert!(decode::<Vec<u64>>(CodecKind::Msgpack, &bytes).is_err());
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        // 100k nested one-element arrays: 0x91 is fixarray(1).
        let mut bytes = vec![0x91u8; 100_000];
        bytes.push(0x00);
        let err = decode::<serde_json::Value>(CodecKind::Msgpack, &bytes).expect_err("too deep");
        assert_eq!(err.kind(), DecodeErrorKind::TooDeep, "{err}");
    }
}
