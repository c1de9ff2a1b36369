//! The I/O of provisioning: read what the server has ([`fetch_actual`]), apply a plan
//! without conflicts ([`apply`]), and both with the plan in between ([`provision`]).
//! [`apply`] changes only the fields jetworker manages; any other setting made on the
//! server by hand is kept.

use std::collections::HashMap;

use async_nats::jetstream::{self, consumer, stream};

use super::error::{request_error, vanished, ProvisionError};
use super::plan::{plan, Action, Plan};
use super::spec::{
    apply_consumer_spec, apply_kv_spec, apply_stream_spec, consumer_spec_from_server, desired,
    kv_spec_from_server, new_consumer_config, new_kv_stream_config, stream_spec_from_server,
    Actual, ConsumerSpec, Desired, ServerVersion,
};
use crate::config::Config;

/// Reads the server's state for every stream and consumer the config names.
pub async fn fetch_actual(
    js: &jetstream::Context,
    server_version: ServerVersion,
    desired: &Desired,
) -> Result<Actual, ProvisionError> {
    let mut actual = Actual {
        server_version,
        ..Actual::default()
    };
    let mut handles: HashMap<String, stream::Stream> = HashMap::new();
    for want in &desired.streams {
        if let Some(s) = get_stream(js, &want.name).await? {
            actual.streams.insert(
                want.name.clone(),
                stream_spec_from_server(&s.cached_info().config),
            );
            handles.insert(want.name.clone(), s);
        }
    }
    for want in &desired.kv_buckets {
        if let Some(s) = get_stream(js, &want.stream_name()).await? {
            actual.kv_buckets.insert(
                want.name.clone(),
                kv_spec_from_server(&want.name, &s.cached_info().config),
            );
        }
    }
    for want in &desired.consumers {
        let stream = match handles.get(&want.stream) {
            Some(s) => s.clone(),
            None => match get_stream(js, &want.stream).await? {
                Some(s) => s,
                None => continue,
            },
        };
        if let Some(info) = consumer_info(&stream, &want.name).await? {
            actual.consumers.insert(
                (want.stream.clone(), want.name.clone()),
                consumer_spec_from_server(&want.stream, &want.name, &info.config),
            );
        }
    }
    Ok(actual)
}

/// The stream, or `None` when it does not exist.
pub async fn get_stream(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Stream>, ProvisionError> {
    match js.get_stream(name).await {
        Ok(s) => Ok(Some(s)),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(request_error(format!("reading stream {name:?}"), e)),
        },
    }
}

/// The consumer's info, or `None` when it does not exist.
pub async fn consumer_info(
    stream: &stream::Stream,
    name: &str,
) -> Result<Option<consumer::Info>, ProvisionError> {
    use jetstream::context::ConsumerInfoErrorKind as Kind;
    match stream.consumer_info(name).await {
        Ok(info) => Ok(Some(info)),
        Err(e) => match e.kind() {
            Kind::NotFound => Ok(None),
            Kind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(request_error(format!("reading consumer {name:?}"), e)),
        },
    }
}

/// What [`apply`] did, per stream and consumer (same order as the plan).
pub type Applied = Plan;

/// Applies a plan computed against the server now. With any conflict, nothing is done.
pub async fn apply(
    js: &jetstream::Context,
    desired: &Desired,
    plan: &Plan,
) -> Result<Applied, ProvisionError> {
    if plan.has_conflicts() {
        return Err(ProvisionError::conflicts(plan.clone()));
    }
    for (want, step) in desired.streams.iter().zip(&plan.streams) {
        match &step.action {
            Action::Create => {
                // Direct gets (by any replica, without the JetStream API) are how a
                // worker reads back each dead letter it stores; not a managed field:
                // a stream made otherwise keeps its setting.
                let mut c = stream::Config {
                    allow_direct: true,
                    ..Default::default()
                };
                apply_stream_spec(want, &mut c);
                js.create_stream(c)
                    .await
                    .map_err(|e| request_error(format!("creating stream {:?}", want.name), e))?;
            }
            Action::Update(_) => {
                let current = get_stream(js, &want.name).await?.ok_or_else(|| {
                    vanished(
                        format_args!("updating stream {:?}", want.name),
                        "it disappeared while provisioning",
                    )
                })?;
                let mut c = current.cached_info().config.clone();
                apply_stream_spec(want, &mut c);
                js.update_stream(c)
                    .await
                    .map_err(|e| request_error(format!("updating stream {:?}", want.name), e))?;
            }
            Action::Unchanged | Action::Conflict { .. } => {}
        }
    }
    for (want, step) in desired.kv_buckets.iter().zip(&plan.kv_buckets) {
        let what = || format!("{} kv bucket {:?}", step.action.word(), want.name);
        match &step.action {
            Action::Create => {
                let c = new_kv_stream_config(want);
                js.create_stream(c)
                    .await
                    .map_err(|e| request_error(what(), e))?;
            }
            Action::Update(_) => {
                let current = get_stream(js, &want.stream_name())
                    .await?
                    .ok_or_else(|| vanished(what(), "it disappeared while provisioning"))?;
                let mut c = current.cached_info().config.clone();
                apply_kv_spec(want, &mut c);
                js.update_stream(c)
                    .await
                    .map_err(|e| request_error(what(), e))?;
            }
            Action::Unchanged | Action::Conflict { .. } => {}
        }
    }
    for (want, step) in desired.consumers.iter().zip(&plan.consumers) {
        let what = || {
            format!(
                "{} consumer {}/{}",
                step.action.word(),
                want.stream,
                want.name
            )
        };
        let config = match &step.action {
            Action::Create => new_consumer_config(want),
            Action::Update(_) => {
                let stream = get_stream(js, &want.stream)
                    .await?
                    .ok_or_else(|| vanished(what(), "its stream disappeared"))?;
                let mut c = consumer_info(&stream, &want.name)
                    .await?
                    .ok_or_else(|| vanished(what(), "it disappeared while provisioning"))?
                    .config;
                apply_consumer_spec(want, &mut c);
                c
            }
            Action::Unchanged | Action::Conflict { .. } => continue,
        };
        ensure_consumer(js, &want.stream, config)
            .await
            .map_err(|e| request_error(what(), e))?;
    }
    Ok(plan.clone())
}

/// Creates (or, for an existing durable, updates) a consumer from a full config.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    config: consumer::Config,
) -> Result<consumer::Info, async_nats::Error> {
    let consumer = js.create_consumer_on_stream(config, stream).await?;
    Ok(consumer.cached_info().clone())
}

/// Creates one consumer from its spec when it is missing (used by the runtime when a
/// consumer was deleted behind its back). Returns its info.
///
/// With `resume_after` (the old consumer's last known ack floor, a stream sequence), the
/// new one starts at the next sequence instead of at its `deliver_policy`: what the old
/// one had acknowledged is not delivered again. (A deliver policy differs from the
/// config's then, which provisioning does not count as a change.)
pub async fn recreate_consumer(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    resume_after: Option<u64>,
) -> Result<consumer::Info, async_nats::Error> {
    let mut config = new_consumer_config(spec);
    if let Some(floor) = resume_after.filter(|floor| *floor > 0) {
        config.deliver_policy = consumer::DeliverPolicy::ByStartSequence {
            start_sequence: floor.saturating_add(1),
        };
    }
    ensure_consumer(js, &spec.stream, config).await
}

/// Reads the server, plans, and (unless `dry_run`) applies. Returns the plan.
pub async fn provision(
    client: &async_nats::Client,
    js: &jetstream::Context,
    config: &Config,
    dry_run: bool,
) -> Result<Plan, ProvisionError> {
    let version = ServerVersion::parse(&client.server_info().version).unwrap_or_default();
    let desired = desired(config);
    let actual = fetch_actual(js, version, &desired).await?;
    let plan = plan(&desired, &actual);
    if !dry_run {
        apply(js, &desired, &plan).await?;
        ensure_payload_buckets(js, config).await?;
    } else if plan.has_conflicts() {
        return Err(ProvisionError::conflicts(plan));
    }
    Ok(plan)
}

/// Creates, next to every dead-letter stream of the config, the object-store bucket that
/// keeps payloads too large for a dead-letter copy (see
/// [`payload_bucket`](crate::dead_letter::payload_bucket)), when missing. It takes the
/// dead-letter stream's storage, replicas and max age.
async fn ensure_payload_buckets(
    js: &jetstream::Context,
    config: &Config,
) -> Result<(), ProvisionError> {
    let mut names: Vec<&str> = config
        .consumers
        .iter()
        .filter_map(|c| {
            config.streams.iter().find(|s| {
                s.subjects
                    .iter()
                    .any(|ss| crate::subject::overlaps(ss, &c.dead_letter_subject))
            })
        })
        .map(|s| s.name.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let what = || format!("creating the payload bucket of dead-letter stream {name:?}");
        let stream = get_stream(js, name)
            .await?
            .ok_or_else(|| vanished(what(), "the stream disappeared while provisioning"))?;
        crate::dead_letter::payload_store(js, stream.cached_info())
            .await
            .map_err(|e| request_error(what(), e))?;
    }
    Ok(())
}
