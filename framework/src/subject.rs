//! NATS subject rules: what a valid subject or filter looks like, and wildcard matching.
//!
//! Used by validation (to reject a bad subject before the server does, naming the key)
//! and by the loop check (does a consumer's filter capture its own dead-letter subject?).

use crate::error::Error;

/// Why a subject is not valid. The text is meant to follow a key path in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectErrorKind {
    /// The subject is empty.
    Empty,
    /// A token between dots is empty (`a..b`, `.a`, `a.`).
    EmptyToken,
    /// The subject contains whitespace or a control character.
    Whitespace,
    /// A wildcard appears where only a literal subject is allowed.
    WildcardNotAllowed,
    /// `*` or `>` is part of a longer token (`a*`, `>b`).
    PartialWildcard,
    /// `>` is not the last token.
    TailWildcardNotLast,
}

impl std::fmt::Display for SubjectErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubjectErrorKind::Empty => "subject is empty",
            SubjectErrorKind::EmptyToken => {
                "subject has an empty token (two dots in a row, or a leading or trailing dot)"
            }
            SubjectErrorKind::Whitespace => "subject contains whitespace or a control character",
            SubjectErrorKind::WildcardNotAllowed => {
                "wildcards (* and >) are not allowed here: this must be a literal subject"
            }
            SubjectErrorKind::PartialWildcard => {
                "a wildcard must be a whole token (`a.*.c`, not `a*`)"
            }
            SubjectErrorKind::TailWildcardNotLast => "`>` must be the last token",
        })
    }
}

/// A subject that is not valid; its kind says why.
pub type SubjectError = Error<SubjectErrorKind>;

/// Checks a subject that may contain wildcards (a stream subject or a consumer filter).
pub fn validate_filter(subject: &str) -> Result<(), SubjectError> {
    if subject.is_empty() {
        return Err(SubjectErrorKind::Empty.into());
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectErrorKind::Whitespace.into());
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    let last = tokens.len() - 1;
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(SubjectErrorKind::EmptyToken.into());
        }
        if token.len() > 1 && (token.contains('*') || token.contains('>')) {
            return Err(SubjectErrorKind::PartialWildcard.into());
        }
        if *token == ">" && i != last {
            return Err(SubjectErrorKind::TailWildcardNotLast.into());
        }
    }
    Ok(())
}

/// Checks a literal subject, one a message can be published to (no wildcards).
pub fn validate_literal(subject: &str) -> Result<(), SubjectError> {
    validate_filter(subject)?;
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err(SubjectErrorKind::WildcardNotAllowed.into());
    }
    Ok(())
}

/// Does `filter` (which may hold `*` and `>`) match the subject `subject`?
///
/// `subject` may itself hold wildcards; then the answer is "could any subject matched
/// by `subject` also be matched by `filter`" (they overlap).
pub fn overlaps(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(a), Some(b)) => {
                if a != "*" && b != "*" && a != b {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let table = [
            ("events.>", Ok(())),
            ("events.*.click", Ok(())),
            ("events", Ok(())),
            ("", Err(SubjectErrorKind::Empty)),
            ("events..click", Err(SubjectErrorKind::EmptyToken)),
            (".events", Err(SubjectErrorKind::EmptyToken)),
            ("events.", Err(SubjectErrorKind::EmptyToken)),
            ("events click", Err(SubjectErrorKind::Whitespace)),
            ("events.cl*", Err(SubjectErrorKind::PartialWildcard)),
            ("events.>.x", Err(SubjectErrorKind::TailWildcardNotLast)),
        ];
        for (subject, expected) in table {
            assert_eq!(
                validate_filter(subject).map_err(|e| e.kind()),
                expected,
                "{subject:?}"
            );
        }
    }

    #[test]
    fn literals() {
        let literal = |subject| validate_literal(subject).map_err(|e| e.kind());
        assert_eq!(literal("dlq.clicks"), Ok(()));
        assert_eq!(literal("dlq.*"), Err(SubjectErrorKind::WildcardNotAllowed));
        assert_eq!(literal("dlq.>"), Err(SubjectErrorKind::WildcardNotAllowed));
    }

    #[test]
    fn matching() {
        let table = [
            ("events.>", "events.click", true),
            ("events.>", "events", false),
            ("events.*", "events.click", true),
            ("events.*", "events.click.x", false),
            ("events.click", "events.click", true),
            ("events.click", "events.login", false),
            (">", "anything.at.all", true),
            ("a.*.c", "a.b.c", true),
            ("a.*.c", "a.b.d", false),
            ("dlq.>", "dlq.*", true),
            ("events.*", "dlq.>", false),
        ];
        for (filter, subject, expected) in table {
            assert_eq!(overlaps(filter, subject), expected, "{filter} ~ {subject}");
        }
    }
}
