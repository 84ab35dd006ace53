//! Durability of the delivered checkpoint across a kill -9: a child process (this test binary
//! again, switched by an environment variable) commits checkpoints through `Delivery` into a
//! `RedbStore` and reports each one; the parent SIGKILLs it right after a report and checks
//! that the store opens, holds at least that checkpoint, and holds whole batches only.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use serde_json::json;
use taskstream::delivery::{Delivery, DeliveryConfig};
use taskstream::sink::{AckFuture, Message, Route, Sink, SinkError};
use taskstream::state::redb_store::RedbStore;
use taskstream::state::{CheckpointOp, CheckpointStore};

/// Set in the child: the store path to write to.
const CHILD_ENV: &str = "TASKSTREAM_KILL9_CHILD_STORE";
/// Entities rewritten by every batch; all must carry the same version after the kill.
const ENTITIES: u64 = 50;
/// The parent kills after this batch is reported committed.
const KILL_AFTER: u64 = 5;

/// Acknowledges everything at once, so each group commits as soon as it is submitted.
struct AckAll;

impl Sink for AckAll {
    fn name(&self) -> &str {
        "ack-all"
    }

    fn enqueue(&self, _msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
        async { Ok(async { Ok(()) }.boxed()) }.boxed()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
        async { Ok(String::new()) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async { Ok(()) }.boxed()
    }
}

/// Batch `i`: every entity at version `i`, and the job position `i`.
fn batch(i: u64) -> Vec<CheckpointOp> {
    let mut ops: Vec<CheckpointOp> = (0..ENTITIES)
        .map(|e| CheckpointOp::Upsert {
            key: format!("node:{e}"),
            version: i,
            state: json!({ "id": e, "version": i, "pad": "x".repeat(200) })
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into(),
        })
        .collect();
    ops.push(CheckpointOp::JobPosition {
        client_id: "client".into(),
        frames: i,
    });
    ops
}

/// The child's side; a no-op test unless the parent set `CHILD_ENV`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_child() -> anyhow::Result<()> {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return Ok(());
    };
    let store = RedbStore::open(&PathBuf::from(path))?;
    let cfg = DeliveryConfig {
        max_in_flight: 16,
        // One batch per transaction, so "whole batches only" is checkable.
        max_batch: batch(0).len(),
        on_acked: None,
    };
    let mut d = Delivery::new(vec![Arc::new(AckAll)], Box::new(store), cfg)?;
    for i in 1.. {
        let msg = Arc::new(Message {
            avro: None,
            avro_key: None,
            route: Route::Nodes,
            event: "updated".into(),
            id: format!("batch:{i}"),
            key: "batch".into(),
            payload: Some(b"{}".to_vec()),
            headers: vec![],
        });
        d.submit(vec![msg], batch(i)).await?;
        d.drain().await?;
        anyhow::ensure!(d.checkpoint().jobs.get("client") == Some(&i));
        // The parent reads this line and kills at once.
        println!("COMMITTED {i}");
    }
    Ok(())
}

#[test]
fn checkpoint_survives_kill9_right_after_commit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("state/cp.redb");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["kill9_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;

    // Read in a thread so a child that never reports fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            // libtest may print its "test kill9_child ... " prefix on the same line.
            Ok(line) if line.ends_with(&format!("COMMITTED {KILL_AFTER}")) => break,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("child never reported batch {KILL_AFTER}: {e}");
            }
        }
    }
    child.kill()?; // SIGKILL on unix: no destructor, no flush, no clean close
    let status = child.wait()?;
    assert!(!status.success(), "child was expected to die: {status}");

    let store = RedbStore::open(&path)?;
    let cp = store.load()?;
    let committed = cp.jobs.get("client").copied().unwrap_or(0);
    assert!(
        committed >= KILL_AFTER,
        "reported batch {KILL_AFTER} committed, store has {committed}"
    );
    let entities = store.reader();
    assert_eq!(entities.count()?, ENTITIES);
    let mut keys = Vec::new();
    entities.scan(&mut |key, _, _| keys.push(key.to_string()))?;
    for key in keys {
        let e = entities.get(&key)?.expect("scanned");
        assert_eq!(
            e.version, committed,
            "{key} is from another batch: torn transaction"
        );
        assert_eq!(e.state["version"], json!(committed));
    }
    Ok(())
}

/// Set in the child of the delete/tombstone test: the store path.
const TOMBSTONE_CHILD_ENV: &str = "TASKSTREAM_TOMBSTONE_CHILD_STORE";

/// Acknowledges records at once and never acknowledges a tombstone (a broker that took the
/// delete record and then went away), and reports each ack on stdout.
struct StallTombstones;

impl Sink for StallTombstones {
    fn name(&self) -> &str {
        "stall-tombstones"
    }

    fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
        async move {
            if msg.payload.is_none() {
                return Ok(futures_util::future::pending().boxed());
            }
            let id = msg.id.clone();
            Ok(async move {
                println!("ACKED {id}");
                Ok(())
            }
            .boxed())
        }
        .boxed()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
        async { Ok(String::new()) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async { Ok(()) }.boxed()
    }
}

/// Records every message it acknowledges.
#[derive(Default)]
struct Recording(std::sync::Mutex<Vec<Arc<Message>>>);

impl Sink for Recording {
    fn name(&self) -> &str {
        "recording"
    }

    fn enqueue(&self, msg: Arc<Message>) -> BoxFuture<'_, Result<AckFuture, SinkError>> {
        self.0.lock().unwrap().push(msg);
        async { Ok(async { Ok(()) }.boxed()) }.boxed()
    }

    fn prepare(&self) -> BoxFuture<'_, Result<String, SinkError>> {
        async { Ok(String::new()) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        async { Ok(()) }.boxed()
    }
}

fn purge_group(store: &dyn CheckpointStore) -> anyhow::Result<taskstream::normalize::Group> {
    use taskstream::normalize::{self, Ctx, Outcome, View};
    let mut view = View::new(store.reader(), 1 << 20);
    view.prefetch(["node:n1"])?;
    let ctx = Ctx {
        source: "synaptask://test/users/u".into(),
        now: "2026-12-01T00:00:00Z".into(),
    };
    let purge = json!({"id": "n1", "deleted": true});
    match normalize::apply_entity(
        &mut view,
        &ctx,
        taskstream::record::EntityKind::Node,
        purge.as_object().ok_or_else(|| anyhow::anyhow!("object"))?,
        taskstream::record::Origin::Diff,
        &taskstream::record::TraceContext::new_root(),
    ) {
        Outcome::Changed(g) => Ok(g),
        other => anyhow::bail!("expected a delete, got {other:?}"),
    }
}

/// The child: publishes the purge of `node:n1` through a sink that stalls its tombstone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstone_child() -> anyhow::Result<()> {
    let Some(path) = std::env::var_os(TOMBSTONE_CHILD_ENV) else {
        return Ok(());
    };
    let store = RedbStore::open(&PathBuf::from(path))?;
    let group = purge_group(&store)?;
    let encoder = taskstream::encode::json::JsonEncoder;
    let msgs = taskstream::encode::to_messages(&group, &encoder)?;
    let mut d = Delivery::new(
        vec![Arc::new(StallTombstones)],
        Box::new(store),
        DeliveryConfig::default(),
    )?;
    d.submit(msgs, group.ops).await?;
    // Never returns: the tombstone is never acknowledged; the parent kills this process.
    d.drain().await?;
    Ok(())
}

/// Issue 8 item 0: a delete record and its tombstone are one unit. Killed after the delete
/// record was acknowledged and before the tombstone was, the checkpoint still has the entity,
/// so the restart publishes the delete again, tombstone included.
#[test]
fn a_delete_without_its_tombstone_acknowledged_is_published_again_after_kill9() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("cp.redb");
    {
        let mut store = RedbStore::open(&path)?;
        store.apply(&[CheckpointOp::Upsert {
            key: "node:n1".into(),
            version: 3,
            state: json!({"id": "n1", "version": 3, "title": "t", "status": 0, "createdTime": "2026-01-01T00:00:00Z"})
                .as_object()
                .cloned()
                .unwrap_or_default()
                .into(),
        }])?;
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "tombstone_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(TOMBSTONE_CHILD_ENV, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.ends_with("ACKED node:n1:4") => break,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("child never acknowledged the delete record: {e}");
            }
        }
    }
    // Give a (wrong) commit of the Remove every chance to land before the kill.
    std::thread::sleep(Duration::from_millis(500));
    child.kill()?;
    child.wait()?;

    let store = RedbStore::open(&path)?;
    assert!(
        store.reader().get("node:n1")?.is_some(),
        "the delete was marked delivered without its tombstone"
    );
    // The restart: the purge is seen again (history or a snapshot) and published whole.
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let group = purge_group(&store)?;
        let encoder = taskstream::encode::json::JsonEncoder;
        let msgs = taskstream::encode::to_messages(&group, &encoder)?;
        let sink = Arc::new(Recording::default());
        let mut d = Delivery::new(
            vec![sink.clone()],
            Box::new(store),
            DeliveryConfig::default(),
        )?;
        d.submit(msgs, group.ops).await?;
        d.drain().await?;
        let sent = sink.0.lock().unwrap().clone();
        let ids: Vec<&str> = sent.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["node:n1:4", "node:n1:4:tombstone"]);
        assert!(sent[1].payload.is_none() && sent[1].key == "n1");
        assert!(d.reader().get("node:n1")?.is_none());
        anyhow::Ok(())
    })?;
    Ok(())
}
