//! The handlers (`track_click`, `track_purchase`, `track_login`) and the state they
//! share: the `analytics` key-value bucket, opened once per process.
//!
//! Every handler validates the event (an event that cannot be counted is a permanent
//! error: dead-lettered at once), then applies its [`applications`] exactly once. Any KV
//! failure is transient: the message is retried on the consumer's schedule, and the
//! retry resumes where the failed run stopped (see [`crate::counters`]).

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use jetworker::{App, Context, Event, HandlerError, ResultExt};
use tokio::sync::OnceCell;

use crate::aggregates::{applications, counter, DEFAULT_FLAG_THRESHOLD};
use crate::counters::{self, Applied, Faults, RunOptions};
use crate::events::{AnyEvent, Click, Login, Purchase};
use crate::keys;

/// The bucket's name in `streams.toml`.
pub const BUCKET: &str = "analytics";

/// The handlers' shared state.
pub struct Analytics {
    bucket: String,
    store: OnceCell<kv::Store>,
    flag_threshold: u64,
    faults: Option<Arc<dyn Faults>>,
}

impl Default for Analytics {
    fn default() -> Self {
        Analytics::new()
    }
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics")
            .field("bucket", &self.bucket)
            .field("opened", &self.store.initialized())
            .field("flag_threshold", &self.flag_threshold)
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

impl Analytics {
    /// State for the [`BUCKET`] bucket and the default flag threshold.
    pub fn new() -> Self {
        Analytics {
            bucket: BUCKET.to_string(),
            store: OnceCell::new(),
            flag_threshold: DEFAULT_FLAG_THRESHOLD,
            faults: None,
        }
    }

    /// Uses another bucket.
    pub fn with_bucket(mut self, bucket: &str) -> Self {
        self.bucket = bucket.to_string();
        self
    }

    /// Flags users once their failed logins reach `threshold`.
    pub fn with_flag_threshold(mut self, threshold: u64) -> Self {
        self.flag_threshold = threshold.max(1);
        self
    }

    /// Injects faults into the counting protocol (tests, chaos drills).
    pub fn with_faults(mut self, faults: Arc<dyn Faults>) -> Self {
        self.faults = Some(faults);
        self
    }

    /// The flag threshold.
    pub fn flag_threshold(&self) -> u64 {
        self.flag_threshold
    }

    /// The bucket, opened on first use (a failure is not cached: the next call retries).
    pub async fn store(&self, js: Option<&jetstream::Context>) -> Result<&kv::Store, HandlerError> {
        self.store
            .get_or_try_init(|| async {
                let js = js.ok_or_else(|| {
                    HandlerError::permanent("no JetStream context: run the handlers in a jetworker App")
                })?;
                js.get_key_value(self.bucket.as_str()).await.map_err(|e| {
                    HandlerError::transient(format!(
                        "cannot open kv bucket {:?} (is it declared under [[kv_buckets]] in streams.toml and provisioned?): {e}",
                        self.bucket
                    ))
                })
            })
            .await
    }
}

/// The app with every handler registered under the names `streams.toml` uses.
pub fn app(state: Analytics) -> App<Analytics> {
    App::new(state)
        .handler("track_click", track_click)
        .handler("track_purchase", track_purchase)
        .handler("track_login", track_login)
}

/// Counts a click.
pub async fn track_click(event: Event<Click>, ctx: Context<Analytics>) -> Result<(), HandlerError> {
    count(event.into_inner().into(), &ctx).await
}

/// Counts a purchase: revenue per minute and in total, purchases per product.
pub async fn track_purchase(
    event: Event<Purchase>,
    ctx: Context<Analytics>,
) -> Result<(), HandlerError> {
    count(event.into_inner().into(), &ctx).await
}

/// Counts a login attempt; flags users who fail too often.
pub async fn track_login(event: Event<Login>, ctx: Context<Analytics>) -> Result<(), HandlerError> {
    count(event.into_inner().into(), &ctx).await
}

/// Applies one event to the aggregates, exactly once.
pub async fn count(event: AnyEvent, ctx: &Context<Analytics>) -> Result<(), HandlerError> {
    event.validate().permanent()?;
    let state = ctx.state();
    let kv = state.store(ctx.jetstream()).await?;
    let options = RunOptions {
        resuming: ctx.attempt() > 1,
        faults: state.faults.as_deref(),
    };
    let [own, active] = applications(&event);
    let applied = counters::apply_once(kv, &own, options).await?;
    let first_in_minute = counters::apply_once(kv, &active, options).await? == Applied::Now;
    if let AnyEvent::Login(login) = &event {
        if !login.success {
            flag_if_needed(kv, &login.user, state.flag_threshold).await?;
        }
    }
    tracing::debug!(
        kind = %event.kind(),
        id = event.id(),
        minute = event.minute(),
        attempt = ctx.attempt(),
        duplicate = applied == Applied::Already,
        first_in_minute,
        "counted"
    );
    Ok(())
}

/// Creates `flag.<user>` when the user's failed logins reached `threshold`. Runs on every
/// delivery of a failed login (duplicates included), so a crash between the count and
/// the flag is repaired by the redelivery.
async fn flag_if_needed(kv: &kv::Store, user: &str, threshold: u64) -> Result<(), HandlerError> {
    let failed = counters::read_record(kv, &keys::user_record(user))
        .await?
        .map(|(record, _)| record.count(counter::FAILED))
        .unwrap_or(0);
    if failed < threshold {
        return Ok(());
    }
    let value = serde_json::json!({ "user": user, "failed_at_flagging": failed });
    if counters::create_once(kv, &keys::flag(user), Bytes::from(value.to_string())).await? {
        tracing::warn!(
            user,
            failed_logins = failed,
            threshold,
            "user flagged: too many failed logins"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetworker::HandlerErrorKind;

    #[tokio::test]
    async fn invalid_events_are_permanent_failures() {
        let ctx = Context::new(Arc::new(Analytics::new()), "events.click", 1);
        let click = Click {
            id: String::new(),
            user: "ann".into(),
            time: 0,
            page: "/".into(),
        };
        let e = track_click(Event::new(click), ctx)
            .await
            .expect_err("no id");
        assert_eq!(e.kind(), HandlerErrorKind::Permanent);
    }

    #[tokio::test]
    async fn no_jetstream_is_a_permanent_failure() {
        let ctx = Context::new(Arc::new(Analytics::new()), "events.click", 1);
        let click = Click {
            id: "c1".into(),
            user: "ann".into(),
            time: 0,
            page: "/".into(),
        };
        let e = track_click(Event::new(click), ctx)
            .await
            .expect_err("no js");
        assert_eq!(e.kind(), HandlerErrorKind::Permanent);
    }
}
