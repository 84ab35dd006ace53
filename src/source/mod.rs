//! The seam between the outside world and the pipeline: the [`Source`] trait, the events a
//! source produces, and the control messages the pipeline sends back. One implementation per
//! file below: [`synaptask`] (the Socket.IO API) and [`jobs`] (the job-event WebSocket API).

pub mod jobs;
pub mod synaptask;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What a source hands the pipeline, in the order the pipeline must apply it. Each source has
/// its own events; only input that could not be used at all is common to both.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// From the SynapTask source.
    Graph(synaptask::GraphEvent),
    /// From the job-event source: a frame, numbered by its run.
    Job(jobs::JobFrame),
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

impl From<synaptask::GraphEvent> for SourceEvent {
    fn from(ev: synaptask::GraphEvent) -> Self {
        SourceEvent::Graph(ev)
    }
}

impl SourceEvent {
    /// The source and kind labels it is counted under (`taskstream_events_received_total`).
    pub fn labels(&self) -> (&'static str, &'static str) {
        use synaptask::GraphEvent;
        match self {
            SourceEvent::Graph(g) => (
                "synaptask",
                match g {
                    GraphEvent::Session { .. } => "session",
                    GraphEvent::SnapshotStart => "snapshot_start",
                    GraphEvent::SnapshotPage { .. } => "snapshot_page",
                    GraphEvent::SnapshotDone { .. } => "snapshot_done",
                    GraphEvent::Diff { .. } => "diff",
                    GraphEvent::History { .. } => "history",
                    GraphEvent::CatchUpDone => "catch_up_done",
                    GraphEvent::Gap { .. } => "gap",
                },
            ),
            SourceEvent::Job(_) => ("jobs", "job_frame"),
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
