//! The simulator's ground truth: every user's graph, the rules that change it (versions,
//! blocking cascades, trash and purge), the history batches those changes write, and the
//! read queries (`graph:get`, `branch:get`, `history:page`, `trash:page`) answered from it, as
//! documented or, with a [`ReadShape`], as a deployment that differs would answer them.
//!
//! Everything here is synchronous and deterministic for a given seed and call sequence;
//! wall-clock time appears only in timestamps.

use std::collections::{BTreeSet, HashMap, HashSet};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::model::{id_array, op, pascal_object, status, Link, Node, User};

mod mutations;
mod reads;

/// An error answered in an ack as `{ok:false, error, message, trace_id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The namespaced error code, e.g. `bad_request.out_of_range`.
    pub code: &'static str,
    /// The human message.
    pub message: &'static str,
}

impl ApiError {
    const fn new(code: &'static str, message: &'static str) -> Self {
        Self { code, message }
    }
}

const OUT_OF_RANGE: ApiError =
    ApiError::new("bad_request.out_of_range", "limit/offset out of range");
const INVALID_SCOPE: ApiError = ApiError::new("bad_request.invalid_scope", "Scope not accessible");

/// One op of a history batch, in the shape `history:page` returns.
#[derive(Debug, Clone)]
pub struct HistoryOp {
    pub id: u64,
    pub kind: u8,
    pub entity_id: Uuid,
    pub forward: Value,
    pub inverse: Value,
    pub guard_version: u64,
    pub created_time: String,
}

/// One history batch: every op a single mutation wrote.
#[derive(Debug, Clone)]
pub struct Batch {
    pub id: Uuid,
    /// Index of the acting user.
    pub actor: usize,
    /// Index of the graph owner whose sockets receive the diff.
    pub owner: usize,
    pub ts: String,
    pub ops: Vec<HistoryOp>,
    /// Branch roots the batch touched, before and after: its GRAPH history scopes.
    pub roots: BTreeSet<Uuid>,
    /// The mutation's name, e.g. `node:update`; for the truth only.
    pub mutation: &'static str,
}

/// A status change of a node, caused by a client update or by a blocking cascade.
#[derive(Debug, Clone)]
pub struct Transition {
    pub node_id: Uuid,
    pub from: u8,
    pub to: u8,
    /// The node version that carries the new status.
    pub version: u64,
    pub batch_id: Uuid,
    pub op_id: u64,
    pub ts: String,
    /// `update` or `cascade`.
    pub cause: &'static str,
}

/// What one applied mutation produced: the owner to notify and the `graph:diff` payload.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Index of the graph owner.
    pub owner: usize,
    /// The flat `{nodes, links}` diff (DECISIONS #1, #2).
    pub diff: Value,
}

/// How an entity shows up in a batch's diff.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum EntryKind {
    Partial,
    Full,
    Trash,
    Delete,
}

#[derive(Debug)]
struct Entry {
    id: Uuid,
    kind: EntryKind,
    fields: BTreeSet<&'static str>,
    /// shareRoots captured before a trash or purge, when the entity is no longer in a branch.
    pre_roots: Vec<Uuid>,
    /// Version at the moment of a purge (the entity is gone afterwards).
    deleted_version: u64,
}

/// A mutation in progress: it collects ops and diff entries, then becomes one batch.
struct Tx {
    batch_id: Uuid,
    actor: usize,
    owner: usize,
    ts: String,
    mutation: &'static str,
    ops: Vec<HistoryOp>,
    nodes: Vec<Entry>,
    links: Vec<Entry>,
    transitions: Vec<Transition>,
}

impl Tx {
    fn entry(list: &mut Vec<Entry>, id: Uuid, kind: EntryKind) -> &mut Entry {
        let pos = match list.iter().position(|e| e.id == id) {
            Some(pos) => pos,
            None => {
                list.push(Entry {
                    id,
                    kind: EntryKind::Partial,
                    fields: BTreeSet::new(),
                    pre_roots: Vec::new(),
                    deleted_version: 0,
                });
                list.len() - 1
            }
        };
        let entry = &mut list[pos];
        if kind > entry.kind {
            entry.kind = kind;
        }
        entry
    }
}

/// A set with O(1) insert, remove and uniform random pick, iterated in insertion-dependent but
/// seed-deterministic order (unlike a `HashSet`).
#[derive(Debug, Default, Clone)]
pub struct PickSet {
    items: Vec<Uuid>,
    pos: HashMap<Uuid, usize>,
}

impl PickSet {
    fn insert(&mut self, id: Uuid) {
        if !self.pos.contains_key(&id) {
            self.pos.insert(id, self.items.len());
            self.items.push(id);
        }
    }
    fn remove(&mut self, id: &Uuid) {
        if let Some(i) = self.pos.remove(id) {
            let last = self.items.len() - 1;
            self.items.swap(i, last);
            self.items.pop();
            if i < self.items.len() {
                self.pos.insert(self.items[i], i);
            }
        }
    }
    /// A uniformly chosen member, if any.
    pub fn pick(&self, rng: &mut impl Rng) -> Option<Uuid> {
        if self.items.is_empty() {
            None
        } else {
            Some(self.items[rng.gen_range(0..self.items.len())])
        }
    }
    /// Number of members.
    pub fn len(&self) -> usize {
        self.items.len()
    }
    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Per-owner indexes the generator picks from.
#[derive(Debug, Default, Clone)]
pub struct OwnerSets {
    pub active_nodes: PickSet,
    pub trashed_nodes: PickSet,
    pub active_links: PickSet,
    pub trashed_links: PickSet,
}

/// Counters of what the world has done, for `/truth`.
#[derive(Debug, Default, Clone)]
pub struct WorldStats {
    pub mutations: u64,
    pub ops: u64,
}

/// How the read queries shape their answers where a real deployment may differ from the
/// documented service (`taskstream sim --history-retention`, `--history-oldest-first`,
/// `--page-cap`). The default is the documented behaviour.
#[derive(Debug, Default, Clone)]
pub struct ReadShape {
    /// `history:page` serves only the newest N batches of a scope (0 = all), as a plan's
    /// history retention would: older ones are gone.
    pub history_retention: usize,
    /// `history:page` lists the oldest batch first (the DECISIONS #4 alternative).
    pub history_oldest_first: bool,
    /// `graph:get` and `branch:get` return at most N objects per page whatever `limit`
    /// asks (0 = no cap).
    pub page_cap: usize,
}

/// The whole simulated service state.
#[derive(Clone)]
pub struct World {
    pub users: Vec<User>,
    nodes: HashMap<Uuid, Node>,
    links: HashMap<Uuid, Link>,
    /// Every node and link by (`createdTime`, id): the order `graph:get` pages in, kept as
    /// they are added and purged so a page does not sort the whole graph (a 1,000,000-object
    /// snapshot spent most of its time sorting, once per page).
    node_order: BTreeSet<(String, Uuid)>,
    link_order: BTreeSet<(String, Uuid)>,
    /// Link ids by source node (the node's parents).
    out_links: HashMap<Uuid, BTreeSet<Uuid>>,
    /// Link ids by target node (the node's children).
    in_links: HashMap<Uuid, BTreeSet<Uuid>>,
    /// Unordered node pairs joined by a link, trashed or not.
    pairs: HashSet<(Uuid, Uuid)>,
    pub sets: Vec<OwnerSets>,
    deleted_nodes: Vec<(Uuid, u64, usize)>,
    deleted_links: Vec<(Uuid, u64, usize)>,
    /// Shared, so that a `history:page` answer takes them out of the world's lock.
    batches: Vec<std::sync::Arc<Batch>>,
    transitions: Vec<Transition>,
    next_op_id: u64,
    next_seq: u64,
    /// The one random source; everything seeded flows from it.
    pub rng: ChaCha8Rng,
    pub stats: WorldStats,
    /// Deviations of the read answers from the documented service.
    pub read_shape: ReadShape,
    /// The last `graph:get` listing, reused while the world is unchanged: a snapshot's pages
    /// then cost their own length instead of a walk over the whole graph each (a real server
    /// pages from an index; 1,000,000 objects took 0.7 s a page here).
    listing: Option<std::sync::Arc<Listing>>,
}

/// The ids `graph:get` pages over for one user, and the state of the world they were taken in.
#[derive(Debug)]
pub(crate) struct Listing {
    key: ListingKey,
    nodes: Vec<Uuid>,
    links: Vec<Uuid>,
}

/// What a listing depends on: every change that can add, remove, trash or restore an object
/// stamps an op or changes a count.
type ListingKey = (usize, u64, u64, usize, usize);

/// Now as an RFC 3339 UTC time to the second, as the API writes times.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// What nodes and links share for history: a version, an edit stamp, and named fields.
trait Versioned {
    fn stamp(&mut self, ts: &str, batch: Uuid) -> u64;
    fn version(&self) -> u64;
    fn field(&self, name: &str) -> Value;
}

// Nodes and links keep their version and edit stamp in fields of the same names.
macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn stamp(&mut self, ts: &str, batch: Uuid) -> u64 {
                let guard = self.version;
                self.version += 1;
                self.last_edited_time = ts.to_string();
                self.last_batch = batch;
                guard
            }
            fn version(&self) -> u64 {
                self.version
            }
            fn field(&self, name: &str) -> Value {
                <$t>::field(self, name)
            }
        }
    )*};
}
versioned!(Node, Link);

/// Bumps an entity's version for one op of `tx` and builds the op's forward and inverse
/// patches (the changed fields plus the version) and its guard (the version before).
fn bump(
    e: &mut impl Versioned,
    tx: &Tx,
    fields: &[(&'static str, Value)],
) -> (Map<String, Value>, Map<String, Value>, u64) {
    let guard = e.stamp(&tx.ts, tx.batch_id);
    let mut forward = Map::new();
    let mut inverse = Map::new();
    for (name, old) in fields {
        forward.insert((*name).to_string(), e.field(name));
        inverse.insert((*name).to_string(), old.clone());
    }
    forward.insert("version".into(), json!(e.version()));
    inverse.insert("version".into(), json!(guard));
    (forward, inverse, guard)
}

fn pair(a: Uuid, b: Uuid) -> (Uuid, Uuid) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

/// Fields a new node is created with; the rest take defaults.
#[derive(Debug, Clone)]
pub struct NewNode {
    pub title: String,
    pub description: String,
    pub status: u8,
    pub due_date: Option<String>,
    pub tags: Vec<String>,
    pub priority: u8,
    pub independent: bool,
    pub volume: u8,
    pub assignee: Vec<String>,
}

/// A partial node update, as `node:update` takes it; `None` keeps the field.
#[derive(Debug, Clone, Default)]
pub struct NodePatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub tags: Option<Vec<String>>,
    pub priority: Option<u8>,
    pub assignee: Option<Vec<String>>,
    pub status: Option<u8>,
}

impl World {
    /// An empty world for these users, seeded.
    pub fn new(users: Vec<User>, seed: u64) -> Self {
        let sets = vec![OwnerSets::default(); users.len()];
        Self {
            users,
            nodes: HashMap::new(),
            links: HashMap::new(),
            node_order: BTreeSet::new(),
            link_order: BTreeSet::new(),
            out_links: HashMap::new(),
            in_links: HashMap::new(),
            pairs: HashSet::new(),
            sets,
            deleted_nodes: Vec::new(),
            deleted_links: Vec::new(),
            batches: Vec::new(),
            transitions: Vec::new(),
            next_op_id: 1,
            next_seq: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            stats: WorldStats::default(),
            read_shape: ReadShape::default(),
            listing: None,
        }
    }

    /// A fresh uuid v4 drawn from the seeded generator.
    pub fn new_uuid(&mut self) -> Uuid {
        let mut bytes = [0u8; 16];
        self.rng.fill_bytes(&mut bytes);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }

    /// The user a bearer token belongs to.
    pub fn user_by_token(&self, token: &str) -> Option<usize> {
        self.users.iter().position(|u| u.token == token)
    }

    /// The user with this uid.
    pub fn user_by_uid(&self, uid: &str) -> Option<usize> {
        self.users.iter().position(|u| u.uid == uid)
    }

    /// A node by id (trashed included, purged excluded).
    pub fn node(&self, id: &Uuid) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// A link by id (trashed included, purged excluded).
    pub fn link(&self, id: &Uuid) -> Option<&Link> {
        self.links.get(id)
    }

    /// Number of history batches written so far.
    pub fn batch_count(&self) -> usize {
        self.batches.len()
    }

    fn node_active(&self, id: &Uuid) -> bool {
        self.nodes.get(id).is_some_and(|n| !n.in_trash)
    }

    fn link_active(&self, l: &Link) -> bool {
        !l.in_trash && self.node_active(&l.source) && self.node_active(&l.target)
    }

    /// Branch roots through which a node is visible: the nodes with no active parent link
    /// reached by walking active links from child to parent. A node without parents is its own root.
    pub fn roots_of(&self, id: Uuid, memo: &mut HashMap<Uuid, Vec<Uuid>>) -> Vec<Uuid> {
        if let Some(r) = memo.get(&id) {
            return r.clone();
        }
        // An explicit stack keeps deep chains from overflowing the thread stack.
        let mut stack = vec![(id, false)];
        while let Some((n, expanded)) = stack.pop() {
            if memo.contains_key(&n) {
                continue;
            }
            let parents: Vec<Uuid> = self
                .out_links
                .get(&n)
                .into_iter()
                .flatten()
                .filter_map(|lid| self.links.get(lid))
                .filter(|l| self.link_active(l))
                .map(|l| l.target)
                .collect();
            if parents.is_empty() {
                memo.insert(n, vec![n]);
            } else if expanded {
                let mut set = BTreeSet::new();
                for p in &parents {
                    if let Some(r) = memo.get(p) {
                        set.extend(r.iter().copied());
                    }
                }
                memo.insert(n, set.into_iter().collect());
            } else {
                stack.push((n, true));
                for p in parents {
                    if !memo.contains_key(&p) {
                        stack.push((p, false));
                    }
                }
            }
        }
        memo.get(&id).cloned().unwrap_or_else(|| vec![id])
    }

    fn link_roots(&self, l: &Link, memo: &mut HashMap<Uuid, Vec<Uuid>>) -> Vec<Uuid> {
        self.roots_of(l.target, memo)
    }

    // ----- transactions -----

    fn begin(&mut self, actor: usize, owner: usize, mutation: &'static str) -> Tx {
        Tx {
            batch_id: self.new_uuid(),
            actor,
            owner,
            ts: now_rfc3339(),
            mutation,
            ops: Vec::new(),
            nodes: Vec::new(),
            links: Vec::new(),
            transitions: Vec::new(),
        }
    }

    fn push_op(
        &mut self,
        tx: &mut Tx,
        kind: u8,
        entity: Uuid,
        forward: Map<String, Value>,
        inverse: Map<String, Value>,
        guard: u64,
    ) -> u64 {
        let id = self.next_op_id;
        self.next_op_id += 1;
        tx.ops.push(HistoryOp {
            id,
            kind,
            entity_id: entity,
            forward: pascal_object(&forward),
            inverse: pascal_object(&inverse),
            guard_version: guard,
            created_time: tx.ts.clone(),
        });
        id
    }

    /// Records an op that changed `fields` of a node (already applied in place), bumping its version.
    fn node_op(
        &mut self,
        tx: &mut Tx,
        id: Uuid,
        kind: u8,
        fields: &[(&'static str, Value)],
    ) -> u64 {
        let Some(node) = self.nodes.get_mut(&id) else {
            return 0;
        };
        let (forward, inverse, guard) = bump(node, tx, fields);
        Tx::entry(&mut tx.nodes, id, EntryKind::Partial)
            .fields
            .extend(fields.iter().map(|(n, _)| *n));
        self.push_op(tx, kind, id, forward, inverse, guard)
    }

    /// The same for a link.
    fn link_op(
        &mut self,
        tx: &mut Tx,
        id: Uuid,
        kind: u8,
        fields: &[(&'static str, Value)],
    ) -> u64 {
        let Some(link) = self.links.get_mut(&id) else {
            return 0;
        };
        let (forward, inverse, guard) = bump(link, tx, fields);
        Tx::entry(&mut tx.links, id, EntryKind::Partial)
            .fields
            .extend(fields.iter().map(|(n, _)| *n));
        self.push_op(tx, kind, id, forward, inverse, guard)
    }

    fn set_status(&mut self, tx: &mut Tx, id: Uuid, to: u8, cause: &'static str) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        let from = node.status;
        if from == to {
            return;
        }
        node.status = to;
        let op_id = self.node_op(tx, id, op::NODE_STATUS, &[("status", json!(from))]);
        let version = self.nodes.get(&id).map_or(0, |n| n.version);
        tx.transitions.push(Transition {
            node_id: id,
            from,
            to,
            version,
            batch_id: tx.batch_id,
            op_id,
            ts: tx.ts.clone(),
            cause,
        });
    }

    /// Active parents of a node through primary links: the nodes its completion can block.
    fn primary_parents(&self, id: &Uuid) -> Vec<Uuid> {
        self.out_links
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|lid| self.links.get(lid))
            .filter(|l| l.kind == 0 && self.link_active(l))
            .map(|l| l.target)
            .collect()
    }

    /// Re-applies the blocking rules from the given nodes upwards (facts §3, DECISIONS #10):
    /// a node with an unfinished child on an active primary link is Blocked; once it is not,
    /// it goes back to Available. `wasBlocker` follows the same walk.
    fn cascade(&mut self, tx: &mut Tx, start: Vec<Uuid>) {
        let mut work: Vec<Uuid> = start;
        let mut guard = 0usize;
        while let Some(id) = work.pop() {
            guard += 1;
            if guard > 1_000_000 {
                tracing::error!("blocking cascade did not settle; the graph has a cycle");
                break;
            }
            let Some(node) = self.nodes.get(&id) else {
                continue;
            };
            if node.in_trash {
                continue;
            }
            let independent = node.independent;
            let status_now = node.status;
            let child_links: Vec<Uuid> = self
                .in_links
                .get(&id)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            let mut blocked = false;
            for lid in child_links {
                let Some(l) = self.links.get(&lid) else {
                    continue;
                };
                if !self.link_active(l) {
                    continue;
                }
                let source_status = self
                    .nodes
                    .get(&l.source)
                    .map_or(status::COMPLETED, |n| n.status);
                let blocking = l.kind == 0 && source_status != status::COMPLETED && !independent;
                blocked |= blocking;
                let was = l.was_blocker;
                let want = if l.kind != 0 || source_status == status::COMPLETED {
                    false
                } else {
                    was || blocking
                };
                if want != was {
                    if let Some(lm) = self.links.get_mut(&lid) {
                        lm.was_blocker = want;
                    }
                    self.link_op(tx, lid, op::LINK_UPDATE, &[("wasBlocker", json!(was))]);
                }
            }
            let target = if blocked {
                status::BLOCKED
            } else if status_now == status::BLOCKED {
                status::AVAILABLE
            } else {
                status_now
            };
            if target != status_now {
                self.set_status(tx, id, target, "cascade");
                // Parents only care whether this node is Completed.
                if (status_now == status::COMPLETED) != (target == status::COMPLETED) {
                    work.extend(self.primary_parents(&id));
                }
            }
        }
    }

    /// Turns the transaction into a batch and a diff, and records it.
    fn commit(&mut self, tx: Tx) -> Applied {
        let mut memo = HashMap::new();
        let mut roots: BTreeSet<Uuid> = BTreeSet::new();
        let mut nodes_out = Vec::with_capacity(tx.nodes.len());
        for e in &tx.nodes {
            let value = match e.kind {
                EntryKind::Delete => {
                    roots.extend(e.pre_roots.iter().copied());
                    json!({"id": e.id.to_string(), "deleted": true, "shareRoots": id_array(&e.pre_roots)})
                }
                EntryKind::Trash => {
                    roots.extend(e.pre_roots.iter().copied());
                    let n = &self.nodes[&e.id];
                    json!({"id": e.id.to_string(), "inTrash": true, "version": n.version,
                           "lastEditedTime": n.last_edited_time, "shareRoots": id_array(&e.pre_roots)})
                }
                EntryKind::Full => {
                    let r = self.roots_of(e.id, &mut memo);
                    roots.extend(r.iter().copied());
                    let n = &self.nodes[&e.id];
                    n.api_json(&self.users[n.owner], &r)
                }
                EntryKind::Partial => {
                    let r = self.roots_of(e.id, &mut memo);
                    roots.extend(r.iter().copied());
                    let n = &self.nodes[&e.id];
                    let mut m = Map::new();
                    m.insert("id".into(), json!(e.id.to_string()));
                    for f in &e.fields {
                        m.insert((*f).to_string(), n.field(f));
                    }
                    // Only changed fields plus id and version (DECISIONS #2).
                    m.insert("version".into(), json!(n.version));
                    Value::Object(m)
                }
            };
            nodes_out.push(value);
        }
        let mut links_out = Vec::with_capacity(tx.links.len());
        for e in &tx.links {
            let value = match e.kind {
                EntryKind::Delete => {
                    roots.extend(e.pre_roots.iter().copied());
                    json!({"id": e.id.to_string(), "deleted": true, "shareRoots": id_array(&e.pre_roots)})
                }
                EntryKind::Trash => {
                    roots.extend(e.pre_roots.iter().copied());
                    let l = &self.links[&e.id];
                    json!({"id": e.id.to_string(), "inTrash": true, "version": l.version,
                           "lastEditedTime": l.last_edited_time, "shareRoots": id_array(&e.pre_roots)})
                }
                EntryKind::Full => {
                    let l = &self.links[&e.id];
                    let r = self.link_roots(l, &mut memo);
                    roots.extend(r.iter().copied());
                    l.full_json(&r)
                }
                EntryKind::Partial => {
                    let l = &self.links[&e.id];
                    let r = self.link_roots(l, &mut memo);
                    roots.extend(r.iter().copied());
                    let mut m = Map::new();
                    m.insert("id".into(), json!(e.id.to_string()));
                    for f in &e.fields {
                        m.insert((*f).to_string(), l.field(f));
                    }
                    m.insert("version".into(), json!(l.version));
                    Value::Object(m)
                }
            };
            links_out.push(value);
        }
        self.stats.mutations += 1;
        self.stats.ops += tx.ops.len() as u64;
        self.transitions.extend(tx.transitions);
        self.batches.push(std::sync::Arc::new(Batch {
            id: tx.batch_id,
            actor: tx.actor,
            owner: tx.owner,
            ts: tx.ts,
            ops: tx.ops,
            roots,
            mutation: tx.mutation,
        }));
        Applied {
            owner: tx.owner,
            diff: json!({"nodes": nodes_out, "links": links_out}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(i: usize) -> User {
        User {
            uid: format!("00000000-0000-4000-8000-00000000000{i}"),
            token: format!("tok{i}"),
            username: format!("user{i}"),
            email: format!("user{i}@example.test"),
        }
    }

    fn new_node(status: u8) -> NewNode {
        NewNode {
            title: "t".into(),
            description: String::new(),
            status,
            due_date: None,
            tags: vec![],
            priority: 1,
            independent: false,
            volume: 1,
            assignee: vec![],
        }
    }

    fn first_id(a: &Applied) -> Uuid {
        Uuid::parse_str(a.diff["nodes"][0]["id"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn child_blocks_parent_and_completion_unblocks() {
        let mut w = World::new(vec![user(1)], 1);
        let parent = first_id(&w.add_node(0, new_node(1), None));
        let child_add = w.add_node(0, new_node(0), Some((parent, 0)));
        let child = first_id(&child_add);
        assert_eq!(w.node(&parent).unwrap().status, status::BLOCKED);
        // version 1 at creation, +1 for the cascade status op
        assert_eq!(w.node(&parent).unwrap().version, 2);
        let link = w.links.values().next().unwrap();
        assert!(link.was_blocker);
        w.update_node(
            child,
            NodePatch {
                status: Some(status::COMPLETED),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(w.node(&parent).unwrap().status, status::AVAILABLE);
        let t: Vec<_> = w
            .transitions
            .iter()
            .map(|t| (t.from, t.to, t.cause))
            .collect();
        assert_eq!(
            t,
            vec![(1, 2, "cascade"), (0, 3, "update"), (2, 0, "cascade")]
        );
    }

    #[test]
    fn title_and_status_bump_twice() {
        let mut w = World::new(vec![user(1)], 1);
        let id = first_id(&w.add_node(0, new_node(0), None));
        let a = w
            .update_node(
                id,
                NodePatch {
                    title: Some("new".into()),
                    status: Some(1),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(w.node(&id).unwrap().version, 3);
        let entry = &a.diff["nodes"][0];
        assert_eq!(entry["title"], "new");
        assert_eq!(entry["status"], 1);
        assert_eq!(entry["version"], 3);
        assert!(
            entry.get("description").is_none(),
            "only changed fields: {entry}"
        );
    }

    #[test]
    fn trash_restore_delete_cycle() {
        let mut w = World::new(vec![user(1)], 7);
        let parent = first_id(&w.add_node(0, new_node(0), None));
        let child = first_id(&w.add_node(0, new_node(0), Some((parent, 0))));
        assert_eq!(w.node(&parent).unwrap().status, status::BLOCKED);
        let trash = w.trash_node(child).unwrap();
        assert_eq!(trash.diff["nodes"][0]["inTrash"], true);
        assert_eq!(w.node(&parent).unwrap().status, status::AVAILABLE);
        w.restore_node(child).unwrap();
        assert_eq!(w.node(&parent).unwrap().status, status::BLOCKED);
        w.trash_node(child).unwrap();
        let del = w.delete_node(child).unwrap();
        let entry = del.diff["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == child.to_string())
            .unwrap();
        assert_eq!(entry["deleted"], true);
        assert!(w.node(&child).is_none());
        assert_eq!(w.links.len(), 0);
    }

    #[test]
    fn graph_pages_cover_everything_once() {
        let mut w = World::new(vec![user(1), user(2)], 3);
        let mut last = None;
        for i in 0..30 {
            let a = w.add_node(
                i % 2,
                new_node(0),
                last.filter(|_| i % 2 == 0).map(|p| (p, 0)),
            );
            if i % 2 == 0 {
                last = Some(first_id(&a));
            }
        }
        let mut seen = 0;
        let mut offset = 0;
        loop {
            let page = w.graph_page(0, 7, offset).unwrap();
            seen +=
                page["nodes"].as_array().unwrap().len() + page["links"].as_array().unwrap().len();
            if !page["hasMore"].as_bool().unwrap() {
                break;
            }
            offset += 7;
        }
        assert_eq!(seen, 15 + 14);
        assert_eq!(w.graph_page(0, 0, 0).unwrap_err(), OUT_OF_RANGE);
        assert_eq!(w.graph_page(0, 5001, 0).unwrap_err(), OUT_OF_RANGE);
    }

    #[test]
    fn cached_graph_listings_page_as_fresh_ones_while_the_world_changes() {
        let mut w = World::new(vec![user(1), user(2)], 5);
        let mut ids = Vec::new();
        let mut last = None;
        for i in 0..40 {
            let a = w.add_node(i % 2, new_node(0), last.map(|p| (p, 0)));
            last = Some(first_id(&a));
            ids.push(first_id(&a));
        }
        for user in [0, 1] {
            for (step, offset) in (0..50).step_by(6).enumerate() {
                // Changes between pages: a trash, a restore, an update, a new node.
                match step % 4 {
                    0 => drop(w.trash_node(ids[step * 3 % ids.len()])),
                    1 => drop(w.restore_node(ids[(step - 1) * 3 % ids.len()])),
                    2 => drop(w.add_node(user, new_node(0), None)),
                    _ => {}
                }
                let mut fresh = w.clone();
                fresh.listing = None;
                let cached = w.graph_page(user, 6, offset).unwrap();
                assert_eq!(cached, fresh.graph_page(user, 6, offset).unwrap());
                // Asked again with nothing changed: served from the listing.
                assert_eq!(cached, w.graph_page(user, 6, offset).unwrap());
            }
        }
    }

    #[test]
    fn history_scopes() {
        let mut w = World::new(vec![user(1)], 3);
        let root = first_id(&w.add_node(0, new_node(0), None));
        w.add_node(0, new_node(0), Some((root, 0)));
        let page = w
            .history_page(0, "GRAPH", &root.to_string(), 100, 0)
            .unwrap();
        assert_eq!(page["batches"].as_array().unwrap().len(), 2);
        let ops = &page["batches"][0]["ops"];
        assert_eq!(ops[0]["type"], op::NODE_ADD);
        let uid = w.users[0].uid.clone();
        assert_eq!(
            w.history_page(0, "USER", &uid, 1, 0).unwrap()["hasMore"],
            true
        );
        assert_eq!(
            w.history_page(0, "USER", "someone", 1, 0).unwrap_err(),
            INVALID_SCOPE
        );
        assert_eq!(
            w.history_page(0, "PAGE", &uid, 1, 0).unwrap_err(),
            INVALID_SCOPE
        );
    }

    fn batch_ids(page: &Value) -> Vec<String> {
        page["batches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["batchId"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn history_retention_and_order() {
        let mut w = World::new(vec![user(1)], 3);
        for _ in 0..6 {
            w.add_node(0, new_node(0), None);
        }
        let uid = w.users[0].uid.clone();
        let newest_first = batch_ids(&w.history_page(0, "USER", &uid, 100, 0).unwrap());
        assert_eq!(newest_first.len(), 6);

        w.read_shape.history_retention = 4;
        let page = w.history_page(0, "USER", &uid, 3, 0).unwrap();
        assert_eq!(batch_ids(&page), newest_first[..3]);
        assert_eq!(page["hasMore"], true);
        let page = w.history_page(0, "USER", &uid, 3, 3).unwrap();
        assert_eq!(batch_ids(&page), newest_first[3..4]);
        assert_eq!(page["hasMore"], false);

        // Oldest first over the retained batches: the two oldest are gone.
        w.read_shape.history_oldest_first = true;
        let page = w.history_page(0, "USER", &uid, 100, 0).unwrap();
        let mut expected = newest_first[..4].to_vec();
        expected.reverse();
        assert_eq!(batch_ids(&page), expected);
    }

    #[test]
    fn page_cap_shortens_pages_and_keeps_has_more() {
        let mut w = World::new(vec![user(1)], 3);
        for _ in 0..10 {
            w.add_node(0, new_node(0), None);
        }
        w.read_shape.page_cap = 4;
        let mut sizes = Vec::new();
        let mut offset = 0;
        loop {
            let page = w.graph_page(0, 100, offset).unwrap();
            let n = page["nodes"].as_array().unwrap().len();
            sizes.push(n);
            offset += n as i64;
            if !page["hasMore"].as_bool().unwrap() {
                break;
            }
        }
        assert_eq!(sizes, [4, 4, 2]);
        // The range check still applies to the asked limit.
        assert_eq!(w.graph_page(0, 5001, 0).unwrap_err(), OUT_OF_RANGE);
    }
}
