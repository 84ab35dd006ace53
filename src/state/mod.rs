//! The delivered checkpoint: what the brokers have acknowledged, per entity, plus whether the
//! first snapshot was fully delivered, the history position of each scope and the job-frame
//! positions. Only the delivery window writes it; after a crash the
//! connector starts from it and publishes exactly the differences (`CheckpointStore` seam).
//!
//! Entity states are the bulk of it (a million objects are gigabytes as parsed maps), so they
//! are never loaded whole: [`Checkpoint`] holds the positions, and the entities are read one
//! by one through an [`EntityReader`] (the working view's cache misses, a journal's baselines,
//! the disappearance scan after a snapshot).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use serde_json::{Map, Value};

pub mod journal;
pub mod redb_store;

/// `[state]`: where the delivered checkpoint is kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The redb file; unset keeps the checkpoint in memory (every start is then a first start).
    pub path: Option<PathBuf>,
    /// Megabytes of parsed entity states the working view keeps in memory, those in flight
    /// (published, not yet checkpointed) included: delivered ones go first, least recently
    /// used first, and are read back from the store when a change needs them. States in flight
    /// stay whatever their size, and a quarter of the budget stays for delivered ones.
    /// Default 64.
    pub cache_mb: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            path: None,
            cache_mb: 64,
        }
    }
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

/// The checkpoint's positions: everything it holds except the entities, which stay in the
/// store ([`EntityReader`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
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

/// Read access to the delivered entities, shared with the pipeline while the delivery window
/// writes (redb readers see the last committed transaction).
pub trait EntityReader: Send + Sync {
    /// The delivered state of `key`, if any.
    fn get(&self, key: &str) -> Result<Option<EntityState>, StateError>;

    /// The delivered states of `keys`, in order, read in one transaction.
    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<EntityState>>, StateError> {
        keys.iter().map(|k| self.get(k)).collect()
    }

    /// Calls `f(key, version, trashed)` for every delivered entity, without parsing states
    /// that are not trashed (`trashed`: the state has `inTrash: true`).
    fn scan(&self, f: &mut dyn FnMut(&str, u64, bool)) -> Result<(), StateError>;

    /// How many entities are delivered.
    fn count(&self) -> Result<u64, StateError>;
}

/// Durable storage of the delivered checkpoint.
pub trait CheckpointStore: Send {
    /// Reads the checkpoint's positions (at start-up); entities are read through
    /// [`CheckpointStore::reader`].
    fn load(&self) -> Result<Checkpoint, StateError>;

    /// A reader of the delivered entities that sees every transaction committed by `apply`.
    fn reader(&self) -> Arc<dyn EntityReader>;

    /// Applies ops in order in one durable transaction: when this returns Ok they survive a
    /// kill -9 of the process.
    fn apply(&mut self, ops: &[CheckpointOp]) -> Result<(), StateError>;
}

/// A checkpoint kept in memory only (the demo's default, and tests).
#[derive(Debug, Default)]
pub struct MemoryStore {
    checkpoint: Checkpoint,
    entities: Arc<MemoryEntities>,
}

/// The entities of a [`MemoryStore`], shared with its readers.
#[derive(Debug, Default)]
pub struct MemoryEntities(RwLock<HashMap<EntityKey, EntityState>>);

impl MemoryEntities {
    fn read(
        &self,
    ) -> Result<std::sync::RwLockReadGuard<'_, HashMap<EntityKey, EntityState>>, StateError> {
        self.0
            .read()
            .map_err(|_| StateError::Io("memory store lock poisoned by a panic".into()))
    }
}

impl EntityReader for MemoryEntities {
    fn get(&self, key: &str) -> Result<Option<EntityState>, StateError> {
        Ok(self.read()?.get(key).cloned())
    }

    fn scan(&self, f: &mut dyn FnMut(&str, u64, bool)) -> Result<(), StateError> {
        for (k, e) in self.read()?.iter() {
            f(k, e.version, is_trashed(&e.state));
        }
        Ok(())
    }

    fn count(&self) -> Result<u64, StateError> {
        Ok(self.read()?.len() as u64)
    }
}

/// Whether a state says it is in the trash.
pub fn is_trashed(state: &Map<String, Value>) -> bool {
    state.get("inTrash").and_then(Value::as_bool) == Some(true)
}

impl CheckpointStore for MemoryStore {
    fn load(&self) -> Result<Checkpoint, StateError> {
        Ok(self.checkpoint.clone())
    }

    fn reader(&self) -> Arc<dyn EntityReader> {
        self.entities.clone()
    }

    fn apply(&mut self, ops: &[CheckpointOp]) -> Result<(), StateError> {
        let mut entities = self
            .entities
            .0
            .write()
            .map_err(|_| StateError::Io("memory store lock poisoned by a panic".into()))?;
        for op in ops {
            apply_entity_op(&mut entities, op);
            apply_op(&mut self.checkpoint, op);
        }
        Ok(())
    }
}

/// Applies an op's effect on the entities (none for the other ops) to an in-memory map, as
/// the redb store does to its table.
pub fn apply_entity_op(entities: &mut HashMap<EntityKey, EntityState>, op: &CheckpointOp) {
    match op {
        CheckpointOp::Upsert {
            key,
            version,
            state,
        } if may_replace(entities.get(key).map(|e| e.version), *version) => {
            entities.insert(
                key.clone(),
                EntityState {
                    version: *version,
                    state: state.clone(),
                },
            );
        }
        CheckpointOp::Remove { key } => {
            entities.remove(key);
        }
        CheckpointOp::ResetSnapshot => entities.clear(),
        _ => {}
    }
}

/// Whether a delivered `incoming` version may replace the `current` one: a delivered version
/// never goes back, whatever order ops arrive in. Every store decides with this.
pub fn may_replace(current: Option<u64>, incoming: u64) -> bool {
    current.is_none_or(|c| c <= incoming)
}

/// Applies one op to the positions of an in-memory checkpoint (entity ops: see
/// [`apply_entity_op`]); stores share it so they agree on semantics.
pub fn apply_op(cp: &mut Checkpoint, op: &CheckpointOp) {
    match op {
        CheckpointOp::Upsert { .. } | CheckpointOp::Remove { .. } => {}
        CheckpointOp::SnapshotComplete => cp.snapshot_complete = true,
        CheckpointOp::ResetSnapshot => cp.snapshot_complete = false,
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
