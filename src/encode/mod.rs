//! Encoding: turns a normalised [`Group`] into the broker-neutral [`Message`]s sinks publish,
//! with the CloudEvents headers (`ce_*`), `content-type`, `trace_id` and `traceparent`.
//! The body format is an [`Encoder`]: JSON always (the file sink and JSON sinks), Avro as well
//! when a broker sink has `format = "avro"`.

pub mod avro;
pub mod json;
pub mod registry;

use std::sync::Arc;

use crate::normalize::Group;
use crate::record::{header_safe, into_header_safe, Body, EntityKind, Record};
use crate::sink::{Message, Route, RECORD_HEADERS};

/// A sink's body format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON documents (`application/json`).
    #[default]
    Json,
    /// Avro binary in the Confluent wire format, schemas from `[schema_registry]`.
    Avro,
}

/// Why a record could not be encoded (fatal: a bug or a schema mismatch, never input data).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode record {id}: {message}")]
pub struct EncodeError {
    /// The record id.
    pub id: String,
    /// The cause.
    pub message: String,
}

/// A body format.
pub trait Encoder: Send + Sync {
    /// The `content-type` header value.
    fn content_type(&self) -> &str;
    /// Encodes one record.
    fn encode(&self, record: &Record) -> Result<Vec<u8>, EncodeError>;
}

/// The topic / subject family a record goes to.
pub(crate) fn route_of(record: &Record) -> Route {
    match &record.body {
        Body::Entity {
            kind: EntityKind::Node,
            ..
        } => Route::Nodes,
        Body::Entity {
            kind: EntityKind::Link,
            ..
        } => Route::Links,
        Body::StatusChanged { .. } => Route::Status,
        Body::HistoryBatch { .. } | Body::Gap { .. } => Route::History,
        Body::DeadLetter { .. } => Route::DeadLetter,
        Body::Job { .. } => Route::Jobs,
    }
}

/// The record's headers. Several values come from the server (ids, times, the uid in the
/// source); a control byte in any of them would make a broker refuse the message and stop the
/// stream, so every value is made header-safe.
fn headers(record: &Record, content_type: &str) -> Vec<(&'static str, String)> {
    headers_traced(record, content_type, None)
}

/// [`headers`], with the `traceparent` of the record's own span where it has one.
fn headers_traced(
    record: &Record,
    content_type: &str,
    traceparent: Option<&str>,
) -> Vec<(&'static str, String)> {
    // In the order of `RECORD_HEADERS`.
    let values: [String; RECORD_HEADERS.len()] = [
        "1.0".to_string(),
        record.id.clone(),
        record.event_type(),
        record.source.clone(),
        record.subject.clone(),
        record.time.clone(),
        content_type.to_string(),
        record.trace.trace_id.clone(),
        traceparent.unwrap_or(&record.trace.traceparent).to_string(),
    ];
    RECORD_HEADERS
        .into_iter()
        .zip(values)
        .map(|(k, v)| (k, into_header_safe(v)))
        .collect()
}

/// The messages of one group, in publish order: each record, then the delete's tombstone.
pub fn to_messages(group: &Group, encoder: &dyn Encoder) -> Result<Vec<Arc<Message>>, EncodeError> {
    to_messages_with(group, Some(encoder), None, &[])
}

/// [`to_messages`], with each record in Avro when an Avro sink needs it, and in JSON only
/// when `json` is given (some sink writes JSON): encoding a format no sink publishes would
/// only cost time on the pipeline task. `traceparents[i]`, where given, is the `traceparent`
/// of record `i`'s own span (tracing on).
pub fn to_messages_with(
    group: &Group,
    json: Option<&dyn Encoder>,
    avro_enc: Option<&avro::AvroEncoder>,
    traceparents: &[Option<&str>],
) -> Result<Vec<Arc<Message>>, EncodeError> {
    let content_type = json.map_or("application/avro", |e| e.content_type());
    let mut out = Vec::with_capacity(group.records.len() + 1);
    for (i, record) in group.records.iter().enumerate() {
        let traceparent = traceparents.get(i).copied().flatten();
        let avro = avro_enc.map(|a| a.encode_with_id(record)).transpose()?;
        // An empty payload stands for "not encoded as JSON"; a JSON document is never empty.
        let payload = match json {
            Some(encoder) => encoder.encode(record)?,
            None => Vec::new(),
        };
        out.push(Arc::new(Message {
            route: route_of(record),
            event: record.event_name(),
            id: header_safe(&record.id).into_owned(),
            key: record.key().to_string(),
            payload: Some(payload),
            headers: headers_traced(record, content_type, traceparent),
            avro,
            avro_key: avro_enc.and_then(|a| a.encode_key(record.key())),
        }));
    }
    if let Some((kind, id)) = &group.tombstone {
        // The tombstone carries the delete record's attributes, so a consumer of the compacted
        // topic can still tell which change removed the key.
        let delete = group.records.first();
        out.push(Arc::new(Message {
            route: if *kind == EntityKind::Node {
                Route::Nodes
            } else {
                Route::Links
            },
            event: "tombstone".into(),
            id: delete.map_or_else(
                || format!("{}:{id}:tombstone", kind.as_str()),
                |r| format!("{}:tombstone", r.id),
            ),
            key: id.clone(),
            payload: None,
            headers: delete.map(|r| headers(r, content_type)).unwrap_or_default(),
            avro: None,
            avro_key: avro_enc.and_then(|a| a.encode_key(id)),
        }));
    }
    Ok(out)
}
