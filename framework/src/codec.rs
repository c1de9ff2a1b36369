//! Payload encoding: MessagePack (rmp-serde, the default) or JSON.
//!
//! Decoding is defensive: the payload comes from the network. MessagePack nesting is
//! limited to [`MAX_MSGPACK_DEPTH`] so a hostile payload cannot exhaust the stack.

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use crate::config::CodecKind;

/// The deepest MessagePack nesting accepted.
pub const MAX_MSGPACK_DEPTH: usize = 64;

/// A payload that could not be decoded into the handler's type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot decode {codec} payload: {message}")]
pub struct DecodeError {
    /// The codec that was used.
    pub codec: CodecKind,
    /// What was wrong.
    pub message: String,
}

/// A value that could not be encoded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot encode {codec} payload: {message}")]
pub struct EncodeError {
    /// The codec that was used.
    pub codec: CodecKind,
    /// What was wrong.
    pub message: String,
}

/// Decodes `bytes` with `codec`.
pub fn decode<T: DeserializeOwned>(codec: CodecKind, bytes: &[u8]) -> Result<T, DecodeError> {
    let fail = |message: String| DecodeError { codec, message };
    match codec {
        CodecKind::Msgpack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            de.set_max_depth(MAX_MSGPACK_DEPTH);
            T::deserialize(&mut de).map_err(|e| fail(e.to_string()))
        }
        CodecKind::Json => serde_json::from_slice(bytes).map_err(|e| fail(e.to_string())),
    }
}

/// Encodes `value` with `codec`. MessagePack encodes structs as maps (field names
/// included), so fields can be added without breaking older readers.
pub fn encode<T: Serialize + ?Sized>(codec: CodecKind, value: &T) -> Result<Vec<u8>, EncodeError> {
    let fail = |message: String| EncodeError { codec, message };
    match codec {
        CodecKind::Msgpack => rmp_serde::to_vec_named(value).map_err(|e| fail(e.to_string())),
        CodecKind::Json => serde_json::to_vec(value).map_err(|e| fail(e.to_string())),
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
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        // 100k nested one-element arrays: 0x91 is fixarray(1).
        let mut bytes = vec![0x91u8; 100_000];
        bytes.push(0x00);
        let err = decode::<serde_json::Value>(CodecKind::Msgpack, &bytes).expect_err("too deep");
        assert!(err.message.contains("depth"), "{err}");
    }
}
