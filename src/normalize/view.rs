//! The working view: the latest known state of every entity, delivered or not, which turns a
//! partial change into `before` / `after` / `changed`.
//!
//! Only part of it is in memory, so that memory does not grow with the graph:
//! - states changed and not yet delivered (*dirty*): the only copy until the store has them;
//! - a bounded cache of delivered states, least recently used first out (`state.cache_mb`);
//! - everything else is in the checkpoint store, read back through an [`EntityReader`].
//!
//! Normalisation stays pure: it reads only what is in memory. Before an event is normalised
//! the pipeline calls [`View::prefetch`] with the keys the event touches (or
//! [`View::prefetch_unseen`] before the disappearance check of a snapshot), which reads the
//! missing ones from the store; the cache is trimmed only there, so nothing an event needs is
//! evicted while it is normalised. A view without a reader ([`View::default`]) keeps
//! everything in memory, as the unit tests want.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use lru::LruCache;
use serde_json::{Map, Value};

use crate::state::journal::Published;
use crate::state::{EntityReader, StateError};

/// The latest known state of one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    /// Its version.
    pub version: u64,
    /// Its full state (camelCase fields as the API sends them; `inTrash: true` while trashed),
    /// shared with the records and checkpoint ops that carry it.
    pub state: Arc<Map<String, Value>>,
}

/// A delivered state kept in memory, and what it is estimated to cost there.
#[derive(Debug, Clone)]
struct Cached {
    known: Known,
    bytes: usize,
}

/// The full states in memory: dirty ones (changed, not yet delivered) and a cache of delivered
/// ones. A key is in at most one of the two. A dirty `None` is a removal not yet delivered: the
/// store still has the old state, which must not be read back meanwhile.
#[derive(Debug, Clone)]
pub(super) struct Entities {
    dirty: HashMap<String, Option<Cached>>,
    /// Estimated bytes of the dirty states: they count against the cache's budget, so that
    /// what the view holds stays near `state.cache_mb` while a snapshot fills the delivery
    /// window (the dirty states then leave no room for delivered ones, which a snapshot does
    /// not read again anyway).
    dirty_bytes: usize,
    clean: LruCache<String, Cached>,
    clean_bytes: usize,
}

impl Default for Entities {
    fn default() -> Self {
        Self {
            dirty: HashMap::new(),
            dirty_bytes: 0,
            clean: LruCache::unbounded(),
            clean_bytes: 0,
        }
    }
}

impl Entities {
    pub(super) fn get(&self, key: &str) -> Option<&Known> {
        match self.dirty.get(key) {
            Some(d) => d.as_ref().map(|c| &c.known),
            None => self.clean.peek(key).map(|c| &c.known),
        }
    }

    pub(super) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A changed state: dirty until its delivery is committed.
    pub(super) fn insert(&mut self, key: String, known: Known) {
        self.forget_clean(&key);
        let bytes = approx_bytes(&key, &known.state);
        self.dirty_bytes += bytes;
        if let Some(Some(old)) = self.dirty.insert(key, Some(Cached { known, bytes })) {
            self.dirty_bytes -= old.bytes;
        }
    }

    /// Removes a state whose removal is published (a `Remove` op): until that is delivered
    /// the key stays marked, so the store's old state is not read back.
    pub(super) fn remove(&mut self, key: &str) -> Option<Known> {
        let old = self.take(key);
        self.dirty.insert(key.to_string(), None);
        old
    }

    /// Removes a state that moves elsewhere in the view (a sketch).
    pub(super) fn take(&mut self, key: &str) -> Option<Known> {
        match self.dirty.remove(key) {
            Some(d) => d.map(|c| {
                self.dirty_bytes -= c.bytes;
                c.known
            }),
            None => self.forget_clean(key).map(|c| c.known),
        }
    }

    /// Moves a dirty state whose delivery is committed to the cache of delivered ones.
    fn deliver(&mut self, key: String) {
        if let Some(Some(c)) = self.dirty.remove(&key) {
            self.dirty_bytes -= c.bytes;
            self.put_clean(key, c);
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = (&String, &Known)> {
        self.dirty
            .iter()
            .filter_map(|(k, d)| Some((k, &d.as_ref()?.known)))
            .chain(self.clean.iter().map(|(k, c)| (k, &c.known)))
    }

    fn len(&self) -> usize {
        self.dirty.values().filter(|d| d.is_some()).count() + self.clean.len()
    }

    fn forget_clean(&mut self, key: &str) -> Option<Cached> {
        let c = self.clean.pop(key)?;
        self.clean_bytes -= c.bytes;
        Some(c)
    }

    fn cache(&mut self, key: String, known: Known) {
        let bytes = approx_bytes(&key, &known.state);
        self.put_clean(key, Cached { known, bytes });
    }

    fn put_clean(&mut self, key: String, c: Cached) {
        self.forget_clean(&key);
        self.clean_bytes += c.bytes;
        self.clean.put(key, c);
    }

    /// Drops least recently used delivered states until they and the dirty ones fit `budget`
    /// bytes. Dirty states stay whatever their size (they are the only copy), and a quarter of
    /// the budget stays for delivered ones even when dirty states fill the rest, so that a full
    /// delivery window does not turn every partial diff into a store read.
    fn trim(&mut self, budget: usize, incoming: usize) {
        let room = budget
            .saturating_sub(self.dirty_bytes.saturating_add(incoming))
            .max(budget / 4);
        while self.clean_bytes > room {
            match self.clean.pop_lru() {
                Some((_, c)) => self.clean_bytes -= c.bytes,
                None => break,
            }
        }
    }
}

/// What a parsed state costs in memory: `serde_json`'s ordered map spends about 80 bytes per
/// field besides the name and the value's own heap (index slot, entry, `Value`, `String`
/// headers), and the cache about 100 per entry. Doubled for what the allocator adds (size
/// classes, spare capacity, pages it cannot return): `benches/memory.sh` measured 104 MB more
/// resident memory for 56 MB more of the undoubled estimate.
pub fn approx_bytes(key: &str, state: &Map<String, Value>) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(|v| 32 + value(v)).sum(),
            Value::Object(m) => fields(m),
            _ => 0,
        }
    }
    fn fields(m: &Map<String, Value>) -> usize {
        m.iter().map(|(k, v)| 80 + k.len() + value(v)).sum()
    }
    2 * (100 + key.len() + fields(state))
}

/// The working view: every entity's latest known state, keyed `node:<id>` / `link:<id>`.
#[derive(Default, Clone)]
pub struct View {
    pub(super) entities: Entities,
    /// Purged entities and the version of their purge, so a stale page cannot resurrect them
    /// (and the store's copy, until the purge is delivered, is not read back).
    pub(super) deleted: HashMap<String, u64>,
    /// Entities known only from a trash listing (published as trashed, never seen whole): kept
    /// apart so that a partial change cannot be merged onto a state without a title or tags,
    /// while a purge or a whole restore still finds them.
    pub(super) sketches: HashMap<String, Known>,
    /// After a restart: versions published but not delivered before it, newer than the
    /// delivered ones (from the published journal, [`crate::state::journal`]).
    pub(super) published: HashMap<String, Known>,
    /// The delivered states; `None` keeps everything in memory.
    reader: Option<Arc<dyn EntityReader>>,
    /// Bytes of delivered states kept in memory.
    cache_bytes: usize,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("dirty", &self.entities.dirty.len())
            .field("cached", &self.entities.clean.len())
            .field("cached_bytes", &self.entities.clean_bytes)
            .field("sketches", &self.sketches.len())
            .field("deleted", &self.deleted.len())
            .field("published", &self.published.len())
            .field("store", &self.reader.is_some())
            .finish()
    }
}

impl View {
    /// The view of a run: the delivered states are read from `reader` as events need them,
    /// and at most about `cache_bytes` of them stay in memory.
    pub fn new(reader: Arc<dyn EntityReader>, cache_bytes: usize) -> Self {
        Self {
            reader: Some(reader),
            cache_bytes,
            ..Self::default()
        }
    }

    /// Overlays the versions a previous run published without their delivery being
    /// acknowledged: changes newer than them start from them (see
    /// [`super::apply_entity`]).
    pub fn remember_published(&mut self, published: impl IntoIterator<Item = (String, Published)>) {
        for (key, p) in published {
            self.published.insert(
                key,
                Known {
                    version: p.version,
                    state: p.state,
                },
            );
        }
    }

    /// The states published and maybe not delivered yet (the dirty ones, and the remembered
    /// ones of the previous run): what a journal compaction keeps.
    pub fn undelivered(&self) -> Vec<(String, Published)> {
        let mut out: HashMap<&String, &Known> = HashMap::new();
        let dirty = self
            .entities
            .dirty
            .iter()
            .filter_map(|(k, d)| Some((k, &d.as_ref()?.known)));
        for (k, known) in self.published.iter().chain(dirty) {
            if out.get(k).is_none_or(|p| p.version < known.version) {
                out.insert(k, known);
            }
        }
        out.into_iter()
            .map(|(k, known)| {
                (
                    k.clone(),
                    Published {
                        version: known.version,
                        state: known.state.clone(),
                    },
                )
            })
            .collect()
    }

    /// The store committed these entity versions (`None`: the removal): their states may
    /// leave memory now (they are cached, within the budget, rather than dropped).
    pub fn delivered(&mut self, committed: impl IntoIterator<Item = (String, Option<u64>)>) {
        if self.reader.is_none() {
            return;
        }
        for (key, version) in committed {
            let now = self.entities.dirty.get(&key);
            if now.is_some_and(|d| d.as_ref().map(|c| c.known.version) == version) {
                self.entities.deliver(key);
            }
        }
    }

    /// Trims the cache of delivered states to its budget (between events).
    pub fn trim(&mut self) {
        if self.reader.is_some() {
            self.entities.trim(self.cache_bytes, 0);
        }
    }

    /// Makes the states of `keys` resident (read from the store when not in memory), after
    /// trimming the cache to its budget: call before normalising an event that touches them.
    pub fn prefetch<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), StateError> {
        self.prefetch_page(keys, 0)
    }

    /// [`View::prefetch`] for an event that brings about `incoming` bytes of new states (a
    /// snapshot page, [`approx_bytes`]): the cache makes room for them first, so that the view
    /// stays within its budget once they are dirty, not a page over it.
    pub fn prefetch_page<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a str>,
        incoming: usize,
    ) -> Result<(), StateError> {
        if self.reader.is_some() {
            self.entities.trim(self.cache_bytes, incoming);
        }
        self.load(keys)
    }

    /// Reads the states of `keys` that are not in memory from the store, without trimming.
    fn load<'a>(&mut self, keys: impl IntoIterator<Item = &'a str>) -> Result<(), StateError> {
        let Some(reader) = self.reader.clone() else {
            return Ok(());
        };
        let mut missing: Vec<&str> = Vec::new();
        let mut asked: HashSet<&str> = HashSet::new();
        for key in keys {
            if self.entities.dirty.contains_key(key) || self.sketches.contains_key(key) {
                continue;
            }
            // `get` marks it recently used.
            if self.entities.clean.get(key).is_none() && asked.insert(key) {
                missing.push(key);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        for (key, found) in missing.iter().zip(reader.get_many(&missing)?) {
            let Some(e) = found else { continue };
            // A purge delivered in an earlier run, and the entity still in the store: only a
            // state newer than the purge counts.
            if self.deleted.get(*key).is_some_and(|d| e.version <= *d) {
                continue;
            }
            let known = Known {
                version: e.version,
                state: e.state,
            };
            let whole = super::split_key(key)
                .is_some_and(|(kind, _)| super::looks_full(kind, &known.state));
            if crate::state::is_trashed(&known.state) && !whole {
                self.sketches.insert(key.to_string(), known);
            } else {
                self.entities.cache(key.to_string(), known);
            }
        }
        Ok(())
    }

    /// Before [`super::missing_after_snapshot`]: makes resident every delivered entity that
    /// the snapshot did not list and that may have disappeared (not in `trash`; trashed ones
    /// only with a listing), and every entity the listing names. One pass over the store's
    /// keys, without parsing states.
    pub fn prefetch_unseen(
        &mut self,
        seen: &SeenKeys,
        trash: Option<&HashMap<String, Map<String, Value>>>,
    ) -> Result<(), StateError> {
        let Some(reader) = self.reader.clone() else {
            return Ok(());
        };
        let listing = trash.is_some();
        let mut keys: Vec<String> = trash
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default();
        reader.scan(&mut |key, _, trashed| {
            if !seen.contains(key)
                && trash.is_none_or(|t| !t.contains_key(key))
                && (listing || !trashed)
            {
                keys.push(key.to_string());
            }
        })?;
        // In pages, so the store is not read in one transaction of unbounded size.
        // Not trimmed between chunks: every one of them is needed by the same check.
        for chunk in keys.chunks(1024) {
            self.load(chunk.iter().map(String::as_str))?;
        }
        Ok(())
    }

    /// An entity's known state (resident: see [`View::prefetch`]).
    pub fn get(&self, key: &str) -> Option<&Known> {
        self.entities.get(key)
    }

    /// Number of full states in memory (dirty and cached; trashed included).
    pub fn len(&self) -> usize {
        self.entities.len()
    }

    /// Whether no full state is in memory.
    pub fn is_empty(&self) -> bool {
        self.entities.len() == 0
    }
}

/// The keys a snapshot listed (and the live changes made while it was read), as 64-bit hashes
/// in a sorted vector: a million keys take about 8 MB (a hash set took 19, and 28 while it
/// grew near the end of a snapshot, which was the snapshot's memory peak). Two keys share a
/// hash with probability about 2^-64 per pair; a key that collides with a listed one would be
/// taken as listed, so its disappearance would wait for the next snapshot, which hashes again
/// the same way (the hasher is fixed, not seeded per process, so the risk is the same every
/// time, and tiny).
#[derive(Debug, Default, Clone)]
pub struct SeenKeys {
    /// Sorted, without repeats.
    sorted: Vec<u64>,
    /// Added since the last fold into `sorted`, in arrival order, maybe repeated.
    recent: Vec<u64>,
}

/// Hashes kept unsorted before they are folded in, at least.
const FOLD_AT: usize = 4096;

/// The standard library's SipHash with its fixed keys (`DefaultHasher::new`): well spread for
/// any input, unlike the fast map hashers, and the same for every snapshot of a run.
fn key_hash(key: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

impl SeenKeys {
    /// Adds a key.
    pub fn insert(&mut self, key: &str) {
        self.recent.push(key_hash(key));
        // A quarter of the sorted part: each fold sorts the whole, so folds must get rarer as
        // it grows, and the unsorted part stays small, since `contains` scans it.
        if self.recent.len() >= FOLD_AT.max(self.sorted.len() / 4) {
            self.seal();
        }
    }

    /// Folds the keys added since the last call into the sorted part: call once adding is done,
    /// before many `contains` (they scan what is not folded yet).
    pub fn seal(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        self.sorted.append(&mut self.recent);
        self.sorted.sort_unstable();
        self.sorted.dedup();
    }

    /// Whether a key was added.
    pub fn contains(&self, key: &str) -> bool {
        let h = key_hash(key);
        self.sorted.binary_search(&h).is_ok() || self.recent.contains(&h)
    }

    /// How many distinct keys were added (exact once sealed; before, keys added twice since
    /// the last fold may count twice).
    pub fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    /// Whether none was added.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty() && self.recent.is_empty()
    }

    /// Adds every key of `other`, sealed.
    pub fn merge(&mut self, other: &SeenKeys) {
        self.recent.extend_from_slice(&other.sorted);
        self.recent.extend_from_slice(&other.recent);
        self.seal();
    }

    /// Forgets every key, and the memory they took.
    pub fn clear(&mut self) {
        *self = Self::default();
    }
}

impl<S: AsRef<str>> Extend<S> for SeenKeys {
    fn extend<I: IntoIterator<Item = S>>(&mut self, iter: I) {
        for k in iter {
            self.insert(k.as_ref());
        }
    }
}

impl<S: AsRef<str>> FromIterator<S> for SeenKeys {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut s = Self::default();
        s.extend(iter);
        s.seal();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{ctx, obj, trace};
    use super::super::{apply_entity, missing_after_snapshot, Group, Outcome};
    use super::*;
    use crate::record::{EntityKind, Origin};
    use crate::state::{CheckpointStore, MemoryStore};
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    /// One random change to one of a few nodes: whole (create, restore), partial (status,
    /// title, trash), a purge, or a replay of an old version.
    fn change(rng: &mut impl Rng, versions: &mut HashMap<String, u64>) -> Map<String, Value> {
        let id = format!("n{}", rng.gen_range(0..12));
        let v = versions.entry(id.clone()).or_insert(0);
        if rng.gen_bool(0.1) && *v > 1 {
            // A replay: stale, must give nothing on both sides.
            return obj(json!({"id": id, "version": *v - 1, "status": 9}));
        }
        *v += 1;
        match rng.gen_range(0..10) {
            0 | 1 => obj(json!({"id": id, "version": *v, "title": format!("t{v}"),
                                "status": rng.gen_range(0..3), "createdTime": "2026-01-01T00:00:00Z",
                                "tags": ["a", {"deep": [1, 2]}]})),
            2..=5 => obj(json!({"id": id, "version": *v, "status": rng.gen_range(0..3)})),
            6 | 7 => obj(json!({"id": id, "version": *v, "title": format!("t{v}")})),
            8 => obj(json!({"id": id, "version": *v, "inTrash": true})),
            _ => obj(json!({"id": id, "deleted": true, "version": *v})),
        }
    }

    /// Delivers a group's ops to the store at once, as an acknowledgement would, and tells the
    /// view.
    fn deliver(store: &mut MemoryStore, view: &mut View, g: &Group) {
        store.apply(&g.ops).unwrap();
        let committed = g.ops.iter().filter_map(|op| match op {
            CheckpointOp::Upsert { key, version, .. } => Some((key.clone(), Some(*version))),
            CheckpointOp::Remove { key } => Some((key.clone(), None)),
            _ => None,
        });
        view.delivered(committed.collect::<Vec<_>>());
    }

    use crate::state::CheckpointOp;

    /// The outcome without the records' span ids, which are random.
    fn unspanned(o: &Outcome) -> Outcome {
        let mut o = o.clone();
        if let Outcome::Changed(g) = &mut o {
            for r in &mut g.records {
                r.trace.traceparent.clear();
            }
        }
        o
    }

    /// The store-backed view with no cache at all (every delivered state read back for every
    /// change) gives exactly the records of the all-in-memory view, whether the change comes
    /// before or after the previous one's delivery.
    #[test]
    fn a_view_read_back_from_the_store_gives_the_same_records() {
        for seed in 0..40u64 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut versions = HashMap::new();
            let mut memory = View::default();
            let mut store = MemoryStore::default();
            let mut stored = View::new(store.reader(), 0);
            let mut late: Vec<Group> = Vec::new();
            for step in 0..300 {
                let entry = change(&mut rng, &mut versions);
                let key = EntityKind::Node.key(entry["id"].as_str().unwrap());
                stored.prefetch([key.as_str()]).unwrap();
                let a = apply_entity(
                    &mut memory,
                    &ctx(),
                    EntityKind::Node,
                    &entry,
                    Origin::Diff,
                    &trace(),
                );
                let b = apply_entity(
                    &mut stored,
                    &ctx(),
                    EntityKind::Node,
                    &entry,
                    Origin::Diff,
                    &trace(),
                );
                assert_eq!(
                    unspanned(&a),
                    unspanned(&b),
                    "seed {seed} step {step}: {entry:?}"
                );
                if let Outcome::Changed(g) = b {
                    late.push(g);
                }
                // Deliveries lag a random number of groups behind.
                while late.len() > rng.gen_range(0..4) {
                    let g = late.remove(0);
                    deliver(&mut store, &mut stored, &g);
                }
            }
        }
    }

    #[test]
    fn disappearances_are_found_in_the_store_too() {
        let mut store = MemoryStore::default();
        let mut view = View::new(store.reader(), 0);
        for id in ["a", "b", "c"] {
            let e = obj(json!({"id": id, "version": 1, "title": id, "status": 0,
                               "createdTime": "2026-01-01T00:00:00Z"}));
            view.prefetch([EntityKind::Node.key(id).as_str()]).unwrap();
            let Outcome::Changed(g) = apply_entity(
                &mut view,
                &ctx(),
                EntityKind::Node,
                &e,
                Origin::Snapshot,
                &trace(),
            ) else {
                panic!("created");
            };
            deliver(&mut store, &mut view, &g);
        }
        view.prefetch([]).unwrap();
        assert_eq!(view.len(), 0, "nothing stays in a cache of 0 bytes");
        let seen: SeenKeys = ["node:a"].into_iter().collect();
        view.prefetch_unseen(&seen, None).unwrap();
        let d = missing_after_snapshot(&mut view, &ctx(), &seen, None, false, &trace());
        let ids: Vec<&str> = d.groups.iter().map(|g| g.records[0].id.as_str()).collect();
        assert_eq!(ids, ["node:b:2", "node:c:2"]);
        assert_eq!(d.unresolved, ["node:b", "node:c"]);
    }

    fn sized_state(i: u64) -> Arc<Map<String, Value>> {
        Arc::new(obj(json!({"id": i.to_string(), "title": "x".repeat(100)})))
    }

    /// A view over a store holding `node:0` .. `node:{stored - 1}` (version 1, each about
    /// `one` bytes), with a budget of `budget` of them; and `one`.
    fn view_over_stored(stored: u64, budget: usize) -> (View, usize) {
        let mut store = MemoryStore::default();
        let ops: Vec<CheckpointOp> = (0..stored)
            .map(|i| CheckpointOp::Upsert {
                key: format!("node:{i}"),
                version: 1,
                state: sized_state(i),
            })
            .collect();
        store.apply(&ops).unwrap();
        let one = approx_bytes("node:10", &sized_state(10));
        (View::new(store.reader(), budget * one), one)
    }

    #[test]
    fn the_cache_keeps_its_budget_and_the_latest_used() {
        let (mut view, _) = view_over_stored(100, 10);
        let keys: Vec<String> = (0..100).map(|i| format!("node:{i}")).collect();
        for k in &keys {
            view.prefetch([k.as_str()]).unwrap();
            assert!(view.get(k).is_some());
        }
        view.prefetch(["node:99"]).unwrap();
        assert!(view.len() <= 10, "{view:?}");
        assert!(view.get("node:99").is_some() && view.get("node:98").is_some());
        assert!(
            view.get("node:0").is_none(),
            "the least recently used went first"
        );
    }

    #[test]
    fn states_in_flight_count_against_the_budget_but_leave_a_quarter_of_it() {
        let (mut view, one) = view_over_stored(8, 8);
        for i in 0..8 {
            view.prefetch([format!("node:{i}").as_str()]).unwrap();
        }
        assert_eq!(view.len(), 8, "{view:?}");
        let dirty = |view: &mut View, range: std::ops::Range<u64>| {
            for i in range {
                let known = Known {
                    version: 2,
                    state: sized_state(i),
                };
                view.entities.insert(format!("node:{i}"), known);
            }
        };
        dirty(&mut view, 10..14);
        view.prefetch([]).unwrap();
        assert_eq!(view.len(), 4 + 4, "half the budget in flight: {view:?}");
        dirty(&mut view, 14..30);
        view.prefetch([]).unwrap();
        assert_eq!(view.len(), 20 + 2, "in flight past the budget: {view:?}");
        assert!(view.get("node:7").is_some() && view.get("node:6").is_some());
        view.delivered((10..30).map(|i| (format!("node:{i}"), Some(2))));
        view.prefetch([]).unwrap();
        assert_eq!(
            view.len(),
            8,
            "delivered, they are cached within it: {view:?}"
        );
        assert!(view.get("node:29").is_some());
        view.prefetch_page([], 5 * one).unwrap();
        assert_eq!(view.len(), 3, "room made for a page's states: {view:?}");
        view.prefetch_page(["node:0"], 100 * one).unwrap();
        assert_eq!(
            view.len(),
            2 + 1,
            "a quarter stays, and what the page needs: {view:?}"
        );
        assert!(view.get("node:0").is_some());
    }

    #[test]
    fn seen_keys_tell_keys_apart() {
        let seen: SeenKeys = (0..100_000).map(|i| format!("node:{i}")).collect();
        assert_eq!(seen.len(), 100_000);
        assert!(seen.contains("node:99999"));
        assert!(!(100_000..200_000).any(|i| seen.contains(&format!("node:{i}"))));
        // Added twice, and some not folded in yet: found all the same, counted once sealed.
        let mut again = SeenKeys::default();
        for i in (0..30_000).chain(20_000..40_000) {
            again.insert(&format!("link:{i}"));
        }
        assert!((0..40_000).all(|i| again.contains(&format!("link:{i}"))));
        assert!(!again.contains("link:40000"));
        again.seal();
        assert_eq!(again.len(), 40_000);
        let mut both = seen.clone();
        both.merge(&again);
        assert_eq!(both.len(), 140_000);
        assert!(both.contains("node:5") && both.contains("link:39999"));
    }
}
