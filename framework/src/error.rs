//! The one error shape of jetworker (and of `jetworker-cli`): [`Error<Kind>`], in the
//! style of async-nats' `Error<Kind>`.
//!
//! Each area has a `Copy` kind enum to match on (`ConfigErrorKind`, `ConnectErrorKind`,
//! ...) and an alias (`pub type ConfigError = Error<ConfigErrorKind>`). An error holds
//! its kind, optionally a message that says what was being done, optionally the error
//! that caused it (a real [`std::error::Error::source`] chain), and, for some kinds,
//! data the caller can read through the alias' own methods (a config's problems, a
//! provisioning plan with conflicts).
//!
//! ```
//! use jetworker::{Config, ConfigErrorKind};
//!
//! let err = Config::load_with_env("/nowhere/streams.toml", std::iter::empty())
//!     .expect_err("no such file");
//! assert_eq!(err.kind(), ConfigErrorKind::Read);
//! assert!(std::error::Error::source(&err).is_some(), "the I/O error");
//! ```

use std::any::Any;
use std::error::Error as StdError;
use std::fmt::{self, Debug, Display};
use std::sync::Arc;

/// An error of some kind `K`: what to match on ([`Error::kind`]), what to show
/// (`Display`), and what caused it ([`std::error::Error::source`]).
///
/// `Display` is the message (or, without one, the kind's own description) followed by
/// `": "` and the source's text, as async-nats prints its errors; an error made with
/// [`Error::wrap`] shows its source's text alone. Messages never hold a
/// secret: where a cause's text could quote one (a config parser quoting a line), only
/// a scrubbed message is kept and that cause is not attached.
///
/// Cloning is cheap: the source and the data are shared.
#[derive(Clone)]
pub struct Error<K> {
    kind: K,
    headline: Headline,
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
    detail: Option<Arc<dyn Detail>>,
}

/// What `Display` starts with.
#[derive(Debug, Clone)]
enum Headline {
    /// The kind's own description.
    Kind,
    /// A message saying what was being done.
    Message(String),
    /// Nothing of its own: the source's text is the whole message (an error that only
    /// classifies another one, like thiserror's `transparent`).
    Source,
}

/// Data some kinds carry beyond their message, read through typed methods of the alias
/// (`ConfigError::problems`, `ProvisionError::plan`, ...).
trait Detail: Any + Debug + Send + Sync {}

impl<T: Any + Debug + Send + Sync> Detail for T {}

impl<K> Error<K>
where
    K: Copy + PartialEq + Eq + Debug + Display,
{
    /// An error of `kind`, shown as the kind's description.
    pub fn new(kind: K) -> Self {
        Error {
            kind,
            headline: Headline::Kind,
            source: None,
            detail: None,
        }
    }

    /// An error of `kind` caused by `source`.
    pub fn with_source(kind: K, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Error {
            source: Some(Arc::from(source.into())),
            ..Error::new(kind)
        }
    }

    /// An error of `kind` that shows `source`'s message as its own: for an error that
    /// only says which step failed (`RunError` of kind `Connect` around a
    /// `ConnectError`). The source stays reachable through `source()`.
    pub fn wrap(kind: K, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Error {
            headline: Headline::Source,
            ..Error::with_source(kind, source)
        }
    }

    /// The same error, shown with `message` (what was being done, with the names that
    /// locate it) instead of the kind's description; the source's text still follows.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.headline = Headline::Message(message.into());
        self
    }

    /// The kind, to match on.
    pub fn kind(&self) -> K {
        self.kind
    }

    /// Attaches data a caller reads back with [`Error::detail`].
    pub(crate) fn with_detail<D: Any + Debug + Send + Sync>(mut self, detail: D) -> Self {
        self.detail = Some(Arc::new(detail));
        self
    }

    /// The data attached with [`Error::with_detail`], when it is a `D`.
    pub(crate) fn detail<D: Any>(&self) -> Option<&D> {
        let detail: &dyn Any = self.detail.as_deref()?;
        detail.downcast_ref()
    }

    /// The source, when it is an `E` (a `RunError`'s `ProvisionError`, ...).
    pub(crate) fn source_as<E: StdError + 'static>(&self) -> Option<&E> {
        self.source.as_deref()?.downcast_ref()
    }
}

impl<K: Debug> Debug for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("Error");
        out.field("kind", &self.kind);
        if let Headline::Message(message) = &self.headline {
            out.field("message", message);
        }
        if let Some(source) = &self.source {
            out.field("source", source);
        }
        if let Some(detail) = &self.detail {
            out.field("detail", detail);
        }
        out.finish()
    }
}

impl<K: Display> Display for Error<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.headline, &self.source) {
            (Headline::Source, Some(source)) => write!(f, "{source}"),
            (Headline::Message(message), Some(source)) => write!(f, "{message}: {source}"),
            (Headline::Message(message), None) => f.write_str(message),
            (Headline::Kind, Some(source)) => write!(f, "{}: {source}", self.kind),
            (Headline::Kind | Headline::Source, None) => write!(f, "{}", self.kind),
        }
    }
}

impl<K: Debug + Display> StdError for Error<K> {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn StdError + 'static))
    }
}

impl<K> From<K> for Error<K>
where
    K: Copy + PartialEq + Eq + Debug + Display,
{
    fn from(kind: K) -> Self {
        Error::new(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum TestKind {
        Read,
    }

    impl Display for TestKind {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("cannot read")
        }
    }

    type TestError = Error<TestKind>;

    fn io() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")
    }

    #[test]
    fn display_reads_as_message_then_source() {
        assert_eq!(TestError::new(TestKind::Read).to_string(), "cannot read");
        assert_eq!(
            TestError::with_source(TestKind::Read, io()).to_string(),
            "cannot read: no such file"
        );
        assert_eq!(
            TestError::with_source(TestKind::Read, io())
                .with_message("a.toml: cannot read the config file")
                .to_string(),
            "a.toml: cannot read the config file: no such file"
        );
        assert_eq!(
            TestError::new(TestKind::Read)
                .with_message("just this")
                .to_string(),
            "just this"
        );
        assert_eq!(
            TestError::wrap(TestKind::Read, io()).to_string(),
            "no such file"
        );
    }

    #[test]
    fn the_source_is_a_real_chain() {
        let inner = TestError::with_source(TestKind::Read, io()).with_message("inner");
        let outer = TestError::wrap(TestKind::Read, inner);
        let source = outer.source().expect("the inner error");
        assert_eq!(source.to_string(), "inner: no such file");
        let root = source.source().expect("the io error");
        assert!(root.downcast_ref::<std::io::Error>().is_some());
        assert!(outer.source_as::<TestError>().is_some());
        assert!(outer.source_as::<std::io::Error>().is_none());
    }

    #[test]
    fn kinds_and_details() {
        let err: TestError = TestKind::Read.into();
        assert_eq!(err.kind(), TestKind::Read);
        let err = err.with_detail(vec![1u8, 2]);
        assert_eq!(err.detail::<Vec<u8>>(), Some(&vec![1u8, 2]));
        assert_eq!(err.detail::<String>(), None);
        let cloned = err.clone();
        assert_eq!(cloned.detail::<Vec<u8>>(), Some(&vec![1u8, 2]));
        assert!(format!("{err:?}").contains("detail"));
    }
}
