//! Provisioning: compare what the config wants with what the server has, and apply the
//! difference without ever deleting or silently overwriting anything.
//!
//! - [`desired`] turns a validated [`Config`](crate::Config) into
//!   [`StreamSpec`](spec::StreamSpec)s and [`ConsumerSpec`]s.
//! - [`fetch_actual`](apply::fetch_actual) reads the same fields from a server into an
//!   [`Actual`].
//! - [`plan()`] (pure) compares them: per stream and consumer, create, update (with the
//!   changed fields), unchanged, or conflict (a change the server cannot apply in place,
//!   with the field and what to do).
//! - [`apply`](apply::apply) carries out a plan that has no conflicts. It changes only
//!   the fields jetworker manages; any other setting made on the server by hand is kept.
//!
//! # Layout
//! - `spec`: the managed fields as specs, the conversions config -> spec, server config
//!   -> spec and spec -> server config, [`ServerVersion`]. Pure.
//! - `plan`: [`plan()`]`(desired, actual) -> `[`Plan`], the field diffs, [`Action`]s and
//!   the plan's text. Pure.
//! - `apply`: the I/O: `fetch_actual`, [`get_stream`], [`consumer_info`], `apply`,
//!   recreating a consumer deleted behind the runtime's back, [`provision`].
//! - `error`: [`ProvisionError`] and its [`ProvisionErrorKind`].
//!
//! Submodules import their siblings and the crate's leaf modules, never this one.

mod apply;
mod error;
mod plan;
mod spec;

pub(crate) use apply::recreate_consumer;
pub use apply::{consumer_info, get_stream, provision};
pub use error::{ProvisionError, ProvisionErrorKind};
pub use plan::{plan, Action, Plan};
pub(crate) use spec::{consumer_spec, ConsumerSpec};
pub use spec::{desired, Actual, Desired, ServerVersion};
