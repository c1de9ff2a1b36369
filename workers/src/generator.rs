//! Synthetic traffic with a realistic mix, for `workers publish`, `workers demo` and the
//! tests: mostly clicks, some purchases and logins, a few hundred users (some far more
//! active than others, a few of them trying passwords), a few dozen products with fixed
//! prices, occasional duplicates (as at-least-once publishers produce) and a small
//! share of malformed payloads (which must end in the dead-letter stream, reason
//! `decode`).
//!
//! Deterministic for a seed: the tests replay exactly what they published.

use std::collections::VecDeque;

use crate::events::{AnyEvent, Click, Kind, Login, Purchase};

/// A small, fast, seedable PRNG (SplitMix64). Not for cryptography.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`; 0 when `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }
}

/// The shape of the traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficConfig {
    /// Distinct users.
    pub users: u64,
    /// Distinct products.
    pub products: u64,
    /// Relative weights of clicks, purchases and logins.
    pub mix: [u32; 3],
    /// Share of logins that fail, for ordinary users.
    pub failed_login_ratio: f64,
    /// Share of outgoing messages that are malformed payloads.
    pub malformed_ratio: f64,
    /// Share of outgoing messages that republish a recent event (half with the same
    /// message id — the server drops them — half with a new one: the handlers must).
    pub duplicate_ratio: f64,
    /// Prefix of event ids; distinct per run so runs never share ids.
    pub run_id: String,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            users: 300,
            products: 36,
            mix: [70, 10, 20],
            failed_login_ratio: 0.2,
            malformed_ratio: 0.005,
            duplicate_ratio: 0.0,
            run_id: "run".to_string(),
        }
    }
}

impl TrafficConfig {
    /// The default shape with `workers publish`'s share of malformed payloads (0.5%),
    /// `duplicate_ratio` of duplicates and event ids prefixed by `run_id`.
    pub fn mixed(run_id: &str, duplicate_ratio: f64) -> Self {
        TrafficConfig {
            malformed_ratio: 0.005,
            duplicate_ratio,
            run_id: run_id.to_string(),
            ..TrafficConfig::default()
        }
    }
}

/// How a malformed payload is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformation {
    /// A valid encoding cut short.
    Truncated,
    /// Random bytes after a byte MessagePack never uses (0xc1).
    Garbage,
    /// Valid MessagePack of the wrong type (a string).
    WrongType,
}

/// What an outgoing message is.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A new event.
    Event(AnyEvent),
    /// An event sent before, again.
    Duplicate {
        /// The event.
        event: AnyEvent,
        /// Whether the message id is the original's (the server deduplicates it within
        /// the stream's duplicate window) or a new one (stored again).
        same_msg_id: bool,
    },
    /// Bytes that do not decode as the subject's event type.
    Malformed(Malformation),
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Subject (`events.<kind>`).
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// The payload bytes.
    pub bytes: Vec<u8>,
    /// What it is.
    pub payload: Payload,
}

impl Outgoing {
    /// The event it carries, if it carries one (new or duplicate).
    pub fn event(&self) -> Option<&AnyEvent> {
        match &self.payload {
            Payload::Event(e) | Payload::Duplicate { event: e, .. } => Some(e),
            Payload::Malformed(_) => None,
        }
    }
}

const ADJECTIVES: [&str; 6] = ["Blue", "Red", "Green", "Black", "White", "Vintage"];
const NOUNS: [&str; 6] = ["Mug", "T-Shirt", "Hoodie", "Poster", "Notebook", "Backpack"];
const PAGES: [&str; 6] = ["/", "/search", "/cart", "/checkout", "/account", "/deals"];
/// Recent events kept for duplicates.
const RECENT: usize = 256;

/// The traffic generator.
#[derive(Debug, Clone)]
pub struct Traffic {
    config: TrafficConfig,
    rng: SplitMix64,
    sequence: u64,
    recent: VecDeque<(AnyEvent, String)>,
}

impl Traffic {
    /// A generator for `config`, deterministic for `seed`.
    pub fn new(config: TrafficConfig, seed: u64) -> Self {
        Traffic {
            config,
            rng: SplitMix64::new(seed),
            sequence: 0,
            recent: VecDeque::with_capacity(RECENT),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TrafficConfig {
        &self.config
    }

    /// The `i`th product's name.
    pub fn product_name(i: u64) -> String {
        let n = ADJECTIVES.len() as u64 * NOUNS.len() as u64;
        let base = format!(
            "{} {}",
            ADJECTIVES[(i / NOUNS.len() as u64 % ADJECTIVES.len() as u64) as usize],
            NOUNS[(i % NOUNS.len() as u64) as usize]
        );
        if i < n {
            base
        } else {
            format!("{base} {}", i / n + 1)
        }
    }

    /// The `i`th product's price in cents (fixed per product: 4.99 to 199.99).
    pub fn product_price(i: u64) -> u64 {
        499 + (crate::keys::stable_hash(&Traffic::product_name(i)) % 196) * 100
    }

    /// The `i`th user's name (an e-mail address: exercises key encoding).
    pub fn user_name(i: u64) -> String {
        format!("user{i}@example.com")
    }

    /// Whether the `i`th user is one who fails most logins (1 in 40).
    pub fn is_suspicious(i: u64) -> bool {
        i % 40 == 7
    }

    /// The next message, with events timed at `time_ms`.
    pub fn next_message(&mut self, time_ms: u64) -> Outgoing {
        if self.rng.chance(self.config.malformed_ratio) {
            return self.malformed(time_ms);
        }
        if !self.recent.is_empty() && self.rng.chance(self.config.duplicate_ratio) {
            let i = self.rng.below(self.recent.len() as u64) as usize;
            if let Some((event, msg_id)) = self.recent.get(i).cloned() {
                let same_msg_id = self.rng.chance(0.5);
                self.sequence += 1;
                let msg_id = if same_msg_id {
                    msg_id
                } else {
                    format!("{msg_id}~dup{}", self.sequence)
                };
                return Outgoing {
                    subject: event.kind().subject(),
                    msg_id,
                    bytes: encode(&event),
                    payload: Payload::Duplicate { event, same_msg_id },
                };
            }
        }
        let event = self.event(time_ms);
        let msg_id = event.id().to_string();
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((event.clone(), msg_id.clone()));
        Outgoing {
            subject: event.kind().subject(),
            msg_id,
            bytes: encode(&event),
            payload: Payload::Event(event),
        }
    }

    fn kind(&mut self) -> Kind {
        let [c, p, l] = self.config.mix.map(u64::from);
        let roll = self.rng.below((c + p + l).max(1));
        if roll < c {
            Kind::Click
        } else if roll < c + p {
            Kind::Purchase
        } else {
            Kind::Login
        }
    }

    /// A skewed pick: low indices are much more likely (a few heavy users, a long tail).
    fn skewed(&mut self, n: u64) -> u64 {
        let u = self.rng.next_f64();
        ((u * u * n as f64) as u64).min(n.saturating_sub(1))
    }

    fn event(&mut self, time: u64) -> AnyEvent {
        self.sequence += 1;
        let id = format!("{}-{}", self.config.run_id, self.sequence);
        let user_index = self.skewed(self.config.users.max(1));
        let user = Traffic::user_name(user_index);
        match self.kind() {
            Kind::Click => {
                let page = if self.rng.chance(0.4) {
                    let p = self.skewed(self.config.products.max(1));
                    format!(
                        "/products/{}",
                        Traffic::product_name(p).to_lowercase().replace(' ', "-")
                    )
                } else {
                    PAGES[self.rng.below(PAGES.len() as u64) as usize].to_string()
                };
                AnyEvent::Click(Click {
                    id,
                    user,
                    time,
                    page,
                })
            }
            Kind::Purchase => {
                let p = self.skewed(self.config.products.max(1));
                AnyEvent::Purchase(Purchase {
                    id,
                    user,
                    time,
                    product: Traffic::product_name(p),
                    amount: Traffic::product_price(p),
                })
            }
            Kind::Login => {
                let fail_ratio = if Traffic::is_suspicious(user_index) {
                    0.8
                } else {
                    self.config.failed_login_ratio
                };
                let success = !self.rng.chance(fail_ratio);
                let method = match self.rng.below(20) {
                    0 => None,
                    1..=2 => Some("sso"),
                    3..=7 => Some("oauth"),
                    _ => Some("password"),
                };
                AnyEvent::Login(Login {
                    id,
                    user,
                    time,
                    success,
                    method: method.map(str::to_string),
                })
            }
        }
    }

    fn malformed(&mut self, time: u64) -> Outgoing {
        self.sequence += 1;
        let msg_id = format!("{}-bad-{}", self.config.run_id, self.sequence);
        let kind = self.kind();
        let how = match self.rng.below(3) {
            0 => Malformation::Truncated,
            1 => Malformation::Garbage,
            _ => Malformation::WrongType,
        };
        let bytes = match how {
            Malformation::Truncated => {
                // A real event's encoding, cut short: the decoder runs out of bytes.
                let saved = self.sequence;
                let event = self.event(time);
                self.sequence = saved;
                let mut bytes = encode(&event);
                let keep = self.rng.below(bytes.len() as u64) as usize;
                bytes.truncate(keep);
                bytes
            }
            Malformation::Garbage => {
                let len = 8 + self.rng.below(32) as usize;
                let mut bytes = vec![0xc1];
                bytes.extend((0..len).map(|_| self.rng.next_u64() as u8));
                bytes
            }
            Malformation::WrongType => {
                rmp_serde::to_vec("this is not an event").unwrap_or_else(|_| vec![0xc1])
            }
        };
        Outgoing {
            subject: kind.subject(),
            msg_id,
            bytes,
            payload: Payload::Malformed(how),
        }
    }
}

fn encode(event: &AnyEvent) -> Vec<u8> {
    // Our own plain structs always encode; an empty payload would only be dead-lettered.
    event.encode().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetworker::CodecKind;
    use std::collections::{BTreeSet, HashSet};

    fn decodes(kind: Kind, bytes: &[u8]) -> bool {
        match kind {
            Kind::Click => jetworker::decode::<Click>(CodecKind::Msgpack, bytes).is_ok(),
            Kind::Purchase => jetworker::decode::<Purchase>(CodecKind::Msgpack, bytes).is_ok(),
            Kind::Login => jetworker::decode::<Login>(CodecKind::Msgpack, bytes).is_ok(),
        }
    }

    fn kind_of(subject: &str) -> Kind {
        Kind::ALL
            .into_iter()
            .find(|k| k.subject() == subject)
            .expect("a known subject")
    }

    #[test]
    fn splitmix_is_deterministic_and_uniform_enough() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        assert_eq!(a.next_u64(), b.next_u64());
        let mean: f64 = (0..10_000).map(|_| a.next_f64()).sum::<f64>() / 10_000.0;
        assert!((0.48..0.52).contains(&mean), "{mean}");
        assert_eq!(a.below(0), 0);
    }

    #[test]
    fn the_mix_is_realistic() {
        let config = TrafficConfig {
            malformed_ratio: 0.005,
            duplicate_ratio: 0.02,
            ..TrafficConfig::default()
        };
        let mut traffic = Traffic::new(config, 42);
        let n = 20_000;
        let (mut kinds, mut malformed, mut dups, mut failed) = ([0u32; 3], 0, 0, 0);
        let mut users = BTreeSet::new();
        let mut products = BTreeSet::new();
        for i in 0..n {
            let out = traffic.next_message(1_700_000_000_000 + i);
            match &out.payload {
                Payload::Event(e) => {
                    assert!(e.validate().is_ok());
                    assert_eq!(out.msg_id, e.id());
                    assert_eq!(out.subject, e.kind().subject());
                    assert!(decodes(e.kind(), &out.bytes));
                    kinds[Kind::ALL.iter().position(|k| *k == e.kind()).expect("kind")] += 1;
                    users.insert(e.user().to_string());
                    match e {
                        AnyEvent::Purchase(p) => {
                            products.insert(p.product.clone());
                            assert!(p.amount >= 499);
                        }
                        AnyEvent::Login(l) if !l.success => failed += 1,
                        _ => {}
                    }
                }
                Payload::Duplicate { .. } => dups += 1,
                Payload::Malformed(_) => {
                    malformed += 1;
                    assert!(!decodes(kind_of(&out.subject), &out.bytes), "{out:?}");
                }
            }
        }
        let share = |c: u32| f64::from(c) / n as f64;
        assert!((0.66..0.72).contains(&share(kinds[0])), "{kinds:?}");
        assert!((0.08..0.12).contains(&share(kinds[1])), "{kinds:?}");
        assert!((0.17..0.23).contains(&share(kinds[2])), "{kinds:?}");
        assert!(
            (0.03..0.07).contains(&share(failed)),
            "failed logins {failed}"
        );
        assert!(
            (0.002..0.009).contains(&share(malformed)),
            "malformed {malformed}"
        );
        assert!((0.01..0.03).contains(&share(dups)), "duplicates {dups}");
        assert!(users.len() > 200, "{}", users.len());
        assert!(products.len() > 20, "{}", products.len());
    }

    #[test]
    fn ids_are_unique_and_prefixed_by_the_run() {
        let mut traffic = Traffic::new(
            TrafficConfig {
                run_id: "r1".into(),
                malformed_ratio: 0.1,
                ..TrafficConfig::default()
            },
            1,
        );
        let mut ids = HashSet::new();
        for i in 0..5_000 {
            let out = traffic.next_message(i);
            assert!(out.msg_id.starts_with("r1-"));
            assert!(ids.insert(out.msg_id), "duplicate message id");
        }
    }

    #[test]
    fn every_malformation_fails_to_decode() {
        let mut traffic = Traffic::new(
            TrafficConfig {
                malformed_ratio: 1.0,
                ..TrafficConfig::default()
            },
            3,
        );
        let mut hows = BTreeSet::new();
        for i in 0..3_000 {
            let out = traffic.next_message(i);
            let Payload::Malformed(how) = out.payload else {
                panic!("expected malformed")
            };
            hows.insert(format!("{how:?}"));
            for kind in Kind::ALL {
                assert!(!decodes(kind, &out.bytes), "{how:?} {:?}", out.bytes);
            }
        }
        assert_eq!(hows.len(), 3);
    }

    #[test]
    fn duplicates_repeat_recent_events() {
        let mut traffic = Traffic::new(
            TrafficConfig {
                duplicate_ratio: 0.5,
                malformed_ratio: 0.0,
                ..TrafficConfig::default()
            },
            9,
        );
        let mut sent = std::collections::HashMap::new();
        let (mut same, mut new) = (0, 0);
        for i in 0..2_000 {
            let out = traffic.next_message(i);
            match &out.payload {
                Payload::Event(e) => {
                    sent.insert(e.id().to_string(), e.clone());
                }
                Payload::Duplicate { event, same_msg_id } => {
                    assert_eq!(sent.get(event.id()), Some(event));
                    assert_eq!(out.msg_id == event.id(), *same_msg_id);
                    if *same_msg_id {
                        same += 1;
                    } else {
                        new += 1;
                    }
                }
                Payload::Malformed(_) => unreachable!(),
            }
        }
        assert!(same > 300 && new > 300, "{same} {new}");
    }

    #[test]
    fn products_have_names_and_prices() {
        assert_eq!(Traffic::product_name(0), "Blue Mug");
        assert_eq!(Traffic::product_name(7), "Red T-Shirt");
        assert_eq!(Traffic::product_name(36), "Blue Mug 2");
        for i in 0..100 {
            let p = Traffic::product_price(i);
            assert!((499..=19_999).contains(&p), "{p}");
            assert_eq!(p, Traffic::product_price(i));
        }
    }
}
