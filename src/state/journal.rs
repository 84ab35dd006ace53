//! The published journal: what was handed to the brokers, before they acknowledged it.
//!
//! The checkpoint says what was *delivered*, and a restart re-publishes from there, which is
//! what at-least-once needs. But consumers may already have seen a newer version that was
//! published and not yet acknowledged when the process died; if the entity changed again
//! while the connector was down, the next record's `before` and status transition must start
//! from what consumers saw, not from the older delivered state (a status record `2 -> 0`
//! after a published `0 -> 2`, not nothing). So every upsert is appended here before its
//! group is published, and a restart overlays the entries newer than the checkpoint on the
//! view's baselines (see [`crate::normalize::View::remember_published`]).
//!
//! A plain append (no fsync): it survives a kill -9 of the process, as the page cache does,
//! not a power loss; after one the baselines are the delivered ones, as without a journal.
//! It is compacted at start and whenever it grows past [`COMPACT_AT`] bytes, keeping only
//! entries newer than the checkpoint.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{CheckpointOp, EntityReader, StateError};

/// Journal size that triggers a compaction.
pub const COMPACT_AT: u64 = 256 * 1024 * 1024;

/// A published, maybe undelivered, state of one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    /// The published version.
    pub version: u64,
    /// The published full state.
    pub state: Arc<Map<String, Value>>,
}

/// The journal file beside the state file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
    bytes: u64,
    buf: Vec<u8>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StateError + '_ {
    move |e| StateError::Io(format!("published journal {}: {e}", path.display()))
}

impl Journal {
    /// The journal of the state file `state` (`<state>.published.jsonl`).
    pub fn path_beside(state: &Path) -> PathBuf {
        let mut name = state.as_os_str().to_owned();
        name.push(".published.jsonl");
        name.into()
    }

    /// Reads the journal at `path` and keeps the entries newer than the delivered ones
    /// (`delivered`), rewriting the file with just those; returns the journal, open for
    /// appending, and the entries. Lines that do not parse (a write cut short by a crash) are
    /// skipped.
    pub fn open(
        path: &Path,
        delivered: &dyn EntityReader,
    ) -> Result<(Self, HashMap<String, Published>), StateError> {
        let mut latest: HashMap<String, Published> = HashMap::new();
        match std::fs::File::open(path) {
            Ok(f) => {
                for line in std::io::BufReader::new(f).lines() {
                    let Ok(line) = line else { break };
                    let Ok(Value::Object(mut entry)) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    let (Some(Value::String(key)), Some(version)) =
                        (entry.remove("k"), entry.get("v").and_then(Value::as_u64))
                    else {
                        continue;
                    };
                    let Some(Value::Object(state)) = entry.remove("s") else {
                        continue;
                    };
                    if latest.get(&key).is_none_or(|p| p.version <= version) {
                        latest.insert(
                            key,
                            Published {
                                version,
                                state: Arc::new(state),
                            },
                        );
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
        let keys: Vec<&str> = latest.keys().map(String::as_str).collect();
        let versions: HashMap<String, u64> = keys
            .iter()
            .zip(delivered.get_many(&keys)?)
            .filter_map(|(k, d)| Some((k.to_string(), d?.version)))
            .collect();
        latest.retain(|k, p| versions.get(k).is_none_or(|d| *d < p.version));
        let journal = Self::rewrite(path, latest.iter())?;
        Ok((journal, latest))
    }

    /// Replaces the file with `entries`, atomically (write a new file, rename it over).
    fn rewrite<'a>(
        path: &Path,
        entries: impl Iterator<Item = (&'a String, &'a Published)>,
    ) -> Result<Self, StateError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        // Written line by line through a small buffer: a compaction during a large snapshot
        // keeps tens of thousands of states, and one buffer of them all was a 49 MB spike at
        // the top of a 1,000,000-object snapshot's peak memory.
        let mut out = std::io::BufWriter::with_capacity(
            64 * 1024,
            std::fs::File::create(&tmp).map_err(io(path))?,
        );
        let mut buf = Vec::new();
        let mut bytes = 0u64;
        for (k, p) in entries {
            buf.clear();
            line(&mut buf, k, p.version, &p.state)?;
            out.write_all(&buf).map_err(io(path))?;
            bytes += buf.len() as u64;
        }
        out.into_inner().map_err(|e| io(path)(e.into_error()))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            bytes,
            buf,
        })
    }

    /// Appends the upserts among `ops` (one write for all of them). Call before publishing.
    pub fn append(&mut self, ops: &[CheckpointOp]) -> Result<(), StateError> {
        self.buf.clear();
        for op in ops {
            if let CheckpointOp::Upsert {
                key,
                version,
                state,
            } = op
            {
                line(&mut self.buf, key, *version, state)?;
            }
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buf).map_err(io(&self.path))?;
        self.bytes += self.buf.len() as u64;
        Ok(())
    }

    /// Whether the journal has grown enough to compact.
    pub fn wants_compaction(&self) -> bool {
        self.bytes > COMPACT_AT
    }

    /// Rewrites the journal with only `undelivered` (entries published and not yet delivered).
    pub fn compact<'a>(
        &mut self,
        undelivered: impl Iterator<Item = (&'a String, &'a Published)>,
    ) -> Result<(), StateError> {
        *self = Self::rewrite(&self.path, undelivered)?;
        Ok(())
    }
}

fn line(
    buf: &mut Vec<u8>,
    key: &str,
    version: u64,
    state: &Map<String, Value>,
) -> Result<(), StateError> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        k: &'a str,
        v: u64,
        s: &'a Map<String, Value>,
    }
    serde_json::to_writer(
        &mut *buf,
        &Line {
            k: key,
            v: version,
            s: state,
        },
    )
    .map_err(|e| StateError::Io(format!("cannot journal {key}: {e}")))?;
    buf.push(b'\n');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CheckpointStore;
    use serde_json::json;

    fn state(v: Value) -> Arc<Map<String, Value>> {
        Arc::new(v.as_object().cloned().unwrap())
    }

    fn upsert(key: &str, version: u64, status: i64) -> CheckpointOp {
        CheckpointOp::Upsert {
            key: key.into(),
            version,
            state: state(json!({"id": key, "version": version, "status": status})),
        }
    }

    #[test]
    fn keeps_what_is_newer_than_the_checkpoint_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = Journal::path_beside(&dir.path().join("state.redb"));
        let mut store = crate::state::MemoryStore::default();
        let (mut j, found) = Journal::open(&path, &*store.reader()).unwrap();
        assert!(found.is_empty());
        j.append(&[upsert("node:a", 4, 0), upsert("node:b", 1, 0)])
            .unwrap();
        j.append(&[upsert("node:a", 5, 2), CheckpointOp::SnapshotComplete])
            .unwrap();
        // A crash mid-line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"k\":\"node:c\",\"v\":")
            .unwrap();
        drop(j);

        store
            .apply(&[upsert("node:a", 4, 0), upsert("node:b", 1, 0)])
            .unwrap();
        let (_, found) = Journal::open(&path, &*store.reader()).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found["node:a"].version, 5);
        assert_eq!(found["node:a"].state["status"], 2);
        // Compacted at open: only that entry is left.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
    }
}
