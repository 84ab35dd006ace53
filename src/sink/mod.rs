//! The seam between records and brokers: the [`Sink`] trait, the broker-neutral [`Message`]
//! every sink publishes, and the errors sinks report.
//!
//! Publishing is two-phase so that order and acknowledgement stay separate: [`Sink::enqueue`]
//! is awaited by one caller in record order and hands the message to the client library; the
//! [`AckFuture`] it returns resolves when the broker has acknowledged that message. The
//! delivery window (`crate::delivery`) holds those futures and advances the checkpoint over
//! the contiguous prefix that has resolved.

use std::sync::Arc;

pub use crate::encode::Format;

pub mod kafka;
pub mod nats;
pub mod stdout;

use futures_util::future::BoxFuture;

/// Which family of topics or subjects a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Node change records (`synaptask.nodes`).
    Nodes,
    /// Link change records (`synaptask.links`).
    Links,
    /// Derived task status changes (`synaptask.status`).
    Status,
    /// Dead letters: input that could not be parsed (`synaptask.dlq`).
    DeadLetter,
    /// Job-event records from the job WebSocket API (`synaptask.jobs`).
    Jobs,
    /// History batches and gap notices (`synaptask.history`).
    History,
}

impl Route {
    /// Every route.
    pub const ALL: [Route; 6] = [
        Route::Nodes,
        Route::Links,
        Route::Status,
        Route::DeadLetter,
        Route::Jobs,
        Route::History,
    ];

    /// The route's name in metric labels (`nodes`, `links`, `status`, `dlq`, `jobs`, `history`).
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Nodes => "nodes",
            Route::Links => "links",
            Route::Status => "status",
            Route::DeadLetter => "dlq",
            Route::Jobs => "jobs",
            Route::History => "history",
        }
    }

    /// The route's position in [`Route::ALL`].
    pub fn index(self) -> usize {
        match self {
            Route::Nodes => 0,
            Route::Links => 1,
            Route::Status => 2,
            Route::DeadLetter => 3,
            Route::Jobs => 4,
            Route::History => 5,
        }
    }
}

/// One message for a broker, already encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic / subject family.
    pub route: Route,
    /// The event name that ends the record type (`created`, `updated`, `status_changed`, ...);
    /// NATS subjects end with it.
    pub event: String,
    /// The record id (`node:<uuid>:<version>`): Kafka header `ce_id`, JetStream `Nats-Msg-Id`.
    pub id: String,
    /// Partition / compaction key: the entity id.
    pub key: String,
    /// The record as a JSON document; `None` is a Kafka tombstone for `key` (NATS sinks skip
    /// tombstones). Empty when no sink writes JSON (see [`Message::body`]).
    pub payload: Option<Vec<u8>>,
    /// Headers, in order (`ce_*`, `content-type`, `trace_id`, `traceparent`). The names are
    /// fixed, so they are not allocated per message.
    pub headers: Vec<(&'static str, String)>,
    /// The record in Avro (Confluent wire format) and its schema id, when a sink uses Avro;
    /// `payload` stays the JSON document.
    pub avro: Option<(Vec<u8>, u32)>,
    /// The key as an Avro string in the wire format, when keys are Avro
    /// (`schema_registry.key_format = "avro"`); tombstones carry it too.
    pub avro_key: Option<Vec<u8>>,
}

/// The names of a record's headers, in the order [`Message::headers`] has them (the encoder
/// writes them; sinks that build per-name objects look them up here).
pub const RECORD_HEADERS: [&str; 9] = [
    "ce_specversion",
    "ce_id",
    "ce_type",
    "ce_source",
    "ce_subject",
    "ce_time",
    "content-type",
    "trace_id",
    "traceparent",
];

/// The header an Avro body adds: the id of its schema in the registry.
pub const SCHEMA_ID_HEADER: &str = "schema_id";

impl Message {
    /// The body a sink of `format` publishes: `None` for a tombstone. A record without its
    /// Avro encoding is a wiring bug, reported as fatal.
    pub fn body(&self, format: Format) -> Result<Option<&[u8]>, String> {
        match (format, &self.payload) {
            (_, None) => Ok(None),
            (Format::Json, Some(p)) if p.is_empty() => {
                Err(format!("record {} was not encoded as JSON", self.id))
            }
            (Format::Json, Some(p)) => Ok(Some(p)),
            (Format::Avro, Some(_)) => self
                .avro
                .as_ref()
                .map(|(b, _)| Some(b.as_slice()))
                .ok_or_else(|| format!("record {} was not encoded as Avro", self.id)),
        }
    }

    /// The key bytes a sink of `format` publishes: the Avro key when there is one.
    pub fn key_bytes(&self, format: Format) -> &[u8] {
        match (format, &self.avro_key) {
            (Format::Avro, Some(k)) => k,
            _ => self.key.as_bytes(),
        }
    }

    /// The headers for `format`: Avro bodies say `content-type: application/avro` and carry
    /// the schema id in `schema_id`.
    pub fn headers_for(&self, format: Format) -> Vec<(&str, std::borrow::Cow<'_, str>)> {
        use std::borrow::Cow;
        let avro = match (format, &self.avro) {
            (Format::Avro, Some((_, id))) => Some(*id),
            _ => None,
        };
        let mut out: Vec<(&str, Cow<'_, str>)> = self
            .headers
            .iter()
            .map(|(k, v)| match (*k, avro) {
                ("content-type", Some(_)) => (*k, Cow::Borrowed("application/avro")),
                _ => (*k, Cow::Borrowed(v.as_str())),
            })
            .collect();
        if let Some(id) = avro {
            out.push((SCHEMA_ID_HEADER, Cow::Owned(id.to_string())));
        }
        out
    }
}

/// Resolves when the broker acknowledged a message. Retryable failures are retried inside
/// (the message id makes a resend detectable) until success, a fatal error, or shutdown.
pub type AckFuture = BoxFuture<'static, Result<(), SinkError>>;

/// Why a sink could not take or deliver a message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Worth retrying: the broker is unreachable, a queue is full, a timeout passed.
    #[error("{sink}: {message} (retryable)")]
    Retryable {
        /// Sink name.
        sink: String,
        /// What happened (no secrets).
        message: String,
    },
    /// Not worth retrying: bad configuration, authorisation, a message the broker refuses.
    #[error("{sink}: {message}")]
    Fatal {
        /// Sink name.
        sink: String,
        /// What happened (no secrets).
        message: String,
    },
    /// The process is shutting down; the message may or may not have been delivered.
    #[error("{sink}: cancelled by shutdown")]
    Cancelled {
        /// Sink name.
        sink: String,
    },
}

impl SinkError {
    /// Whether the same operation may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Retryable { .. })
    }
}

/// A sink's config section (`[sinks.<name>]`), which builds its sink: `app`, `check` and the
/// validation iterate over these instead of naming each sink, so a new sink is its module and
/// one line in `config::SinksConfig::all`.
pub trait SinkConfig: Send + Sync {
    /// The sink's name in logs, errors and `taskstream check`.
    fn name(&self) -> &'static str;
    /// Whether the section turns the sink on.
    fn enabled(&self) -> bool;
    /// The body format it asked for; `None` follows `[encoding] format`. Sinks that only write
    /// JSON say so.
    fn format(&self) -> Option<Format>;
    /// The topic or subject a route's records go to, which names the route's registry subject
    /// when the sink writes Avro; `None` for a sink without routes.
    fn route_name(&self, route: Route) -> Option<String>;
    /// Whether its messages have keys (Kafka); Avro keys are registered only for those.
    fn keyed(&self) -> bool {
        false
    }
    /// Builds the sink for `format` (no network yet: `Sink::prepare` connects).
    fn build(&self, format: Format) -> Result<Arc<dyn Sink>, SinkError>;
}

/// A broker the records go to.
pub trait Sink: Send + Sync {
    /// A short name for logs and metrics (`kafka`, `nats`, `stdout`, ...).
    fn name(&self) -> &str;

    /// Hands one message to the client library, in call order; resolves to the future of its
    /// acknowledgement. Callers await this sequentially, so a sink may rely on call order.
    fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>>;

    /// Creates missing topics / streams when the configuration allows it, and checks the broker
    /// answers; `taskstream check` and start-up call it once.
    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>>;

    /// Waits until everything enqueued so far is acknowledged (on shutdown).
    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Whether the broker answers now (`/health/ready` and `taskstream check`): cheap, no
    /// side effects, called every few seconds while the connector runs.
    fn probe(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}
