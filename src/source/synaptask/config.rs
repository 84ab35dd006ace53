//! `[source]`: where the SynapTask API is, the token, the documented limits the source keeps
//! to, and how it pages, polls and reconnects.

use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;

use super::session::DiffBuffer;
use crate::secret::Secret;
use crate::source::SourceError;

/// Where a scope without a delivered position starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HistoryStart {
    /// At the head of history when the connector first sees the scope; the first snapshot
    /// stands for everything before.
    #[default]
    Latest,
    /// At the oldest batch history still serves: every retained batch is published.
    Earliest,
}

/// `[source]`: where the SynapTask API is and how to treat it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynapTaskConfig {
    /// Server URL, `https://synaptask.space` in production.
    pub url: String,
    /// Socket.IO path: `/socket.io` as documented; some deployments use `/ext-socket.io`.
    pub path: String,
    /// Environment variable that holds the API token.
    pub token_env: String,
    /// File that holds the API token, read when the variable is unset (e.g. a mounted secret).
    pub token_file: Option<PathBuf>,
    /// Objects per `graph:get` page (1..=5000).
    pub page_limit: u32,
    /// Objects each page re-reads from the previous one beyond the trashes and purges the live
    /// stream showed since that page (each may shift the listing left by one, DECISIONS #6): a
    /// margin for removals still on their way. Repeats are merged away by version.
    pub page_overlap: u32,
    /// Reads allowed per window and per read event name (documented: 5 per 10 s per event).
    pub read_budget: usize,
    /// The read window in milliseconds.
    pub read_window_ms: u64,
    /// How long to wait for an ack, in milliseconds.
    pub ack_timeout_ms: u64,
    /// How long to wait for the `connected` event after connecting, in milliseconds.
    pub connect_timeout_ms: u64,
    /// Connect attempts allowed per minute (documented limits: 10 per IP, 20 per user).
    pub connects_per_minute: usize,
    /// First reconnect delay bound, in milliseconds (full jitter below it).
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay bound, in milliseconds.
    pub backoff_max_ms: u64,
    /// `ws:ping` interval in milliseconds (0 = off); no answer or event for `heartbeat_timeout_ms` means the session is dead.
    pub heartbeat_ms: u64,
    /// Silence after which a session counts as dead, in milliseconds.
    pub heartbeat_timeout_ms: u64,
    /// Live diffs held while the pipeline is busy; beyond it they are dropped and a history
    /// catch-up recovers them.
    pub diff_buffer: usize,
    /// Bytes of live diffs held at most (their parsed size); beyond it they are dropped like
    /// past `diff_buffer`.
    pub diff_buffer_bytes: usize,
    /// List the trash after a snapshot, to tell trashed from deleted entities that disappeared.
    pub trash_listing: bool,
    /// Limit the source to one branch: its root node id, or a public token. Snapshots page
    /// `branch:get`, history follows the root's `GRAPH` scope (instead of the `USER` scope;
    /// with a public token there is no history scope, so gaps are reconciled with snapshots),
    /// diffs outside the branch are ignored, and an entity that leaves it gets a `left` record.
    pub root: Option<String>,
    /// Replay and poll `history:page` (off: every gap is reconciled with a snapshot).
    pub history: bool,
    /// Follow the caller's own history (`USER` scope, the uid from the `connected` event).
    pub history_user_scope: bool,
    /// Branch roots whose history (`GRAPH` scope) is followed too, e.g. shared branches.
    pub history_roots: Vec<String>,
    /// Where a scope with no delivered position starts: `latest` or `earliest`.
    pub history_start: HistoryStart,
    /// Poll `history:page` this often while connected, in milliseconds (0 = only after gaps),
    /// so a change whose `graph:diff` never arrived is still published.
    pub history_interval_ms: u64,
    /// Batches asked for by the first page of a periodic poll (1..=1000).
    pub history_poll_limit: u32,
    /// Batches per `history:page` page while catching up (1..=1000).
    pub history_page_limit: u32,
    /// A catch-up that would hold more batches than this is given up for a snapshot.
    pub history_max_batches: usize,
    /// Every this many seconds, a low-priority snapshot compares the whole graph with what was
    /// published and publishes only the differences (0 = off).
    pub reconcile_interval_secs: u64,
}

impl Default for SynapTaskConfig {
    fn default() -> Self {
        Self {
            url: "https://synaptask.space".into(),
            path: "/socket.io".into(),
            token_env: "SYNAPTASK_API_TOKEN".into(),
            token_file: None,
            page_limit: 5000,
            page_overlap: 50,
            read_budget: 5,
            read_window_ms: 10_000,
            ack_timeout_ms: 15_000,
            connect_timeout_ms: 10_000,
            connects_per_minute: 8,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            heartbeat_ms: 15_000,
            heartbeat_timeout_ms: 45_000,
            diff_buffer: 10_000,
            diff_buffer_bytes: 64 << 20,
            trash_listing: true,
            root: None,
            history: true,
            history_user_scope: true,
            history_roots: Vec::new(),
            history_start: HistoryStart::Latest,
            history_interval_ms: 10_000,
            history_poll_limit: 100,
            history_page_limit: 1000,
            history_max_batches: 200_000,
            reconcile_interval_secs: 900,
        }
    }
}

impl SynapTaskConfig {
    /// The sustained time per read of one event the read budget allows.
    pub fn read_interval(&self) -> std::time::Duration {
        let per = self.read_window_ms / u64::try_from(self.read_budget.max(1)).unwrap_or(1);
        std::time::Duration::from_millis(per)
    }

    /// Checks value ranges; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=5000).contains(&self.page_limit) {
            return Err("source.page_limit must be between 1 and 5000".into());
        }
        if self.page_overlap >= self.page_limit {
            return Err("source.page_overlap must be smaller than source.page_limit".into());
        }
        for (key, v) in [
            ("history_poll_limit", self.history_poll_limit),
            ("history_page_limit", self.history_page_limit),
        ] {
            if !(1..=1000).contains(&v) {
                return Err(format!("source.{key} must be between 1 and 1000"));
            }
        }
        if self.read_budget == 0 || self.connects_per_minute == 0 {
            return Err(
                "source.read_budget and source.connects_per_minute must be at least 1".into(),
            );
        }
        if self.diff_buffer == 0 || self.diff_buffer_bytes < 1024 {
            return Err(
                "source.diff_buffer must be at least 1 and source.diff_buffer_bytes at least 1024"
                    .into(),
            );
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!(
                "source.url must start with http:// or https://, got {:?}",
                self.url
            ));
        }
        Ok(())
    }

    /// Exponential backoff with full jitter after `failures` failures: a random delay below a
    /// bound that doubles from `backoff_initial_ms` up to `backoff_max_ms`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let cap = self
            .backoff_initial_ms
            .saturating_mul(1u64 << failures.min(20))
            .min(self.backoff_max_ms)
            .max(1);
        Duration::from_millis(rand::thread_rng().gen_range(0..=cap))
    }

    /// How many live diffs a session holds, in count and in bytes.
    pub fn diff_buffer(&self) -> DiffBuffer {
        DiffBuffer {
            count: self.diff_buffer,
            bytes: self.diff_buffer_bytes,
        }
    }

    /// The Engine.IO URL: server URL plus the Socket.IO path.
    pub fn endpoint(&self) -> String {
        format!(
            "{}/{}/",
            self.url.trim_end_matches('/'),
            self.path.trim_matches('/')
        )
    }

    /// The host part of the URL, for record sources.
    pub fn host(&self) -> String {
        let rest = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_string()
    }

    /// Reads the token from `token_env` or `token_file`.
    pub fn token(&self) -> Result<Secret, SourceError> {
        Secret::load(Some(&self.token_env), self.token_file.as_deref())
            .map_err(|e| SourceError::Config(e.to_string()))?
            .ok_or_else(|| {
                SourceError::Config(format!(
                    "no API token: set the environment variable {} or source.token_file",
                    self.token_env
                ))
            })
    }
}
