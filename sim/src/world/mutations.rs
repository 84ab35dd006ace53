//! The mutations of the world: adding, updating, trashing, restoring and purging nodes and
//! links, each one transaction that bumps versions, writes a history batch and yields a diff.

use std::collections::HashMap;

use rand::Rng;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::*;
use crate::model::{op, status, Link, Node};

impl World {
    /// `node:add`: a new node, optionally under `parent` with a link of `link_kind`.
    pub fn add_node(&mut self, owner: usize, new: NewNode, parent: Option<(Uuid, u8)>) -> Applied {
        let mut tx = self.begin(owner, owner, "node:add");
        let id = self.new_uuid();
        let (x, y, z) = (
            self.rng.gen_range(-500.0..500.0_f64).round(),
            self.rng.gen_range(-500.0..500.0_f64).round(),
            0.0,
        );
        let seq = self.next_seq;
        self.next_seq += 1;
        let node = Node {
            id,
            owner,
            seq,
            title: new.title,
            description: new.description,
            status: new.status,
            due_date: new.due_date,
            kind: 0,
            tags: new.tags,
            priority: new.priority,
            independent: new.independent,
            volume: new.volume,
            version: 1,
            assignee: new.assignee,
            created_time: tx.ts.clone(),
            last_edited_time: tx.ts.clone(),
            public_token: None,
            public_due: None,
            public_branch: false,
            x,
            y,
            z,
            pinned: false,
            collapsed: false,
            in_trash: false,
            last_batch: tx.batch_id,
        };
        let mut forward = Map::new();
        if let Value::Object(m) = node.api_json(&self.users[owner], &[]) {
            forward = m;
            forward.remove("shareRoots");
            forward.remove("access");
        }
        self.node_order.insert((node.created_time.clone(), id));
        self.nodes.insert(id, node);
        self.sets[owner].active_nodes.insert(id);
        // A new entity has version 1 (DECISIONS #11); its guard is the version before it existed.
        self.push_op(&mut tx, op::NODE_ADD, id, forward, Map::new(), 0);
        Tx::entry(&mut tx.nodes, id, EntryKind::Full);
        if let Some((target, kind)) = parent {
            if self.node_active(&target) && target != id {
                self.insert_link(&mut tx, owner, id, target, kind);
                self.cascade(&mut tx, vec![target]);
            }
        }
        self.commit(tx)
    }

    fn insert_link(
        &mut self,
        tx: &mut Tx,
        owner: usize,
        source: Uuid,
        target: Uuid,
        kind: u8,
    ) -> Uuid {
        let id = self.new_uuid();
        let link = Link {
            id,
            owner,
            source,
            target,
            kind,
            private: false,
            was_blocker: false,
            in_trash: false,
            version: 1,
            created_time: tx.ts.clone(),
            last_edited_time: tx.ts.clone(),
            last_batch: tx.batch_id,
        };
        let mut forward = Map::new();
        if let Value::Object(m) = link.full_json(&[]) {
            forward = m;
            forward.remove("shareRoots");
        }
        self.link_order.insert((link.created_time.clone(), id));
        self.links.insert(id, link);
        self.out_links.entry(source).or_default().insert(id);
        self.in_links.entry(target).or_default().insert(id);
        self.pairs.insert(pair(source, target));
        self.sets[owner].active_links.insert(id);
        self.push_op(tx, op::LINK_ADD, id, forward, Map::new(), 0);
        Tx::entry(&mut tx.links, id, EntryKind::Full);
        id
    }

    /// Whether a new link between these two nodes is allowed: both active, same owner, distinct,
    /// not already joined. Returns them ordered (newer child, older parent) so the graph stays acyclic.
    pub fn link_candidate(&self, a: Uuid, b: Uuid) -> Option<(Uuid, Uuid)> {
        let (na, nb) = (self.nodes.get(&a)?, self.nodes.get(&b)?);
        if a == b
            || na.in_trash
            || nb.in_trash
            || na.owner != nb.owner
            || self.pairs.contains(&pair(a, b))
        {
            return None;
        }
        if na.seq > nb.seq {
            Some((a, b))
        } else {
            Some((b, a))
        }
    }

    /// `link:add` between an existing child (`source`) and parent (`target`).
    pub fn add_link(&mut self, source: Uuid, target: Uuid, kind: u8) -> Option<Applied> {
        let (s, t) = self.link_candidate(source, target)?;
        let owner = self.nodes[&s].owner;
        let mut tx = self.begin(owner, owner, "link:add");
        self.insert_link(&mut tx, owner, s, t, kind);
        self.cascade(&mut tx, vec![t]);
        Some(self.commit(tx))
    }

    /// `node:update` with a partial patch; a status change is its own op (facts §3).
    pub fn update_node(&mut self, id: Uuid, patch: NodePatch) -> Option<Applied> {
        let node = self.nodes.get(&id)?;
        if node.in_trash {
            return None;
        }
        let owner = node.owner;
        let mut tx = self.begin(owner, owner, "node:update");
        let mut changed: Vec<(&'static str, Value)> = Vec::new();
        {
            let n = self.nodes.get_mut(&id)?;
            if let Some(v) = patch.title {
                if v != n.title {
                    changed.push(("title", json!(std::mem::replace(&mut n.title, v))));
                }
            }
            if let Some(v) = patch.description {
                if v != n.description {
                    changed.push((
                        "description",
                        json!(std::mem::replace(&mut n.description, v)),
                    ));
                }
            }
            if let Some(v) = patch.tags {
                if v != n.tags {
                    changed.push(("tags", json!(std::mem::replace(&mut n.tags, v))));
                }
            }
            if let Some(v) = patch.priority {
                if v != n.priority {
                    changed.push(("priority", json!(std::mem::replace(&mut n.priority, v))));
                }
            }
            if let Some(v) = patch.assignee {
                if v != n.assignee {
                    changed.push(("assignee", json!(std::mem::replace(&mut n.assignee, v))));
                }
            }
        }
        if !changed.is_empty() {
            self.node_op(&mut tx, id, op::NODE_UPDATE, &changed);
        }
        let mut status_changed = false;
        if let Some(to) = patch.status {
            let from = self.nodes[&id].status;
            // Blocked can be neither set nor left by a client (`status_blocked`, `node_blocked`).
            if to != status::BLOCKED && from != status::BLOCKED && to != from {
                self.set_status(&mut tx, id, to, "update");
                status_changed = (from == status::COMPLETED) != (to == status::COMPLETED);
            }
        }
        if tx.ops.is_empty() {
            return None;
        }
        if status_changed {
            let parents = self.primary_parents(&id);
            self.cascade(&mut tx, parents);
        }
        Some(self.commit(tx))
    }

    fn trash_link_in(&mut self, tx: &mut Tx, lid: Uuid, memo: &mut HashMap<Uuid, Vec<Uuid>>) {
        let Some(l) = self.links.get(&lid) else {
            return;
        };
        if l.in_trash {
            return;
        }
        let pre = self.link_roots(l, memo);
        let owner = l.owner;
        if let Some(lm) = self.links.get_mut(&lid) {
            lm.in_trash = true;
        }
        self.sets[owner].active_links.remove(&lid);
        self.sets[owner].trashed_links.insert(lid);
        self.link_op(tx, lid, op::LINK_TRASH, &[("inTrash", json!(false))]);
        let e = Tx::entry(&mut tx.links, lid, EntryKind::Trash);
        e.pre_roots = pre;
    }

    /// `node:trash`: the node and every active link touching it go to trash.
    pub fn trash_node(&mut self, id: Uuid) -> Option<Applied> {
        let node = self.nodes.get(&id)?;
        if node.in_trash {
            return None;
        }
        let owner = node.owner;
        let mut tx = self.begin(owner, owner, "node:trash");
        let mut memo = HashMap::new();
        let pre = self.roots_of(id, &mut memo);
        let parents: Vec<Uuid> = self.primary_parents(&id);
        let touching: Vec<Uuid> = self
            .out_links
            .get(&id)
            .into_iter()
            .flatten()
            .chain(self.in_links.get(&id).into_iter().flatten())
            .copied()
            .collect();
        for lid in touching {
            self.trash_link_in(&mut tx, lid, &mut memo);
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.in_trash = true;
        }
        self.sets[owner].active_nodes.remove(&id);
        self.sets[owner].trashed_nodes.insert(id);
        self.node_op(&mut tx, id, op::NODE_TRASH, &[("inTrash", json!(false))]);
        Tx::entry(&mut tx.nodes, id, EntryKind::Trash).pre_roots = pre;
        self.cascade(&mut tx, parents);
        Some(self.commit(tx))
    }

    /// `node:restore`: the node and the links trashed with it (same batch) whose other end is active.
    pub fn restore_node(&mut self, id: Uuid) -> Option<Applied> {
        let node = self.nodes.get(&id)?;
        if !node.in_trash {
            return None;
        }
        let owner = node.owner;
        let trash_batch = node.last_batch;
        let mut tx = self.begin(owner, owner, "node:restore");
        if let Some(n) = self.nodes.get_mut(&id) {
            n.in_trash = false;
        }
        self.sets[owner].trashed_nodes.remove(&id);
        self.sets[owner].active_nodes.insert(id);
        self.node_op(&mut tx, id, op::NODE_RESTORE, &[("inTrash", json!(true))]);
        Tx::entry(&mut tx.nodes, id, EntryKind::Full);
        let touching: Vec<Uuid> = self
            .out_links
            .get(&id)
            .into_iter()
            .flatten()
            .chain(self.in_links.get(&id).into_iter().flatten())
            .copied()
            .collect();
        let mut affected = vec![id];
        for lid in touching {
            let Some(l) = self.links.get(&lid) else {
                continue;
            };
            let other = if l.source == id { l.target } else { l.source };
            if l.in_trash && l.last_batch == trash_batch && self.node_active(&other) {
                affected.push(l.target);
                self.restore_link_in(&mut tx, lid);
            }
        }
        affected.extend(self.primary_parents(&id));
        self.cascade(&mut tx, affected);
        Some(self.commit(tx))
    }

    fn restore_link_in(&mut self, tx: &mut Tx, lid: Uuid) {
        let Some(lm) = self.links.get_mut(&lid) else {
            return;
        };
        lm.in_trash = false;
        let owner = lm.owner;
        self.sets[owner].trashed_links.remove(&lid);
        self.sets[owner].active_links.insert(lid);
        self.link_op(tx, lid, op::LINK_RESTORE, &[("inTrash", json!(true))]);
        Tx::entry(&mut tx.links, lid, EntryKind::Full);
    }

    fn purge_link_in(&mut self, tx: &mut Tx, lid: Uuid, memo: &mut HashMap<Uuid, Vec<Uuid>>) {
        let Some(l) = self.links.get(&lid) else {
            return;
        };
        let pre = self.link_roots(l, memo);
        let (owner, source, target, guard) = (l.owner, l.source, l.target, l.version);
        let mut inverse = Map::new();
        if let Value::Object(m) = l.full_json(&[]) {
            inverse = m;
            inverse.remove("shareRoots");
        }
        if let Some(gone) = self.links.remove(&lid) {
            self.link_order.remove(&(gone.created_time, lid));
        }
        if let Some(s) = self.out_links.get_mut(&source) {
            s.remove(&lid);
        }
        if let Some(s) = self.in_links.get_mut(&target) {
            s.remove(&lid);
        }
        self.pairs.remove(&pair(source, target));
        self.sets[owner].active_links.remove(&lid);
        self.sets[owner].trashed_links.remove(&lid);
        // A purge is an op on the entity too, so it takes the next version (DECISIONS #11).
        self.deleted_links.push((lid, guard + 1, owner));
        let mut forward = Map::new();
        forward.insert("deleted".into(), json!(true));
        forward.insert("version".into(), json!(guard + 1));
        self.push_op(tx, op::LINK_DELETE, lid, forward, inverse, guard);
        let e = Tx::entry(&mut tx.links, lid, EntryKind::Delete);
        e.pre_roots = pre;
        e.deleted_version = guard + 1;
    }

    /// `node:delete`: purges a trashed node and every link touching it.
    pub fn delete_node(&mut self, id: Uuid) -> Option<Applied> {
        let node = self.nodes.get(&id)?;
        if !node.in_trash {
            return None; // cant_delete_active_node
        }
        let owner = node.owner;
        let mut tx = self.begin(owner, owner, "node:delete");
        let mut memo = HashMap::new();
        let pre = self.roots_of(id, &mut memo);
        let touching: Vec<Uuid> = self
            .out_links
            .get(&id)
            .into_iter()
            .flatten()
            .chain(self.in_links.get(&id).into_iter().flatten())
            .copied()
            .collect();
        let mut affected = Vec::new();
        for lid in touching {
            if let Some(l) = self.links.get(&lid) {
                if !l.in_trash {
                    affected.push(l.target);
                }
            }
            self.purge_link_in(&mut tx, lid, &mut memo);
        }
        let node = self.nodes.remove(&id)?;
        self.node_order.remove(&(node.created_time.clone(), id));
        self.out_links.remove(&id);
        self.in_links.remove(&id);
        self.sets[owner].trashed_nodes.remove(&id);
        self.sets[owner].active_nodes.remove(&id);
        self.deleted_nodes.push((id, node.version + 1, owner));
        let mut inverse = Map::new();
        if let Value::Object(m) = node.api_json(&self.users[owner], &[]) {
            inverse = m;
            inverse.remove("shareRoots");
            inverse.remove("access");
        }
        let mut forward = Map::new();
        forward.insert("deleted".into(), json!(true));
        forward.insert("version".into(), json!(node.version + 1));
        self.push_op(&mut tx, op::NODE_DELETE, id, forward, inverse, node.version);
        let e = Tx::entry(&mut tx.nodes, id, EntryKind::Delete);
        e.pre_roots = pre;
        e.deleted_version = node.version + 1;
        self.cascade(&mut tx, affected);
        Some(self.commit(tx))
    }

    /// `link:update`: changes the type (0 primary, 1 secondary) of an active link.
    pub fn update_link_type(&mut self, lid: Uuid, kind: u8) -> Option<Applied> {
        let l = self.links.get(&lid)?;
        if !self.link_active(l) || l.kind == kind {
            return None;
        }
        let (owner, target, old) = (l.owner, l.target, l.kind);
        let mut tx = self.begin(owner, owner, "link:update");
        if let Some(lm) = self.links.get_mut(&lid) {
            lm.kind = kind;
        }
        self.link_op(&mut tx, lid, op::LINK_TYPE, &[("type", json!(old))]);
        self.cascade(&mut tx, vec![target]);
        Some(self.commit(tx))
    }

    /// `link:trash` of an active link.
    pub fn trash_link(&mut self, lid: Uuid) -> Option<Applied> {
        let l = self.links.get(&lid)?;
        if l.in_trash {
            return None;
        }
        let (owner, target) = (l.owner, l.target);
        let mut tx = self.begin(owner, owner, "link:trash");
        let mut memo = HashMap::new();
        self.trash_link_in(&mut tx, lid, &mut memo);
        self.cascade(&mut tx, vec![target]);
        Some(self.commit(tx))
    }

    /// `link:restore` of a trashed link whose two ends are active.
    pub fn restore_link(&mut self, lid: Uuid) -> Option<Applied> {
        let l = self.links.get(&lid)?;
        if !l.in_trash || !self.node_active(&l.source) || !self.node_active(&l.target) {
            return None;
        }
        let (owner, target) = (l.owner, l.target);
        let mut tx = self.begin(owner, owner, "link:restore");
        self.restore_link_in(&mut tx, lid);
        self.cascade(&mut tx, vec![target]);
        Some(self.commit(tx))
    }

    /// `link:delete`: purges a trashed link.
    pub fn delete_link(&mut self, lid: Uuid) -> Option<Applied> {
        let l = self.links.get(&lid)?;
        if !l.in_trash {
            return None;
        }
        let owner = l.owner;
        let mut tx = self.begin(owner, owner, "link:delete");
        let mut memo = HashMap::new();
        self.purge_link_in(&mut tx, lid, &mut memo);
        Some(self.commit(tx))
    }

    /// `node:publish`: gives the node a public token; `branch` decides whether the token opens
    /// the whole branch or the root alone.
    pub fn publish_node(&mut self, id: Uuid, branch: bool) -> Option<Applied> {
        let node = self.nodes.get(&id)?;
        if node.in_trash {
            return None;
        }
        let owner = node.owner;
        let mut tx = self.begin(owner, owner, "node:publish");
        const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
        let token: String = (0..10)
            .map(|_| ALPHABET[self.rng.gen_range(0..ALPHABET.len())] as char)
            .collect();
        let n = self.nodes.get_mut(&id)?;
        let old_token = json!(n.public_token);
        let old_branch = json!(n.public_branch);
        n.public_token = Some(token);
        n.public_branch = branch;
        self.node_op(
            &mut tx,
            id,
            op::NODE_PUBLISH,
            &[("publicToken", old_token), ("publicBranch", old_branch)],
        );
        Some(self.commit(tx))
    }
}
