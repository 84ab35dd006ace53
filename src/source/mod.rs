//! The seam between the outside world and the pipeline: the [`Source`] trait, the events a
//! source produces, and the control messages the pipeline sends back. One implementation per
//! file below: [`synaptask`] (the Socket.IO API) and [`jobs`] (the job-event WebSocket API).

pub mod jobs;
pub mod synaptask;

use std::collections::{HashMap, HashSet};

use futures_util::future::BoxFuture;
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::record::{EntityKind, TraceContext};

/// What a source hands the pipeline, in the order the pipeline must apply it.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// A session is established: records get `source = synaptask://<host>/users/<uid>`.
    Session {
        /// The `source` attribute for records from now on.
        source_uri: String,
    },
    /// A snapshot begins: changes seen until [`SourceEvent::SnapshotDone`] count as seen by it.
    SnapshotStart,
    /// A page of a snapshot (`graph:get`): full entities.
    SnapshotPage {
        /// Entities in page order.
        items: Vec<(EntityKind, Map<String, Value>)>,
        /// The page ack's trace.
        trace: TraceContext,
    },
    /// The snapshot is complete. Diffs that arrived meanwhile come after this event.
    SnapshotDone {
        /// Keys (`node:<id>`, `link:<id>`) every page listed.
        seen: HashSet<String>,
        /// Trashed entities by key, from `trash:page`; `None` when there is no listing (the
        /// server lacks the event, or `source.trash_listing` is off).
        trash: Option<HashMap<String, Map<String, Value>>>,
        /// The last page's trace.
        trace: TraceContext,
    },
    /// A pushed `graph:diff` payload.
    Diff {
        /// The payload as received.
        payload: Value,
        /// A trace started for it (pushed diffs carry no `trace_id`).
        trace: TraceContext,
    },
    /// History batches of one scope newer than its position, oldest first.
    History {
        /// `USER:<uid>` or `GRAPH:<root>`.
        scope: String,
        /// The batches as `history:page` listed them.
        batches: Vec<Map<String, Value>>,
        /// The trace of the page ack that brought the last of them.
        trace: TraceContext,
    },
    /// A history catch-up of every scope finished (diffs held for unknown entities can be
    /// tried again).
    CatchUpDone,
    /// History does not reach back to a scope's delivered position. The window is published
    /// as a gap record: after the snapshot that reconciles it, or at once when the live stream
    /// covered it (`snapshot: false`).
    Gap {
        /// The scope.
        scope: String,
        /// The delivered position.
        from_op_id: u64,
        /// The oldest op id history still listed.
        oldest_available_op_id: Option<u64>,
        /// Why (`retention`, `history_unavailable ...`, `too_far_behind`).
        reason: String,
        /// A snapshot follows and the record waits for it; otherwise (a periodic poll outran
        /// by retention while the live stream lost nothing) the graph is whole and only the
        /// window's batches are missing from the history stream.
        snapshot: bool,
    },
    /// A job-event frame, parsed.
    Job {
        /// The job-API client id.
        client_id: String,
        /// The epoch of the run that numbered the frame.
        epoch: u64,
        /// Position of the frame in that client's stream (1-based).
        index: u64,
        /// The frame.
        frame: Map<String, Value>,
    },
    /// Input that could not be used at all; it becomes a dead letter.
    Malformed {
        /// The event or frame kind.
        event: String,
        /// The raw bytes.
        raw: Vec<u8>,
        /// Why.
        reason: String,
    },
}

impl SourceEvent {
    /// The source and kind labels it is counted under (`taskstream_events_received_total`).
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            SourceEvent::Session { .. } => ("synaptask", "session"),
            SourceEvent::SnapshotStart => ("synaptask", "snapshot_start"),
            SourceEvent::SnapshotPage { .. } => ("synaptask", "snapshot_page"),
            SourceEvent::SnapshotDone { .. } => ("synaptask", "snapshot_done"),
            SourceEvent::Diff { .. } => ("synaptask", "diff"),
            SourceEvent::History { .. } => ("synaptask", "history"),
            SourceEvent::CatchUpDone => ("synaptask", "catch_up_done"),
            SourceEvent::Gap { .. } => ("synaptask", "gap"),
            SourceEvent::Job { .. } => ("jobs", "job_frame"),
            SourceEvent::Malformed { event, .. } if event == "job_frame" => ("jobs", "malformed"),
            SourceEvent::Malformed { .. } => ("synaptask", "malformed"),
        }
    }
}

/// What the pipeline can ask of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Take a fresh snapshot: history could not fill in what is missing.
    Reconcile {
        /// Why, for the log.
        reason: String,
    },
    /// Catch history up now: a change is missing (a partial diff of an unknown entity).
    CatchUp {
        /// Why, for the log.
        reason: String,
    },
}

/// Why a source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The server refused the token: fatal, no retry (exit code 2).
    #[error("authentication refused by {url}: {code} ({message})")]
    Auth {
        /// The server URL.
        url: String,
        /// The error code (`unauthorized`, `forbidden.auth_missing`, ...).
        code: String,
        /// The server's message.
        message: String,
    },
    /// A configuration problem (no token, bad URL): fatal.
    #[error("{0}")]
    Config(String),
    /// The pipeline went away (shutdown in progress).
    #[error("pipeline closed")]
    PipelineClosed,
}

impl SourceError {
    /// Sources retry everything retryable themselves; what they return is fatal.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// A producer of [`SourceEvent`]s.
pub trait Source: Send {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Runs until shutdown or a fatal error, sending events in order on `out`. A source that
    /// takes requests from the pipeline (the SynapTask one: reconcile, catch up) hands out its
    /// own controller.
    fn run(
        self: Box<Self>,
        out: mpsc::Sender<SourceEvent>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, Result<(), SourceError>>;
}
