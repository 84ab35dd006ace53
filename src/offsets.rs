//! `taskstream offsets show | reset | set`: the positions a connector resumes from, shown and
//! changed while it is stopped. The state file is locked by a running connector (redb takes an
//! exclusive lock), so a change is refused while one runs on it.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::Config;
use crate::state::journal::Journal;
use crate::state::redb_store::RedbStore;
use crate::state::{Checkpoint, CheckpointOp, CheckpointStore, StateError};

/// Why a positions command failed.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    /// Positions live in memory only.
    #[error("state.path is not set: positions live in memory and end with the process")]
    NoStatePath,
    /// Another process (a running connector) holds the state file.
    #[error("{0} is in use, most likely by a running connector: stop it first")]
    InUse(String),
    /// The store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// Nothing to change was named.
    #[error("{0}")]
    Usage(String),
}

/// Which positions `reset` forgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// The SynapTask source: delivered entities, the snapshot flag and every history position
    /// (or, with `--scope`, that scope's position only).
    Synaptask,
    /// The job source: delivered frame counts.
    Jobs,
}

fn open(cfg: &Config) -> Result<(RedbStore, PathBuf), OffsetsError> {
    let path = cfg.state_path().ok_or(OffsetsError::NoStatePath)?.clone();
    if !path.exists() {
        return Err(OffsetsError::State(StateError::Open {
            path: path.display().to_string(),
            message: "no such file (the connector has not run with this state.path)".into(),
        }));
    }
    match RedbStore::open(&path) {
        Ok(store) => Ok((store, path)),
        Err(StateError::Open { path, message })
            if message.contains("already open") || message.contains("lock") =>
        {
            Err(OffsetsError::InUse(path))
        }
        Err(e) => Err(e.into()),
    }
}

/// The positions as JSON: snapshot state, entity count, history per scope, job positions.
pub fn positions(cp: &Checkpoint, entities: u64, path: &Path) -> Value {
    let mut history: Vec<(&String, &u64)> = cp.history.iter().collect();
    history.sort();
    let mut jobs: Vec<Value> = cp
        .jobs
        .iter()
        .map(|(client, frames)| {
            json!({"clientId": client, "framesDelivered": frames,
                   "epoch": cp.job_epochs.get(client)})
        })
        .collect();
    jobs.sort_by(|a, b| a["clientId"].as_str().cmp(&b["clientId"].as_str()));
    json!({
        "state": path.display().to_string(),
        "snapshotComplete": cp.snapshot_complete,
        "entities": entities,
        "history": history.iter().map(|(s, op)| json!({"scope": s, "opId": op})).collect::<Vec<_>>(),
        "jobs": jobs,
    })
}

/// `offsets show`: the positions as JSON, or as a table.
pub fn show(cfg: &Config, as_json: bool) -> Result<String, OffsetsError> {
    let (store, path) = open(cfg)?;
    let p = positions(&store.load()?, store.reader().count()?, &path);
    if as_json {
        return Ok(p.to_string());
    }
    let mut out = format!(
        "state              {}\nsnapshot complete  {}\nentities           {}\n",
        p["state"].as_str().unwrap_or_default(),
        p["snapshotComplete"],
        p["entities"]
    );
    out.push_str("\nSOURCE     POSITION                                      VALUE\n");
    for h in p["history"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "synaptask  history {:<38} op {}\n",
            h["scope"].as_str().unwrap_or_default(),
            h["opId"]
        ));
    }
    for j in p["jobs"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "jobs       frames of client {:<29} {} (epoch {})\n",
            j["clientId"].as_str().unwrap_or_default(),
            j["framesDelivered"],
            j["epoch"]
        ));
    }
    Ok(out)
}

/// `offsets reset`: forgets positions so that the next run starts them again. Returns what
/// was done, for the user.
pub fn reset(cfg: &Config, which: Which, scope: Option<&str>) -> Result<String, OffsetsError> {
    let (mut store, path) = open(cfg)?;
    let cp = store.load()?;
    let (ops, said) = match (which, scope) {
        (Which::Synaptask, Some(scope)) => {
            if !cp.history.contains_key(scope) {
                return Err(OffsetsError::Usage(format!(
                    "no history position for scope {scope}; `offsets show` lists them"
                )));
            }
            (
                vec![CheckpointOp::SetHistory {
                    scope: scope.to_string(),
                    op_id: None,
                }],
                format!("history position of {scope} forgotten: the next run starts it as a new scope (source.history_start)"),
            )
        }
        (Which::Synaptask, None) => {
            let mut ops = vec![CheckpointOp::ResetSnapshot];
            ops.extend(cp.history.keys().map(|s| CheckpointOp::SetHistory {
                scope: s.clone(),
                op_id: None,
            }));
            // The published journal would otherwise give the next run baselines for entities
            // the checkpoint no longer has.
            let journal = Journal::path_beside(&path);
            if journal.exists() {
                std::fs::remove_file(&journal).map_err(|e| StateError::Io(e.to_string()))?;
            }
            (
                ops,
                format!(
                    "{} entities and {} history positions forgotten: the next run takes a full snapshot and publishes every entity again",
                    store.reader().count()?,
                    cp.history.len()
                ),
            )
        }
        (Which::Jobs, Some(_)) => {
            return Err(OffsetsError::Usage(
                "--scope applies to the synaptask source only".into(),
            ))
        }
        (Which::Jobs, None) => (
            cp.jobs
                .keys()
                .map(|c| CheckpointOp::ResetJobs {
                    client_id: c.clone(),
                })
                .collect(),
            format!(
                "frame counts of {} job clients forgotten (record ids stay unique: each run takes a new epoch)",
                cp.jobs.len()
            ),
        ),
    };
    store.apply(&ops)?;
    Ok(said)
}

/// `offsets set`: one history position, exactly (lower than today's too: history is replayed
/// from there, and records already published come again with the same ids).
pub fn set(cfg: &Config, scope: &str, op_id: u64) -> Result<String, OffsetsError> {
    let (mut store, _) = open(cfg)?;
    let before = store.load()?.history.get(scope).copied();
    store.apply(&[CheckpointOp::SetHistory {
        scope: scope.to_string(),
        op_id: Some(op_id),
    }])?;
    Ok(format!(
        "history position of {scope}: {} -> {op_id}",
        before.map_or("none".to_string(), |b| b.to_string())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn config(dir: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.state.path = Some(dir.join("state.redb"));
        cfg
    }

    #[test]
    fn show_reset_and_set_change_what_the_next_run_resumes_from() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cfg = config(dir.path());
        {
            let mut store = RedbStore::open(cfg.state_path().unwrap())?;
            store.apply(&[
                CheckpointOp::Upsert {
                    key: "node:a".into(),
                    version: 3,
                    state: Arc::default(),
                },
                CheckpointOp::SnapshotComplete,
                CheckpointOp::HistoryCursor {
                    scope: "USER:u".into(),
                    op_id: 40,
                },
                CheckpointOp::JobPosition {
                    client_id: "c".into(),
                    frames: 7,
                },
            ])?;
        }
        let shown: Value = serde_json::from_str(&show(&cfg, true)?)?;
        assert_eq!(shown["entities"], 1);
        assert_eq!(shown["history"][0]["opId"], 40);
        assert!(show(&cfg, false)?.contains("USER:u"));

        set(&cfg, "USER:u", 12)?;
        let shown: Value = serde_json::from_str(&show(&cfg, true)?)?;
        assert_eq!(shown["history"][0]["opId"], 12, "set can go back");

        reset(&cfg, Which::Jobs, None)?;
        reset(&cfg, Which::Synaptask, None)?;
        let store = RedbStore::open(cfg.state_path().unwrap())?;
        let cp = store.load()?;
        assert_eq!(store.reader().count()?, 0);
        assert!(!cp.snapshot_complete && cp.history.is_empty());
        assert!(cp.jobs.is_empty());
        Ok(())
    }

    #[test]
    fn a_state_file_in_use_is_refused_with_a_clear_message() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let cfg = config(dir.path());
        let _running = RedbStore::open(cfg.state_path().unwrap())?;
        let err = show(&cfg, false).unwrap_err();
        assert!(matches!(err, OffsetsError::InUse(_)), "{err}");
        assert!(err.to_string().contains("stop it first"));
        Ok(())
    }
}
