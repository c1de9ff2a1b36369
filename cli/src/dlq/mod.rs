//! Dead letters as an operator handles them: `dlq list`, `show`, `replay` and `purge`.
//!
//! # Where dead letters are
//! In the streams of the config that capture some consumer's `dead_letter_subject`
//! ([`dead_letter_streams`]), on those subjects only: anything else such a stream holds is
//! never listed, replayed or purged.
//!
//! # Reading
//! One ephemeral ordered consumer per dead-letter subject, filtered by that subject and,
//! with `--since`, started at that time on the server. It streams messages in batches (a
//! few thousand dead letters take a moment, not one request each), skips deleted
//! messages server-side, and works on nats-server 2.9 as on current servers. Reading
//! stops at the stream's last sequence as it was when the read began.
//!
//! # Replaying
//! [`Dlq::replay_one`] republishes the dead letter to its original subject with the
//! dead-letter headers removed ([`replay_headers`]), waits for the PubAck, and only then
//! deletes it from the dead-letter stream. Publish-then-delete loses nothing if
//! interrupted; a crash between the two leaves a copy in both places, and the replay's
//! message id ([`replay_message_id`]) is the same when the replay is run again, so the
//! original stream's duplicate window stores it once. That protection lasts as long as
//! the window (`duplicate_window`, 2 minutes by default): a replay finished later than
//! that stores a second copy, which handlers absorb like any redelivery (they must be
//! idempotent anyway). Replays run one at a time, so at most one dead letter is ever
//! in both places.
//!
//! A replay is a new message on the original subject: every consumer whose filter
//! matches it receives it, not only the one that gave up on it.
//! [`Dlq::other_readers`] names them, and `dlq replay` says so before it starts.
//!
//! ```no_run
//! # async fn demo(js: async_nats::jetstream::Context, config: jetworker::Config) -> Result<(), jetworker_cli::DlqError> {
//! use jetworker_cli::{Dlq, Filter};
//! use jetworker::Reason;
//!
//! let dlq = Dlq::new(js, &config)?;
//! let filter = Filter { reasons: vec![Reason::Permanent], ..Filter::default() };
//! for letter in dlq.list(&filter).await? {
//!     let replayed = dlq.replay_one(&letter).await?;
//!     println!("{} #{} -> {}", letter.stream, letter.sequence, replayed.subject);
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `streams`: which streams hold dead letters of which consumers ([`dead_letter_streams`]).
//! - `letter`: one dead letter ([`Letter`]) and its views: [`Summary`], [`Detail`], the
//!   [`Payload`] made readable, [`list_table`].
//! - `filter`: [`Filter`], the selection, and its `--reason` / `--since` / `--until` values.
//! - `replay`: what a replay publishes ([`replay_headers`], [`replay_message_id`]) and the
//!   replay and purge reports.
//! - `service`: [`Dlq`], the operations over a server.
//! - `error`: [`DlqError`] and its [`DlqErrorKind`].
//!
//! Submodules import their siblings, never this one.

mod error;
mod filter;
mod letter;
mod replay;
mod service;
mod streams;

pub use error::{DlqError, DlqErrorKind};
pub use filter::{parse_reason, parse_time, Filter};
pub use letter::{decode_payload, list_table, Detail, Letter, Payload, PayloadEncoding, Summary};
pub use replay::{replay_headers, replay_message_id, PurgeReport, ReplayReport, Replayed};
pub use service::Dlq;
pub use streams::{dead_letter_streams, DeadLetterSource, DeadLetterStream};
