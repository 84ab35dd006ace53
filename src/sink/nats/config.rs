//! `[sinks.nats]`: the NATS sink's configuration, its subjects, and how it builds the sink.

use std::sync::Arc;

use serde::Deserialize;

use super::{NatsSink, NAME};
use crate::sink::{Format, Message, Route, Sink, SinkConfig, SinkError};

/// `[sinks.nats]`: core NATS or JetStream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Whether this sink is on.
    pub enabled: bool,
    /// Server URL (`nats://host:port`; several may be comma-separated).
    pub url: String,
    /// `jetstream` (acknowledged, de-duplicated) or `core` (fire and forget).
    pub mode: NatsMode,
    /// The JetStream stream that captures the subjects.
    pub stream: String,
    /// Create the stream when it is missing, capturing every subject this sink publishes to.
    pub create_stream: bool,
    /// Subject per record family.
    pub subjects: NatsSubjects,
    /// Body format, `json` or `avro` (Confluent wire format, `[schema_registry]`); unset takes
    /// `[encoding] format`.
    pub format: Option<crate::encode::Format>,
    /// How long to wait for a JetStream publish ack (or a core flush) before resending (ms).
    pub ack_timeout_ms: u64,
    /// Environment variable holding the user name (with `password_env`).
    pub user_env: Option<String>,
    /// Environment variable holding the password (with `user_env`). Never logged.
    pub password_env: Option<String>,
    /// Environment variable holding an authentication token. Never logged.
    pub token_env: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: "nats://127.0.0.1:4222".into(),
            mode: NatsMode::default(),
            stream: "SYNAPTASK".into(),
            create_stream: true,
            subjects: NatsSubjects::default(),
            format: None,
            ack_timeout_ms: 10_000,
            user_env: None,
            password_env: None,
            token_env: None,
        }
    }
}

/// How messages are published.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NatsMode {
    /// Plain publish; at-most-once (see the module docs).
    Core,
    /// Publish to a stream and wait for its ack; at-least-once.
    #[default]
    JetStream,
}

/// `[sinks.nats.subjects]`: the subject of each record family.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSubjects {
    /// Node records go to `<nodes>.<event>` (e.g. `synaptask.nodes.updated`).
    pub nodes: String,
    /// Link records go to `<links>.<event>`.
    pub links: String,
    /// Status records go to this subject exactly.
    pub status: String,
    /// Dead letters go to this subject exactly.
    pub dlq: String,
    /// Job-event records go to `<jobs>.<event>`.
    pub jobs: String,
    /// History records go to `<history>.<event>` (`batch`, `gap`).
    pub history: String,
}

impl Default for NatsSubjects {
    fn default() -> Self {
        Self {
            nodes: "synaptask.nodes".into(),
            links: "synaptask.links".into(),
            status: "synaptask.status".into(),
            dlq: "synaptask.dlq".into(),
            jobs: "synaptask.jobs".into(),
            history: "synaptask.history".into(),
        }
    }
}

impl NatsSubjects {
    /// The subject, or subject prefix, of a route (names the registry subject of its schema).
    pub fn base(&self, route: Route) -> &str {
        match route {
            Route::Nodes => &self.nodes,
            Route::Links => &self.links,
            Route::Jobs => &self.jobs,
            Route::History => &self.history,
            Route::Status => &self.status,
            Route::DeadLetter => &self.dlq,
        }
    }

    /// The subject a message is published to.
    pub fn subject(&self, msg: &Message) -> String {
        let with_event = |base: &str| format!("{base}.{}", msg.event);
        match msg.route {
            Route::Nodes => with_event(&self.nodes),
            Route::Links => with_event(&self.links),
            Route::Jobs => with_event(&self.jobs),
            Route::History => with_event(&self.history),
            Route::Status => self.status.clone(),
            Route::DeadLetter => self.dlq.clone(),
        }
    }

    /// The subjects a stream needs to capture everything this sink publishes, without
    /// patterns that another one already covers (the server rejects overlapping subjects).
    pub fn stream_subjects(&self) -> Vec<String> {
        let candidates = [
            format!("{}.>", self.nodes),
            format!("{}.>", self.links),
            format!("{}.>", self.jobs),
            format!("{}.>", self.history),
            self.status.clone(),
            self.dlq.clone(),
        ];
        let mut out: Vec<String> = Vec::new();
        for (i, subject) in candidates.iter().enumerate() {
            let covered = candidates
                .iter()
                .enumerate()
                .any(|(j, other)| j != i && other != subject && subject_matches(other, subject));
            if !covered && !out.contains(subject) {
                out.push(subject.clone());
            }
        }
        out
    }
}

/// Whether `pattern` (with `*` and `>` wildcards) matches every subject `subject` matches.
pub(super) fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl SinkConfig for NatsConfig {
    fn name(&self) -> &'static str {
        NAME
    }

    fn enabled(&self) -> bool {
        self.enabled
    }

    fn format(&self) -> Option<Format> {
        self.format
    }

    fn route_name(&self, route: Route) -> Option<String> {
        Some(self.subjects.base(route).to_string())
    }

    fn build(&self, format: Format) -> Result<Arc<dyn Sink>, SinkError> {
        let cfg = NatsConfig {
            format: Some(format),
            ..self.clone()
        };
        Ok(Arc::new(NatsSink::new(&cfg)?))
    }
}
