//! The change record: its envelope (CloudEvents attributes), deterministic ids, trace context,
//! and the JSON it encodes to. Ids depend only on the change (`{entity}:{uuid}:{version}`), so
//! whichever path saw a change (snapshot or live diff) and however often it was sent, consumers
//! can recognise duplicates.

use std::sync::Arc;

use serde_json::{json, Map, Value};

/// The kind of entity a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntityKind {
    /// A task node.
    Node,
    /// A dependency link.
    Link,
}

impl EntityKind {
    /// `node` or `link`: the record-id and type prefix.
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Node => "node",
            EntityKind::Link => "link",
        }
    }

    /// The checkpoint key of an entity of this kind.
    pub fn key(self, id: &str) -> String {
        format!("{}:{id}", self.as_str())
    }
}

/// What happened to an entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// First seen.
    Created,
    /// Fields changed.
    Updated,
    /// Moved to trash.
    Trashed,
    /// Back from trash.
    Restored,
    /// Purged.
    Deleted,
    /// No longer in the source's scope (a branch-scoped source: it left the branch); it still
    /// exists elsewhere.
    Left,
}

impl Change {
    /// The last segment of the record type.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Trashed => "trashed",
            Change::Restored => "restored",
            Change::Deleted => "deleted",
            Change::Left => "left",
        }
    }
}

/// Which path saw the change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A `graph:get` page (start-up or reconcile).
    Snapshot,
    /// A pushed `graph:diff`.
    Diff,
    /// A job-event frame.
    Jobs,
    /// A `history:page` batch (catch-up or periodic backfill).
    History,
}

impl Origin {
    /// As the `origin` field spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Snapshot => "snapshot",
            Origin::Diff => "diff",
            Origin::Jobs => "jobs",
            Origin::History => "history",
        }
    }
}

/// The trace a record belongs to: the source's `trace_id` where the event carried one, else one
/// the connector started. The same id goes into `traceId`, the `trace_id` header and `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The id as `traceId` and the `trace_id` header carry it.
    pub trace_id: String,
    /// W3C `traceparent` whose trace-id embeds `trace_id` (left-padded with zeros to 32 hex).
    pub traceparent: String,
}

impl TraceContext {
    /// Continues the trace the source named (`trace_id` of an ack, 12 hex characters).
    pub fn from_source(trace_id: &str) -> Self {
        let hex: String = trace_id
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        if hex.is_empty() || hex.len() > 32 || hex.chars().all(|c| c == '0') {
            return Self::new_root();
        }
        let padded = format!("{hex:0>32}");
        Self {
            trace_id: trace_id.to_string(),
            traceparent: format!("00-{padded}-{}-01", new_span_id()),
        }
    }

    /// Starts a new trace for an event that carried none.
    pub fn new_root() -> Self {
        let trace = opentelemetry::trace::TraceId::from_bytes(rand::random::<[u8; 16]>());
        let hex = format!("{trace}");
        Self {
            traceparent: format!("00-{hex}-{}-01", new_span_id()),
            trace_id: hex,
        }
    }
}

fn new_span_id() -> String {
    // An all-zero span id is invalid in traceparent; a random 8 bytes is never zero in practice,
    // and the low bit forced on makes it certain.
    let mut bytes = rand::random::<[u8; 8]>();
    bytes[7] |= 1;
    format!("{}", opentelemetry::trace::SpanId::from_bytes(bytes))
}

/// Current UTC time as the API writes it: RFC 3339, second precision, `Z` (DECISIONS #16).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_millis() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// Task status codes and names (`/concepts/nodes`).
pub fn status_name(code: i64) -> &'static str {
    match code {
        0 => "Available",
        1 => "InProgress",
        2 => "Blocked",
        3 => "Completed",
        _ => "Unknown",
    }
}

/// The body of a record, by kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// A node or link change.
    Entity {
        /// Node or link.
        kind: EntityKind,
        /// What happened.
        change: Change,
        /// Full state before (null when first seen).
        before: Option<Arc<Map<String, Value>>>,
        /// Full state after (null when deleted).
        after: Option<Arc<Map<String, Value>>>,
        /// Fields whose value differs between before and after.
        changed: Vec<String>,
    },
    /// A derived task status change (what automations subscribe to).
    StatusChanged {
        /// Previous status code.
        from: i64,
        /// New status code.
        to: i64,
        /// The node after the change.
        after: Arc<Map<String, Value>>,
        /// Who made the change, where the history batch says (`{username, email}`).
        actor: Option<Value>,
        /// The history batch that made the change, where known.
        batch_id: Option<String>,
        /// The batch an undo batch reverted, when this change is part of an undo.
        undo_of: Option<String>,
    },
    /// One `history:page` batch as the API listed it: actor, time, ops with their patches.
    HistoryBatch {
        /// The scope it was read from (`USER:<uid>`, `GRAPH:<root>`); the message key, so one
        /// scope's batches stay in order on one partition.
        scope: String,
        /// `batchId`, `actor`, `ts`, `undone`, `undoOf`, `ops` (normalised, see `normalize::history`).
        batch: Map<String, Value>,
    },
    /// A window of history that could not be replayed, only reconciled with a snapshot.
    Gap {
        /// The scope whose history did not reach back.
        scope: String,
        /// The delivered position the replay had to start from (op id).
        from_op_id: u64,
        /// The oldest op id history still served, if any.
        oldest_available_op_id: Option<u64>,
        /// Why replay was impossible (`retention`, `history_unavailable`, ...).
        reason: String,
        /// What stands in for the window: `snapshot`, or `live_diffs` when a periodic poll was
        /// outrun by retention while the live stream lost nothing.
        reconciled_by: String,
        /// Entities whose fate the snapshot could not tell (left the active graph, trash
        /// listing unavailable): published as trashed, possibly purged since.
        unresolved: Vec<String>,
    },
    /// Input that could not be parsed.
    DeadLetter {
        /// The event or frame kind it arrived as.
        event: String,
        /// Why it was refused.
        reason: String,
        /// The raw bytes.
        raw: Vec<u8>,
    },
    /// A job-event frame of the job WebSocket API.
    Job {
        /// The job-API client id the frame arrived on.
        client_id: String,
        /// The frame as received.
        frame: Map<String, Value>,
    },
}

/// One change record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Deterministic id, e.g. `node:<uuid>:<version>`, `status:<uuid>:<version>`.
    pub id: String,
    /// `synaptask://<host>/users/<uid>`.
    pub source: String,
    /// The entity id (or the job id / dead-letter event).
    pub subject: String,
    /// RFC 3339 time of the change (the entity's `lastEditedTime` where known).
    pub time: String,
    /// The entity version the record carries.
    pub sequence: u64,
    /// Trace context.
    pub trace: TraceContext,
    /// Which path saw it.
    pub origin: Origin,
    /// The body.
    pub body: Body,
}

impl Record {
    /// The CloudEvents `type`, e.g. `synaptask.node.updated`.
    pub fn event_type(&self) -> String {
        match &self.body {
            Body::Entity { kind, change, .. } => {
                format!("synaptask.{}.{}", kind.as_str(), change.as_str())
            }
            Body::StatusChanged { .. } => "synaptask.task.status_changed".to_string(),
            Body::HistoryBatch { .. } => "synaptask.history.batch".to_string(),
            Body::Gap { .. } => "synaptask.gap".to_string(),
            Body::DeadLetter { .. } => "synaptask.dead_letter".to_string(),
            Body::Job { frame, .. } => {
                let t = frame
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown");
                format!("synaptask.job.{t}")
            }
        }
    }

    /// The last segment of the type, used as a NATS subject suffix.
    pub fn event_name(&self) -> String {
        match &self.body {
            Body::Entity { change, .. } => change.as_str().to_string(),
            Body::StatusChanged { .. } => "status_changed".to_string(),
            Body::HistoryBatch { .. } => "batch".to_string(),
            Body::Gap { .. } => "gap".to_string(),
            Body::DeadLetter { .. } => "dead_letter".to_string(),
            // It ends a NATS subject: anything but a plain word would make the subject invalid.
            Body::Job { frame, .. } => frame
                .get("type")
                .and_then(Value::as_str)
                .filter(|t| {
                    !t.is_empty()
                        && t.len() <= 64
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                })
                .unwrap_or("unknown")
                .to_string(),
        }
    }

    /// The partition / compaction key: the entity id (the subject), except for history
    /// records, which are keyed by scope so that a scope's batches keep their order.
    pub fn key(&self) -> &str {
        match &self.body {
            Body::HistoryBatch { scope, .. } | Body::Gap { scope, .. } => scope,
            _ => &self.subject,
        }
    }

    /// The record as the JSON document consumers read.
    pub fn to_json(&self) -> Value {
        // Serialising a record cannot fail: every key is a string and every value plain JSON.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Serialises without building an intermediate `Value`: `before` and `after` are written from
/// the record's own maps (encoding was a hot spot when it cloned them).
impl serde::Serialize for Record {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.serialize_parts(s, true)
    }
}

/// A record's document without its entity states (`before` and `after` are null): what the
/// Avro encoder converts, lending it the states instead of copying them.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a>(pub &'a Record);

impl serde::Serialize for Envelope<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize_parts(s, false)
    }
}

impl Record {
    fn serialize_parts<S: serde::Serializer>(&self, s: S, states: bool) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let none: Option<&Map<String, Value>> = None;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &self.id)?;
        m.serialize_entry("type", &self.event_type())?;
        m.serialize_entry("source", &self.source)?;
        m.serialize_entry("subject", &self.subject)?;
        m.serialize_entry("time", &self.time)?;
        m.serialize_entry("sequence", &self.sequence)?;
        m.serialize_entry("traceId", &self.trace.trace_id)?;
        m.serialize_entry("origin", self.origin.as_str())?;
        match &self.body {
            Body::Entity {
                before,
                after,
                changed,
                ..
            } => {
                if states {
                    m.serialize_entry("before", before)?;
                    m.serialize_entry("after", after)?;
                } else {
                    m.serialize_entry("before", &none)?;
                    m.serialize_entry("after", &none)?;
                }
                m.serialize_entry("changed", changed)?;
            }
            Body::StatusChanged {
                from,
                to,
                after,
                actor,
                batch_id,
                undo_of,
            } => {
                m.serialize_entry("from", &json!({"code": from, "name": status_name(*from)}))?;
                m.serialize_entry("to", &json!({"code": to, "name": status_name(*to)}))?;
                if states {
                    m.serialize_entry("after", after)?;
                } else {
                    m.serialize_entry("after", &none)?;
                }
                m.serialize_entry("changed", &["status"])?;
                if let Some(actor) = actor {
                    m.serialize_entry("actor", actor)?;
                }
                if let Some(b) = batch_id {
                    m.serialize_entry("batchId", b)?;
                }
                if let Some(u) = undo_of {
                    m.serialize_entry("undoOf", u)?;
                }
            }
            Body::HistoryBatch { scope, batch } => {
                m.serialize_entry("scope", scope)?;
                for (k, v) in batch {
                    m.serialize_entry(k, v)?;
                }
            }
            Body::Gap {
                scope,
                from_op_id,
                oldest_available_op_id,
                reason,
                reconciled_by,
                unresolved,
            } => {
                m.serialize_entry("scope", scope)?;
                m.serialize_entry("fromOpId", from_op_id)?;
                m.serialize_entry("oldestAvailableOpId", oldest_available_op_id)?;
                m.serialize_entry("reason", reason)?;
                m.serialize_entry("reconciledBy", reconciled_by)?;
                m.serialize_entry("unresolved", unresolved)?;
            }
            Body::DeadLetter { event, reason, raw } => {
                use base64::Engine;
                m.serialize_entry("event", event)?;
                m.serialize_entry("reason", reason)?;
                m.serialize_entry(
                    "raw",
                    &base64::engine::general_purpose::STANDARD.encode(raw),
                )?;
            }
            Body::Job { client_id, frame } => {
                m.serialize_entry("clientId", client_id)?;
                m.serialize_entry("data", frame)?;
            }
        }
        m.end()
    }
}

/// Whether a server-given identifier can stand in record ids, keys and message headers as it
/// is: 1 to 256 visible ASCII characters. Ids of the API are UUIDs; anything else that is not
/// such a token (CR/LF, spaces, control bytes, megabytes) is input to dead-letter, not to
/// publish, since a broker refuses it in a header and would stop the stream.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// A header value brokers accept whatever the input: control bytes (CR, LF, NUL, ...) are
/// written as `%XX`. A last line of defence: ids are checked with [`is_token`] before.
pub fn header_safe(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.bytes().any(|b| b.is_ascii_control()) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_ascii_control() {
            out.push_str(&format!("%{:02X}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// [`header_safe`] for an owned value: a clean one is kept as it is, not copied.
pub fn into_header_safe(s: String) -> String {
    if let std::borrow::Cow::Owned(escaped) = header_safe(&s) {
        return escaped;
    }
    s
}

/// A stable 64-bit FNV-1a hash, for ids of records that have no version (dead letters).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_trace_id_is_kept_and_embedded_in_traceparent() {
        let t = TraceContext::from_source("f3a12bc9e1d4");
        assert_eq!(t.trace_id, "f3a12bc9e1d4");
        let parts: Vec<&str> = t.traceparent.split('-').collect();
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], "00000000000000000000f3a12bc9e1d4");
        assert_eq!(parts[2].len(), 16);
        assert_eq!(parts[3], "01");
    }

    #[test]
    fn new_trace_uses_one_id_everywhere() {
        let t = TraceContext::new_root();
        assert_eq!(t.trace_id.len(), 32);
        assert!(t.traceparent.contains(&t.trace_id));
        assert_ne!(TraceContext::new_root().trace_id, t.trace_id);
    }

    #[test]
    fn tokens_and_header_values() {
        assert!(is_token("d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54"));
        assert!(!is_token("a\r\nb"));
        assert!(!is_token("a b"));
        assert!(!is_token(""));
        assert!(!is_token(&"x".repeat(257)));
        assert_eq!(header_safe("2026-01-01T00:00:00Z"), "2026-01-01T00:00:00Z");
        assert_eq!(header_safe("a\r\nb\0"), "a%0D%0Ab%00");
        assert_eq!(into_header_safe("a\r\nb\0".into()), "a%0D%0Ab%00");
        assert_eq!(into_header_safe("plain".into()), "plain");
    }

    #[test]
    fn status_record_json() {
        let r = Record {
            id: "status:abc:4".into(),
            source: "synaptask://h/users/u".into(),
            subject: "abc".into(),
            time: "2025-01-01T00:00:00Z".into(),
            sequence: 4,
            trace: TraceContext::from_source("0123456789ab"),
            origin: Origin::Diff,
            body: Body::StatusChanged {
                from: 1,
                to: 3,
                after: Map::new().into(),
                actor: None,
                batch_id: None,
                undo_of: None,
            },
        };
        let v = r.to_json();
        assert_eq!(v["type"], "synaptask.task.status_changed");
        assert_eq!(v["from"], json!({"code": 1, "name": "InProgress"}));
        assert_eq!(v["to"]["name"], "Completed");
        assert_eq!(v["traceId"], "0123456789ab");
    }
}
