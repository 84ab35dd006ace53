//! The delivered checkpoint: what the brokers have acknowledged, per entity, plus whether the
//! first snapshot was fully delivered, the history position of each scope and the job-frame
//! positions. Only the delivery window writes it; after a crash the
//! connector starts from it and publishes exactly the differences (`CheckpointStore` seam).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Map, Value};

pub mod journal;
pub mod redb_store;

/// `[state]`: where the delivered checkpoint is kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The redb file; unset keeps the checkpoint in memory (every start is then a first start).
    pub path: Option<PathBuf>,
}

/// An entity key: `node:<uuid>` or `link:<uuid>`.
pub type EntityKey = String;

/// The last delivered state of one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityState {
    /// The version of the last acknowledged record.
    pub version: u64,
    /// The full entity as that record's `after` had it (shared with the view and the record).
    pub state: Arc<Map<String, Value>>,
}

/// Everything the checkpoint holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    /// Delivered entities (deleted ones removed).
    pub entities: HashMap<EntityKey, EntityState>,
    /// Whether a complete snapshot has been delivered at least once.
    pub snapshot_complete: bool,
    /// Job-event stream positions: client id -> frames delivered.
    pub jobs: HashMap<String, u64>,
    /// History positions: scope (`USER:<uid>`, `GRAPH:<root>`) -> highest op id whose batch,
    /// and every batch before it, was delivered.
    pub history: HashMap<String, u64>,
    /// Job-API client id -> the epoch of its latest run. Every run takes a new one before it
    /// numbers frames, so a frame id is never given to two different frames.
    pub job_epochs: HashMap<String, u64>,
    /// Recent SynapTask connection attempts (Unix milliseconds, oldest first), so a connector
    /// restarted in a loop still keeps to the server's connect limit.
    pub connects: Vec<u64>,
    /// Recent SynapTask reads: (event name, Unix milliseconds of the answer, or of the send
    /// while unanswered), so a restarted connector still keeps to the read limit.
    pub reads: Vec<(String, u64)>,
}

/// Connection attempts older than this are forgotten by every store.
pub const CONNECTS_KEPT_MS: u64 = 10 * 60 * 1000;

/// One change to the checkpoint, applied once its record and all before it are acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckpointOp {
    /// The entity was delivered at this version with this full state.
    Upsert {
        /// Entity key.
        key: EntityKey,
        /// Delivered version.
        version: u64,
        /// Full state after the change.
        state: Arc<Map<String, Value>>,
    },
    /// The entity's deletion was delivered.
    Remove {
        /// Entity key.
        key: EntityKey,
    },
    /// Every record of a full snapshot was delivered.
    SnapshotComplete,
    /// History batches of a scope delivered up to this op id.
    HistoryCursor {
        /// The scope, `USER:<uid>` or `GRAPH:<root id>`.
        scope: String,
        /// The highest op id of the delivered batch.
        op_id: u64,
    },
    /// A run of the job source took this epoch (written before its first frame is numbered,
    /// not through the delivery window).
    JobEpoch {
        /// Job-API client id.
        client_id: String,
        /// The epoch; a store never lowers it.
        epoch: u64,
    },
    /// A connection attempt to SynapTask at this Unix time in milliseconds (written before
    /// connecting, not through the delivery window).
    ConnectAttempt {
        /// Unix milliseconds.
        at_ms: u64,
    },
    /// A read sent at `sent_ms` counted at `at_ms` (its send, then its answer: the server
    /// counted it in between). Written outside the delivery window, like connect attempts.
    ReadAttempt {
        /// The read event.
        event: String,
        /// Unix milliseconds of the send: identifies the attempt.
        sent_ms: u64,
        /// Unix milliseconds it counts from.
        at_ms: u64,
    },
    /// `taskstream offsets`: forget every delivered entity and the snapshot flag, so the next
    /// run takes a full snapshot and publishes every entity again.
    ResetSnapshot,
    /// `taskstream offsets`: set a history position exactly (lower too); `None` forgets it.
    SetHistory {
        /// The scope.
        scope: String,
        /// The position, or `None` to start the scope as new.
        op_id: Option<u64>,
    },
    /// `taskstream offsets`: forget a job client's delivered frame count.
    ResetJobs {
        /// Job-API client id.
        client_id: String,
    },
    /// Job frames of a client delivered up to this count.
    JobPosition {
        /// Job-API client id.
        client_id: String,
        /// Frames delivered so far.
        frames: u64,
    },
}

/// Why the checkpoint store failed. Every variant is fatal for the run: continuing without a
/// durable checkpoint would break "a checkpoint means delivered".
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The store could not be opened or created.
    #[error("cannot open checkpoint store {path}: {message}")]
    Open {
        /// Store path.
        path: String,
        /// Cause.
        message: String,
    },
    /// A read or write failed.
    #[error("checkpoint store I/O failed: {0}")]
    Io(String),
    /// A stored value could not be decoded.
    #[error("checkpoint store holds a value that cannot be decoded: {0}")]
    Corrupt(String),
}

/// Durable storage of the delivered checkpoint.
pub trait CheckpointStore: Send {
    /// Reads the whole checkpoint (at start-up).
    fn load(&self) -> Result<Checkpoint, StateError>;

    /// Applies ops in order in one durable transaction: when this returns Ok they survive a
    /// kill -9 of the process.
    fn apply(&mut self, ops: &[CheckpointOp]) -> Result<(), StateError>;
}

/// A checkpoint kept in memory only (the demo's default, and tests).
#[derive(Debug, Default)]
pub struct MemoryStore {
    checkpoint: Checkpoint,
}

impl CheckpointStore for MemoryStore {
    fn load(&self) -> Result<Checkpoint, StateError> {
        Ok(self.checkpoint.clone())
    }

    fn apply(&mut self, ops: &[CheckpointOp]) -> Result<(), StateError> {
        for op in ops {
            apply_op(&mut self.checkpoint, op);
        }
        Ok(())
    }
}

/// Whether a delivered `incoming` version may replace the `current` one: a delivered version
/// never goes back, whatever order ops arrive in. Every store decides with this.
pub fn may_replace(current: Option<u64>, incoming: u64) -> bool {
    current.is_none_or(|c| c <= incoming)
}

/// Applies one op to an in-memory checkpoint; stores share it so they agree on semantics.
pub fn apply_op(cp: &mut Checkpoint, op: &CheckpointOp) {
    match op {
        CheckpointOp::Upsert {
            key,
            version,
            state,
        } => {
            if may_replace(cp.entities.get(key).map(|e| e.version), *version) {
                cp.entities.insert(
                    key.clone(),
                    EntityState {
                        version: *version,
                        state: state.clone(),
                    },
                );
            }
        }
        CheckpointOp::Remove { key } => {
            cp.entities.remove(key);
        }
        CheckpointOp::SnapshotComplete => cp.snapshot_complete = true,
        CheckpointOp::ResetSnapshot => {
            cp.entities.clear();
            cp.snapshot_complete = false;
        }
        CheckpointOp::SetHistory { scope, op_id } => match op_id {
            Some(op_id) => {
                cp.history.insert(scope.clone(), *op_id);
            }
            None => {
                cp.history.remove(scope);
            }
        },
        CheckpointOp::ResetJobs { client_id } => {
            cp.jobs.remove(client_id);
        }
        CheckpointOp::JobPosition { client_id, frames } => {
            let e = cp.jobs.entry(client_id.clone()).or_default();
            *e = (*e).max(*frames);
        }
        CheckpointOp::HistoryCursor { scope, op_id } => {
            let e = cp.history.entry(scope.clone()).or_default();
            *e = (*e).max(*op_id);
        }
        CheckpointOp::JobEpoch { client_id, epoch } => {
            let e = cp.job_epochs.entry(client_id.clone()).or_default();
            *e = (*e).max(*epoch);
        }
        CheckpointOp::ReadAttempt {
            event,
            sent_ms,
            at_ms,
        } => {
            // The memory store keeps one entry per attempt like redb: the answer replaces the send.
            if let Some(i) = cp
                .reads
                .iter()
                .position(|(e, t)| e == event && t == sent_ms)
            {
                cp.reads.remove(i);
            }
            cp.reads.push((event.clone(), *at_ms));
            cp.reads
                .retain(|(_, t)| at_ms.saturating_sub(*t) < CONNECTS_KEPT_MS);
        }
        CheckpointOp::ConnectAttempt { at_ms } => {
            cp.connects.push(*at_ms);
            cp.connects.sort_unstable();
            let newest = cp.connects.last().copied().unwrap_or(0);
            cp.connects
                .retain(|t| newest.saturating_sub(*t) < CONNECTS_KEPT_MS);
        }
    }
}
