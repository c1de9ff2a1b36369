//! [`Dlq`]: list, show, replay and purge the dead letters of one config on a server.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use jetworker::headers as dead_letter;
use jetworker::{CodecKind, Config, Publisher, RetryPolicy};

use super::error::{dlq_error, request, DlqError, DlqErrorKind};
use super::filter::Filter;
use super::letter::Letter;
use super::replay::{
    other_readers, replay_headers, replay_message_id, PurgeReport, Reader, ReplayReport, Replayed,
};
use super::streams::{dead_letter_streams, DeadLetterStream};

/// Dead-letter operations on the streams of one config.
#[derive(Clone)]
pub struct Dlq {
    js: jetstream::Context,
    streams: Vec<DeadLetterStream>,
    /// Every stream of the config with its subjects, to find where a replay lands.
    stream_subjects: Vec<(String, Vec<String>)>,
    /// Every consumer of the config, to tell who receives a replay.
    readers: Vec<Reader>,
    publisher: Publisher,
    read_timeout: Duration,
}

impl fmt::Debug for Dlq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dlq")
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl Dlq {
    /// Dead-letter operations for `config`'s dead-letter streams. Fails when the config
    /// has none.
    pub fn new(js: jetstream::Context, config: &Config) -> Result<Dlq, DlqError> {
        let streams = dead_letter_streams(config);
        if streams.is_empty() {
            return Err(dlq_error(
                DlqErrorKind::NoDeadLetterStream,
                format!(
                    "{}: no stream captures a consumer's dead_letter_subject",
                    config.source.display()
                ),
            ));
        }
        let request_timeout = config.connection.request_timeout;
        let publisher = Publisher::new(js.clone()).with_retry(RetryPolicy {
            deadline: Duration::from_secs(15).max(request_timeout * 2),
            ack_timeout: request_timeout,
            ..RetryPolicy::default()
        });
        Ok(Dlq {
            js,
            streams,
            stream_subjects: config
                .streams
                .iter()
                .map(|s| (s.name.clone(), s.subjects.clone()))
                .collect(),
            readers: config
                .consumers
                .iter()
                .map(|c| Reader {
                    stream: c.stream.clone(),
                    consumer: c.name.clone(),
                    filter: c.filter_subject.clone(),
                })
                .collect(),
            publisher,
            read_timeout: request_timeout.max(Duration::from_secs(5)),
        })
    }

    /// The consumers of the config, other than the one that gave up on `letter`, that
    /// also receive its replay, sorted. A replay is a new message on the original
    /// subject: every consumer of the stream storing that subject whose filter matches
    /// it handles it again, not only the one that dead-lettered it. Empty when the
    /// letter has no original subject.
    pub fn other_readers(&self, letter: &Letter) -> Vec<String> {
        other_readers(&self.stream_subjects, &self.readers, letter)
    }

    /// The dead-letter streams, as [`dead_letter_streams`] found them.
    pub fn streams(&self) -> &[DeadLetterStream] {
        &self.streams
    }

    /// The codec of the consumer that produced `letter`, when it is in the config.
    pub fn codec_of(&self, letter: &Letter) -> Option<CodecKind> {
        let consumer = letter.consumer()?;
        let original_stream = letter.original_stream();
        let sources = self
            .streams
            .iter()
            .filter(|s| s.name == letter.stream)
            .flat_map(|s| s.subjects.get(&letter.subject))
            .flatten();
        let mut fallback = None;
        for source in sources {
            // A partitioned consumer's letters name one of its partitions.
            if source.consumer == consumer
                || super::filter::is_partition_of(consumer, &source.consumer)
            {
                if original_stream.is_none_or(|s| s == source.stream) {
                    return Some(source.codec);
                }
                fallback = Some(source.codec);
            }
        }
        fallback
    }

    fn stream_named(&self, name: &str) -> Result<&DeadLetterStream, DlqError> {
        self.streams.iter().find(|s| s.name == name).ok_or_else(|| {
            dlq_error(
                DlqErrorKind::NoDeadLetterStream,
                format!(
                    "{name:?} is not a dead-letter stream of this config (dead-letter streams: {})",
                    self.stream_names()
                ),
            )
        })
    }

    fn stream_names(&self) -> String {
        self.streams
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The dead-letter stream `name`, or the only one when `name` is `None`.
    pub fn resolve_stream(&self, name: Option<&str>) -> Result<&DeadLetterStream, DlqError> {
        match name {
            Some(name) => self.stream_named(name),
            None => match self.streams.as_slice() {
                [only] => Ok(only),
                _ => Err(dlq_error(
                    DlqErrorKind::InvalidSelection,
                    format!(
                        "the config has several dead-letter streams ({}): name one with --stream",
                        self.stream_names()
                    ),
                )),
            },
        }
    }

    async fn handle(&self, name: &str) -> Result<stream::Stream<()>, DlqError> {
        self.js
            .get_stream_no_info(name)
            .await
            .map_err(|e| request(format_args!("opening stream {name:?}"), e))
    }

    /// Every dead letter `filter` selects, per stream in config order, oldest first.
    pub async fn list(&self, filter: &Filter) -> Result<Vec<Letter>, DlqError> {
        let streams: Vec<&DeadLetterStream> = match &filter.stream {
            Some(name) => vec![self.stream_named(name)?],
            None => self.streams.iter().collect(),
        };
        let mut out = Vec::new();
        for dl in streams {
            // With consumers named that the config knows, read only their subjects.
            let known: BTreeSet<&String> = dl
                .subjects
                .iter()
                .filter(|(_, sources)| {
                    sources
                        .iter()
                        .any(|s| filter.consumers.contains(&s.consumer))
                })
                .map(|(subject, _)| subject)
                .collect();
            let all_known = filter.consumers.iter().all(|c| {
                self.streams
                    .iter()
                    .any(|s| s.subjects.values().flatten().any(|src| src.consumer == *c))
            });
            let subjects: Vec<&String> = if filter.consumers.is_empty() || !all_known {
                dl.subjects.keys().collect()
            } else {
                known.into_iter().collect()
            };
            let mut letters = Vec::new();
            for subject in subjects {
                letters.extend(self.read_subject(&dl.name, subject, filter).await?);
            }
            letters.sort_by_key(|l| l.sequence);
            out.extend(letters);
        }
        Ok(out)
    }

    /// Reads the dead letters on one subject with an ordered consumer.
    async fn read_subject(
        &self,
        stream_name: &str,
        subject: &str,
        filter: &Filter,
    ) -> Result<Vec<Letter>, DlqError> {
        let what = || format!("reading {subject} in stream {stream_name:?}");
        let stream = self
            .js
            .get_stream(stream_name)
            .await
            .map_err(|e| request(what(), e))?;
        let last = stream.cached_info().state.last_sequence;
        let deliver_policy = match filter.since {
            Some(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
            None => consumer::DeliverPolicy::All,
        };
        let reader = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: subject.to_string(),
                deliver_policy,
                description: Some("jetworker dlq reader".to_string()),
                ..Default::default()
            })
            .await
            .map_err(|e| request(what(), e))?;
        let name = reader.cached_info().name.clone();
        let expected = reader.cached_info().num_pending;
        let mut out = Vec::new();
        let result = async {
            if expected == 0 {
                return Ok(());
            }
            let mut messages = reader.messages().await.map_err(|e| request(what(), e))?;
            loop {
                let next = tokio::time::timeout(self.read_timeout, messages.next())
                    .await
                    .map_err(|_| {
                        dlq_error(
                            DlqErrorKind::Request,
                            format!(
                                "{}: no message within {} ({} read, {expected} expected)",
                                what(),
                                humantime::format_duration(self.read_timeout),
                                out.len()
                            ),
                        )
                    })?;
                let message = match next {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(request(what(), e)),
                    Some(Ok(m)) => m,
                };
                let (sequence, time, pending) = match message.info() {
                    Ok(info) => (info.stream_sequence, info.published, info.pending),
                    Err(e) => return Err(request(what(), e)),
                };
                let letter = Letter {
                    stream: stream_name.to_string(),
                    sequence,
                    subject: message.subject.to_string(),
                    time,
                    headers: dead_letter::restore_escaped(
                        message.headers.as_ref().unwrap_or(&Default::default()),
                    ),
                    payload: message.payload.clone(),
                };
                if filter.matches(&letter) {
                    out.push(letter);
                }
                if pending == 0 || sequence >= last {
                    return Ok(());
                }
            }
        }
        .await;
        // Ephemeral: it would go by itself after its inactivity threshold; tidy up now.
        let _ = stream.delete_consumer(&name).await;
        result.map(|()| out)
    }

    /// The dead letter at `sequence` of the dead-letter stream `stream` (or of the only
    /// one). It must be on a dead-letter subject.
    pub async fn get(&self, stream: Option<&str>, sequence: u64) -> Result<Letter, DlqError> {
        let dl = self.resolve_stream(stream)?;
        let handle = self.handle(&dl.name).await?;
        let message = match handle.get_raw_message(sequence).await {
            Ok(m) => m,
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                return Err(dlq_error(
                    DlqErrorKind::NotFound,
                    format!("no message #{sequence} in stream {:?}", dl.name),
                ))
            }
            Err(e) => {
                return Err(request(
                    format_args!("reading #{sequence} of stream {:?}", dl.name),
                    e,
                ))
            }
        };
        let subject = message.subject.to_string();
        if !dl.subjects.contains_key(&subject) {
            return Err(dlq_error(DlqErrorKind::NotFound,
                format!(
                    "message #{sequence} of stream {:?} is on {subject}, which is no consumer's dead_letter_subject",
                    dl.name
                ),
            ));
        }
        let mut letter = Letter {
            stream: dl.name.clone(),
            sequence,
            subject,
            time: message.time,
            headers: dead_letter::restore_escaped(&message.headers),
            payload: message.payload,
        };
        // A payload kept in the object store is shown from there; when the object is
        // gone, the letter is shown without it (a replay refuses it, see `original_payload`).
        if letter.header(dead_letter::PAYLOAD_OBJECT).is_some() {
            if let Ok(payload) = self.original_payload(&letter).await {
                letter.payload = payload;
            }
        }
        Ok(letter)
    }

    /// The original's payload a replay republishes: the letter's own, or, when it was
    /// too large for the copy, the object named by its
    /// [`PAYLOAD_OBJECT`](dead_letter::PAYLOAD_OBJECT) header. `PayloadMissing` when the
    /// letter holds none and names no object, or the object is gone.
    pub async fn original_payload(&self, letter: &Letter) -> Result<bytes::Bytes, DlqError> {
        let missing = |why: String| {
            dlq_error(
                DlqErrorKind::PayloadMissing,
                format!(
                    "{} #{} does not hold the original payload ({why}): replaying it would publish an empty message; it was kept",
                    letter.stream, letter.sequence
                ),
            )
        };
        if let Some(header) = letter.header(dead_letter::PAYLOAD_OBJECT) {
            let what = || {
                format!(
                    "reading the payload of {} #{} from {header}",
                    letter.stream, letter.sequence
                )
            };
            let (store, object) = self
                .payload_object(header, what)
                .await?
                .ok_or_else(|| missing(format!("{}: {header:?}", dead_letter::PAYLOAD_OBJECT)))?;
            let mut reader = match store.get(object).await {
                Ok(reader) => reader,
                Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                    return Err(missing(format!("object {header} is gone")))
                }
                Err(e) => return Err(request(what(), e)),
            };
            let mut bytes = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes)
                .await
                .map_err(|e| request(what(), e))?;
            return Ok(bytes.into());
        }
        // The original's payload was too large to copy (before payloads were kept in
        // the object store), or the original was gone when the safety net recorded it.
        let without_payload = [dead_letter::PAYLOAD_DROPPED, dead_letter::ORIGINAL_MISSING]
            .into_iter()
            .find(|name| letter.headers.get(*name).is_some());
        match without_payload {
            Some(header) => Err(missing(header.to_string())),
            None => Ok(letter.payload.clone()),
        }
    }

    /// The object store and the object a [`PAYLOAD_OBJECT`](dead_letter::PAYLOAD_OBJECT)
    /// header names; `None` when the header names none. `what` says what for, in errors.
    async fn payload_object<'h>(
        &self,
        header: &'h str,
        what: impl Fn() -> String,
    ) -> Result<Option<(jetstream::object_store::ObjectStore, &'h str)>, DlqError> {
        let Some((bucket, object)) = jetworker::dead_letter_payload_object(header) else {
            return Ok(None);
        };
        let store = self
            .js
            .get_object_store(bucket)
            .await
            .map_err(|e| request(what(), e))?;
        Ok(Some((store, object)))
    }

    /// Deletes the object that holds `letter`'s payload, if it names one. Called only
    /// once the letter itself is deleted: the letter is the record, never the object
    /// alone. `Ok` when there is none or it was gone already.
    async fn delete_payload_object(&self, letter: &Letter) -> Result<(), DlqError> {
        let Some(header) = letter.header(dead_letter::PAYLOAD_OBJECT) else {
            return Ok(());
        };
        let what = || {
            format!(
                "deleting {header}, the payload of {} #{}",
                letter.stream, letter.sequence
            )
        };
        let Some((store, object)) = self.payload_object(header, what).await? else {
            return Ok(());
        };
        match store.delete(object).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(request(what(), e)),
        }
    }

    /// The publish step of a replay alone: republishes `letter` to its original subject
    /// (see [`replay_headers`], [`replay_message_id`]) and returns the PubAck, leaving the
    /// dead letter in place. [`Dlq::replay_one`] is this, then the delete.
    pub async fn republish(&self, letter: &Letter) -> Result<Replayed, DlqError> {
        let target = letter.original_subject().ok_or_else(|| {
            dlq_error(
                DlqErrorKind::NotADeadLetter,
                format!(
                    "{} #{} has no {} header: nowhere to replay it to",
                    letter.stream,
                    letter.sequence,
                    dead_letter::ORIGINAL_SUBJECT
                ),
            )
        })?;
        if let Err(e) = jetworker::validate_literal(target) {
            return Err(dlq_error(
                DlqErrorKind::NotADeadLetter,
                format!(
                    "{} #{}: original subject {target:?} cannot be published to: {e}",
                    letter.stream, letter.sequence
                ),
            ));
        }
        // Never republish what the letter does not have.
        let payload = self.original_payload(letter).await?;
        let count = letter.replay_count() + 1;
        let message_id = replay_message_id(&letter.stream, letter.sequence, count);
        let headers = replay_headers(&letter.headers, count);
        let ack = self
            .publisher
            .publish_bytes(target, &message_id, headers, payload)
            .await
            .map_err(|e| {
                DlqError::with_source(DlqErrorKind::Publish, e).with_message(format!(
                    "replaying {} #{} (the dead letter was kept)",
                    letter.stream, letter.sequence
                ))
            })?;
        Ok(Replayed {
            stream: letter.stream.clone(),
            sequence: letter.sequence,
            subject: target.to_string(),
            message_id,
            replay_count: count,
            target_stream: ack.stream,
            target_sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Replays one dead letter: republish, await the PubAck, then delete it from the
    /// dead-letter stream. When the delete fails the message is in both places; running
    /// the replay again republishes with the same message id (deduplicated) and deletes.
    pub async fn replay_one(&self, letter: &Letter) -> Result<Replayed, DlqError> {
        let replayed = self.republish(letter).await?;
        self.delete(letter).await.map_err(|e| {
            DlqError::with_source(e.kind(), e).with_message(format!(
                "{} #{} was republished to {} ({} #{}) but not deleted (replay it again to finish: the copy is deduplicated)",
                letter.stream,
                letter.sequence,
                replayed.subject,
                replayed.target_stream,
                replayed.target_sequence
            ))
        })?;
        Ok(replayed)
    }

    /// Replays `letters` in order, stopping at the first failure. Dead letters with
    /// nowhere to go, or without the original's payload, are skipped and left in place.
    pub async fn replay(&self, letters: &[Letter]) -> ReplayReport {
        let mut report = ReplayReport::default();
        for letter in letters {
            match self.replay_one(letter).await {
                Ok(r) => report.replayed.push(r),
                Err(e)
                    if matches!(
                        e.kind(),
                        DlqErrorKind::NotADeadLetter | DlqErrorKind::PayloadMissing
                    ) =>
                {
                    report
                        .skipped
                        .push((letter.stream.clone(), letter.sequence, e.to_string()))
                }
                Err(e) => {
                    report.failed = Some(e);
                    break;
                }
            }
        }
        report
    }

    /// Deletes one dead letter. `Ok(false)` when it was already gone.
    ///
    /// The message is removed, not overwritten on disk (`no_erase`): an erasing delete
    /// costs a disk write per message on current servers, too slow for thousands.
    async fn delete(&self, letter: &Letter) -> Result<bool, DlqError> {
        use jetstream::response::Response;
        let what = || format!("deleting {} #{}", letter.stream, letter.sequence);
        let response: Result<Response<stream::DeleteStatus>, _> = self
            .js
            .request(
                format!("STREAM.MSG.DELETE.{}", letter.stream),
                &serde_json::json!({ "seq": letter.sequence, "no_erase": true }),
            )
            .await;
        let failure = match response {
            Ok(Response::Ok(status)) if status.success => {
                self.delete_payload_object(letter).await?;
                return Ok(true);
            }
            Ok(Response::Ok(_)) => dlq_error(
                DlqErrorKind::Request,
                format!("{}: the server did not delete it", what()),
            ),
            Ok(Response::Err { error }) => request(what(), error),
            Err(e) => request(what(), e),
        };
        let handle = self.handle(&letter.stream).await?;
        match handle.get_raw_message(letter.sequence).await {
            // Gone already (another replay or purge got there first): done.
            Err(g) if g.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                self.delete_payload_object(letter).await?;
                Ok(false)
            }
            _ => Err(failure),
        }
    }

    /// Deletes `letters` from their dead-letter streams for good.
    pub async fn purge(&self, letters: &[Letter]) -> Result<PurgeReport, DlqError> {
        // Up to 32 deletes at once. Pushed one by one rather than mapped by a closure
        // over a stream: the closure's lifetimes would keep the returned future from
        // being `Send`, which the console's handlers need.
        let mut deleting = futures::stream::FuturesUnordered::new();
        let mut results: Vec<Result<bool, DlqError>> = Vec::with_capacity(letters.len());
        for letter in letters {
            if deleting.len() >= 32 {
                results.extend(deleting.next().await);
            }
            deleting.push(self.delete(letter));
        }
        while let Some(result) = deleting.next().await {
            results.push(result);
        }
        let mut report = PurgeReport::default();
        let mut first_error = None;
        for r in results {
            match r {
                Ok(true) => report.deleted += 1,
                Ok(false) => report.already_gone += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(DlqError::with_source(e.kind(), e).with_message(format!(
                "purging failed after {} other dead letters were deleted",
                report.deleted
            ))),
            None => Ok(report),
        }
    }
}
