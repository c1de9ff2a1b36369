//! Key lanes of an ordered consumer (`ordered_by`): messages of one key run one at a
//! time, in stream order; messages of different keys run concurrently, up to the
//! consumer's `concurrency` slots.
//!
//! Each key has a lane: the message of that key that runs (or waits for a slot), the
//! later ones held behind it in stream-sequence order, and the earlier ones that went
//! back to the server and must come back first. A lane releases its next message when
//! the one before it is settled for good (acked, or dead-lettered and termed).
//!
//! # A retry holds the key back
//! A failed message is nak'ed with its retry delay as usual (the attempt is the server's
//! delivery count, wherever it lands). Its lane then *awaits* it: later messages of the
//! key that arrive, or were already held, stay in hand unsettled until the server
//! delivers the nak'ed one again and it is settled. When it finally is dead-lettered
//! the key moves on to its next message. Held messages get a progress ack every third of
//! `ack_wait`, so none is redelivered while it waits.
//!
//! # Bounds, and why the lanes cannot deadlock
//! Held messages count as held by the pull loop (its `waiting`, with their bytes), so
//! the prefetch bound of `prefetch` shrinks by them: they do not make the loop pull more.
//! While a lane awaits a redelivery the loop keeps one pull request open even when the
//! bound allows nothing more, because only a pull brings the awaited message back. The
//! server delivers pending redeliveries before new messages and before its
//! `max_ack_pending` check (consumer.go, `getNextMsg`), so what one consumer can hold at
//! all, held messages and awaited ones together, is at most `max_ack_pending`: that is
//! the bound of the hold, and at that bound the open pull can bring only redeliveries,
//! which is what the lanes wait for. An awaited message that does not come back within
//! its delay plus twice `ack_wait` (it was removed from the stream, or another process
//! settled it) is given up on, logged, and its key moves on.
//!
//! # The gate, when messages are pending elsewhere
//! A consumer that starts (a worker restarted, a replica took over a partition or the
//! lease of an ordered consumer without partitions, see `partition`) may find messages
//! pending at the server that were in flight at a process that died or were nak'ed
//! there for a retry. They must run before every later message of their key, and they
//! come back only after their ack wait or retry delay.
//! So the lanes start with their gate closed when the server reports pending messages:
//! they take in what the pulls bring and start nothing keyed, until the consumer's
//! `num_ack_pending` (polled each tick) is no more than what they hold: every pending
//! message is then in hand, in stream order in its lane, or settled. Should that never
//! happen, the gate opens at a deadline: the longest of the ack wait and the retry
//! delays, plus an ack wait and a margin.
//!
//! Lanes live as long as the consumer, across pull sessions: a session that restarts
//! (a reconnect) keeps what it holds, and a message that arrived as the session ended
//! joins its lane instead of going back to the server. At shutdown what is held is
//! handed back like every unstarted delivery.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::delivery::{send_or_note, AckSubject, Settled};
use super::runtime::ConsumerRuntime;
use crate::config::OrderedBy;
use crate::provision;

/// A key function registered with [`App::key`](crate::App::key): a message's key, or
/// `None` for a message that has none (it runs without waiting for any other).
pub(crate) type KeyFn = Arc<dyn Fn(&async_nats::Message) -> Option<String> + Send + Sync>;

/// How long past its expected return an awaited message is waited for, on top of twice
/// the ack wait.
const AWAIT_MARGIN: Duration = Duration::from_secs(5);

/// Where a consumer finds a message's key.
#[derive(Clone)]
pub(crate) enum KeyOf {
    /// A subject token, by 0-based index.
    SubjectToken(usize),
    /// A header's value.
    Header(String),
    /// A function given in code.
    Function(KeyFn),
}

impl KeyOf {
    /// The key source `by` names, with the registered `functions`; `None` when it names
    /// a function that is not registered (`App::check` reports that).
    pub(crate) fn from_config(by: &OrderedBy, functions: &HashMap<String, KeyFn>) -> Option<KeyOf> {
        if let Some(index) = by.subject_token {
            return Some(KeyOf::SubjectToken(index));
        }
        if let Some(header) = &by.header {
            return Some(KeyOf::Header(header.clone()));
        }
        let name = by.function.as_ref()?;
        functions.get(name).cloned().map(KeyOf::Function)
    }

    /// The lane of `message`: a hash of its key (two keys with one hash share a lane,
    /// which keeps both in order), or `None` when it has no key.
    fn lane_of(&self, message: &async_nats::Message) -> Option<u64> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        match self {
            KeyOf::SubjectToken(index) => message.subject.split('.').nth(*index)?.hash(&mut hasher),
            KeyOf::Header(name) => message
                .headers
                .as_ref()?
                .get(name.as_str())?
                .as_str()
                .hash(&mut hasher),
            KeyOf::Function(key) => key(message)?.hash(&mut hasher),
        }
        Some(hasher.finish())
    }
}

/// What a started delivery of a lane reports back when it is settled.
struct Finished {
    lane: u64,
    sequence: u64,
    settled: Settled,
}

/// Carried by a delivery a lane released: report its settlement with
/// [`LaneTicket::finished`].
pub(super) struct LaneTicket {
    lane: u64,
    sequence: u64,
    to: mpsc::UnboundedSender<Finished>,
}

impl LaneTicket {
    /// Tells the lane how its message was settled.
    pub(super) fn finished(self, settled: Settled) {
        // The receiver lives as long as the consumer; a send after it is gone (the
        // consumer ended) has nobody left to tell.
        let _ = self.to.send(Finished {
            lane: self.lane,
            sequence: self.sequence,
            settled,
        });
    }
}

/// A message in hand that no handler works on yet, and since when its ack timer runs.
struct Held {
    message: async_nats::Message,
    since: Instant,
}

/// One key's messages.
#[derive(Default)]
struct Lane {
    /// The sequence of this key's message that runs or waits for a slot.
    dispatched: Option<u64>,
    /// Later messages of the key, by stream sequence.
    held: BTreeMap<u64, Held>,
    /// Messages of the key that went back to the server, by sequence, with when they
    /// are given up on: nothing after the first of them runs before it is back.
    awaiting: BTreeMap<u64, Instant>,
}

impl Lane {
    fn is_idle(&self) -> bool {
        self.dispatched.is_none() && self.held.is_empty() && self.awaiting.is_empty()
    }

    /// The message that may start now: the earliest held, when nothing of the key runs
    /// and no earlier message of it is out at the server.
    fn next(&mut self) -> Option<(u64, Held)> {
        if self.dispatched.is_some() {
            return None;
        }
        let (&sequence, _) = self.held.first_key_value()?;
        if let Some((&awaited, _)) = self.awaiting.first_key_value() {
            if sequence >= awaited {
                return None;
            }
        }
        let held = self.held.remove(&sequence)?;
        self.dispatched = Some(sequence);
        Some((sequence, held))
    }
}

/// A message released by its lane (or without a key), waiting for a handler slot.
struct Ready {
    held: Held,
    ticket: Option<(u64, u64)>,
}

/// The key lanes of one consumer (see the module docs).
pub(super) struct Lanes {
    key_of: KeyOf,
    ack_wait: Duration,
    lanes: HashMap<u64, Lane>,
    /// Released, in release order, waiting for a slot.
    ready: VecDeque<Ready>,
    /// Messages held in lanes (not in `ready`).
    held: usize,
    /// Bytes of the held and the ready messages.
    bytes: usize,
    /// Awaited messages across the lanes.
    awaiting: usize,
    finished_tx: mpsc::UnboundedSender<Finished>,
    finished_rx: mpsc::UnboundedReceiver<Finished>,
    /// While closed: when it opens at the latest (see the module docs).
    gate: Option<Instant>,
}

impl Lanes {
    /// Lanes keyed by `key_of`, for a consumer whose ack wait is `ack_wait`.
    pub(super) fn new(key_of: KeyOf, ack_wait: Duration) -> Lanes {
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        Lanes {
            key_of,
            ack_wait,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            held: 0,
            bytes: 0,
            awaiting: 0,
            finished_tx,
            finished_rx,
            gate: None,
        }
    }

    /// Closes the gate until every message pending at the server is in hand or
    /// settled, or `until` at the latest.
    pub(super) fn close_gate(&mut self, until: Instant) {
        self.gate = Some(until);
    }

    /// While the gate is closed: asks the server how many messages of the consumer are
    /// pending, and opens the gate once they are all in hand (or at its deadline).
    pub(super) async fn check_gate<S>(&mut self, rt: &ConsumerRuntime<S>, now: Instant) {
        let Some(until) = self.gate else { return };
        let pending = match provision::get_stream(&rt.js, &rt.spec.stream).await {
            Ok(Some(stream)) => match provision::consumer_info(&stream, &rt.spec.name).await {
                Ok(Some(info)) => Some(info.num_ack_pending),
                _ => None,
            },
            _ => None,
        };
        let in_hand = self.unstarted();
        let all_in_hand = pending.is_some_and(|p| p <= in_hand);
        if all_in_hand || now >= until {
            tracing::info!(
                consumer = %rt.spec.name, pending, in_hand, all_in_hand,
                "the messages pending elsewhere are in hand or settled; ordered lanes start"
            );
            self.open_gate();
        }
    }

    /// Opens the gate: every lane releases its first message.
    fn open_gate(&mut self) {
        self.gate = None;
        let lanes: Vec<u64> = self.lanes.keys().copied().collect();
        for lane_id in lanes {
            self.release(lane_id);
        }
    }

    /// Messages in hand that no handler works on: held in lanes or ready for a slot.
    pub(super) fn unstarted(&self) -> usize {
        self.held + self.ready.len()
    }

    /// Bytes of [`Lanes::unstarted`].
    pub(super) fn unstarted_bytes(&self) -> usize {
        self.bytes
    }

    /// Whether some lane waits for a message to come back from the server, or the gate
    /// for the pending ones: the pull loop then keeps a pull request open whatever its
    /// bound says.
    pub(super) fn awaits_redelivery(&self) -> bool {
        self.awaiting > 0 || self.gate.is_some()
    }

    /// Whether a message may start as soon as a slot is free.
    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Takes in a message that arrived at `now`: into its key's lane (released at once
    /// when its key is free), or straight to the ready ones when it has no key.
    pub(super) fn admit(&mut self, message: async_nats::Message, now: Instant) {
        self.bytes += message.length;
        let held = Held {
            message,
            since: now,
        };
        let lane_and_seq = self.key_of.lane_of(&held.message).and_then(|lane| {
            let reply = held.message.reply.as_ref()?;
            Some((lane, AckSubject::parse(reply.as_str())?.stream_sequence))
        });
        let Some((lane_id, sequence)) = lane_and_seq else {
            self.ready.push_back(Ready { held, ticket: None });
            return;
        };
        let lane = match self.lanes.entry(lane_id) {
            // The key is free: the message starts as soon as a slot is (most messages
            // of a consumer with many keys take this way, with no hold at all).
            std::collections::hash_map::Entry::Vacant(free) if self.gate.is_none() => {
                free.insert(Lane {
                    dispatched: Some(sequence),
                    ..Lane::default()
                });
                self.ready.push_back(Ready {
                    held,
                    ticket: Some((lane_id, sequence)),
                });
                return;
            }
            entry => entry.or_default(),
        };
        if lane.awaiting.remove(&sequence).is_some() {
            self.awaiting -= 1;
        }
        match lane.held.insert(sequence, held) {
            // A newer delivery of a message already held replaces it.
            Some(older) => self.bytes = self.bytes.saturating_sub(older.message.length),
            None => self.held += 1,
        }
        self.release(lane_id);
    }

    /// Moves the lane's next message, if it may start, to the ready ones; forgets an
    /// idle lane.
    fn release(&mut self, lane_id: u64) {
        if self.gate.is_some() {
            return;
        }
        let Some(lane) = self.lanes.get_mut(&lane_id) else {
            return;
        };
        if let Some((sequence, held)) = lane.next() {
            self.held -= 1;
            self.ready.push_back(Ready {
                held,
                ticket: Some((lane_id, sequence)),
            });
        }
        if lane.is_idle() {
            self.lanes.remove(&lane_id);
        }
    }

    /// The next message to start, with the ticket its delivery reports back with.
    pub(super) fn pop_ready(&mut self) -> Option<(async_nats::Message, Option<LaneTicket>)> {
        let ready = self.ready.pop_front()?;
        self.bytes = self.bytes.saturating_sub(ready.held.message.length);
        let ticket = ready.ticket.map(|(lane, sequence)| LaneTicket {
            lane,
            sequence,
            to: self.finished_tx.clone(),
        });
        Some((ready.held.message, ticket))
    }

    /// Takes in the settlements reported since the last call (at `now`): a message gone
    /// for good frees its key, one that returns makes its lane await it.
    pub(super) fn take_finished(&mut self, now: Instant) {
        while let Ok(finished) = self.finished_rx.try_recv() {
            self.finish(finished, now);
        }
    }

    fn finish(&mut self, finished: Finished, now: Instant) {
        let Some(lane) = self.lanes.get_mut(&finished.lane) else {
            return;
        };
        if lane.dispatched == Some(finished.sequence) {
            lane.dispatched = None;
        }
        // A message that returns is awaited, unless a newer delivery of it is already
        // held (that one runs next).
        if let Settled::Returns { after } = finished.settled {
            if !lane.held.contains_key(&finished.sequence) {
                let give_up_at = now + after + 2 * self.ack_wait + AWAIT_MARGIN;
                if lane
                    .awaiting
                    .insert(finished.sequence, give_up_at)
                    .is_none()
                {
                    self.awaiting += 1;
                }
            }
        }
        self.release(finished.lane);
    }

    /// Gives up on awaited messages that did not come back in time (logged): their keys
    /// move on.
    pub(super) fn give_up_overdue(&mut self, consumer: &str, now: Instant) {
        if self.awaiting == 0 {
            return;
        }
        let mut moved = Vec::new();
        for (lane_id, lane) in &mut self.lanes {
            let before = lane.awaiting.len();
            lane.awaiting.retain(|sequence, give_up_at| {
                let keep = *give_up_at > now;
                if !keep {
                    tracing::warn!(consumer, seq = *sequence, "a retried message of an ordered key did not come back; the key moves on without it");
                }
                keep
            });
            if lane.awaiting.len() != before {
                self.awaiting -= before - lane.awaiting.len();
                moved.push(*lane_id);
            }
        }
        for lane_id in moved {
            self.release(lane_id);
        }
    }

    /// Sends a progress ack for every message in hand that has waited a third of the ack
    /// wait since it arrived or since its last progress ack, so none is redelivered
    /// while its key is busy.
    pub(super) async fn keep_alive<S>(&mut self, rt: &ConsumerRuntime<S>, now: Instant) {
        let due = self.ack_wait / 3;
        let held = self.lanes.values_mut().flat_map(|l| l.held.values_mut());
        for held in held.chain(self.ready.iter_mut().map(|r| &mut r.held)) {
            if now.duration_since(held.since) < due {
                continue;
            }
            if let Some(reply) = &held.message.reply {
                send_or_note(rt, reply, AckKind::Progress, None).await;
            }
            held.since = now;
        }
    }

    /// At shutdown: every message in hand that never started, to be handed back. The
    /// lanes keep what they await and what runs.
    pub(super) fn hand_back(&mut self) -> Vec<async_nats::Message> {
        let mut out: Vec<async_nats::Message> =
            self.ready.drain(..).map(|r| r.held.message).collect();
        for lane in self.lanes.values_mut() {
            out.extend(
                std::mem::take(&mut lane.held)
                    .into_values()
                    .map(|h| h.message),
            );
        }
        self.lanes.retain(|_, lane| !lane.is_idle());
        self.held = 0;
        self.bytes = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivery of `subject` with stream sequence `seq` (and delivery count 1).
    fn delivery(subject: &str, seq: u64) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: Some(format!("$JS.ACK.S.c.1.{seq}.{seq}.1700000000000000000.0").into()),
            payload: bytes::Bytes::new(),
            headers: None,
            status: None,
            description: None,
            length: 10,
        }
    }

    fn lanes() -> Lanes {
        Lanes::new(KeyOf::SubjectToken(1), Duration::from_secs(30))
    }

    /// The subjects and sequences ready to start, in order, taking them.
    fn started(lanes: &mut Lanes) -> Vec<(String, u64, LaneTicket)> {
        let mut out = Vec::new();
        while let Some((message, ticket)) = lanes.pop_ready() {
            let ticket = ticket.expect("keyed");
            out.push((message.subject.to_string(), ticket.sequence, ticket));
        }
        out
    }

    /// The subjects ready to start, keyed or not, taking them.
    fn started_any(lanes: &mut Lanes) -> Vec<String> {
        let mut out = Vec::new();
        while let Some((message, _)) = lanes.pop_ready() {
            out.push(message.subject.to_string());
        }
        out
    }

    fn seqs(started: &[(String, u64, LaneTicket)]) -> Vec<u64> {
        started.iter().map(|s| s.1).collect()
    }

    #[test]
    fn one_message_per_key_runs_and_keys_run_side_by_side() {
        let now = Instant::now();
        let mut l = lanes();
        for (seq, key) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b")] {
            l.admit(delivery(&format!("orders.{key}"), seq), now);
        }
        let first = started(&mut l);
        assert_eq!(seqs(&first), [1, 3], "one of each key");
        assert_eq!(l.unstarted(), 3);
        assert_eq!(l.unstarted_bytes(), 30);
        finish_all(&mut l, first, now);
        let second = started(&mut l);
        assert_eq!(seqs(&second), [2, 5]);
        finish_all(&mut l, second, now);
        let third = started(&mut l);
        assert_eq!(seqs(&third), [4]);
        finish_all(&mut l, third, now);
        assert!(l.lanes.is_empty(), "idle lanes are forgotten");
        assert_eq!(l.unstarted(), 0);
    }

    /// Lanes holding seq 2 of key `a` while seq 1, retried in 1 s, is out at the server.
    fn first_of_two_retried(now: Instant) -> Lanes {
        let mut l = lanes();
        l.admit(delivery("orders.a", 1), now);
        l.admit(delivery("orders.a", 2), now);
        let (_, _, ticket) = started(&mut l).pop().expect("seq 1 runs");
        ticket.finished(Settled::Returns {
            after: Duration::from_secs(1),
        });
        l.take_finished(now);
        l
    }

    /// Settles every started message as gone for good.
    fn finish_all(l: &mut Lanes, started: Vec<(String, u64, LaneTicket)>, now: Instant) {
        for (_, _, ticket) in started {
            ticket.finished(Settled::Gone);
        }
        l.take_finished(now);
    }

    #[test]
    fn a_retry_holds_its_key_until_it_comes_back() {
        let now = Instant::now();
        let mut l = first_of_two_retried(now);
        assert!(l.awaits_redelivery());
        assert!(started(&mut l).is_empty(), "seq 2 waits for seq 1");
        l.admit(delivery("orders.a", 3), now);
        assert!(started(&mut l).is_empty(), "so does seq 3");
        // Seq 1 comes back: it runs first, then 2, then 3.
        l.admit(delivery("orders.a", 1), now);
        assert!(!l.awaits_redelivery());
        let again = started(&mut l);
        assert_eq!(seqs(&again), [1]);
        finish_all(&mut l, again, now);
        assert_eq!(seqs(&started(&mut l)), [2]);
    }

    #[test]
    fn an_awaited_message_not_back_in_time_is_given_up() {
        let now = Instant::now();
        let mut l = first_of_two_retried(now);
        l.give_up_overdue("c", now + Duration::from_secs(60));
        assert!(started(&mut l).is_empty(), "within delay + 2 ack waits");
        l.give_up_overdue("c", now + Duration::from_secs(67));
        assert_eq!(seqs(&started(&mut l)), [2]);
        assert!(!l.awaits_redelivery());
    }

    #[test]
    fn an_earlier_message_may_pass_an_awaited_later_one() {
        let now = Instant::now();
        let mut l = lanes();
        l.admit(delivery("orders.a", 5), now);
        let (_, _, ticket) = started(&mut l).pop().expect("seq 5 runs");
        ticket.finished(Settled::Returns {
            after: Duration::ZERO,
        });
        l.take_finished(now);
        // Seq 3 (a redelivery from before) arrives: it is earlier than the awaited 5.
        l.admit(delivery("orders.a", 3), now);
        assert_eq!(seqs(&started(&mut l)), [3]);
    }

    #[test]
    fn messages_without_a_key_run_at_once_and_hand_back_takes_the_rest() {
        let now = Instant::now();
        let mut l = lanes();
        l.admit(delivery("orders", 1), now);
        l.admit(delivery("orders.a", 2), now);
        l.admit(delivery("orders.a", 3), now);
        let back = l.hand_back();
        assert_eq!(back.len(), 3);
        assert_eq!(l.unstarted(), 0);
        assert_eq!(l.unstarted_bytes(), 0);
        let mut l = lanes();
        l.admit(delivery("orders", 1), now);
        let (message, ticket) = l.pop_ready().expect("ready");
        assert!(ticket.is_none());
        assert_eq!(message.subject.as_str(), "orders");
    }

    #[test]
    fn keys_come_from_tokens_headers_and_functions() {
        let mut m = delivery("orders.eu.42", 1);
        let token = KeyOf::SubjectToken(2);
        let other = delivery("orders.us.42", 2);
        assert_eq!(token.lane_of(&m), token.lane_of(&other));
        assert_eq!(KeyOf::SubjectToken(3).lane_of(&m), None);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Order-Id", "7");
        m.headers = Some(headers);
        assert!(KeyOf::Header("Order-Id".into()).lane_of(&m).is_some());
        assert_eq!(KeyOf::Header("Other".into()).lane_of(&m), None);
        let f: KeyFn = Arc::new(|m| m.subject.split('.').nth(1).map(str::to_owned));
        let by_region = KeyOf::Function(f);
        assert_ne!(by_region.lane_of(&m), by_region.lane_of(&other));
    }

    #[test]
    fn a_closed_gate_holds_keyed_messages_and_opens_in_stream_order() {
        let now = Instant::now();
        let mut l = lanes();
        l.close_gate(now + Duration::from_secs(60));
        assert!(l.awaits_redelivery(), "a closed gate keeps a pull open");
        l.admit(delivery("orders.a", 7), now);
        // A redelivery of an earlier message arrives after a later one.
        l.admit(delivery("orders.a", 4), now);
        l.admit(delivery("orders", 9), now);
        let keyless = started_any(&mut l);
        assert_eq!(keyless, ["orders"], "only what has no key runs");
        assert_eq!(l.unstarted(), 2);
        l.open_gate();
        assert_eq!(seqs(&started(&mut l)), [4], "the earlier one first");
    }
}
