//! Normalisation, pure (no I/O): turns SynapTask payloads (snapshot entities, `graph:diff`
//! entries, job frames) plus the working view into change records and the checkpoint ops that
//! record their delivery.
//!
//! The working [`View`] holds the latest full state of every entity seen so far, delivered or
//! not (part of it read back from the store as events need it, [`View`]); it is what turns a
//! partial diff into `before` / `after` / `changed`. Versions only go
//! up: an entry whose version is not newer than the view's is stale and produces nothing, which
//! is how snapshot pages and buffered diffs merge without ever going back.

pub mod history;
mod view;

pub use view::{approx_bytes, Known, SeenKeys, View};

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::record::{fnv1a, Body, Change, EntityKind, Origin, Record, TraceContext};
use crate::state::{is_trashed, CheckpointOp};

/// Fields that change with every version and so say nothing on their own.
const BOOKKEEPING: &[&str] = &["id", "version", "lastEditedTime"];

/// [`changed_fields`] of a merge, where `after` is `before` with only the `touched` names set:
/// only those can differ, so the ~50 fields of the rest are not compared (a third of an
/// entity record's cost in the e2e profile).
fn changed_among(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
    mut touched: Vec<String>,
) -> Vec<String> {
    touched.retain(|k| !BOOKKEEPING.contains(&k.as_str()) && before.get(k) != after.get(k));
    touched.sort_unstable();
    touched.dedup();
    debug_assert_eq!(touched, changed_fields(before, after));
    touched
}

/// Where records come from, for the envelope.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// `synaptask://<host>/users/<uid>`.
    pub source: String,
    /// The time the input arrived (RFC 3339), used where the payload carries none.
    pub now: String,
}

/// The output of one change: records published together, the tombstone that follows a delete,
/// and the checkpoint ops their delivery allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The change record first, then a derived status record if any.
    pub records: Vec<Record>,
    /// `(kind, entity id)` of a delete: the entity topic gets a tombstone for that key.
    pub tombstone: Option<(EntityKind, String)>,
    /// Applied once every message of this group (and before) is acknowledged.
    pub ops: Vec<CheckpointOp>,
}

/// What an entry did to the view.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A change to publish.
    Changed(Group),
    /// Not newer than what is known: nothing to publish.
    Stale,
    /// A partial change to an entity never seen in full: only a snapshot can fill it in.
    NeedsSnapshot,
    /// The entry itself is unusable.
    Invalid(String),
}

/// Whether an entry carries a whole entity, as creations, restores and pages do. A partial
/// diff of a title and status change has both of those fields; only a whole node also has its
/// creation time.
fn looks_full(kind: EntityKind, entry: &Map<String, Value>) -> bool {
    match kind {
        EntityKind::Node => {
            entry.contains_key("title")
                && entry.contains_key("status")
                && entry.contains_key("createdTime")
        }
        EntityKind::Link => entry.contains_key("source") && entry.contains_key("target"),
    }
}

fn changed_fields(before: &Map<String, Value>, after: &Map<String, Value>) -> Vec<String> {
    // Only the few changed names are sorted, not every name of both states (the sort of ~50
    // names was a third of building an entity record in the e2e profile).
    let mut changed: Vec<&String> = after
        .iter()
        .filter(|(k, v)| before.get(*k) != Some(*v))
        .map(|(k, _)| k)
        .chain(before.keys().filter(|k| !after.contains_key(*k)))
        .filter(|k| !BOOKKEEPING.contains(&k.as_str()))
        .collect();
    changed.sort_unstable();
    changed.into_iter().cloned().collect()
}

fn time_of(state: Option<&Map<String, Value>>, ctx: &Ctx) -> String {
    state
        .and_then(|s| s.get("lastEditedTime"))
        .and_then(Value::as_str)
        // A time is a short token; anything else is not worth carrying into a header.
        .filter(|t| crate::record::is_token(t))
        .map(str::to_string)
        .unwrap_or_else(|| ctx.now.clone())
}

fn status_of(state: &Map<String, Value>) -> Option<i64> {
    state.get("status").and_then(Value::as_i64)
}

#[allow(clippy::too_many_arguments)]
fn entity_record(
    ctx: &Ctx,
    kind: EntityKind,
    id: &str,
    version: u64,
    change: Change,
    before: Option<Arc<Map<String, Value>>>,
    after: Option<Arc<Map<String, Value>>>,
    origin: Origin,
    trace: &TraceContext,
    touched: Option<Vec<String>>,
) -> Record {
    let changed = match (&before, &after) {
        (Some(b), Some(a)) => match touched {
            Some(t) => changed_among(b, a, t),
            None => changed_fields(b, a),
        },
        (None, Some(a)) => a
            .keys()
            .filter(|k| !BOOKKEEPING.contains(&k.as_str()))
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    Record {
        id: format!("{}:{id}:{version}", kind.as_str()),
        source: ctx.source.clone(),
        subject: id.to_string(),
        time: time_of(after.as_deref().or(before.as_deref()), ctx),
        sequence: version,
        trace: trace.clone(),
        origin,
        body: Body::Entity {
            kind,
            change,
            before,
            after,
            changed,
        },
    }
}

/// The highest version a record carries (`i64::MAX`); an entity claiming more is refused.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// Whether a live partial diff skips versions its own fields cannot explain, so that merging
/// it onto the known state would keep fields of a missed change stale. A status change is
/// always an op of its own (facts §3) and so is a link's `wasBlocker` or `type` change, so a
/// diff carrying such a field and others may climb two versions in one batch (DECISIONS #11);
/// anything more, or less explained, waits for history to fill in the versions between.
/// Full entities (creations, restores) and purges replace what they touch and never wait; a
/// trash is merged like any partial change, so it waits too.
pub fn skips_versions(view: &View, kind: EntityKind, entry: &Map<String, Value>) -> bool {
    let Some(id) = entry.get("id").and_then(Value::as_str) else {
        return false;
    };
    let (Some(known), Some(version)) = (
        view.entities.get(&kind.key(id)),
        entry.get("version").and_then(Value::as_u64),
    ) else {
        return false;
    };
    if version <= known.version.saturating_add(1)
        || looks_full(kind, entry)
        || entry.contains_key("deleted")
    {
        return false;
    }
    let own_ops: &[&str] = match kind {
        EntityKind::Node => &["status"],
        EntityKind::Link => &["type", "wasBlocker"],
    };
    let fields = entry
        .keys()
        .filter(|k| !BOOKKEEPING.contains(&k.as_str()) && k.as_str() != "shareRoots");
    let (mut separate, mut other) = (0u64, 0u64);
    for f in fields {
        if own_ops.contains(&f.as_str()) {
            separate += 1;
        } else {
            other = 1;
        }
    }
    version > known.version.saturating_add(separate + other)
}

/// Applies one entity (a snapshot item or a diff entry) to the view. [`apply_owned`] without
/// giving up the entry (it is copied).
pub fn apply_entity(
    view: &mut View,
    ctx: &Ctx,
    kind: EntityKind,
    entry: &Map<String, Value>,
    origin: Origin,
    trace: &TraceContext,
) -> Outcome {
    apply_owned(view, ctx, kind, entry.clone(), origin, trace).0
}

/// Applies one entity (a snapshot item or a diff entry) to the view, moving its fields into
/// the new state rather than copying them: a snapshot page then shrinks as it is applied
/// instead of staying whole beside the states made from it. The entry comes back when it
/// did not become a state (`Stale`, `NeedsSnapshot`, `Invalid`, a purge): a held diff or a
/// dead letter needs it.
pub fn apply_owned(
    view: &mut View,
    ctx: &Ctx,
    kind: EntityKind,
    entry: Map<String, Value>,
    origin: Origin,
    trace: &TraceContext,
) -> (Outcome, Option<Map<String, Value>>) {
    let Some(id) = entry.get("id").and_then(Value::as_str) else {
        return (
            Outcome::Invalid("entry without a string id".into()),
            Some(entry),
        );
    };
    if !crate::record::is_token(id) {
        let reason = format!(
            "{} id is not an identifier ({} bytes, control characters or spaces)",
            kind.as_str(),
            id.len()
        );
        return (Outcome::Invalid(reason), Some(entry));
    }
    // The id lives on in the key, since the entry's fields move into the new state.
    let key = kind.key(id);
    let id = &key[key.len() - id.len()..];
    // Records carry the version as a signed 64-bit sequence (Avro `long`, Java consumers), and
    // a version at the top of the range would leave no room for the next one.
    if let Some(v) = entry.get("version").and_then(Value::as_u64) {
        if v > MAX_VERSION {
            let reason = format!("{} {id} version {v} is past {MAX_VERSION}", kind.as_str());
            return (Outcome::Invalid(reason), Some(entry));
        }
    }
    let known = view.entities.get(&key);
    let sketch = if known.is_none() {
        view.sketches.get(&key).cloned()
    } else {
        None
    };

    if entry.get("deleted").and_then(Value::as_bool) == Some(true) {
        let Some(known) = known.or(sketch.as_ref()) else {
            return (Outcome::Stale, Some(entry));
        };
        // A purge carries no version (DECISIONS #1); it is one op past the last known one.
        let version = entry
            .get("version")
            .and_then(Value::as_u64)
            .unwrap_or(known.version.saturating_add(1));
        if version <= known.version {
            return (Outcome::Stale, Some(entry));
        }
        let before = known.state.clone();
        view.entities.remove(&key);
        view.sketches.remove(&key);
        view.deleted.insert(key.clone(), version);
        let record = entity_record(
            ctx,
            kind,
            id,
            version,
            Change::Deleted,
            Some(before),
            None,
            origin,
            trace,
            None,
        );
        let group = Group {
            records: vec![record],
            tombstone: Some((kind, id.to_string())),
            ops: vec![CheckpointOp::Remove { key }],
        };
        return (Outcome::Changed(group), Some(entry));
    }

    let Some(version) = entry.get("version").and_then(Value::as_u64) else {
        let reason = format!("{} {id} without an integer version", kind.as_str());
        return (Outcome::Invalid(reason), Some(entry));
    };
    if known
        .or(sketch.as_ref())
        .is_some_and(|k| version <= k.version)
        || view.deleted.get(&key).is_some_and(|d| version <= *d)
    {
        return (Outcome::Stale, Some(entry));
    }
    // After a restart, consumers may have seen a newer version than the delivered one (it was
    // published, not yet acknowledged, when the process died). A change newer than that one
    // starts from it: its `before` and status transition are what consumers last saw. A
    // replay of it, or of an older version, starts from the delivered state, so it is
    // published as it was the first time.
    let published = view
        .published
        .get(&key)
        .filter(|p| version > p.version && known.is_none_or(|k| p.version > k.version))
        .cloned();
    if view
        .published
        .get(&key)
        .is_some_and(|p| version >= p.version)
    {
        view.published.remove(&key);
    }
    let known = published.as_ref().or(known);
    let trashing = entry.get("inTrash").and_then(Value::as_bool) == Some(true);
    let full = looks_full(kind, &entry);
    // The change happened when the entry says; a partial entry that does not say happened now,
    // not at the previous edit time still in the merged state.
    let dated = entry.contains_key("lastEditedTime");
    // A trash of an entity never seen in full is published from what it says, as a trash
    // listing's entry is, and kept apart the same way (below). It is common, not exotic: an
    // entity skipped by a snapshot's pages or changed and trashed while they were read (after
    // the trash listing) is in neither, and history replays its trash op afterwards. Asking
    // for a snapshot instead asked, under load, for one after another.
    let sketched = known.is_none() && trashing && !full;
    // The names a merge set: the record's changed fields are among them.
    let mut touched: Option<Vec<String>> = None;
    let (change, before, mut after) = match known {
        None if !(full || trashing) => return (Outcome::NeedsSnapshot, Some(entry)),
        // A whole entity restores what was only known from the trash listing.
        None if full && sketch.is_some() => (
            Change::Restored,
            sketch.as_ref().map(|k| k.state.clone()),
            entry,
        ),
        None => (
            if trashing {
                Change::Trashed
            } else {
                Change::Created
            },
            None,
            entry,
        ),
        Some(k) => {
            // The one copy a change costs: the merged state; everything else shares it.
            let mut after = Map::clone(&k.state);
            let mut names = Vec::with_capacity(entry.len() + 1);
            for (f, v) in entry {
                names.push(f.clone());
                after.insert(f, v);
            }
            names.push("inTrash".into());
            touched = Some(names);
            let change = if trashing {
                Change::Trashed
            } else if is_trashed(&k.state) {
                Change::Restored
            } else {
                Change::Updated
            };
            (change, Some(k.state.clone()), after)
        }
    };
    if change == Change::Restored {
        after.insert("inTrash".into(), Value::Bool(false));
    }
    if before.is_some() && !dated {
        after.insert("lastEditedTime".into(), Value::String(ctx.now.clone()));
    }
    let after = Arc::new(after);
    let status_change = match (kind, &before) {
        (EntityKind::Node, Some(b)) => match (status_of(b), status_of(&after)) {
            (Some(from), Some(to)) if from != to => Some((from, to)),
            _ => None,
        },
        _ => None,
    };
    view.sketches.remove(&key);
    let known = Known {
        version,
        state: after.clone(),
    };
    if sketched {
        // Kept apart: it lacks most fields, and a later restore must bring the whole entity
        // (its diff, or a snapshot), not merge `inTrash: false` onto this sketch.
        view.sketches.insert(key.clone(), known);
    } else {
        view.entities.insert(key.clone(), known);
    }
    let mut records = vec![entity_record(
        ctx,
        kind,
        id,
        version,
        change,
        before,
        Some(after.clone()),
        origin,
        trace,
        touched,
    )];
    if let Some((from, to)) = status_change {
        records.push(Record {
            id: format!("status:{id}:{version}"),
            source: ctx.source.clone(),
            subject: id.to_string(),
            time: time_of(Some(&after), ctx),
            sequence: version,
            trace: trace.clone(),
            origin,
            body: Body::StatusChanged {
                from,
                to,
                after: after.clone(),
                actor: None,
                batch_id: None,
                undo_of: None,
            },
        });
    }
    let group = Group {
        records,
        tombstone: None,
        ops: vec![CheckpointOp::Upsert {
            key,
            version,
            state: after,
        }],
    };
    (Outcome::Changed(group), None)
}

/// An unusable entry of a diff: its position among the payload's entries (nodes, then links),
/// why it is unusable, and the entry as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct BadEntry {
    /// Position among the payload's entries, nodes first; part of the dead letter's id.
    pub index: usize,
    /// Why it cannot be used.
    pub reason: String,
    /// The entry itself.
    pub raw: Vec<u8>,
}

/// Usable entries of a diff, and the unusable ones.
pub type DiffEntries = (Vec<(EntityKind, Map<String, Value>)>, Vec<BadEntry>);

/// The entities of a `graph:diff` payload, in order (nodes, then links).
///
/// Accepts the documented flat shape (`{nodes:[...], links:[...]}`, DECISIONS #2) and the ack's
/// op-shaped entries (`{op, before, after}`), whose `after` is used; extra top-level keys are
/// ignored. Entries that are not objects come back in the second list, for the dead-letter route.
pub fn diff_entries(payload: &Value) -> Result<DiffEntries, String> {
    take_diff_entries(&mut payload.clone())
}

/// [`diff_entries`], moving the entities out of the payload instead of copying them (the live
/// path: a copy of every entity map was 9 % of the pipeline's time in the e2e profile). The
/// entities taken are left as nulls. A payload with an error or a bad entry is left whole
/// (its entities are copied): its dead letters are named after a hash of it.
pub fn take_diff_entries(payload: &mut Value) -> Result<DiffEntries, String> {
    let Some(obj) = payload.as_object_mut() else {
        return Err(format!(
            "graph:diff payload is {}, not an object",
            type_name(payload)
        ));
    };
    let mut whole = true;
    for field in ["nodes", "links"] {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => whole &= items.iter().all(|i| entry_of(i).is_ok()),
            Some(other) => {
                return Err(format!(
                    "graph:diff {field} is {}, not an array",
                    type_name(other)
                ))
            }
        }
    }
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let mut index = 0usize;
    for (field, kind) in [("nodes", EntityKind::Node), ("links", EntityKind::Link)] {
        let Some(Value::Array(items)) = obj.get_mut(field) else {
            continue;
        };
        for item in items {
            match entry_of(item) {
                Ok(op_shaped) if whole => {
                    let taken = if op_shaped {
                        item.get_mut("after").map(Value::take)
                    } else {
                        Some(item.take())
                    };
                    if let Some(Value::Object(m)) = taken {
                        out.push((kind, m));
                    }
                }
                Ok(op_shaped) => {
                    let entity = if op_shaped {
                        item.get("after")
                    } else {
                        Some(&*item)
                    };
                    if let Some(Value::Object(m)) = entity {
                        out.push((kind, m.clone()));
                    }
                }
                Err(why) => bad.push(BadEntry {
                    index,
                    reason: format!("{field} {why}"),
                    raw: item.to_string().into_bytes(),
                }),
            }
            index += 1;
        }
    }
    Ok((out, bad))
}

/// Whether a diff entry is usable, and whether it is op-shaped (`{op, before, after}`, the
/// entity in `after`); otherwise why not.
fn entry_of(item: &Value) -> Result<bool, String> {
    match item.as_object() {
        Some(m) if m.contains_key("after") && !m.contains_key("id") => match m.get("after") {
            Some(Value::Object(after)) if after.contains_key("id") => Ok(true),
            _ => Err("entry with an unusable after".into()),
        },
        Some(_) => Ok(false),
        None => Err(format!("entry is {}, not an object", type_name(item))),
    }
}

/// How many entities of a `graph:diff` payload leave the live graph (`inTrash:true` or
/// `deleted:true`, flat or op-shaped). Snapshot paging re-reads that many more objects, since
/// `graph:get` pages by offset over a listing these removals shift.
pub fn removals_in_diff(payload: &Value) -> u64 {
    let mut n = 0u64;
    for field in ["nodes", "links"] {
        let Some(Value::Array(items)) = payload.get(field) else {
            continue;
        };
        for item in items {
            let entity = match entry_of(item) {
                Ok(true) => item.get("after"),
                Ok(false) => Some(item),
                Err(_) => None,
            };
            let removes = entity.is_some_and(|e| {
                e.get("inTrash").and_then(Value::as_bool) == Some(true)
                    || e.get("deleted").and_then(Value::as_bool) == Some(true)
            });
            n += u64::from(removes);
        }
    }
    n
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a snapshot's disappearances came to.
#[derive(Debug, Default)]
pub struct Disappearances {
    /// Records to publish: trashes and purges.
    pub groups: Vec<Group>,
    /// Keys that left the active graph with no trash listing to tell a trash from a purge:
    /// published as trashed (a purge needs a trash first, facts §7), named in the gap record.
    pub unresolved: Vec<String>,
}

/// After a full snapshot: the trash listing and the disappearances. Every entity `trash` lists
/// (by key) ends trashed in the view, whether it was known or not (`graph:get` never lists
/// trashed items, so this is the only way to learn of them), unless the view already holds a
/// newer version (a restore that arrived while the listing was read). A known entity neither
/// listed by the snapshot nor in trash was purged while nobody watched and becomes a `deleted`
/// record (version one past the known one). Without a listing (`trash` is `None`) a purge
/// cannot be told from a trash, and no delete is published that is not known: an active entity
/// that disappeared is published as trashed, since that much is certain, and reported as
/// unresolved. `seen` must hold every key a snapshot page listed and every key a live change
/// touched while the snapshot was read.
///
/// A branch-scoped snapshot (`scoped`) lists only the branch: the user-wide trash listing
/// counts only for entities the view knows, and a known entity neither listed nor in trash
/// `left` the branch (it may still exist elsewhere) rather than being deleted.
pub fn missing_after_snapshot(
    view: &mut View,
    ctx: &Ctx,
    seen: &SeenKeys,
    trash: Option<&HashMap<String, Map<String, Value>>>,
    scoped: bool,
    trace: &TraceContext,
) -> Disappearances {
    let empty = HashMap::new();
    let listing = trash.is_some();
    let scoped_trash: HashMap<String, Map<String, Value>>;
    let trash = match trash {
        Some(t) if scoped => {
            scoped_trash = t
                .iter()
                .filter(|(k, _)| view.entities.contains_key(k) || view.sketches.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            &scoped_trash
        }
        Some(t) => t,
        None => &empty,
    };
    let mut out = Disappearances::default();
    let mut trashed: Vec<&String> = trash.keys().filter(|k| !seen.contains(k)).collect();
    trashed.sort();
    for key in trashed {
        let Some((kind, _)) = split_key(key) else {
            continue;
        };
        let mut entry = trash[key].clone();
        entry.insert("inTrash".into(), Value::Bool(true));
        if let Some(known) = view.entities.get(key) {
            // Only a listing without versions leaves the trash op's version to infer: it is
            // one past an active known state. A listed version the view already has or passed
            // is stale and is left to `apply_entity`.
            if !is_trashed(&known.state) && !entry.contains_key("version") {
                entry.insert(
                    "version".into(),
                    Value::from(known.version.saturating_add(1)),
                );
            }
        }
        let unknown = !view.entities.contains_key(key);
        if let (Outcome::Changed(g), _) =
            apply_owned(view, ctx, kind, entry, Origin::Snapshot, trace)
        {
            out.groups.push(g);
        }
        if unknown {
            // Published as trashed, but kept apart: a trash listing lacks most fields, and a
            // later restore must bring the whole entity (its diff, or a snapshot), not merge
            // `inTrash: false` onto this sketch.
            if let Some(k) = view.entities.take(key) {
                view.sketches.insert(key.clone(), k);
            }
        }
    }
    let mut gone: Vec<String> = view
        .entities
        .iter()
        // With a listing, a known trashed entity that is no longer in trash was purged too.
        .filter(|(_, known)| listing || !is_trashed(&known.state))
        .map(|(k, _)| k)
        .filter(|k| !seen.contains(k) && !trash.contains_key(*k))
        .cloned()
        .collect();
    if listing {
        // Known only from an earlier listing and no longer in trash: purged too.
        gone.extend(
            view.sketches
                .keys()
                .filter(|k| !seen.contains(k) && !trash.contains_key(*k))
                .cloned(),
        );
    }
    gone.sort();
    for key in gone {
        let Some((kind, id)) = split_key(&key) else {
            continue;
        };
        if scoped {
            if let Some(g) = left_scope(view, ctx, kind, id, trace) {
                out.groups.push(g);
            }
            continue;
        }
        let mut entry = Map::new();
        entry.insert("id".into(), Value::String(id.to_string()));
        if listing {
            entry.insert("deleted".into(), Value::Bool(true));
        } else {
            let version = view
                .entities
                .get(&key)
                .map_or(1, |k| k.version.saturating_add(1));
            entry.insert("inTrash".into(), Value::Bool(true));
            entry.insert("version".into(), Value::from(version));
            out.unresolved.push(key.clone());
        }
        if let (Outcome::Changed(g), _) =
            apply_owned(view, ctx, kind, entry, Origin::Snapshot, trace)
        {
            out.groups.push(g);
        }
    }
    out
}

/// A known entity that is no longer in the source's scope: a `left` record with the last state
/// as `before`, and a tombstone, so a compacted topic holds the scope's content. Unlike a
/// purge it is not remembered as deleted: it may come back at any version.
fn left_scope(
    view: &mut View,
    ctx: &Ctx,
    kind: EntityKind,
    id: &str,
    trace: &TraceContext,
) -> Option<Group> {
    let key = kind.key(id);
    let known = view
        .entities
        .remove(&key)
        .or_else(|| view.sketches.remove(&key))?;
    let record = entity_record(
        ctx,
        kind,
        id,
        known.version,
        Change::Left,
        Some(known.state),
        None,
        Origin::Snapshot,
        trace,
        None,
    );
    Some(Group {
        records: vec![Record {
            // The version did not change; the id says what happened to it.
            id: format!("{}:left", record.id),
            ..record
        }],
        tombstone: Some((kind, id.to_string())),
        ops: vec![CheckpointOp::Remove { key }],
    })
}

/// Whether a diff entry belongs to a source scoped to the branch under `root`: the root itself,
/// an entry whose `shareRoots` names the root, or (for partial entries, which carry no
/// `shareRoots`) an entity already known in the branch.
pub fn in_scope(view: &View, kind: EntityKind, entry: &Map<String, Value>, root: &str) -> bool {
    let Some(id) = entry.get("id").and_then(Value::as_str) else {
        return true; // left to `apply_entity`, which dead-letters it
    };
    if id == root {
        return true;
    }
    match entry.get("shareRoots").and_then(Value::as_array) {
        Some(roots) => roots.iter().any(|r| r.as_str() == Some(root)),
        None => {
            let key = kind.key(id);
            view.entities.contains_key(&key) || view.sketches.contains_key(&key)
        }
    }
}

fn split_key(key: &str) -> Option<(EntityKind, &str)> {
    let (kind, id) = key.split_once(':')?;
    match kind {
        "node" => Some((EntityKind::Node, id)),
        "link" => Some((EntityKind::Link, id)),
        _ => None,
    }
}

/// A dead-letter record for input that could not be used; its id is a hash of the bytes, so
/// the same bad input always maps to the same record.
pub fn dead_letter(
    ctx: &Ctx,
    event: &str,
    raw: &[u8],
    reason: &str,
    trace: &TraceContext,
) -> Group {
    let id = format!("dlq:{event}:{:016x}", fnv1a(raw));
    dead_letter_with_id(ctx, id, event, raw, reason, trace)
}

/// A dead letter for one entry of a payload that had several: the id names the payload and the
/// entry's position, so every bad entry has its own (a JetStream stream keeps each).
pub fn dead_letter_entry(
    ctx: &Ctx,
    event: &str,
    payload_hash: u64,
    entry: &BadEntry,
    trace: &TraceContext,
) -> Group {
    let id = format!("dlq:{event}:{payload_hash:016x}:{}", entry.index);
    dead_letter_with_id(ctx, id, event, &entry.raw, &entry.reason, trace)
}

/// Bytes of the refused input a dead letter carries at most (a broker refuses messages past
/// about 1 MB, and a dead letter must not be refused in turn).
pub const DEAD_LETTER_RAW_MAX: usize = 256 * 1024;
/// Characters of a refusal reason kept at most.
const DEAD_LETTER_REASON_MAX: usize = 1024;

fn dead_letter_with_id(
    ctx: &Ctx,
    id: String,
    event: &str,
    raw: &[u8],
    reason: &str,
    trace: &TraceContext,
) -> Group {
    let mut reason: String = reason.chars().take(DEAD_LETTER_REASON_MAX).collect();
    let kept = &raw[..raw.len().min(DEAD_LETTER_RAW_MAX)];
    if kept.len() < raw.len() {
        reason.push_str(&format!(
            " (first {} of {} bytes kept)",
            kept.len(),
            raw.len()
        ));
    }
    Group {
        records: vec![Record {
            id,
            source: ctx.source.clone(),
            subject: event.to_string(),
            time: ctx.now.clone(),
            sequence: 0,
            trace: trace.clone(),
            origin: Origin::Diff,
            body: Body::DeadLetter {
                event: event.to_string(),
                reason,
                raw: kept.to_vec(),
            },
        }],
        tombstone: None,
        ops: Vec::new(),
    }
}

/// A record for one job-event frame; `index` is the frame's position in its client's stream
/// and `epoch` the run that numbered it (ids stay unique across restarts).
pub fn job_frame(
    ctx: &Ctx,
    client_id: &str,
    epoch: u64,
    index: u64,
    frame: Map<String, Value>,
    trace: &TraceContext,
) -> Group {
    let subject = frame
        .get("jobId")
        .or_else(|| frame.get("fileId"))
        .and_then(Value::as_str)
        .unwrap_or(client_id)
        .to_string();
    Group {
        records: vec![Record {
            id: format!("job:{client_id}:{epoch}:{index}"),
            source: ctx.source.clone(),
            subject,
            time: ctx.now.clone(),
            sequence: index,
            trace: trace.clone(),
            origin: Origin::Jobs,
            body: Body::Job {
                client_id: client_id.to_string(),
                frame,
            },
        }],
        tombstone: None,
        ops: vec![CheckpointOp::JobPosition {
            client_id: client_id.to_string(),
            frames: index,
        }],
    }
}

/// Fixtures shared by the normaliser's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn ctx() -> Ctx {
        Ctx {
            source: "synaptask://sim/users/u1".into(),
            now: "2026-01-01T00:00:00Z".into(),
        }
    }

    pub fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    pub fn trace() -> TraceContext {
        TraceContext::from_source("abcdef012345")
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{ctx, obj, trace};
    use super::*;
    use serde_json::json;

    /// A node exactly as `graph:get` returns it in seed 001.
    fn seed_node() -> Value {
        json!({"id": "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54", "title": "string", "description": "string",
               "status": 0, "dueDate": "2025-09-13T10:00:00Z", "type": 0, "tags": ["backend", "urgent"],
               "priority": 5, "independent": false, "volume": 5, "version": 0, "assignee": ["user1", "user2"],
               "createdTime": "2025-09-13T10:00:00Z", "lastEditedTime": "2025-09-13T10:00:00Z",
               "ownerUsername": "BLACK", "ownerEmail": "example@synaptask.space", "publicToken": "string",
               "publicDue": "2026-09-13T10:00:00Z", "x": 0.0, "y": 0.0, "z": 0.0, "pinned": false,
               "collapsed": false, "access": 0, "shareRoots": ["uuid1", "uuid2"]})
    }

    fn changed(o: Outcome) -> Group {
        match o {
            Outcome::Changed(g) => g,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn an_owned_entry_becomes_the_state_or_comes_back() {
        let mut view = View::default();
        let apply = |view: &mut View, e: Value| {
            apply_owned(
                view,
                &ctx(),
                EntityKind::Node,
                obj(e),
                Origin::Diff,
                &trace(),
            )
        };
        let (o, back) = apply(&mut view, seed_node());
        assert!(matches!(o, Outcome::Changed(_)) && back.is_none());
        let id = "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54";
        let (o, back) = apply(&mut view, json!({"id": id, "status": 2, "version": 3}));
        let g = changed(o);
        assert!(back.is_none());
        let r = g.records[0].to_json();
        assert_eq!(
            (r["before"]["status"].clone(), r["after"]["status"].clone()),
            (json!(0), json!(2))
        );
        assert_eq!(r["after"]["title"], seed_node()["title"]);
        // Not applied: the caller gets the entry back, unchanged, to hold or dead-letter.
        for (e, stale) in [
            (json!({"id": id, "status": 1, "version": 2}), true),
            (json!({"id": "n2", "status": 1, "version": 2}), false),
            (json!({"id": id, "status": 1}), false),
        ] {
            let (o, back) = apply(&mut view, e.clone());
            assert_eq!(matches!(o, Outcome::Stale), stale, "{o:?}");
            assert_eq!(back, Some(obj(e)));
        }
    }

    #[test]
    fn snapshot_then_seed_000_diff_gives_update_and_status_change() {
        let mut view = View::default();
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &obj(seed_node()),
            Origin::Snapshot,
            &trace(),
        ));
        let r = g.records[0].to_json();
        assert_eq!(r["type"], "synaptask.node.created");
        assert_eq!(r["id"], "node:d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54:0");
        assert_eq!(r["before"], Value::Null);
        assert_eq!(r["origin"], "snapshot");
        // The second node entry of seed 000's graph:diff example, with a version.
        let diff = json!({"nodes": [{"id": "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54", "status": 2, "version": 3}], "links": []});
        let (entries, bad) = diff_entries(&diff).unwrap();
        assert!(bad.is_empty());
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            entries[0].0,
            &entries[0].1,
            Origin::Diff,
            &trace(),
        ));
        assert_eq!(g.records.len(), 2);
        let r = g.records[0].to_json();
        assert_eq!(r["type"], "synaptask.node.updated");
        assert_eq!(r["sequence"], 3);
        assert_eq!(r["changed"], json!(["status"]));
        assert_eq!(r["before"]["status"], 0);
        assert_eq!(r["after"]["status"], 2);
        assert_eq!(r["after"]["title"], "string", "after is the full entity");
        let s = g.records[1].to_json();
        assert_eq!(s["id"], "status:d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54:3");
        assert_eq!(s["from"]["name"], "Available");
        assert_eq!(s["to"]["name"], "Blocked");
        assert_eq!(
            g.ops,
            vec![CheckpointOp::Upsert {
                key: "node:d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54".into(),
                version: 3,
                state: obj(r["after"].clone()).into()
            }]
        );
    }

    #[test]
    fn older_or_equal_versions_never_win() {
        let mut view = View::default();
        let mut n = obj(seed_node());
        n.insert("version".into(), json!(5));
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &n,
            Origin::Diff,
            &trace(),
        ));
        let mut old = n.clone();
        old.insert("version".into(), json!(4));
        old.insert("title".into(), json!("older"));
        assert_eq!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &old,
                Origin::Snapshot,
                &trace()
            ),
            Outcome::Stale
        );
        assert_eq!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &n,
                Origin::Snapshot,
                &trace()
            ),
            Outcome::Stale
        );
        assert_eq!(
            view.get("node:d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54")
                .unwrap()
                .state["title"],
            "string"
        );
    }

    #[test]
    fn trash_restore_delete_and_tombstone() {
        let mut view = View::default();
        let id = "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54";
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &obj(seed_node()),
            Origin::Snapshot,
            &trace(),
        ));
        let trash = obj(
            json!({"id": id, "inTrash": true, "version": 1, "lastEditedTime": "2026-01-01T00:00:01Z", "shareRoots": []}),
        );
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &trash,
            Origin::Diff,
            &trace(),
        ));
        assert_eq!(g.records[0].to_json()["type"], "synaptask.node.trashed");
        let mut restore = obj(seed_node());
        restore.insert("version".into(), json!(2));
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &restore,
            Origin::Diff,
            &trace(),
        ));
        let r = g.records[0].to_json();
        assert_eq!(r["type"], "synaptask.node.restored");
        assert_eq!(r["after"]["inTrash"], false);
        let purge = obj(json!({"id": id, "deleted": true, "shareRoots": []}));
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &purge,
            Origin::Diff,
            &trace(),
        ));
        let r = g.records[0].to_json();
        assert_eq!(r["type"], "synaptask.node.deleted");
        assert_eq!(r["id"], format!("node:{id}:3"));
        assert_eq!(r["after"], Value::Null);
        assert_eq!(g.tombstone, Some((EntityKind::Node, id.to_string())));
        assert_eq!(
            g.ops,
            vec![CheckpointOp::Remove {
                key: format!("node:{id}")
            }]
        );
        // A stale page cannot bring it back.
        assert_eq!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &restore,
                Origin::Snapshot,
                &trace()
            ),
            Outcome::Stale
        );
    }

    #[test]
    fn removals_in_a_diff_count_trashes_and_purges_of_both_shapes() {
        let flat = json!({
            "nodes": [{"id": "a", "inTrash": true, "version": 2}, {"id": "b", "status": 1}],
            "links": [{"id": "l", "deleted": true}, {"id": "m", "inTrash": false}],
        });
        assert_eq!(removals_in_diff(&flat), 2);
        let ops = json!({"nodes": [
            {"op": "trash", "before": {"id": "a"}, "after": {"id": "a", "inTrash": true}},
            {"op": "update", "before": {"id": "b"}, "after": {"id": "b", "title": "t"}},
        ]});
        assert_eq!(removals_in_diff(&ops), 1);
        assert_eq!(removals_in_diff(&json!({"nodes": "no"})), 0);
        assert_eq!(removals_in_diff(&json!([1, 2])), 0);
    }

    #[test]
    fn a_trash_of_an_entity_never_seen_is_published_and_kept_as_a_sketch() {
        // Changed and trashed while a snapshot was read, after the trash listing: history
        // replays its trash op, and consumers learn it is in the trash, as a listing tells.
        let mut view = View::default();
        let trash = obj(json!({"id": "x", "inTrash": true, "version": 3}));
        let Outcome::Changed(g) = apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Link,
            &trash,
            Origin::History,
            &trace(),
        ) else {
            panic!("a trashed record")
        };
        let r = g.records[0].to_json();
        assert_eq!(r["type"], "synaptask.link.trashed");
        assert_eq!(r["sequence"], 3);
        assert!(
            view.get("link:x").is_none(),
            "a sketch is not a known entity"
        );
        assert!(view.sketches.contains_key("link:x"));
        // The same op again (a replay, the live diff) is stale ...
        assert_eq!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Link,
                &trash,
                Origin::Diff,
                &trace()
            ),
            Outcome::Stale
        );
        // ... and a partial restore cannot be merged onto the sketch.
        let restore = obj(json!({"id": "x", "inTrash": false, "version": 4}));
        assert_eq!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Link,
                &restore,
                Origin::History,
                &trace()
            ),
            Outcome::NeedsSnapshot
        );
    }

    #[test]
    fn partial_change_to_unknown_entity_needs_a_snapshot() {
        let mut view = View::default();
        let e = obj(json!({"id": "x", "status": 1, "version": 9}));
        assert_eq!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &e,
                Origin::Diff,
                &trace()
            ),
            Outcome::NeedsSnapshot
        );
    }

    #[test]
    fn seed_001_link_and_op_shaped_entries() {
        let mut view = View::default();
        let link = json!({"id": "l1", "source": "a", "target": "b", "type": 0, "version": 0, "wasBlocker": false});
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Link,
            &obj(link),
            Origin::Snapshot,
            &trace(),
        ));
        // The ack's op/before/after shape (facts §5.2), with unknown keys kept.
        let payload = json!({"batchId": "b", "actor": {"username": "x"}, "links": [
            {"op": 11, "before": {"id": "l1", "type": 0}, "after": {"id": "l1", "type": 1, "version": 1, "futureField": 7}}]});
        let (entries, _) = diff_entries(&payload).unwrap();
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            entries[0].0,
            &entries[0].1,
            Origin::Diff,
            &trace(),
        ));
        let r = g.records[0].to_json();
        assert_eq!(r["type"], "synaptask.link.updated");
        assert_eq!(r["changed"], json!(["futureField", "type"]));
        assert_eq!(r["after"]["source"], "a");
    }

    /// Issue 8 item 4: v5 (status 0 -> 2) was published, not acknowledged, when the process
    /// died; the status went back to 0 while it was down. The restart's checkpoint has v4.
    #[test]
    fn after_a_restart_changes_start_from_what_was_published() {
        let node = |v: u64, status: i64| {
            obj(
                json!({"id": "n1", "version": v, "title": "t", "status": status, "createdTime": "2026-01-01T00:00:00Z"}),
            )
        };
        use crate::state::CheckpointStore;
        let mut store = crate::state::MemoryStore::default();
        store
            .apply(&[CheckpointOp::Upsert {
                key: "node:n1".into(),
                version: 4,
                state: Arc::new(node(4, 0)),
            }])
            .unwrap();
        let restarted = || {
            let mut view = View::new(store.reader(), 1 << 20);
            view.prefetch(["node:n1"]).unwrap();
            view
        };
        let published = || {
            vec![(
                "node:n1".to_string(),
                crate::state::journal::Published {
                    version: 5,
                    state: Arc::new(node(5, 2)),
                },
            )]
        };

        // Only the newer state is known (a snapshot after history ran out): 2 -> 0.
        let mut view = restarted();
        view.remember_published(published());
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &node(6, 0),
            Origin::Snapshot,
            &trace(),
        ));
        let ids: Vec<&str> = g.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["node:n1:6", "status:n1:6"]);
        match &g.records[1].body {
            Body::StatusChanged { from, to, .. } => assert_eq!((*from, *to), (2, 0)),
            other => panic!("{other:?}"),
        }

        // History replays v5 first: it is published as the first time (0 -> 2, same id), then
        // v6 goes back (2 -> 0).
        let mut view = restarted();
        view.remember_published(published());
        let g5 = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &node(5, 2),
            Origin::Diff,
            &trace(),
        ));
        assert_eq!(g5.records[1].id, "status:n1:5");
        match &g5.records[1].body {
            Body::StatusChanged { from, to, .. } => assert_eq!((*from, *to), (0, 2)),
            other => panic!("{other:?}"),
        }
        let g6 = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &node(6, 0),
            Origin::Diff,
            &trace(),
        ));
        match &g6.records[1].body {
            Body::StatusChanged { from, to, .. } => assert_eq!((*from, *to), (2, 0)),
            other => panic!("{other:?}"),
        }

        // Without the journal (the old behaviour) the snapshot says nothing about status.
        let mut view = restarted();
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &node(6, 0),
            Origin::Snapshot,
            &trace(),
        ));
        assert_eq!(g.records.len(), 1);
    }

    #[test]
    fn every_bad_entry_of_a_payload_gets_its_own_dead_letter() {
        let payload = json!({"nodes": [1, {"id": "a", "version": 1}, "x"], "links": [true, 1]});
        let (ok, bad) = diff_entries(&payload).unwrap();
        assert_eq!(ok.len(), 1);
        let indexes: Vec<usize> = bad.iter().map(|b| b.index).collect();
        assert_eq!(indexes, [0, 2, 3, 4]);
        let hash = fnv1a(payload.to_string().as_bytes());
        let ids: std::collections::HashSet<String> = bad
            .iter()
            .map(|b| {
                dead_letter_entry(&ctx(), "graph:diff", hash, b, &trace()).records[0]
                    .id
                    .clone()
            })
            .collect();
        assert_eq!(ids.len(), 4, "{ids:?}");
        // The two entries `1` (a node and a link) are the same bytes, yet two dead letters.
        let g = dead_letter_entry(&ctx(), "graph:diff", hash, &bad[3], &trace());
        match &g.records[0].body {
            Body::DeadLetter { raw, .. } => assert_eq!(raw, b"1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_huge_dead_letter_keeps_a_bounded_prefix_and_says_so() {
        let raw = vec![b'x'; DEAD_LETTER_RAW_MAX * 4];
        let g = dead_letter(&ctx(), "graph:diff", &raw, &"r".repeat(5000), &trace());
        match &g.records[0].body {
            Body::DeadLetter {
                raw: kept, reason, ..
            } => {
                assert_eq!(kept.len(), DEAD_LETTER_RAW_MAX);
                assert!(reason.len() < 1200, "{}", reason.len());
                assert!(
                    reason.ends_with(&format!(
                        "(first {DEAD_LETTER_RAW_MAX} of {} bytes kept)",
                        raw.len()
                    )),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn versions_at_the_top_of_the_range_are_refused_not_overflowed() {
        // Found by the fuzz targets (tests/fuzz.rs): `known.version + 1` overflowed.
        let mut view = View::default();
        let top = obj(
            json!({"id": "a", "title": "t", "status": 0, "version": MAX_VERSION,
                             "createdTime": "2026-12-01T00:00:00Z"}),
        );
        let past = obj(json!({"id": "a", "title": "t", "status": 0, "version": u64::MAX}));
        let apply = |view: &mut View, e: &Map<String, Value>| {
            apply_entity(view, &ctx(), EntityKind::Node, e, Origin::Diff, &trace())
        };
        assert!(matches!(apply(&mut view, &past), Outcome::Invalid(_)));
        assert!(matches!(apply(&mut view, &top), Outcome::Changed(_)));
        let partial = obj(json!({"id": "a", "title": "u", "version": MAX_VERSION}));
        assert!(!skips_versions(&view, EntityKind::Node, &partial));
        let purge = obj(json!({"id": "a", "deleted": true}));
        let _ = apply(&mut view, &purge);
    }

    #[test]
    fn changed_fields_are_the_sorted_names_whose_values_differ() {
        let before = json!({"b": 1, "a": 2, "gone": true, "version": 1, "same": "x"});
        let after = json!({"a": 3, "b": 1, "new": null, "version": 2, "same": "x", "c": []});
        let (Value::Object(b), Value::Object(a)) = (before, after) else {
            unreachable!()
        };
        assert_eq!(changed_fields(&b, &a), ["a", "c", "gone", "new"]);
        assert!(changed_fields(&a, &a).is_empty());
    }

    #[test]
    fn taking_diff_entries_gives_what_copying_gives_and_leaves_bad_payloads_whole() {
        let payloads = [
            json!({"nodes": [{"id": "a", "version": 1}], "links": [{"op": 0, "after": {"id": "l", "version": 2}}]}),
            json!({"nodes": [1, {"id": "a", "version": 1}], "links": [{"op": 0, "after": null}]}),
            json!({"nodes": null, "links": [{"id": "l"}], "other": true}),
            json!({"nodes": 3}),
            json!("nope"),
        ];
        for payload in payloads {
            let copied = diff_entries(&payload);
            let mut taken_from = payload.clone();
            let taken = take_diff_entries(&mut taken_from);
            match (&copied, &taken) {
                (Ok((ok_a, bad_a)), Ok((ok_b, bad_b))) => {
                    assert_eq!(ok_a, ok_b, "{payload}");
                    assert_eq!(bad_a.len(), bad_b.len(), "{payload}");
                    for (a, b) in bad_a.iter().zip(bad_b) {
                        assert_eq!((a.index, &a.reason, &a.raw), (b.index, &b.reason, &b.raw));
                    }
                    if !bad_a.is_empty() {
                        assert_eq!(
                            taken_from, payload,
                            "a payload with bad entries stays whole"
                        );
                    }
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a, b);
                    assert_eq!(taken_from, payload);
                }
                _ => panic!("{payload}: {copied:?} vs {taken:?}"),
            }
        }
    }

    #[test]
    fn malformed_payloads_are_reported_not_panicked_on() {
        assert!(diff_entries(&json!("nope")).is_err());
        assert!(diff_entries(&json!({"nodes": 3})).is_err());
        let (ok, bad) = diff_entries(&json!({"nodes": [1, {"id": "a", "version": 1}]})).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].raw, b"1");
        let mut view = View::default();
        let no_version = obj(json!({"id": "a", "title": "t", "status": 0}));
        assert!(matches!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &no_version,
                Origin::Diff,
                &trace()
            ),
            Outcome::Invalid(_)
        ));
        let g = dead_letter(&ctx(), "graph:diff", b"\xff{", "not JSON", &trace());
        let r = g.records[0].to_json();
        assert_eq!(r["type"], "synaptask.dead_letter");
        assert_eq!(r["raw"], "/3s=");
        assert_eq!(
            g.records[0].id,
            dead_letter(&ctx(), "graph:diff", b"\xff{", "x", &trace()).records[0].id
        );
    }

    #[test]
    fn known_trashed_then_purged_is_deleted_only_with_a_listing() {
        let mut view = View::default();
        let mut n = obj(seed_node());
        n.insert("id".into(), json!("t"));
        n.insert("version".into(), json!(4));
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &n,
            Origin::Snapshot,
            &trace(),
        ));
        let trash = obj(json!({"id": "t", "inTrash": true, "version": 5}));
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &trash,
            Origin::Diff,
            &trace(),
        ));
        let seen = SeenKeys::default();
        // No listing: a trashed entity cannot be judged.
        assert!(
            missing_after_snapshot(&mut view.clone(), &ctx(), &seen, None, false, &trace())
                .groups
                .is_empty()
        );
        // A listing without it: it was purged.
        let groups = missing_after_snapshot(
            &mut view,
            &ctx(),
            &seen,
            Some(&HashMap::new()),
            false,
            &trace(),
        )
        .groups;
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].records[0].id, "node:t:6");
        assert_eq!(groups[0].records[0].event_type(), "synaptask.node.deleted");
        assert!(groups[0].tombstone.is_some());
    }

    #[test]
    fn missing_from_snapshot_is_trashed_or_deleted() {
        let mut view = View::default();
        for id in ["a", "b", "c"] {
            let mut n = obj(seed_node());
            n.insert("id".into(), json!(id));
            n.insert("version".into(), json!(4));
            changed(apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &n,
                Origin::Snapshot,
                &trace(),
            ));
        }
        let seen: SeenKeys = ["node:a"].into_iter().collect();
        let trash: HashMap<String, Map<String, Value>> = [(
            "node:b".to_string(),
            obj(json!({"id": "b", "inTrash": true, "version": 5})),
        ), (
            "node:z".to_string(),
            obj(json!({"id": "z", "title": "never seen", "status": 1, "inTrash": true, "version": 9})),
        )]
        .into();
        let groups =
            missing_after_snapshot(&mut view, &ctx(), &seen, Some(&trash), false, &trace()).groups;
        let types: Vec<(String, String)> = groups
            .iter()
            .map(|g| (g.records[0].id.clone(), g.records[0].event_type()))
            .collect();
        assert_eq!(
            types,
            vec![
                ("node:b:5".to_string(), "synaptask.node.trashed".to_string()),
                ("node:z:9".to_string(), "synaptask.node.trashed".to_string()),
                ("node:c:5".to_string(), "synaptask.node.deleted".to_string())
            ]
        );
    }

    #[test]
    fn without_a_trash_listing_nothing_unknown_is_published_as_deleted() {
        let mut view = View::default();
        for id in ["a", "b"] {
            let mut n = obj(seed_node());
            n.insert("id".into(), json!(id));
            n.insert("version".into(), json!(4));
            changed(apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &n,
                Origin::Snapshot,
                &trace(),
            ));
        }
        let seen: SeenKeys = ["node:a"].into_iter().collect();
        let d = missing_after_snapshot(&mut view, &ctx(), &seen, None, false, &trace());
        assert_eq!(d.unresolved, ["node:b"]);
        assert_eq!(d.groups.len(), 1);
        assert_eq!(
            d.groups[0].records[0].event_type(),
            "synaptask.node.trashed"
        );
        assert!(d.groups[0].tombstone.is_none());
        // A purge diff that follows still deletes it.
        let purge = obj(json!({"id": "b", "deleted": true}));
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &purge,
            Origin::Diff,
            &trace(),
        ));
        assert_eq!(g.records[0].id, "node:b:6");
    }

    #[test]
    fn a_trash_listing_older_than_a_restore_already_applied_is_stale() {
        // Trashed at v5 when the pages were read, restored (v6, applied from a live diff)
        // before the listing, which still says v5.
        let mut view = View::default();
        let mut n = obj(seed_node());
        n.insert("id".into(), json!("r"));
        n.insert("version".into(), json!(6));
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &n,
            Origin::Diff,
            &trace(),
        ));
        let trash: HashMap<String, Map<String, Value>> = [(
            "node:r".to_string(),
            obj(json!({"id": "r", "inTrash": true, "version": 5})),
        )]
        .into();
        // The restore's key counts as seen (touched while the snapshot was read) ...
        let seen: SeenKeys = ["node:r"].into_iter().collect();
        let d = missing_after_snapshot(
            &mut view.clone(),
            &ctx(),
            &seen,
            Some(&trash),
            false,
            &trace(),
        );
        assert!(d.groups.is_empty(), "{:?}", d.groups);
        // ... and even unseen, a listed version the view passed publishes nothing.
        let d = missing_after_snapshot(
            &mut view,
            &ctx(),
            &SeenKeys::default(),
            Some(&trash),
            false,
            &trace(),
        );
        assert!(d.groups.is_empty(), "{:?}", d.groups);
        assert_eq!(view.get("node:r").unwrap().version, 6);
    }

    #[test]
    fn version_jumps_a_diff_cannot_explain_wait_for_history() {
        let mut view = View::default();
        let mut n = obj(seed_node());
        n.insert("version".into(), json!(3));
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &n,
            Origin::Snapshot,
            &trace(),
        ));
        let id = "d83d2f10-f4c9-49b8-a93b-f8b0f2db1e54";
        let d = |v: Value| obj(v);
        // +1: always fine.
        assert!(!skips_versions(
            &view,
            EntityKind::Node,
            &d(json!({"id": id, "tags": [], "version": 4}))
        ));
        // Title and status in one batch: two ops, +2 explained.
        assert!(!skips_versions(
            &view,
            EntityKind::Node,
            &d(json!({"id": id, "title": "x", "status": 1, "version": 5}))
        ));
        // A title alone at +2: a change in between was missed.
        assert!(skips_versions(
            &view,
            EntityKind::Node,
            &d(json!({"id": id, "title": "x", "version": 5}))
        ));
        assert!(skips_versions(
            &view,
            EntityKind::Node,
            &d(json!({"id": id, "status": 1, "version": 5}))
        ));
        // Title and status at +3: a change in between was missed.
        assert!(skips_versions(
            &view,
            EntityKind::Node,
            &d(json!({"id": id, "title": "x", "status": 1, "version": 6}))
        ));
        // Full entities replace what they touch; a trash is merged, so it waits.
        let mut full = obj(seed_node());
        full.insert("version".into(), json!(9));
        assert!(!skips_versions(&view, EntityKind::Node, &full));
        assert!(skips_versions(
            &view,
            EntityKind::Node,
            &d(json!({"id": id, "inTrash": true, "version": 9}))
        ));
        assert!(!skips_versions(
            &view,
            EntityKind::Node,
            &d(json!({"id": id, "inTrash": true, "version": 4}))
        ));
    }

    #[test]
    fn an_entity_known_only_from_the_trash_listing_is_purged_or_restored_whole() {
        let mut view = View::default();
        let trash: HashMap<String, Map<String, Value>> = [(
            "node:s".to_string(),
            obj(
                json!({"id": "s", "title": "in trash", "status": 1, "inTrash": true, "version": 4}),
            ),
        )]
        .into();
        let d = missing_after_snapshot(
            &mut view,
            &ctx(),
            &SeenKeys::default(),
            Some(&trash),
            false,
            &trace(),
        );
        assert_eq!(
            d.groups[0].records[0].event_type(),
            "synaptask.node.trashed"
        );
        assert!(
            view.get("node:s").is_none(),
            "a sketch is not a known entity"
        );
        // A partial change (history's restore patch) cannot be merged onto it ...
        let restore = obj(json!({"id": "s", "inTrash": false, "version": 5}));
        assert_eq!(
            apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &restore,
                Origin::History,
                &trace()
            ),
            Outcome::NeedsSnapshot
        );
        // ... a whole restore can, and a purge deletes it.
        let mut whole = obj(seed_node());
        whole.insert("id".into(), json!("s"));
        whole.insert("version".into(), json!(5));
        let mut v2 = view.clone();
        let g = changed(apply_entity(
            &mut v2,
            &ctx(),
            EntityKind::Node,
            &whole,
            Origin::Diff,
            &trace(),
        ));
        assert_eq!(g.records[0].event_type(), "synaptask.node.restored");
        let purge = obj(json!({"id": "s", "deleted": true}));
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &purge,
            Origin::Diff,
            &trace(),
        ));
        assert_eq!(g.records[0].id, "node:s:5");
        assert!(g.tombstone.is_some());
    }

    #[test]
    fn a_branch_scoped_snapshot_says_left_not_deleted_and_ignores_other_trash() {
        let mut view = View::default();
        for id in ["root", "in", "out"] {
            let mut n = obj(seed_node());
            n.insert("id".into(), json!(id));
            n.insert("version".into(), json!(2));
            changed(apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &n,
                Origin::Snapshot,
                &trace(),
            ));
        }
        let seen: SeenKeys = ["node:root", "node:in"].into_iter().collect();
        // The user-wide listing has an entity of another branch: not ours to publish.
        let trash: HashMap<String, Map<String, Value>> = [(
            "node:elsewhere".to_string(),
            obj(json!({"id": "elsewhere", "title": "t", "status": 0, "inTrash": true, "version": 3})),
        )]
        .into();
        let d = missing_after_snapshot(&mut view, &ctx(), &seen, Some(&trash), true, &trace());
        assert_eq!(d.groups.len(), 1, "{:?}", d.groups);
        let r = d.groups[0].records[0].to_json();
        assert_eq!(r["type"], "synaptask.node.left");
        assert_eq!(r["id"], "node:out:2:left");
        assert_eq!(r["after"], Value::Null);
        assert!(d.groups[0].tombstone.is_some());
        assert!(view.get("node:out").is_none() && view.get("node:elsewhere").is_none());
        // It may come back, at any version.
        let mut back = obj(seed_node());
        back.insert("id".into(), json!("out"));
        back.insert("version".into(), json!(2));
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &back,
            Origin::Snapshot,
            &trace(),
        ));
        assert_eq!(g.records[0].event_type(), "synaptask.node.created");
    }

    #[test]
    fn diff_entries_in_and_out_of_a_branch() {
        let mut view = View::default();
        let mut n = obj(seed_node());
        n.insert("id".into(), json!("known"));
        changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &n,
            Origin::Snapshot,
            &trace(),
        ));
        let e = |v: Value| obj(v);
        assert!(in_scope(
            &view,
            EntityKind::Node,
            &e(json!({"id": "r"})),
            "r"
        ));
        assert!(in_scope(
            &view,
            EntityKind::Node,
            &e(json!({"id": "x", "shareRoots": ["a", "r"]})),
            "r"
        ));
        assert!(!in_scope(
            &view,
            EntityKind::Node,
            &e(json!({"id": "x", "shareRoots": ["a"]})),
            "r"
        ));
        assert!(in_scope(
            &view,
            EntityKind::Node,
            &e(json!({"id": "known", "title": "t"})),
            "r"
        ));
        assert!(!in_scope(
            &view,
            EntityKind::Node,
            &e(json!({"id": "unknown", "title": "t"})),
            "r"
        ));
    }

    #[test]
    fn ids_that_cannot_be_published_are_invalid_not_fatal() {
        let mut view = View::default();
        for id in ["a\r\nb", "with space", ""] {
            let mut n = obj(seed_node());
            n.insert("id".into(), json!(id));
            assert!(matches!(
                apply_entity(
                    &mut view,
                    &ctx(),
                    EntityKind::Node,
                    &n,
                    Origin::Diff,
                    &trace()
                ),
                Outcome::Invalid(_)
            ));
        }
        let mut n = obj(seed_node());
        n.insert("lastEditedTime".into(), json!("2026-01-01\r\nX: y"));
        let g = changed(apply_entity(
            &mut view,
            &ctx(),
            EntityKind::Node,
            &n,
            Origin::Diff,
            &trace(),
        ));
        assert_eq!(
            g.records[0].time,
            ctx().now,
            "a time that is no token is not carried"
        );
    }
}
