//! The redb-backed [`CheckpointStore`]: the delivered checkpoint in one embedded file, written
//! in one durable transaction per [`CheckpointStore::apply`] so that what `apply` reported is
//! still there after a kill -9.
//!
//! Layout (format 1):
//! - `entities`: entity key → 8-byte big-endian version, then the state as a JSON object. The
//!   version sits in front, outside the JSON, so an upsert compares versions without parsing
//!   the state it is about to replace.
//! - `meta`: `format` → 1, `snapshot_complete` → 1 once set.
//! - `jobs`: job-API client id → frames delivered.
//! - `history`: history scope → highest delivered op id.
//! - `job_epochs`: job-API client id → epoch of its latest run.
//! - `connects`: Unix milliseconds of recent connection attempts → 0.
//! - `reads`: (read event, Unix milliseconds sent) → Unix milliseconds it counts from.
//!
//! The last three were added without a format bump: a file written before them simply has
//! none of these rows yet.

use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, WriteTransaction,
};
use serde_json::{Map, Value};

use super::{Checkpoint, CheckpointOp, CheckpointStore, EntityReader, EntityState, StateError};

const ENTITIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entities");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const JOBS: TableDefinition<&str, u64> = TableDefinition::new("jobs");
const HISTORY: TableDefinition<&str, u64> = TableDefinition::new("history");
const JOB_EPOCHS: TableDefinition<&str, u64> = TableDefinition::new("job_epochs");
const CONNECTS: TableDefinition<u64, u64> = TableDefinition::new("connects");
const READS: TableDefinition<(&str, u64), u64> = TableDefinition::new("reads");

const META_FORMAT: &str = "format";
const META_SNAPSHOT_COMPLETE: &str = "snapshot_complete";
/// Bumped whenever the layout above changes, so an old binary refuses a newer file rather than
/// misreading it.
const FORMAT: u64 = 1;

const VERSION_LEN: usize = 8;

/// redb's default cache is 1 GiB. Entity reads are the working view's cache misses (it keeps
/// the parsed states it uses, `state.cache_mb`) and the pages they need are in the OS page
/// cache anyway, so a small cache keeps the connector's memory predictable. 4 MB rather than
/// 16: `bash benches/memory.sh 500000 500000` peaked at 121-136 MB instead of 162-192, and
/// 98-102 MB after the snapshot instead of 137-142, with the snapshot as fast (55-58 s).
const CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The delivered checkpoint in a redb file.
pub struct RedbStore {
    db: Arc<Database>,
}

/// Reads delivered entities from a [`RedbStore`]'s file (redb's readers see the last commit and
/// never wait for a writer).
struct RedbReader {
    db: Arc<Database>,
}

/// The serialised form of `"inTrash":true` as `serde_json` writes a state: a state without it
/// is not trashed, one with it is parsed to make sure (the text may sit inside a string).
const TRASHED: &[u8] = b"\"inTrash\":true";

impl EntityReader for RedbReader {
    fn get(&self, key: &str) -> Result<Option<EntityState>, StateError> {
        Ok(self.get_many(&[key])?.pop().flatten())
    }

    fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<EntityState>>, StateError> {
        let txn = self.db.begin_read().map_err(io)?;
        let entities = txn.open_table(ENTITIES).map_err(io)?;
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(match entities.get(*key).map_err(io)? {
                Some(guard) => {
                    let (version, state) = decode_entity(key, guard.value())?;
                    Some(EntityState {
                        version,
                        state: state.into(),
                    })
                }
                None => None,
            });
        }
        Ok(out)
    }

    fn scan(&self, f: &mut dyn FnMut(&str, u64, bool)) -> Result<(), StateError> {
        let txn = self.db.begin_read().map_err(io)?;
        let entities = txn.open_table(ENTITIES).map_err(io)?;
        for row in entities.iter().map_err(io)? {
            let (key, value) = row.map_err(io)?;
            let (key, value) = (key.value(), value.value());
            let version = decode_version(key, value)?;
            let json = &value[VERSION_LEN..];
            let trashed = json.windows(TRASHED.len()).any(|w| w == TRASHED)
                && super::is_trashed(&decode_entity(key, value)?.1);
            f(key, version, trashed);
        }
        Ok(())
    }

    fn count(&self) -> Result<u64, StateError> {
        let txn = self.db.begin_read().map_err(io)?;
        let entities = txn.open_table(ENTITIES).map_err(io)?;
        entities.len().map_err(io)
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens the store at `path`, creating its parent directories and the file when missing.
    ///
    /// The file's integrity is checked on every open (it is read once, at start-up), so a file
    /// damaged outside redb fails with an error instead of a panic later on.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let open_err = |message: String| StateError::Open {
            path: path.display().to_string(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path)
            .map_err(|e| open_err(e.to_string()))?;

        // Creating the tables up front lets `load` read them without a "no such table" case.
        let txn = begin_durable(&db)?;
        {
            txn.open_table(ENTITIES).map_err(io)?;
            txn.open_table(JOBS).map_err(io)?;
            txn.open_table(HISTORY).map_err(io)?;
            txn.open_table(JOB_EPOCHS).map_err(io)?;
            txn.open_table(CONNECTS).map_err(io)?;
            txn.open_table(READS).map_err(io)?;
            let mut meta = txn.open_table(META).map_err(io)?;
            let format = meta.get(META_FORMAT).map_err(io)?.map(|g| g.value());
            match format {
                None => {
                    meta.insert(META_FORMAT, FORMAT).map_err(io)?;
                }
                Some(FORMAT) => {}
                Some(other) => {
                    return Err(open_err(format!(
                        "store format {other} is not supported (this build reads {FORMAT})"
                    )))
                }
            }
        }
        txn.commit().map_err(io)?;
        Ok(Self { db: Arc::new(db) })
    }
}

impl CheckpointStore for RedbStore {
    fn load(&self) -> Result<Checkpoint, StateError> {
        let txn = self.db.begin_read().map_err(io)?;
        let mut cp = Checkpoint::default();

        let meta = txn.open_table(META).map_err(io)?;
        cp.snapshot_complete = meta
            .get(META_SNAPSHOT_COMPLETE)
            .map_err(io)?
            .is_some_and(|g| g.value() != 0);

        let jobs = txn.open_table(JOBS).map_err(io)?;
        for row in jobs.iter().map_err(io)? {
            let (client, frames) = row.map_err(io)?;
            cp.jobs.insert(client.value().to_owned(), frames.value());
        }

        let history = txn.open_table(HISTORY).map_err(io)?;
        for row in history.iter().map_err(io)? {
            let (scope, op_id) = row.map_err(io)?;
            cp.history.insert(scope.value().to_owned(), op_id.value());
        }

        let epochs = txn.open_table(JOB_EPOCHS).map_err(io)?;
        for row in epochs.iter().map_err(io)? {
            let (client, epoch) = row.map_err(io)?;
            cp.job_epochs
                .insert(client.value().to_owned(), epoch.value());
        }

        let connects = txn.open_table(CONNECTS).map_err(io)?;
        for row in connects.iter().map_err(io)? {
            let (at_ms, _) = row.map_err(io)?;
            cp.connects.push(at_ms.value());
        }
        let reads = txn.open_table(READS).map_err(io)?;
        for row in reads.iter().map_err(io)? {
            let (key, at_ms) = row.map_err(io)?;
            cp.reads.push((key.value().0.to_owned(), at_ms.value()));
        }
        cp.reads.sort_by_key(|(_, t)| *t);
        Ok(cp)
    }

    fn reader(&self) -> Arc<dyn EntityReader> {
        Arc::new(RedbReader {
            db: Arc::clone(&self.db),
        })
    }

    fn apply(&mut self, ops: &[CheckpointOp]) -> Result<(), StateError> {
        if ops.is_empty() {
            return Ok(());
        }
        let txn = begin_durable(&self.db)?;
        // On any error below the transaction is dropped uncommitted, which aborts it: a batch
        // lands whole or not at all.
        {
            let mut entities = txn.open_table(ENTITIES).map_err(io)?;
            let mut meta = txn.open_table(META).map_err(io)?;
            let mut jobs = txn.open_table(JOBS).map_err(io)?;
            let mut history = txn.open_table(HISTORY).map_err(io)?;
            let mut epochs = txn.open_table(JOB_EPOCHS).map_err(io)?;
            let mut connects = txn.open_table(CONNECTS).map_err(io)?;
            let mut reads = txn.open_table(READS).map_err(io)?;
            let mut tables = Tables {
                entities: &mut entities,
                meta: &mut meta,
                jobs: &mut jobs,
                history: &mut history,
                epochs: &mut epochs,
                connects: &mut connects,
                reads: &mut reads,
            };
            for op in ops {
                apply_one(&mut tables, op)?;
            }
        }
        txn.commit().map_err(io)?;
        Ok(())
    }
}

/// The tables of one write transaction.
struct Tables<'a, 't> {
    entities: &'a mut Table<'t, &'static str, &'static [u8]>,
    meta: &'a mut Table<'t, &'static str, u64>,
    jobs: &'a mut Table<'t, &'static str, u64>,
    history: &'a mut Table<'t, &'static str, u64>,
    epochs: &'a mut Table<'t, &'static str, u64>,
    connects: &'a mut Table<'t, u64, u64>,
    reads: &'a mut Table<'t, (&'static str, u64), u64>,
}

/// Same semantics as [`super::apply_op`], against the tables of one write transaction.
fn apply_one(t: &mut Tables<'_, '_>, op: &CheckpointOp) -> Result<(), StateError> {
    let Tables {
        entities,
        meta,
        jobs,
        history,
        epochs,
        connects,
        reads,
    } = t;
    match op {
        CheckpointOp::Upsert {
            key,
            version,
            state,
        } => {
            let current = match entities.get(key.as_str()).map_err(io)? {
                Some(guard) => Some(decode_version(key, guard.value())?),
                None => None,
            };
            if !super::may_replace(current, *version) {
                return Ok(());
            }
            let bytes = encode_entity(key, *version, state)?;
            entities
                .insert(key.as_str(), bytes.as_slice())
                .map_err(io)?;
        }
        CheckpointOp::Remove { key } => {
            entities.remove(key.as_str()).map_err(io)?;
        }
        CheckpointOp::SnapshotComplete => {
            meta.insert(META_SNAPSHOT_COMPLETE, 1).map_err(io)?;
        }
        CheckpointOp::ResetSnapshot => {
            entities.retain(|_, _| false).map_err(io)?;
            meta.remove(META_SNAPSHOT_COMPLETE).map_err(io)?;
        }
        CheckpointOp::SetHistory { scope, op_id } => match op_id {
            Some(op_id) => {
                history.insert(scope.as_str(), *op_id).map_err(io)?;
            }
            None => {
                history.remove(scope.as_str()).map_err(io)?;
            }
        },
        CheckpointOp::ResetJobs { client_id } => {
            jobs.remove(client_id.as_str()).map_err(io)?;
        }
        CheckpointOp::JobPosition { client_id, frames } => {
            let current = jobs.get(client_id.as_str()).map_err(io)?.map(|g| g.value());
            if current.is_none_or(|c| c < *frames) {
                jobs.insert(client_id.as_str(), *frames).map_err(io)?;
            }
        }
        CheckpointOp::HistoryCursor { scope, op_id } => {
            let current = history.get(scope.as_str()).map_err(io)?.map(|g| g.value());
            if current.is_none_or(|c| c < *op_id) {
                history.insert(scope.as_str(), *op_id).map_err(io)?;
            }
        }
        CheckpointOp::JobEpoch { client_id, epoch } => {
            let current = epochs
                .get(client_id.as_str())
                .map_err(io)?
                .map(|g| g.value());
            if current.is_none_or(|c| c < *epoch) {
                epochs.insert(client_id.as_str(), *epoch).map_err(io)?;
            }
        }
        CheckpointOp::ReadAttempt {
            event,
            sent_ms,
            at_ms,
        } => {
            reads
                .insert((event.as_str(), *sent_ms), *at_ms)
                .map_err(io)?;
            let cutoff = at_ms.saturating_sub(super::CONNECTS_KEPT_MS);
            reads.retain(|_, t| t > cutoff).map_err(io)?;
        }
        CheckpointOp::ConnectAttempt { at_ms } => {
            connects.insert(*at_ms, 0).map_err(io)?;
            let cutoff = at_ms.saturating_sub(super::CONNECTS_KEPT_MS);
            connects.retain(|t, _| t > cutoff).map_err(io)?;
        }
    }
    Ok(())
}

/// A write transaction that is on disk when `commit` returns.
fn begin_durable(db: &Database) -> Result<WriteTransaction, StateError> {
    let mut txn = db.begin_write().map_err(io)?;
    // Immediate is redb's default; set anyway so the kill -9 guarantee does not rest on it.
    txn.set_durability(Durability::Immediate).map_err(io)?;
    Ok(txn)
}

fn encode_entity(
    key: &str,
    version: u64,
    state: &Map<String, Value>,
) -> Result<Vec<u8>, StateError> {
    let mut bytes = Vec::with_capacity(VERSION_LEN + 256);
    bytes.extend_from_slice(&version.to_be_bytes());
    serde_json::to_writer(&mut bytes, state)
        .map_err(|e| StateError::Io(format!("cannot encode {key}: {e}")))?;
    Ok(bytes)
}

fn decode_version(key: &str, bytes: &[u8]) -> Result<u64, StateError> {
    let head: [u8; VERSION_LEN] = bytes
        .get(..VERSION_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| {
            StateError::Corrupt(format!(
                "{key}: value of {} bytes has no version",
                bytes.len()
            ))
        })?;
    Ok(u64::from_be_bytes(head))
}

fn decode_entity(key: &str, bytes: &[u8]) -> Result<(u64, Map<String, Value>), StateError> {
    let version = decode_version(key, bytes)?;
    let state = serde_json::from_slice(&bytes[VERSION_LEN..])
        .map_err(|e| StateError::Corrupt(format!("{key}: state is not a JSON object: {e}")))?;
    Ok((version, state))
}

fn io(e: impl std::fmt::Display) -> StateError {
    StateError::Io(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{apply_op, MemoryStore};
    use serde_json::json;

    fn state(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    fn upsert(key: &str, version: u64, title: &str) -> CheckpointOp {
        CheckpointOp::Upsert {
            key: key.into(),
            version,
            state: state(json!({ "id": key, "title": title, "tags": ["a", 1, null] })).into(),
        }
    }

    fn sample_ops() -> Vec<CheckpointOp> {
        vec![
            upsert("node:1", 1, "one"),
            upsert("node:2", 4, "two"),
            upsert("link:3", 2, "three"),
            CheckpointOp::Remove {
                key: "link:3".into(),
            },
            CheckpointOp::SnapshotComplete,
            CheckpointOp::JobPosition {
                client_id: "c1".into(),
                frames: 7,
            },
            CheckpointOp::HistoryCursor {
                scope: "USER:u".into(),
                op_id: 40,
            },
            CheckpointOp::HistoryCursor {
                scope: "USER:u".into(),
                op_id: 12,
            },
            upsert("node:1", 3, "one again"),
        ]
    }

    #[test]
    fn round_trip_matches_memory_store() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = RedbStore::open(&dir.path().join("nested/dir/cp.redb"))?;
        assert_eq!(store.load()?, Checkpoint::default());

        let mut mem = MemoryStore::default();
        store.apply(&sample_ops())?;
        mem.apply(&sample_ops())?;
        let loaded = store.load()?;
        assert_eq!(loaded, mem.load()?);
        let (disk, ram) = (store.reader(), mem.reader());
        for key in ["node:1", "node:2", "link:3"] {
            assert_eq!(disk.get(key)?, ram.get(key)?, "{key}");
        }
        assert_eq!(disk.get("node:1")?.map(|e| e.version), Some(3));
        assert_eq!(disk.get("link:3")?, None);
        assert_eq!(disk.count()?, 2);
        assert!(loaded.snapshot_complete);
        assert_eq!(loaded.jobs["c1"], 7);
        assert_eq!(
            loaded.history["USER:u"], 40,
            "a history position never goes back"
        );
        Ok(())
    }

    #[test]
    fn versions_and_job_positions_never_go_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = RedbStore::open(&dir.path().join("cp.redb"))?;
        let job = |frames| CheckpointOp::JobPosition {
            client_id: "c1".into(),
            frames,
        };
        store.apply(&[upsert("node:1", 5, "five"), job(10)])?;
        store.apply(&[upsert("node:1", 4, "four"), job(3)])?;
        let cp = store.load()?;
        let one = store.reader().get("node:1")?.expect("delivered");
        assert_eq!(one.version, 5);
        assert_eq!(one.state["title"], "five");
        assert_eq!(cp.jobs["c1"], 10);

        // Equal versions replace, like `apply_op`.
        store.apply(&[upsert("node:1", 5, "five again"), job(11)])?;
        let mut expected = Checkpoint::default();
        for op in [
            upsert("node:1", 5, "five"),
            job(10),
            upsert("node:1", 5, "five again"),
            job(11),
        ] {
            apply_op(&mut expected, &op);
        }
        assert_eq!(store.load()?, expected);
        let again = store.reader().get("node:1")?.expect("delivered");
        assert_eq!(again.state["title"], "five again");
        Ok(())
    }

    #[test]
    fn read_attempts_count_from_their_answer_and_old_ones_are_forgotten() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cp.redb");
        let mut store = RedbStore::open(&path)?;
        let read = |sent_ms, at_ms| CheckpointOp::ReadAttempt {
            event: "history:page".into(),
            sent_ms,
            at_ms,
        };
        let t = 50 * 60 * 1000;
        store.apply(&[read(1000, 1000)])?;
        store.apply(&[read(t, t), read(t, t + 300)])?;
        store.apply(&[CheckpointOp::ConnectAttempt { at_ms: t }])?;
        drop(store);
        let cp = RedbStore::open(&path)?.load()?;
        assert_eq!(cp.reads, vec![("history:page".to_string(), t + 300)]);
        assert_eq!(cp.connects, vec![t]);
        Ok(())
    }

    #[test]
    fn reopen_after_drop_sees_data() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cp.redb");
        let before = {
            let mut store = RedbStore::open(&path)?;
            store.apply(&sample_ops())?;
            store.load()?
        };
        let store = RedbStore::open(&path)?;
        assert_eq!(store.load()?, before);
        Ok(())
    }

    #[test]
    fn corrupt_value_is_an_error_not_a_panic() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = RedbStore::open(&dir.path().join("cp.redb"))?;
        store.apply(&[upsert("node:ok", 1, "fine")])?;
        for (key, bytes) in [
            ("node:short", &b"\x00\x01"[..]),
            (
                "node:json",
                &b"\x00\x00\x00\x00\x00\x00\x00\x01{not json"[..],
            ),
            ("node:array", &b"\x00\x00\x00\x00\x00\x00\x00\x01[1,2]"[..]),
        ] {
            let txn = store.db.begin_write()?;
            txn.open_table(ENTITIES)?.insert(key, bytes)?;
            txn.commit()?;
            let err = store
                .reader()
                .get(key)
                .expect_err("corrupt value must not load");
            assert!(
                matches!(err, StateError::Corrupt(ref m) if m.contains(key)),
                "{err}"
            );
            // The scan parses versions only (and trashed states).
            if key == "node:short" {
                let err = store
                    .reader()
                    .scan(&mut |_, _, _| {})
                    .expect_err("a value without a version must not scan");
                assert!(matches!(err, StateError::Corrupt(_)), "{err}");
            }
            // An upsert over a value whose version cannot be read is refused too.
            if key == "node:short" {
                let err = store
                    .apply(&[upsert(key, 1, "x")])
                    .expect_err("corrupt version must not be overwritten");
                assert!(matches!(err, StateError::Corrupt(_)), "{err}");
            }
            let txn = store.db.begin_write()?;
            txn.open_table(ENTITIES)?.remove(key)?;
            txn.commit()?;
        }
        assert_eq!(store.reader().count()?, 1);
        Ok(())
    }

    #[test]
    fn scan_tells_trashed_states_without_being_fooled_by_their_text() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = RedbStore::open(&dir.path().join("cp.redb"))?;
        let with = |key: &str, v: Value| CheckpointOp::Upsert {
            key: key.into(),
            version: 2,
            state: state(v).into(),
        };
        store.apply(&[
            with("node:t", json!({"id": "t", "inTrash": true})),
            with("node:a", json!({"id": "a", "inTrash": false})),
            with("node:s", json!({"id": "s", "title": "\"inTrash\":true"})),
            with("node:n", json!({"id": "n"})),
        ])?;
        let mut seen = Vec::new();
        store
            .reader()
            .scan(&mut |k, v, trashed| seen.push((k.to_string(), v, trashed)))?;
        seen.sort();
        let expect = |k: &str, t| (k.to_string(), 2, t);
        assert_eq!(
            seen,
            vec![
                expect("node:a", false),
                expect("node:n", false),
                expect("node:s", false),
                expect("node:t", true)
            ]
        );
        Ok(())
    }

    #[test]
    fn garbage_file_fails_to_open() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cp.redb");
        std::fs::write(&path, vec![0xAB; 10_000])?;
        let err = RedbStore::open(&path).expect_err("garbage is not a store");
        assert!(matches!(err, StateError::Open { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn second_open_of_the_same_file_is_refused() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cp.redb");
        let _first = RedbStore::open(&path)?;
        assert!(matches!(
            RedbStore::open(&path),
            Err(StateError::Open { .. })
        ));
        Ok(())
    }

    /// Prints the cost of one durable transaction; run with `--nocapture` to see it.
    #[test]
    fn apply_cost() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut store = RedbStore::open(&dir.path().join("cp.redb"))?;
        for n in [1usize, 1000] {
            let rounds = 5;
            let mut total = std::time::Duration::ZERO;
            for r in 0..rounds {
                let ops: Vec<_> = (0..n)
                    .map(|i| upsert(&format!("node:{r}-{i}"), 1, "a title of some length"))
                    .collect();
                let t = std::time::Instant::now();
                store.apply(&ops)?;
                total += t.elapsed();
            }
            println!(
                "redb apply of {n} op(s): {:?} per transaction",
                total / rounds
            );
        }
        Ok(())
    }
}
