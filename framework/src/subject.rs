//! NATS subject rules: what a valid subject or filter looks like, and wildcard matching.
//!
//! Used by validation (to reject a bad subject before the server does, naming the key)
//! and by the loop check (does a consumer's filter capture its own dead-letter subject?).

/// Why a subject is not valid. The text is meant to follow a key path in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectError {
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

impl std::fmt::Display for SubjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubjectError::Empty => "subject is empty",
            SubjectError::EmptyToken => {
                "subject has an empty token (two dots in a row, or a leading or trailing dot)"
            }
            SubjectError::Whitespace => "subject contains whitespace or a control character",
            SubjectError::WildcardNotAllowed => {
                "wildcards (* and >) are not allowed here: this must be a literal subject"
            }
            SubjectError::PartialWildcard => "a wildcard must be a whole token (`a.*.c`, not `a*`)",
            SubjectError::TailWildcardNotLast => "`>` must be the last token",
        })
    }
}

/// Checks a subject that may contain wildcards (a stream subject or a consumer filter).
pub fn validate_filter(subject: &str) -> Result<(), SubjectError> {
    if subject.is_empty() {
        return Err(SubjectError::Empty);
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectError::Whitespace);
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    let last = tokens.len() - 1;
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        if token.len() > 1 && (token.contains('*') || token.contains('>')) {
            return Err(SubjectError::PartialWildcard);
        }
        if *token == ">" && i != last {
            return Err(SubjectError::TailWildcardNotLast);
        }
    }
    Ok(())
}

/// Checks a literal subject, one a message can be published to (no wildcards).
pub fn validate_literal(subject: &str) -> Result<(), SubjectError> {
    validate_filter(subject)?;
    if subject.split('.').any(|t| t == "*" || t == ">") {
        return Err(SubjectError::WildcardNotAllowed);
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
            ("", Err(SubjectError::Empty)),
            ("events..click", Err(SubjectError::EmptyToken)),
            (".events", Err(SubjectError::EmptyToken)),
            ("events.", Err(SubjectError::EmptyToken)),
            ("events click", Err(SubjectError::Whitespace)),
            ("events.cl*", Err(SubjectError::PartialWildcard)),
            ("events.>.x", Err(SubjectError::TailWildcardNotLast)),
        ];
        for (subject, expected) in table {
            assert_eq!(validate_filter(subject), expected, "{subject:?}");
        }
    }

    #[test]
    fn literals() {
        assert_eq!(validate_literal("dlq.clicks"), Ok(()));
        assert_eq!(
            validate_literal("dlq.*"),
            Err(SubjectError::WildcardNotAllowed)
        );
        assert_eq!(
            validate_literal("dlq.>"),
            Err(SubjectError::WildcardNotAllowed)
        );
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
