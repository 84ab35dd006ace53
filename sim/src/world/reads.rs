//! The reads of the world: `graph:get`, `branch:get`, `history:page`, `trash:page` pages and
//! the `/truth` document, as documented or as a [`ReadShape`] says.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use std::sync::Arc;

use serde_json::{json, Value};
use uuid::Uuid;

use super::*;
use crate::model::{Link, Node};

impl World {
    /// Visible, non-trashed nodes of a user in page order (createdTime, then id: DECISIONS #6).
    fn page_nodes<'a>(&'a self, ids: impl Iterator<Item = &'a Node>) -> Vec<&'a Node> {
        let mut v: Vec<&Node> = ids.filter(|n| !n.in_trash).collect();
        v.sort_by(|a, b| a.created_time.cmp(&b.created_time).then(a.id.cmp(&b.id)));
        v
    }

    fn page_links<'a>(&'a self, ids: impl Iterator<Item = &'a Link>) -> Vec<&'a Link> {
        let mut v: Vec<&Link> = ids.filter(|l| self.link_active(l)).collect();
        v.sort_by(|a, b| a.created_time.cmp(&b.created_time).then(a.id.cmp(&b.id)));
        v
    }

    /// Which part of the list "all nodes, then all links" (DECISIONS #6) the page at `offset`
    /// holds: its node and link index ranges, and whether more follow. At most `limit` objects,
    /// and at most `read_shape.page_cap` when a cap is set.
    fn window(
        &self,
        nodes: usize,
        links: usize,
        limit: usize,
        offset: usize,
    ) -> (Range<usize>, Range<usize>, bool) {
        let limit = match self.read_shape.page_cap {
            0 => limit,
            cap => limit.min(cap),
        };
        let total = nodes + links;
        let (start, end) = (offset.min(total), offset.saturating_add(limit).min(total));
        (
            start.min(nodes)..end.min(nodes),
            start.max(nodes) - nodes..end.max(nodes) - nodes,
            end < total,
        )
    }

    /// A page's answer from its objects.
    fn page_json<'a>(
        &self,
        nodes: impl Iterator<Item = &'a Node>,
        links: impl Iterator<Item = &'a Link>,
        has_more: bool,
    ) -> Value {
        let mut memo = HashMap::new();
        let nodes_out: Vec<Value> = nodes
            .map(|n| {
                let roots = self.roots_of(n.id, &mut memo);
                n.api_json(&self.users[n.owner], &roots)
            })
            .collect();
        let links_out: Vec<Value> = links.map(Link::api_json).collect();
        json!({"ok": true, "hasMore": has_more, "nodes": nodes_out, "links": links_out})
    }

    /// One page over the list "all nodes, then all links" (see [`World::window`]).
    fn page(&self, nodes: &[&Node], links: &[&Link], limit: usize, offset: usize) -> Value {
        let (n, l, more) = self.window(nodes.len(), links.len(), limit, offset);
        self.page_json(nodes[n].iter().copied(), links[l].iter().copied(), more)
    }

    /// `graph:get`: the caller's whole graph, paged.
    pub fn graph_page(&mut self, user: usize, limit: i64, offset: i64) -> Result<Value, ApiError> {
        let (limit, offset) = check_range(limit, offset, 5000)?;
        let key = (
            user,
            self.next_op_id,
            self.stats.mutations,
            self.nodes.len(),
            self.links.len(),
        );
        let listing = match &self.listing {
            Some(l) if l.key == key => Arc::clone(l),
            _ => {
                // Already in page order (`page_nodes` / `page_links` order, without their sort).
                let nodes = self
                    .node_order
                    .iter()
                    .filter(|(_, id)| {
                        self.nodes
                            .get(id)
                            .is_some_and(|n| n.owner == user && !n.in_trash)
                    })
                    .map(|(_, id)| *id)
                    .collect();
                let links = self
                    .link_order
                    .iter()
                    .filter(|(_, id)| {
                        self.links
                            .get(id)
                            .is_some_and(|l| l.owner == user && self.link_active(l))
                    })
                    .map(|(_, id)| *id)
                    .collect();
                let l = Arc::new(Listing { key, nodes, links });
                self.listing = Some(Arc::clone(&l));
                l
            }
        };
        // Only the page's own objects are looked up.
        let (n, l, more) = self.window(listing.nodes.len(), listing.links.len(), limit, offset);
        Ok(self.page_json(
            listing.nodes[n].iter().filter_map(|id| self.nodes.get(id)),
            listing.links[l].iter().filter_map(|id| self.links.get(id)),
            more,
        ))
    }

    /// `branch:get`: the branch under `root` (a node id visible to the caller, or a public token).
    pub fn branch_page(
        &self,
        user: usize,
        root: &str,
        limit: i64,
        offset: i64,
    ) -> Result<Value, ApiError> {
        let (limit, offset) = check_range(limit, offset, 5000)?;
        let root_node = match Uuid::parse_str(root) {
            Ok(id) => match self.nodes.get(&id) {
                Some(n) if n.owner == user && !n.in_trash => n,
                _ => return Err(ApiError::new("not_found.node_not_found", "Node not found")),
            },
            Err(_) => match self
                .nodes
                .values()
                .find(|n| !n.in_trash && n.public_token.as_deref() == Some(root))
            {
                Some(n) => n,
                None => {
                    return Err(ApiError::new(
                        "bad_request.branch_not_found",
                        "Branch not found",
                    ))
                }
            },
        };
        let by_token = root_node.owner != user || Uuid::parse_str(root).is_err();
        let mut members: BTreeSet<Uuid> = BTreeSet::new();
        members.insert(root_node.id);
        if !by_token || root_node.public_branch {
            // Descendants are the sources that point at a node (facts §2.2, DECISIONS #15).
            let mut stack = vec![root_node.id];
            while let Some(n) = stack.pop() {
                for lid in self.in_links.get(&n).into_iter().flatten() {
                    if let Some(l) = self.links.get(lid) {
                        if self.link_active(l) && members.insert(l.source) {
                            stack.push(l.source);
                        }
                    }
                }
            }
        }
        let nodes = self.page_nodes(members.iter().filter_map(|id| self.nodes.get(id)));
        let links = self.page_links(
            self.links
                .values()
                .filter(|l| members.contains(&l.source) && members.contains(&l.target)),
        );
        Ok(self.page(&nodes, &links, limit, offset))
    }

    /// `history:page`: newest batch first (DECISIONS #4; oldest first with
    /// `read_shape.history_oldest_first`), scoped by GRAPH + branch root or USER + uid, over
    /// the newest `read_shape.history_retention` batches of the scope when that is set.
    pub fn history_page(
        &self,
        user: usize,
        scope_type: &str,
        scope_id: &str,
        limit: i64,
        offset: i64,
    ) -> Result<Value, ApiError> {
        self.history_select(user, scope_type, scope_id, limit, offset)
            .map(|page| page.to_json())
    }

    /// [`World::history_page`]'s batches, chosen without writing them out: the server holds
    /// the world's lock only for this, and writes the page after releasing it.
    pub fn history_select(
        &self,
        user: usize,
        scope_type: &str,
        scope_id: &str,
        limit: i64,
        offset: i64,
    ) -> Result<HistoryPage, ApiError> {
        let (limit, offset) = check_range(limit, offset, 1000)?;
        let filter: Box<dyn Fn(&Batch) -> bool> = match scope_type {
            "GRAPH" => {
                let id = Uuid::parse_str(scope_id).map_err(|_| INVALID_SCOPE)?;
                let known = self
                    .nodes
                    .get(&id)
                    .map(|n| n.owner == user)
                    .unwrap_or(false)
                    || self
                        .deleted_nodes
                        .iter()
                        .any(|(d, _, o)| *d == id && *o == user);
                if !known {
                    return Err(INVALID_SCOPE);
                }
                Box::new(move |b: &Batch| b.owner == user && b.roots.contains(&id))
            }
            "USER" => {
                if scope_id != self.users[user].uid {
                    return Err(INVALID_SCOPE);
                }
                Box::new(move |b: &Batch| b.actor == user)
            }
            _ => return Err(INVALID_SCOPE),
        };
        let matching: Vec<&Arc<Batch>> = self.batches.iter().filter(|b| filter(b)).collect();
        // Retention keeps the newest batches of the scope's list, whatever order it is paged in.
        let kept = match self.read_shape.history_retention {
            0 => &matching[..],
            n => &matching[matching.len().saturating_sub(n)..],
        };
        let ordered: Box<dyn Iterator<Item = &&Arc<Batch>>> =
            if self.read_shape.history_oldest_first {
                Box::new(kept.iter())
            } else {
                Box::new(kept.iter().rev())
            };
        let batches: Vec<(Arc<Batch>, Value)> = ordered
            .skip(offset)
            .take(limit)
            .map(|b| (Arc::clone(b), actor_json(&self.users[b.actor])))
            .collect();
        let has_more = kept.len() > offset.saturating_add(batches.len());
        Ok(HistoryPage { batches, has_more })
    }

    /// `trash:page`: the caller's trashed nodes, then trashed links, each by `lastEditedTime`
    /// then id, in the shapes of facts §6.3.
    pub fn trash_page(&self, user: usize, limit: i64, offset: i64) -> Result<Value, ApiError> {
        let (limit, offset) = check_range(limit, offset, 1000)?;
        let mut nodes: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.owner == user && n.in_trash)
            .collect();
        nodes.sort_by(|a, b| {
            a.last_edited_time
                .cmp(&b.last_edited_time)
                .then(a.id.cmp(&b.id))
        });
        let mut links: Vec<&Link> = self
            .links
            .values()
            .filter(|l| l.owner == user && l.in_trash)
            .collect();
        links.sort_by(|a, b| {
            a.last_edited_time
                .cmp(&b.last_edited_time)
                .then(a.id.cmp(&b.id))
        });
        let total = nodes.len() + links.len();
        let end = offset.saturating_add(limit).min(total);
        let (mut nodes_out, mut links_out) = (Vec::new(), Vec::new());
        for i in offset.min(total)..end {
            if i < nodes.len() {
                let n = nodes[i];
                let owner = &self.users[n.owner];
                nodes_out.push(json!({"id": n.id.to_string(), "title": n.title, "status": n.status, "inTrash": true,
                    "lastBatchID": n.last_batch.to_string(), "version": n.version, "lastEditedTime": n.last_edited_time,
                    "ownerUsername": owner.username, "ownerEmail": owner.email}));
            } else {
                let l = links[i - nodes.len()];
                links_out.push(json!({"id": l.id.to_string(), "source": l.source.to_string(), "target": l.target.to_string(),
                    "type": l.kind, "version": l.version, "inTrash": true, "lastBatchID": l.last_batch.to_string()}));
            }
        }
        Ok(json!({"ok": true, "hasMore": end < total, "nodes": nodes_out, "links": links_out}))
    }

    fn batch_json(&self, b: &Batch) -> Value {
        batch_json(b, actor_json(&self.users[b.actor]))
    }

    /// The ground truth as `GET /truth` serves it.
    pub fn truth(&self, with_history: bool) -> Value {
        let mut memo = HashMap::new();
        let mut nodes: Vec<&Node> = self.nodes.values().collect();
        nodes.sort_by_key(|n| n.seq);
        let nodes: Vec<Value> = nodes
            .into_iter()
            .map(|n| {
                let roots = self.roots_of(n.id, &mut memo);
                let mut v = n.api_json(&self.users[n.owner], &roots);
                if let Value::Object(m) = &mut v {
                    m.insert("inTrash".into(), json!(n.in_trash));
                    m.insert("publicBranch".into(), json!(n.public_branch));
                    m.insert("ownerUid".into(), json!(self.users[n.owner].uid));
                }
                v
            })
            .collect();
        let mut links: Vec<&Link> = self.links.values().collect();
        links.sort_by(|a, b| a.created_time.cmp(&b.created_time).then(a.id.cmp(&b.id)));
        let links: Vec<Value> = links
            .into_iter()
            .map(|l| {
                let roots = self.link_roots(l, &mut memo);
                let mut v = l.full_json(&roots);
                if let Value::Object(m) = &mut v {
                    m.insert("ownerUid".into(), json!(self.users[l.owner].uid));
                }
                v
            })
            .collect();
        let deleted = |v: &[(Uuid, u64, usize)]| -> Vec<Value> {
            v.iter()
                .map(|(id, ver, o)| json!({"id": id.to_string(), "version": ver, "ownerUid": self.users[*o].uid}))
                .collect()
        };
        let trashed_nodes: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.in_trash)
            .map(|n| n.id.to_string())
            .collect();
        let trashed_links: Vec<String> = self
            .links
            .values()
            .filter(|l| l.in_trash)
            .map(|l| l.id.to_string())
            .collect();
        let transitions: Vec<Value> = self
            .transitions
            .iter()
            .map(|t| {
                json!({"nodeId": t.node_id.to_string(), "from": t.from, "to": t.to, "version": t.version,
                       "batchId": t.batch_id.to_string(), "opId": t.op_id, "ts": t.ts, "cause": t.cause})
            })
            .collect();
        let mut out = json!({
            "users": self.users.iter().map(|u| json!({"uid": u.uid, "username": u.username, "email": u.email})).collect::<Vec<_>>(),
            "nodes": nodes,
            "links": links,
            "deleted": {"nodes": deleted(&self.deleted_nodes), "links": deleted(&self.deleted_links)},
            "trashed": {"nodes": trashed_nodes, "links": trashed_links},
            "transitions": transitions,
            "stats": {"mutations": self.stats.mutations, "ops": self.stats.ops, "batches": self.batches.len(),
                      "lastOpId": self.next_op_id - 1},
        });
        if with_history {
            let batches: Vec<Value> = self
                .batches
                .iter()
                .map(|b| {
                    let mut v = self.batch_json(b);
                    if let Value::Object(m) = &mut v {
                        m.insert("ownerUid".into(), json!(self.users[b.owner].uid));
                        m.insert("mutation".into(), json!(b.mutation));
                        m.insert(
                            "roots".into(),
                            json!(b.roots.iter().map(|r| r.to_string()).collect::<Vec<_>>()),
                        );
                    }
                    v
                })
                .collect();
            out["batches"] = Value::Array(batches);
        }
        out
    }
}

/// Validates `limit` (1..=max) and `offset` (>= 0), as the read events do.
fn check_range(limit: i64, offset: i64, max: i64) -> Result<(usize, usize), ApiError> {
    if !(1..=max).contains(&limit) || offset < 0 {
        return Err(OUT_OF_RANGE);
    }
    // Both were just checked to be non-negative and small enough for usize.
    Ok((limit as usize, offset as usize))
}

/// A `history:page` answer: the batches chosen under the world's lock, written out after.
#[derive(Debug)]
pub struct HistoryPage {
    /// Each batch with its actor as the API shows it.
    batches: Vec<(Arc<Batch>, Value)>,
    has_more: bool,
}

impl HistoryPage {
    /// The ack payload.
    pub fn to_json(&self) -> Value {
        let out: Vec<Value> = self
            .batches
            .iter()
            .map(|(b, actor)| batch_json(b, actor.clone()))
            .collect();
        json!({"ok": true, "hasMore": self.has_more, "batches": out})
    }
}

fn actor_json(actor: &User) -> Value {
    json!({"username": actor.username, "email": actor.email})
}

/// A batch in the shape of facts §7.
fn batch_json(b: &Batch, actor: Value) -> Value {
    json!({
        "batchId": b.id.to_string(),
        "actor": actor,
        "ts": b.ts,
        "undone": false,
        "ops": b.ops.iter().map(|o| json!({
            "id": o.id,
            "type": o.kind,
            "entityId": o.entity_id.to_string(),
            "forwardPatch": o.forward,
            "inversePatch": o.inverse,
            "guard": {"Version": o.guard_version},
            "createdTime": o.created_time,
        })).collect::<Vec<_>>(),
    })
}
