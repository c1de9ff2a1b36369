//! The three user interactions the platform tracks, as published by the front ends
//! (MessagePack maps, field names included, so fields can be added later).
//!
//! Every event has an `id` unique per event (the publisher also uses it as the
//! `Nats-Msg-Id`, and the aggregates use it to count each event once), a `user` and a
//! `time` in unix milliseconds; each kind adds its own fields.

use serde::{Deserialize, Serialize};

/// Longest event id accepted, in bytes. Ids become part of KV keys.
pub const MAX_ID_LEN: usize = 128;
/// Longest user or product name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// A page view or a click on the site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Click {
    /// Unique per event.
    pub id: String,
    /// Who clicked.
    pub user: String,
    /// When, in unix milliseconds.
    pub time: u64,
    /// Path of the page.
    pub page: String,
}

/// A completed purchase of one product.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Purchase {
    /// Unique per event.
    pub id: String,
    /// Who bought.
    pub user: String,
    /// When, in unix milliseconds.
    pub time: u64,
    /// What was bought (product name or SKU).
    pub product: String,
    /// Price paid, in cents.
    pub amount: u64,
}

/// A login attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    /// Unique per event.
    pub id: String,
    /// Who tried to log in.
    pub user: String,
    /// When, in unix milliseconds.
    pub time: u64,
    /// Whether it succeeded.
    pub success: bool,
    /// How (`password`, `oauth`, `sso`, ...), when the front end knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// The kind of an event; each kind has its own subject and consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// [`Click`].
    Click,
    /// [`Purchase`].
    Purchase,
    /// [`Login`].
    Login,
}

impl Kind {
    /// Every kind, in a stable order.
    pub const ALL: [Kind; 3] = [Kind::Click, Kind::Purchase, Kind::Login];

    /// The lowercase name, as used in subjects and keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Click => "click",
            Kind::Purchase => "purchase",
            Kind::Login => "login",
        }
    }

    /// The subject events of this kind are published to (`events.click`, ...).
    pub fn subject(self) -> String {
        format!("events.{}", self.as_str())
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Any one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyEvent {
    /// A click.
    Click(Click),
    /// A purchase.
    Purchase(Purchase),
    /// A login attempt.
    Login(Login),
}

impl From<Click> for AnyEvent {
    fn from(e: Click) -> Self {
        AnyEvent::Click(e)
    }
}

impl From<Purchase> for AnyEvent {
    fn from(e: Purchase) -> Self {
        AnyEvent::Purchase(e)
    }
}

impl From<Login> for AnyEvent {
    fn from(e: Login) -> Self {
        AnyEvent::Login(e)
    }
}

/// Why an event that decoded cannot be counted (it goes to the dead-letter stream).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    /// The id is empty.
    #[error("the event id is empty")]
    EmptyId,
    /// The id is longer than [`MAX_ID_LEN`].
    #[error("the event id is {0} bytes long (at most {MAX_ID_LEN})")]
    IdTooLong(usize),
    /// The user is empty.
    #[error("the user is empty")]
    EmptyUser,
    /// A name (user, product) is longer than [`MAX_NAME_LEN`].
    #[error("{field} is {len} bytes long (at most {MAX_NAME_LEN})")]
    NameTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}

impl AnyEvent {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            AnyEvent::Click(_) => Kind::Click,
            AnyEvent::Purchase(_) => Kind::Purchase,
            AnyEvent::Login(_) => Kind::Login,
        }
    }

    /// Its id.
    pub fn id(&self) -> &str {
        match self {
            AnyEvent::Click(e) => &e.id,
            AnyEvent::Purchase(e) => &e.id,
            AnyEvent::Login(e) => &e.id,
        }
    }

    /// Its user.
    pub fn user(&self) -> &str {
        match self {
            AnyEvent::Click(e) => &e.user,
            AnyEvent::Purchase(e) => &e.user,
            AnyEvent::Login(e) => &e.user,
        }
    }

    /// Its time, in unix milliseconds.
    pub fn time(&self) -> u64 {
        match self {
            AnyEvent::Click(e) => e.time,
            AnyEvent::Purchase(e) => e.time,
            AnyEvent::Login(e) => e.time,
        }
    }

    /// The minute it happened in (unix minutes).
    pub fn minute(&self) -> u64 {
        self.time() / 60_000
    }

    /// Checks what decoding cannot: ids and names usable as keys.
    pub fn validate(&self) -> Result<(), InvalidEvent> {
        let id = self.id();
        if id.is_empty() {
            return Err(InvalidEvent::EmptyId);
        }
        if id.len() > MAX_ID_LEN {
            return Err(InvalidEvent::IdTooLong(id.len()));
        }
        if self.user().is_empty() {
            return Err(InvalidEvent::EmptyUser);
        }
        let mut names = vec![("user", self.user())];
        if let AnyEvent::Purchase(p) = self {
            names.push(("product", &p.product));
        }
        for (field, name) in names {
            if name.len() > MAX_NAME_LEN {
                return Err(InvalidEvent::NameTooLong {
                    field,
                    len: name.len(),
                });
            }
        }
        Ok(())
    }

    /// The MessagePack payload, as the front ends publish it.
    pub fn encode(&self) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        match self {
            AnyEvent::Click(e) => rmp_serde::to_vec_named(e),
            AnyEvent::Purchase(e) => rmp_serde::to_vec_named(e),
            AnyEvent::Login(e) => rmp_serde::to_vec_named(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn click(id: &str, user: &str) -> AnyEvent {
        AnyEvent::Click(Click {
            id: id.into(),
            user: user.into(),
            time: 120_000,
            page: "/".into(),
        })
    }

    #[test]
    fn accessors_and_minute() {
        let e = click("e-1", "ann");
        assert_eq!(e.kind(), Kind::Click);
        assert_eq!(e.id(), "e-1");
        assert_eq!(e.user(), "ann");
        assert_eq!(e.minute(), 2);
        assert_eq!(Kind::Purchase.subject(), "events.purchase");
    }

    #[test]
    fn validation() {
        assert_eq!(click("e-1", "ann").validate(), Ok(()));
        assert_eq!(click("", "ann").validate(), Err(InvalidEvent::EmptyId));
        assert_eq!(click("e", "").validate(), Err(InvalidEvent::EmptyUser));
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            click(&long, "ann").validate(),
            Err(InvalidEvent::IdTooLong(MAX_ID_LEN + 1))
        );
        let p = AnyEvent::Purchase(Purchase {
            id: "p".into(),
            user: "ann".into(),
            time: 0,
            product: "y".repeat(MAX_NAME_LEN + 1),
            amount: 1,
        });
        assert!(matches!(
            p.validate(),
            Err(InvalidEvent::NameTooLong {
                field: "product",
                ..
            })
        ));
    }

    #[test]
    fn login_method_is_optional_on_the_wire() {
        #[derive(Serialize)]
        struct OldLogin {
            id: String,
            user: String,
            time: u64,
            success: bool,
        }
        let bytes = rmp_serde::to_vec_named(&OldLogin {
            id: "l".into(),
            user: "u".into(),
            time: 1,
            success: false,
        })
        .expect("encode");
        let login: Login = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(login.method, None);
        assert!(!login.success);
    }
}
