//! History batches (`history:page`, seed 003) into records, pure: the batch record itself, the
//! entity changes its ops describe (applied to the working view, version-gated like every other
//! path), and one `synaptask.task.status_changed` record per status change an op records, with
//! the batch's actor.
//!
//! Ids are the ones the live path computes (`node:<id>:<version>`, `status:<id>:<version>`, with
//! the version the op produced), so a change seen both live and in history is recognisable as
//! one. A flat live diff that coalesced a title and a status op (DECISIONS #11: the version goes
//! up twice) carries the version of the last op, which is the status op's: the ids still meet.
//!
//! Patches are PascalCase (facts §9.1) and are re-keyed to the camelCase of the entity payloads.
//! The entity an op touches is inferred from its op-code range (0-9 nodes, 10-19 links), and its
//! meaning from the patch (`InTrash`, `Deleted`), never from the disputed link op numbers
//! (DECISIONS #9).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{apply_owned, status_of, Ctx, Group, Outcome, View};
use crate::record::{Body, EntityKind, Origin, Record, TraceContext};
use crate::state::CheckpointOp;

/// The op name of the concept page's table (facts §9.1), `UNKNOWN` for codes it lacks.
pub fn op_name(code: i64) -> &'static str {
    match code {
        0 => "NODE_ADD",
        1 => "NODE_UPDATE",
        2 => "NODE_STATUS",
        3 => "NODE_TRASH",
        4 => "NODE_RESTORE",
        5 => "NODE_DELETE",
        6 => "NODE_PUBLISH",
        10 => "LINK_ADD",
        11 => "LINK_TYPE",
        12 => "LINK_UPDATE",
        13 => "LINK_TRASH",
        14 => "LINK_RESTORE",
        15 => "LINK_DELETE",
        16 => "LINK_SWAP",
        20 => "GRANT_UPSERT",
        21 => "GRANT_UPDATE",
        22 => "GRANT_DELETE",
        30 => "USER_UPDATE",
        40 => "PAGE_UPDATE",
        _ => "UNKNOWN",
    }
}

/// The entity family of an op code (facts §9.1: the op object does not say).
fn op_entity(code: i64) -> Option<EntityKind> {
    match code {
        0..=9 => Some(EntityKind::Node),
        10..=19 => Some(EntityKind::Link),
        _ => None,
    }
}

/// The entity keys a history batch's ops touch (for [`super::View::prefetch`]).
pub fn batch_keys(batch: &Map<String, Value>) -> Vec<String> {
    let Some(Value::Array(ops)) = batch.get("ops") else {
        return Vec::new();
    };
    ops.iter()
        .filter_map(|op| {
            let kind = op_entity(op.get("type").and_then(Value::as_i64)?)?;
            Some(kind.key(op.get("entityId").and_then(Value::as_str)?))
        })
        .collect()
}

fn entity_type_name(code: i64) -> &'static str {
    match code {
        0..=9 => "node",
        10..=19 => "link",
        20..=29 => "grant",
        30..=39 => "user",
        40..=49 => "page",
        _ => "unknown",
    }
}

/// The camelCase field of a PascalCase patch key (`Title` → `title`, `ID` → `id`,
/// `LastBatchID` → `lastBatchID`).
pub fn camel(key: &str) -> String {
    if key.chars().all(|c| !c.is_lowercase()) {
        return key.to_lowercase();
    }
    let mut chars = key.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn camel_object(patch: Option<&Value>) -> Map<String, Value> {
    patch
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (camel(k), v.clone())).collect())
        .unwrap_or_default()
}

/// The highest op id of a batch: its position in the history stream. `None` for a batch
/// without ops, which changes nothing and cannot be placed.
pub fn max_op_id(batch: &Map<String, Value>) -> Option<u64> {
    batch
        .get("ops")
        .and_then(Value::as_array)?
        .iter()
        .filter_map(|op| op.get("id").and_then(Value::as_u64))
        .max()
}

/// The ids of status records published recently, so that a transition already published by
/// the live path is not published again by history (and the other way round within a run).
/// Bounded: the oldest ids are forgotten first; a forgotten id only costs a duplicate with the
/// same record id, which consumers and JetStream drop.
#[derive(Debug)]
pub struct RecentIds {
    set: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl RecentIds {
    /// Remembers at most `cap` ids.
    pub fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Whether the id was remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Remembers an id; returns false if it was already there.
    pub fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.set.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

/// One op, as the batch record lists it: code and name, entity, patches, guard version.
fn op_json(op: &Map<String, Value>) -> Value {
    let code = op.get("type").and_then(Value::as_i64).unwrap_or(-1);
    let mut out = Map::new();
    out.insert("id".into(), op.get("id").cloned().unwrap_or(Value::Null));
    out.insert("code".into(), Value::from(code));
    out.insert("name".into(), Value::from(op_name(code)));
    out.insert("entityType".into(), Value::from(entity_type_name(code)));
    for key in ["entityId", "forwardPatch", "inversePatch", "createdTime"] {
        out.insert(key.into(), op.get(key).cloned().unwrap_or(Value::Null));
    }
    out.insert(
        "guardVersion".into(),
        op.get("guard")
            .and_then(|g| g.get("Version").or_else(|| g.get("version")))
            .cloned()
            .unwrap_or(Value::Null),
    );
    // Fields the API may add to ops are kept, not dropped.
    for (k, v) in op {
        if !matches!(
            k.as_str(),
            "id" | "type" | "entityId" | "forwardPatch" | "inversePatch" | "createdTime" | "guard"
        ) {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// The batch record's body: every field of the batch, ops normalised.
fn batch_body(batch: &Map<String, Value>, ops: &[Map<String, Value>]) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in batch {
        if k != "ops" {
            out.insert(k.clone(), v.clone());
        }
    }
    if let Some(u) = undo_of(batch) {
        out.insert("undoOf".into(), Value::from(u));
    }
    out.insert(
        "ops".into(),
        Value::Array(ops.iter().map(op_json).collect()),
    );
    out
}

fn undo_of(batch: &Map<String, Value>) -> Option<String> {
    batch
        .get("undoOf")
        .or_else(|| batch.get("UndoOf"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The version an op produced: the patch's `Version`, else the guard's plus one.
fn op_version(forward: &Map<String, Value>, op: &Map<String, Value>) -> Option<u64> {
    forward.get("version").and_then(Value::as_u64).or_else(|| {
        op.get("guard")
            .and_then(|g| g.get("Version").or_else(|| g.get("version")))
            .and_then(Value::as_u64)
            .and_then(|g| g.checked_add(1))
    })
}

/// Entities a history batch named but could not settle with what the view knows.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Unknown {
    /// Keys of entities whose ops changed them partially while the view does not know them in
    /// full, and that no later op of the batch removed: only a snapshot can publish them.
    pub changed: Vec<String>,
    /// Keys of entities the batch trashed or purged. An entity changed and then removed
    /// while a snapshot was read, before its page, is in no page: its removal, later in
    /// history, settles it without a snapshot.
    pub removed: Vec<String>,
}

/// The records of one history batch read from `scope`, in publish order: the batch record,
/// the entity changes (only those newer than the view), the status transitions not published
/// yet, then the scope's position (an ops-only group, so the position moves only once all of
/// them are acknowledged), and the entities it could not settle ([`Unknown`]). `Err` when the
/// batch itself is unusable.
pub fn apply_batch(
    view: &mut View,
    ctx: &Ctx,
    scope: &str,
    batch: &Map<String, Value>,
    recent: &mut RecentIds,
    trace: &TraceContext,
) -> Result<(Vec<Group>, Unknown), String> {
    let Some(batch_id) = batch.get("batchId").and_then(Value::as_str) else {
        return Err("history batch without a string batchId".into());
    };
    if !crate::record::is_token(batch_id) {
        return Err("history batch id is not an identifier".into());
    }
    let ops: Vec<Map<String, Value>> = match batch.get("ops") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut ops = Vec::with_capacity(items.len());
            for item in items {
                match item.as_object() {
                    Some(op) => ops.push(op.clone()),
                    None => return Err(format!("history batch {batch_id}: op is not an object")),
                }
            }
            ops
        }
        Some(_) => return Err(format!("history batch {batch_id}: ops is not an array")),
    };
    let max_op = max_op_id(batch);
    let time = batch
        .get("ts")
        .and_then(Value::as_str)
        .map_or_else(|| ctx.now.clone(), str::to_string);
    let actor = batch.get("actor").cloned();
    let undo = undo_of(batch);
    let mut unknown = Unknown::default();
    let mut groups = vec![Group {
        records: vec![Record {
            id: format!("history:{batch_id}"),
            source: ctx.source.clone(),
            subject: batch_id.to_string(),
            time: time.clone(),
            sequence: max_op.unwrap_or(0),
            trace: trace.clone(),
            origin: Origin::History,
            body: Body::HistoryBatch {
                scope: scope.to_string(),
                batch: batch_body(batch, &ops),
            },
        }],
        tombstone: None,
        ops: Vec::new(),
    }];
    for op in &ops {
        let code = op.get("type").and_then(Value::as_i64).unwrap_or(-1);
        let Some(kind) = op_entity(code) else {
            continue;
        };
        let Some(entity_id) = op.get("entityId").and_then(Value::as_str) else {
            continue;
        };
        let forward = camel_object(op.get("forwardPatch"));
        let inverse = camel_object(op.get("inversePatch"));
        let Some(version) = op_version(&forward, op) else {
            continue;
        };
        let mut entry = forward.clone();
        entry.insert("id".into(), Value::from(entity_id));
        entry.insert("version".into(), Value::from(version));
        if !entry.contains_key("lastEditedTime") {
            if let Some(t) = op.get("createdTime").or_else(|| batch.get("ts")) {
                entry.insert("lastEditedTime".into(), t.clone());
            }
        }
        let before_status = view
            .get(&kind.key(entity_id))
            .and_then(|k| status_of(&k.state));
        // Ops of this entity missing between what the view knows and this one (retention,
        // another scope's batch): merging this patch alone would leave their fields stale at
        // this version. The live diff or a snapshot brings the entity whole; the status
        // transition below is still published.
        let skips = view.get(&kind.key(entity_id)).is_some_and(|k| {
            version > k.version.saturating_add(1) && !super::looks_full(kind, &entry)
        }) && !entry.contains_key("deleted");
        if entry.get("inTrash").and_then(Value::as_bool) == Some(true)
            || entry.get("deleted").and_then(Value::as_bool) == Some(true)
        {
            let key = kind.key(entity_id);
            unknown.changed.retain(|k| *k != key);
            unknown.removed.push(key);
        }
        let outcome = if skips {
            Outcome::Stale
        } else {
            apply_owned(view, ctx, kind, entry, Origin::History, trace).0
        };
        match outcome {
            Outcome::Changed(mut g) => {
                // The status record comes from the op below, with the actor.
                g.records
                    .retain(|r| !matches!(r.body, Body::StatusChanged { .. }));
                groups.push(g);
            }
            Outcome::NeedsSnapshot => unknown.changed.push(kind.key(entity_id)),
            _ => {}
        }
        if kind != EntityKind::Node {
            continue;
        }
        let Some(to) = forward.get("status").and_then(Value::as_i64) else {
            continue;
        };
        let Some(from) = inverse
            .get("status")
            .and_then(Value::as_i64)
            .or(before_status)
        else {
            continue;
        };
        let id = format!("status:{entity_id}:{version}");
        if from == to || !recent.insert(&id) {
            continue;
        }
        // The node as that op left it where the view is at that version. Otherwise (the view
        // moved on) the latest known node with the op's status and version, so consumers still
        // get a whole node; only a node never seen in full gets what the op itself says.
        let after = match view.get(&kind.key(entity_id)) {
            Some(k) if k.version == version => k.state.clone(),
            known => {
                let mut m = known.map(|k| Map::clone(&k.state)).unwrap_or_default();
                m.insert("id".into(), Value::from(entity_id));
                m.insert("status".into(), Value::from(to));
                m.insert("version".into(), Value::from(version));
                Arc::new(m)
            }
        };
        groups.push(Group {
            records: vec![Record {
                id,
                source: ctx.source.clone(),
                subject: entity_id.to_string(),
                time: op
                    .get("createdTime")
                    .and_then(Value::as_str)
                    .map_or_else(|| time.clone(), str::to_string),
                sequence: version,
                trace: trace.clone(),
                origin: Origin::History,
                body: Body::StatusChanged {
                    from,
                    to,
                    after,
                    actor: actor.clone(),
                    batch_id: Some(batch_id.to_string()),
                    undo_of: undo.clone(),
                },
            }],
            tombstone: None,
            ops: Vec::new(),
        });
    }
    if let Some(op_id) = max_op {
        groups.push(Group {
            records: Vec::new(),
            tombstone: None,
            ops: vec![CheckpointOp::HistoryCursor {
                scope: scope.to_string(),
                op_id,
            }],
        });
    }
    Ok((groups, unknown))
}

/// The notice that a window of history could not be replayed; `reconciled_by` says what
/// stands in for it (`snapshot`, or `live_diffs` when the live stream lost nothing).
#[allow(clippy::too_many_arguments)]
pub fn gap(
    ctx: &Ctx,
    scope: &str,
    from_op_id: u64,
    oldest_available_op_id: Option<u64>,
    reason: &str,
    reconciled_by: &str,
    unresolved: Vec<String>,
    trace: &TraceContext,
) -> Group {
    Group {
        records: vec![Record {
            id: format!(
                "gap:{scope}:{from_op_id}:{}",
                oldest_available_op_id.unwrap_or(0)
            ),
            source: ctx.source.clone(),
            subject: scope.to_string(),
            time: ctx.now.clone(),
            sequence: from_op_id,
            trace: trace.clone(),
            origin: Origin::History,
            body: Body::Gap {
                scope: scope.to_string(),
                from_op_id,
                oldest_available_op_id,
                reason: reason.to_string(),
                reconciled_by: reconciled_by.to_string(),
                unresolved,
            },
        }],
        tombstone: None,
        ops: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::apply_entity;
    use super::super::fixtures::{ctx, obj, trace};
    use super::*;
    use serde_json::json;

    fn node(id: &str, version: u64, status: i64) -> Map<String, Value> {
        obj(
            json!({"id": id, "title": "t", "status": status, "version": version,
                   "createdTime": "2025-10-08T09:00:00Z", "lastEditedTime": "2025-10-08T10:00:00Z"}),
        )
    }

    fn known(view: &mut View, n: Map<String, Value>) {
        let o = apply_entity(
            view,
            &ctx(),
            EntityKind::Node,
            &n,
            Origin::Snapshot,
            &trace(),
        );
        assert!(matches!(o, Outcome::Changed(_)));
    }

    /// The example batch of seed 003, plus a status op as facts §3 describes it.
    fn seed_batch() -> Map<String, Value> {
        obj(json!({
            "batchId": "b8e0c4cb-8ab7-4b2e-91cd-8fd92e1b9a20",
            "actor": {"username": "BLACK", "email": "black@synaptask.space"},
            "ts": "2025-10-08T10:45:02Z",
            "undone": false,
            "ops": [
                {"id": 100123, "type": 1, "entityId": "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54",
                 "forwardPatch": {"Title": "New title"}, "inversePatch": {"Title": "Old title"},
                 "guard": {"Version": 2}, "createdTime": "2025-10-08T10:45:02Z"},
                {"id": 100124, "type": 2, "entityId": "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54",
                 "forwardPatch": {"Status": 3}, "inversePatch": {"Status": 1},
                 "guard": {"Version": 3}, "createdTime": "2025-10-08T10:45:02Z"}
            ]
        }))
    }

    #[test]
    fn seed_003_batch_gives_batch_record_changes_status_and_position() {
        let mut view = View::default();
        known(
            &mut view,
            node("d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54", 2, 1),
        );
        let mut recent = RecentIds::new(10);
        let groups = apply_batch(
            &mut view,
            &ctx(),
            "USER:u1",
            &seed_batch(),
            &mut recent,
            &trace(),
        )
        .unwrap()
        .0;
        let ids: Vec<&str> = groups
            .iter()
            .flat_map(|g| g.records.iter().map(|r| r.id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                "history:b8e0c4cb-8ab7-4b2e-91cd-8fd92e1b9a20",
                "node:d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54:3",
                "node:d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54:4",
                "status:d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54:4",
            ]
        );
        let batch = groups[0].records[0].to_json();
        assert_eq!(batch["type"], "synaptask.history.batch");
        assert_eq!(batch["subject"], "b8e0c4cb-8ab7-4b2e-91cd-8fd92e1b9a20");
        assert_eq!(batch["sequence"], 100124);
        assert_eq!(batch["actor"]["username"], "BLACK");
        assert_eq!(batch["ops"][0]["name"], "NODE_UPDATE");
        assert_eq!(batch["ops"][0]["guardVersion"], 2);
        assert_eq!(batch["ops"][1]["forwardPatch"], json!({"Status": 3}));
        assert_eq!(groups[0].records[0].key(), "USER:u1");
        let update = groups[1].records[0].to_json();
        assert_eq!(update["after"]["title"], "New title");
        assert_eq!(update["origin"], "history");
        let status = groups[3].records[0].to_json();
        assert_eq!(status["from"]["name"], "InProgress");
        assert_eq!(status["to"]["name"], "Completed");
        assert_eq!(status["actor"]["email"], "black@synaptask.space");
        assert_eq!(status["after"]["title"], "New title");
        assert_eq!(
            groups.last().unwrap().ops,
            vec![CheckpointOp::HistoryCursor {
                scope: "USER:u1".into(),
                op_id: 100124
            }]
        );
    }

    #[test]
    fn a_transition_seen_live_is_not_published_again_but_one_only_in_history_is() {
        let id = "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54";
        // Live: one flat diff carried both ops (version 2 -> 4).
        let mut view = View::default();
        known(&mut view, node(id, 2, 1));
        let live = obj(json!({"id": id, "title": "New title", "status": 3, "version": 4}));
        let Outcome::Changed(g) = apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &live,
            Origin::Diff,
            &trace(),
        ) else {
            panic!("live diff applies")
        };
        let mut recent = RecentIds::new(10);
        for r in &g.records {
            if matches!(r.body, Body::StatusChanged { .. }) {
                recent.insert(&r.id);
            }
        }
        assert!(
            recent.contains(&format!("status:{id}:4")),
            "same id as history's"
        );
        let groups = apply_batch(
            &mut view,
            &ctx(),
            "USER:u1",
            &seed_batch(),
            &mut recent,
            &trace(),
        )
        .unwrap()
        .0;
        assert_eq!(
            groups.len(),
            2,
            "batch record and position only: {groups:?}"
        );

        // Missed live (a snapshot already shows version 4): history still tells the transition.
        let mut view = View::default();
        known(&mut view, node(id, 4, 3));
        let mut recent = RecentIds::new(10);
        let groups = apply_batch(
            &mut view,
            &ctx(),
            "USER:u1",
            &seed_batch(),
            &mut recent,
            &trace(),
        )
        .unwrap()
        .0;
        let status: Vec<Value> = groups
            .iter()
            .flat_map(|g| g.records.iter())
            .filter(|r| r.event_type() == "synaptask.task.status_changed")
            .map(Record::to_json)
            .collect();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0]["id"], format!("status:{id}:4"));
        assert_eq!(status[0]["from"]["code"], 1);
        assert_eq!(status[0]["to"]["code"], 3);
    }

    #[test]
    fn creation_trash_restore_delete_and_undo_from_history() {
        let mut view = View::default();
        let mut recent = RecentIds::new(10);
        let add = obj(
            json!({"batchId": "b1", "ts": "2025-10-08T10:00:00Z", "ops": [
            {"id": 1, "type": 0, "entityId": "n1", "guard": {"Version": 0},
             "forwardPatch": {"ID": "n1", "Title": "new", "Status": 0, "Version": 1, "LastBatchID": "b1",
                              "CreatedTime": "2025-10-08T10:00:00Z"},
             "inversePatch": {}},
            {"id": 2, "type": 10, "entityId": "l1", "guard": {"Version": 0},
             "forwardPatch": {"ID": "l1", "Source": "n1", "Target": "n0", "Type": 0, "Version": 1},
             "inversePatch": {}}]}),
        );
        let g = apply_batch(&mut view, &ctx(), "USER:u", &add, &mut recent, &trace())
            .unwrap()
            .0;
        let types: Vec<String> = g
            .iter()
            .flat_map(|g| g.records.iter().map(Record::event_type))
            .collect();
        assert_eq!(
            types,
            [
                "synaptask.history.batch",
                "synaptask.node.created",
                "synaptask.link.created"
            ]
        );
        assert_eq!(view.get("node:n1").unwrap().state["lastBatchID"], "b1");
        let trash = obj(json!({"batchId": "b2", "ops": [
            {"id": 3, "type": 3, "entityId": "n1", "guard": {"Version": 1},
             "forwardPatch": {"InTrash": true, "Version": 2}, "inversePatch": {"InTrash": false, "Version": 1}}]}));
        let g = apply_batch(&mut view, &ctx(), "USER:u", &trash, &mut recent, &trace())
            .unwrap()
            .0;
        assert_eq!(g[1].records[0].event_type(), "synaptask.node.trashed");
        // An undo batch of the trash: a restore, and a status it reverts carries undoOf.
        let undo = obj(json!({"batchId": "b3", "undoOf": "b2", "ops": [
            {"id": 4, "type": 4, "entityId": "n1", "guard": {"Version": 2},
             "forwardPatch": {"InTrash": false}, "inversePatch": {"InTrash": true}},
            {"id": 5, "type": 2, "entityId": "n1", "guard": {"Version": 3},
             "forwardPatch": {"Status": 1}, "inversePatch": {"Status": 0}}]}));
        let g = apply_batch(&mut view, &ctx(), "USER:u", &undo, &mut recent, &trace())
            .unwrap()
            .0;
        assert_eq!(g[1].records[0].event_type(), "synaptask.node.restored");
        assert_eq!(
            g[1].records[0].id, "node:n1:3",
            "guard + 1 without a Version"
        );
        let status = g[3].records[0].to_json();
        assert_eq!(status["undoOf"], "b2");
        assert_eq!(status["batchId"], "b3");
        assert_eq!(g[0].records[0].to_json()["undoOf"], "b2");
        let purge = obj(json!({"batchId": "b4", "ops": [
            {"id": 6, "type": 5, "entityId": "n1", "guard": {"Version": 4},
             "forwardPatch": {"Deleted": true, "Version": 5}, "inversePatch": {}}]}));
        let g = apply_batch(&mut view, &ctx(), "USER:u", &purge, &mut recent, &trace())
            .unwrap()
            .0;
        assert_eq!(g[1].records[0].id, "node:n1:5");
        assert_eq!(g[1].records[0].event_type(), "synaptask.node.deleted");
        assert!(g[1].tombstone.is_some());
    }

    #[test]
    fn an_entity_changed_then_removed_unseen_is_settled_by_its_removal() {
        // Changed, trashed and purged while a snapshot was read, before its page.
        let mut view = View::default();
        let mut recent = RecentIds::new(10);
        let change = obj(json!({"batchId": "a", "ops": [
            {"id": 1, "type": 11, "entityId": "l", "forwardPatch": {"Type": 0, "Version": 2},
             "inversePatch": {"Type": 1, "Version": 1}, "guard": {"Version": 1}}]}));
        let (_, u) =
            apply_batch(&mut view, &ctx(), "USER:u", &change, &mut recent, &trace()).unwrap();
        assert_eq!(u.changed, vec!["link:l".to_string()]);
        let trash = obj(json!({"batchId": "b", "ops": [
            {"id": 2, "type": 13, "entityId": "l", "forwardPatch": {"InTrash": true, "Version": 3},
             "inversePatch": {"InTrash": false, "Version": 2}, "guard": {"Version": 2}}]}));
        let (g, u) =
            apply_batch(&mut view, &ctx(), "USER:u", &trash, &mut recent, &trace()).unwrap();
        assert!(u.changed.is_empty());
        assert_eq!(u.removed, vec!["link:l".to_string()]);
        assert_eq!(g.len(), 3, "the batch record, the trash and the position");
        assert_eq!(g[1].records[0].to_json()["type"], "synaptask.link.trashed");
        // Within one batch, only what the op order leaves unsettled counts: a restore after
        // the trash needs the entity again.
        let both = obj(json!({"batchId": "c", "ops": [
            {"id": 3, "type": 1, "entityId": "n", "forwardPatch": {"Title": "t", "Version": 2},
             "inversePatch": {"Title": "s", "Version": 1}, "guard": {"Version": 1}},
            {"id": 4, "type": 3, "entityId": "n", "forwardPatch": {"InTrash": true, "Version": 3},
             "inversePatch": {"InTrash": false, "Version": 2}, "guard": {"Version": 2}},
            {"id": 5, "type": 4, "entityId": "n", "forwardPatch": {"InTrash": false, "Version": 4},
             "inversePatch": {"InTrash": true, "Version": 3}, "guard": {"Version": 3}}]}));
        let (_, u) =
            apply_batch(&mut view, &ctx(), "USER:u", &both, &mut recent, &trace()).unwrap();
        assert_eq!(u.changed, vec!["node:n".to_string()]);
        assert_eq!(u.removed, vec!["node:n".to_string()]);
    }

    #[test]
    fn unknown_ops_and_unusable_batches() {
        let mut view = View::default();
        let mut recent = RecentIds::new(10);
        let grant = obj(json!({"batchId": "g", "ops": [
            {"id": 9, "type": 20, "entityId": "x", "forwardPatch": {"Level": 2}, "inversePatch": {},
             "guard": {"Version": 0}, "futureField": 1}]}));
        let g = apply_batch(&mut view, &ctx(), "USER:u", &grant, &mut recent, &trace())
            .unwrap()
            .0;
        let r = g[0].records[0].to_json();
        assert_eq!(r["ops"][0]["name"], "GRANT_UPSERT");
        assert_eq!(r["ops"][0]["entityType"], "grant");
        assert_eq!(r["ops"][0]["futureField"], 1);
        assert_eq!(g.len(), 2, "batch and position");
        assert!(apply_batch(
            &mut view,
            &ctx(),
            "USER:u",
            &obj(json!({"ops": []})),
            &mut recent,
            &trace()
        )
        .is_err());
        assert!(apply_batch(
            &mut view,
            &ctx(),
            "USER:u",
            &obj(json!({"batchId": "b", "ops": 3})),
            &mut recent,
            &trace()
        )
        .is_err());
    }

    #[test]
    fn camel_case_keys() {
        assert_eq!(camel("Title"), "title");
        assert_eq!(camel("ID"), "id");
        assert_eq!(camel("LastBatchID"), "lastBatchID");
        assert_eq!(camel("WasBlocker"), "wasBlocker");
        assert_eq!(camel("inTrash"), "inTrash");
    }

    #[test]
    fn recent_ids_are_bounded() {
        let mut r = RecentIds::new(2);
        assert!(r.insert("a"));
        assert!(!r.insert("a"));
        r.insert("b");
        r.insert("c");
        assert!(!r.contains("a"));
        assert!(r.contains("b") && r.contains("c"));
    }
}
